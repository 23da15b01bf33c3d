"""MuJoCo task environments with STL rules (``stlflow.envs``).

Importing this package registers the gymnasium ids:

- ``stlflow/Crossing-v0``  -- planar robot in a corridor, pedestrians crossing (:mod:`stlflow.envs.crossing`)
- ``stlflow/PickPlace-v0`` -- Cartesian end-effector, binary gripper, two target zones (:mod:`stlflow.envs.pickplace`)
- ``stlflow/Maze2d-<maze>-v1`` and ``stlflow/Maze2d-<maze>-dense-v1`` for maze umaze | medium | large -- D4RL's
  maze2d rebuilt (:mod:`stlflow.envs.maze2d`): the id is D4RL's task name ``maze2d-...-v1`` with a capital M
  under the ``stlflow/`` namespace, with D4RL's time limits (300 / 600 / 800 steps)

Every task env (``env.unwrapped``) exposes:

- ``dt`` (seconds per control step), ``rules`` (parametric STL text), ``rule_defaults`` (dict),
- ``signals(obs) -> dict[str, ndarray]``: the STL signals from observations shaped (T, Do) or (B, T, Do);
  each step's ``info["signals"]`` holds the same values for the observation that step returned,
- ``discrete_action_mask``: bool array (Da,), True where the action channel is discrete (values {-1, +1}),
- ``make_expert(seed) -> Expert``: the task's scripted expert (see :class:`stlflow.envs.base.Expert`).
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from stlflow.envs.base import Expert, make_env, make_expert
from stlflow.envs.maze2d import MAZE2D_TASKS as _MAZE2D_TASKS
from stlflow.envs.maze2d import gym_id as _maze2d_gym_id

__all__ = ["Expert", "make_env", "make_expert"]

_ENTRY_POINTS = {
    "stlflow/Crossing-v0": "stlflow.envs.crossing:CrossingEnv",
    "stlflow/PickPlace-v0": "stlflow.envs.pickplace:PickPlaceEnv",
}

for _id, _entry in _ENTRY_POINTS.items():
    if _id not in registry:
        register(id=_id, entry_point=_entry)

for _task, (_maze, _reward, _steps) in _MAZE2D_TASKS.items():
    if _maze2d_gym_id(_task) not in registry:
        register(
            id=_maze2d_gym_id(_task),
            entry_point="stlflow.envs.maze2d:Maze2dEnv",
            max_episode_steps=_steps,
            kwargs={"maze": _maze, "reward_type": _reward},
        )
