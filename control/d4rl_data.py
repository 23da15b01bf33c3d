"""D4RL maze2d data and evaluation: the dataset generator and rollouts scored like D4RL.

:func:`generate` follows D4RL's maze2d data protocol on the rebuilt environment (:mod:`stlflow.envs.maze2d`):
one continuous stream of ``samples`` steps. A random target (a random start cell + U(-0.1, 0.1)) is drawn,
the point is reset, and the waypoint controller (:mod:`stlflow.envs.maze2d_expert`) drives towards the
target's cell with Gaussian action noise (std 0.5, then clipped to [-1, 1]). A step is ``terminal`` when the
controller reports the target solved, or when ``max_steps`` steps (the task's episode length) passed since
the target was drawn; after a terminal step a new random target is drawn and the stream goes on from where
the point is. Rewards are relabelled afterwards for the evaluation goal, as D4RL did, from each row's own
observation (before its action): sparse ``|xy - goal| <= 0.5``, dense ``exp(-|xy - goal|)``.

One deliberate difference: D4RL's script kept the pre-step observation after a terminal step (the row after a
terminal repeats the previous observation while the simulation moved on); here every row holds the state the
action was applied in, so ``observations[i + 1]`` is always the true successor and ``infos/qpos``/``qvel`` equal
the observation.

HDF5 layout (D4RL's keys): ``observations`` float32 (N, 4), ``actions`` float32 (N, 2), ``rewards`` float32 (N,),
``terminals`` bool (N,), ``timeouts`` bool (N,) (all False: the stream has no time-outs), ``infos/goal``
float32 (N, 2) (the current random target), ``infos/qpos`` float32 (N, 2), ``infos/qvel`` float32 (N, 2), and a
``metadata`` group of scalars (task, seed, generator, versions, noise). The file is written under a temporary
name in the destination folder and renamed at the end: an error or an interrupt leaves nothing at ``out``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stlflow.datasets.d4rl_refs import normalized_score
from stlflow.datasets.store_io import fsync_path
from stlflow.envs.maze2d import (
    DT,
    MAZE2D_TASKS,
    RULE_LIST,
    Maze2dSim,
    goal_cell,
    reward,
    rule_defaults,
    signals,
)
from stlflow.envs.maze2d_expert import Maze2dExpert, WaypointController

GENERATOR_VERSION = "1"
ACTION_NOISE = 0.5  # std of the Gaussian noise added to the controller's action (D4RL's --noisy)


def _task(task: str) -> tuple[str, str, int]:
    if task not in MAZE2D_TASKS:
        raise ValueError(f"unknown task {task!r}; the D4RL tasks stlflow can simulate: {', '.join(MAZE2D_TASKS)}")
    return MAZE2D_TASKS[task]


def _stream(maze: str, max_steps: int, samples: int, seed: int, progress: bool) -> dict[str, np.ndarray]:
    """The raw stream (observations float64, actions, terminals, goals) of D4RL's collection loop."""
    rng_env, rng_ctrl, rng_noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    sim = Maze2dSim(maze)
    controller = WaypointController(sim.open_cells, rng_ctrl)
    obs_buf = np.empty((samples, 4))
    act_buf = np.empty((samples, 2))
    goal_buf = np.empty((samples, 2))
    terminals = np.zeros(samples, dtype=bool)
    noise = rng_noise.normal(0.0, ACTION_NOISE, size=(samples, 2))
    target = sim.random_cell_point(rng_env)  # D4RL: set_target() before the first reset
    obs = sim.reset(rng_env)
    since_target = 0
    bar = tqdm(total=samples, desc=f"generate maze2d-{maze}", unit="step", disable=not progress)
    for i in range(samples):
        action, done = controller.get_action(obs[:2], obs[2:], target)
        action = np.clip(action + noise[i], -1.0, 1.0)
        done = done or since_target >= max_steps
        obs_buf[i], act_buf[i], goal_buf[i], terminals[i] = obs, action, target, done
        obs = sim.step(action)
        since_target += 1
        if done:
            target, since_target = sim.random_cell_point(rng_env), 0
        if (i + 1) % 10_000 == 0:
            bar.update(10_000)
    bar.update(samples - bar.n)
    bar.close()
    return {"observations": obs_buf, "actions": act_buf, "terminals": terminals, "infos/goal": goal_buf}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (overwrite=true on the command line) to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; give a file path such as {out / 'maze2d.hdf5'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder {out.parent} does not exist; create it first")


def _write_hdf5(path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value, compression="gzip", compression_opts=4, chunks=True)
        group = f.create_group("metadata")
        for key, value in meta.items():
            group[key] = value
            f.attrs[key] = value


def generate(task: str, out: str | os.PathLike, samples: int, seed: int = 0, progress: bool = True,
             overwrite: bool = False) -> Path:
    """Generate a D4RL-style maze2d dataset of ``samples`` steps for ``task`` (e.g. ``maze2d-umaze-v1``) at ``out``.

    The reward type of ``task`` (sparse or dense) sets the relabelled ``rewards``; the stream itself depends only
    on the maze and ``seed``. Returns ``out``. Raises ValueError (unknown task: the message lists the known ones;
    ``samples`` < 1), FileExistsError (``out`` exists and not ``overwrite``) or FileNotFoundError (no such folder).
    """
    maze, reward_type, max_steps = _task(task)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    out = Path(out)
    _check_out(out, overwrite)
    raw = _stream(maze, max_steps, int(samples), int(seed), progress)
    obs = raw["observations"].astype(np.float32)
    sim_goal = goal_cell(maze)
    arrays = {
        "observations": obs,
        "actions": raw["actions"].astype(np.float32),
        "rewards": reward(obs[:, :2].astype(np.float64), sim_goal, reward_type).astype(np.float32),
        "terminals": raw["terminals"],
        "timeouts": np.zeros(len(obs), dtype=bool),
        "infos/goal": raw["infos/goal"].astype(np.float32),
        "infos/qpos": obs[:, :2].copy(),
        "infos/qvel": obs[:, 2:].copy(),
    }
    meta = {
        "task": task, "maze": maze, "reward_type": reward_type, "seed": int(seed), "samples": int(samples),
        "max_steps": max_steps, "action_noise_std": ACTION_NOISE, "eval_goal": sim_goal.astype(np.float32),
        "generator": "stlflow.control.d4rl_data", "generator_version": GENERATOR_VERSION,
        "stlflow_version": metadata.version("stlflow"),
        "provenance": "stlflow's rebuild of D4RL maze2d and its waypoint-controller data protocol, not D4RL's file",
    }
    tmp = out.parent / f".{out.name}.generating-{os.getpid()}-{secrets.token_hex(4)}.stlflow-tmp"
    try:
        _write_hdf5(tmp, arrays, meta)
        fsync_path(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(out.parent)
    return out


def stl_robustness(obs: np.ndarray, maze: str, params: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Robustness at t = 0 of each maze rule and of their conjunction ``"all"`` for trajectories ``obs`` (B, T, 4)
    -> {rule: (B,)}; ``params`` default to :func:`stlflow.envs.maze2d.rule_defaults`."""
    from stlflow.stl import parse

    values = {**rule_defaults(maze), **(params or {})}
    sig = signals(obs, maze)
    out = {name: parse(text).robustness(sig, dt=DT, params=values).numpy() for name, text in RULE_LIST.items()}
    out["all"] = np.min(np.stack(list(out.values())), axis=0)
    return out


def rollout_returns(task: str, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int,
                    rule_params: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Run ``episodes`` evaluation episodes of ``task`` with policy ``act`` (obs (4,) float64 -> action (2,)),
    as D4RL scores them: reset to a random cell, the fixed goal, ``max_steps`` steps, never terminating.

    If ``act`` has a callable ``reset`` attribute it is called before each episode. Episodes are drawn from one
    generator seeded with ``seed`` (the same seed gives the same starts).

    Returns ``{"returns": (E,) with the task's reward, "returns_sparse", "returns_dense": (E,), "normalized": (E,)
    (D4RL's normalised score of "returns"), "success": (E,) bool (inside the goal disc at the last step),
    "reached": (E,) bool (at any step), "stl": {rule: (E,) robustness}, "stl_satisfied": (E,) bool (all rules,
    robustness >= 0), "observations": (E, T + 1, 4)}``.
    """
    maze, reward_type, steps = _task(task)
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    sim = Maze2dSim(maze)
    rng = np.random.default_rng(seed)
    reset = getattr(act, "reset", None)
    traj = np.empty((episodes, steps + 1, 4))
    for e in range(episodes):
        obs = sim.reset(rng)
        if callable(reset):
            reset()
        traj[e, 0] = obs
        for t in range(steps):
            obs = sim.step(np.asarray(act(obs), dtype=np.float64).reshape(-1))
            traj[e, t + 1] = obs
    after = traj[:, 1:, :2]  # the reward of a step is computed on the observation it returns
    result: dict[str, Any] = {f"returns_{k}": reward(after, sim.goal, k).sum(axis=1) for k in ("sparse", "dense")}
    result["returns"] = result[f"returns_{reward_type}"]
    result["normalized"] = normalized_score(task, result["returns"])
    dist = np.linalg.norm(after - sim.goal, axis=-1)
    result["success"], result["reached"] = dist[:, -1] <= 0.5, (dist <= 0.5).any(axis=1)
    result["stl"] = stl_robustness(traj, maze, rule_params)
    result["stl_satisfied"] = result["stl"]["all"] >= 0
    result["observations"] = traj
    return result


def reference_policy(task: str, policy: str, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """The policies behind D4RL's reference scores: ``"expert"`` (one waypoint controller for all episodes, as
    D4RL's script ran it), ``"expert-replan"`` (the controller re-planning every episode) or ``"random"`` (uniform
    actions in [-1, 1]). Their random numbers are seeded from ``seed`` but independent of the episode starts that
    :func:`rollout_returns` draws with the same ``seed``."""
    maze = _task(task)[0]
    # a stream of its own: rollout_returns draws the starts from default_rng(seed)
    policy_seed = int(np.random.SeedSequence((seed, 1)).generate_state(1)[0])
    if policy == "random":
        rng = np.random.default_rng(policy_seed)
        return lambda obs: rng.uniform(-1.0, 1.0, size=2)
    if policy in ("expert", "expert-replan"):
        sim = Maze2dSim(maze)
        return Maze2dExpert(sim.open_cells, sim.goal, policy_seed, replan_each_episode=policy == "expert-replan")
    raise ValueError(f"unknown reference policy {policy!r}; use 'expert', 'expert-replan' or 'random'")
