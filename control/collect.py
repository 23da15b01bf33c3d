"""Demonstration collection: the control loop runs a task's scripted expert with the recorder on.

Episode i uses seed ``seed + i`` for both ``env.reset`` and the expert, and each episode is simulated in a fresh
env, so an episode's arrays depend on its seed alone: the store is bit-identical for any number of worker
processes (episodes are written in seed order as they arrive).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.jobs import CollectJob, JobError
from stlflow.control.loop import run_episode
from stlflow.control.recorder import EpisodeRecorder
from stlflow.control.tasks import get_task
from stlflow.control.workers import parallel_map

WRITE_BATCH = 16  # episodes per store commit


def collect_episode(job: tuple[str, int, dict[str, Any] | None]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the scripted expert of task ``job[0]`` for episode seed ``job[1]`` (env kwargs ``job[2]``); returns the
    recorded (arrays, attrs)."""
    name, seed, env_kwargs = job
    task = get_task(name)
    env = task.make_env(env_kwargs)
    try:
        expert = env.unwrapped.make_expert(int(seed))
        recorder = EpisodeRecorder(
            attrs={"source": "expert", "env_id": task.env_id},
            extra_attrs=lambda _result: {"mode": str(expert.mode), "style": jsonable(expert.style)},
        )
        run_episode(env, expert, int(seed), hook=recorder)
        return recorder.episode()
    finally:
        env.close()


def jsonable(value: Any) -> Any:
    """Numpy scalars/arrays inside a dict or list -> plain Python (store attributes are JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def collect(job: CollectJob) -> Any:
    """Record ``job.episodes`` expert episodes (seeds ``job.seed ..``) of ``job.task`` into a new EpisodeStore at
    ``job.out`` (an existing store is replaced only with ``job.overwrite``). Returns the store opened for reading
    (the writer lock is released: another process may calibrate it at once)."""
    from stlflow.datasets import EpisodeStore

    if job.episodes < 1:
        raise JobError(f"episodes must be >= 1, got {job.episodes}")
    if job.workers < 1:
        raise JobError(f"workers must be >= 1, got {job.workers}")
    out = Path(job.out)
    if out.exists() and not job.overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=true to replace it")
    task = get_task(job.task)
    meta = task.metadata(job.env_kwargs)
    store = EpisodeStore.create(
        str(out), dt=meta["dt"], overwrite=job.overwrite,
        attrs={**meta, "source": "expert", "first_seed": int(job.seed), "episodes": int(job.episodes),
               "signal_convention": "signal_<name>[t] is info['signals'][name] after executing action[t]"},
    )
    jobs = [(task.name, job.seed + i, dict(job.env_kwargs or {})) for i in range(job.episodes)]
    batch: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = []

    def flush() -> None:  # one commit per few episodes: a crash loses at most a batch, never corrupts
        if batch:
            store.add_episodes([a for a, _ in batch], [m for _, m in batch])
            batch.clear()

    chunk = max(1, min(8, job.episodes // (4 * job.workers)))  # fewer round trips for many short episodes
    # results arrive in seed order, so the store is the same for any number of workers
    try:
        for episode in parallel_map(collect_episode, jobs, workers=job.workers, desc=f"collect {task.env_id}",
                                    unit="ep", progress=job.progress, chunksize=chunk):
            batch.append(episode)
            if len(batch) >= WRITE_BATCH:
                flush()
        flush()
    finally:
        store.close()  # release the writer lock (committed batches stay readable after a failure)
    return EpisodeStore.open(out)
