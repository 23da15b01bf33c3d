"""The task registry: every verb, the pipeline and every benchmark look a task up here.

Adding a task means one module and one line::

    # control/tasks/reacher.py
    class ReacherTask(Task):
        name, env_id = "reacher", "stlflow/Reacher-v0"   # the env registered with gymnasium in stlflow.envs
        ...                                             # readers, guidance model, augmentation where it has them

    # here
    register_task(ReacherTask())

plus, for the command line, ``conf/env/reacher.yaml`` (the Hydra ``env=`` choice: ``name`` and env kwargs) and,
for calibration and augmentation, ``conf/stl/reacher.yaml``. Tests and user code may register tasks at run time
with :func:`register_task`.
"""

from __future__ import annotations

from stlflow.control.tasks.base import EnvInfo, Task, resolve_theta
from stlflow.control.tasks.crossing import CrossingTask
from stlflow.control.tasks.pickplace import PickPlaceTask

__all__ = ["TASKS", "EnvInfo", "Task", "get_task", "register_task", "resolve_theta"]

TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` to the registry under ``task.name`` (an existing name is an error unless ``replace``)."""
    if not task.name or not task.env_id:
        raise ValueError(f"{type(task).__name__} needs a name and an env_id")
    if task.name in TASKS and not replace:
        raise ValueError(f"a task named {task.name!r} is registered already ({TASKS[task.name]!r})")
    TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    """Remove a task registered at run time (tests)."""
    TASKS.pop(name, None)


def get_task(name: str | Task) -> Task:
    """The task named ``name`` (short name such as ``crossing``, or its gymnasium id); a clear error otherwise."""
    if isinstance(name, Task):
        return name
    if name in TASKS:
        return TASKS[name]
    for task in TASKS.values():
        if task.env_id == name:
            return task
    raise ValueError(f"unknown task {name!r}; tasks: {sorted(TASKS)} "
                     f"(env ids: {sorted(t.env_id for t in TASKS.values())})")


register_task(CrossingTask())
register_task(PickPlaceTask())
