"""Demonstration collection: the control loop runs a task's scripted expert with the recorder on.

Episode i uses seed ``seed + i`` for both ``env.reset`` and the expert, and each episode is simulated in a fresh
env, so an episode's arrays depend on its seed alone: the store is bit-identical for any number of worker
processes (episodes are written in seed order as they arrive).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.loop import run_episode
from stlflow.control.recorder import EpisodeRecorder

WRITE_BATCH = 16  # episodes per store commit


def init_worker() -> None:
    """Worker-process set-up: one compute thread (2 processes x 2 threads on 2 cores ran 15-60x slower)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # read by torch when a task imports it later (the expert loop does not need it)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None, render_mode: str | None = None) -> Any:
    """``gym.make`` of a registered stlflow task id (imports :mod:`stlflow.envs` to register them)."""
    import gymnasium as gym

    import stlflow.envs  # noqa: F401  (registers the ids)

    kwargs = dict(env_kwargs or {})
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as err:
        from stlflow.envs import TASKS

        raise ValueError(f"unknown env id {env_id!r}; stlflow tasks: {TASKS}") from err


def resolve_env_id(env: str) -> str:
    """A short task name (``crossing``) or a gymnasium id (``stlflow/Crossing-v0``) -> the gymnasium id."""
    from stlflow.envs import TASKS

    return TASKS.get(env, env)


def env_metadata(env_id: str, env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store-level attributes of a task: id, dt (s), rules (parametric STL), rule defaults, discrete mask."""
    env = make_env(env_id, env_kwargs)
    try:
        u = env.unwrapped
        return {
            "env_id": env_id,
            "env_kwargs": dict(env_kwargs or {}),
            "dt": float(u.dt),
            "rules": u.rules,
            "rule_defaults": {k: float(v) for k, v in dict(u.rule_defaults).items()},
            "rule_list": _jsonable(getattr(u, "rule_list", {})),  # name -> STL text of each conjunct
            "discrete_action_mask": [bool(b) for b in np.asarray(u.discrete_action_mask).reshape(-1)],
            "max_steps": int(getattr(u, "max_steps", 0) or 0),
        }
    finally:
        env.close()


def collect_episode(env_id: str, seed: int, env_kwargs: dict[str, Any] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the scripted expert of ``env_id`` for episode ``seed``; returns the recorded (arrays, attrs)."""
    env = make_env(env_id, env_kwargs)
    try:
        expert = env.unwrapped.make_expert(int(seed))
        recorder = EpisodeRecorder(
            attrs={"source": "expert", "env_id": env_id},
            extra_attrs=lambda _result: {"mode": str(expert.mode), "style": _jsonable(expert.style)},
        )
        run_episode(env, expert, int(seed), hook=recorder)
        return recorder.episode()
    finally:
        env.close()


def _collect_star(args: tuple) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return collect_episode(*args)


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays inside a style dict -> plain Python (store attributes are JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def collect(
    env: str,
    episodes: int,
    out: str | Path,
    *,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> Any:
    """Record ``episodes`` expert episodes (seeds ``seed .. seed+episodes-1``) of ``env`` into a new EpisodeStore.

    Args:
        env: task name (``crossing``, ``pickplace``) or gymnasium id.
        episodes: number of episodes (>= 1).
        out: path of the EpisodeStore (zarr directory) to create.
        seed: seed of the first episode.
        workers: worker processes (1 = in this process); the output does not depend on it.
        overwrite: replace an existing store at ``out`` (otherwise that is an error).
        env_kwargs: keyword arguments for ``gym.make``.
        progress: show a progress bar.

    Returns the open EpisodeStore.
    """
    from tqdm import tqdm

    from stlflow.datasets import EpisodeStore

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=true to replace it")
    env_id = resolve_env_id(env)
    meta = env_metadata(env_id, env_kwargs)
    store = EpisodeStore.create(
        str(out), dt=meta["dt"], overwrite=overwrite,
        attrs={**meta, "source": "expert", "first_seed": int(seed), "episodes": int(episodes),
               "signal_convention": "signal_<name>[t] is info['signals'][name] after executing action[t]"},
    )
    jobs = [(env_id, seed + i, env_kwargs) for i in range(episodes)]
    bar = tqdm(total=episodes, desc=f"collect {env_id}", unit="ep", disable=not progress)
    batch: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = []

    def flush() -> None:  # one commit per few episodes: a crash loses at most a batch, never corrupts
        if batch:
            store.add_episodes([a for a, _ in batch], [m for _, m in batch])
            batch.clear()

    def take(episode: tuple[dict[str, np.ndarray], dict[str, Any]]) -> None:
        batch.append(episode)
        bar.update(1)
        if len(batch) >= WRITE_BATCH:
            flush()

    if workers == 1:
        for job in jobs:
            take(_collect_star(job))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=init_worker) as pool:
            # map() yields in submission (= seed) order; chunks keep the per-task overhead small.
            chunk = max(1, min(8, episodes // (4 * workers)))
            for episode in pool.map(_collect_star, jobs, chunksize=chunk):
                take(episode)
    flush()
    bar.close()
    return store

