"""``stlflow d4rl run``: train an offline-RL agent on a D4RL-format file, evaluate it, report normalised scores.

One process per seed, each with one torch thread (:func:`stlflow.control.workers.parallel_map`). Each seed
writes ``OUT/seed_<s>/``:

- ``metrics.csv``: one row per evaluation, appended and flushed to disk as it is written (step, training
  seconds, ms per update, mean/std return and normalised score over the episodes, goal success and STL rule
  satisfaction where the task has them, the agent's losses averaged since the previous row);
- ``checkpoint/``: the agent after the latest evaluation (:func:`stlflow.policy.agents.save_agent`, atomic and
  verified), with the training seconds so far.

``resume=true`` continues every seed from its checkpoint and keeps the metric rows up to that checkpoint's step
(a row written after it, by a run killed between the two writes, is dropped and redone). Finished seeds are
not retrained. ``OUT/report.json`` and ``OUT/report.md`` (:mod:`stlflow.control.d4rl_report`) give "last" and
"best" scores over seeds, the published anchors, the evaluation env and whether the comparison is exact.

Evaluation:

- maze2d (``maze2d-{umaze,medium,large}[-dense]-v1``): stlflow's rebuild of D4RL's maze2d
  (:func:`stlflow.control.d4rl_data.rollout_returns`: D4RL's reset, goal, reward and horizon, and the task's STL
  rules); comparison "exact".
- locomotion (``{halfcheetah,hopper,walker2d}-<dataset>-v2``, the user's own D4RL file): gymnasium's
  ``<Robot>-v4``, the model and reward of D4RL's v2 data on the maintained MuJoCo bindings; comparison
  "approximate". ``env_version=v5`` evaluates on ``-v5`` instead, whose reward differs from the data's.
- ``env=<gymnasium id>``: any other env with the file's dimensions; without reference scores raw returns are
  reported, with a warning.

Bad input (unknown task or agent, missing or truncated file, dimensions that do not match the env, an existing
output folder without ``resume``) is refused before anything is written.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.d4rl_report import CORL_LAST, aggregate, read_metrics, write_report
from stlflow.control.workers import limit_threads, parallel_map
from stlflow.datasets.d4rl_refs import d4rl_task_settings, reference_scores
from stlflow.policy.checkpoint import CONFIG_FILE, atomic_write_text

__all__ = ["D4RLRunJob", "EvalTarget", "eval_target", "evaluate_agent", "gym_returns", "known_tasks", "load_data",
           "run"]

_ROBOTS = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
_DATASETS = ("random", "medium", "expert", "medium-replay", "full-replay", "medium-expert")
_LOCOMOTION = re.compile(r"^(halfcheetah|hopper|walker2d)-([a-z-]+)-v2$")
RUN_FILE = "run.json"


def known_tasks() -> list[str]:
    """The D4RL task names ``run`` can evaluate without ``env=``: maze2d and the v2 locomotion datasets."""
    from stlflow.envs.maze2d import MAZE2D_TASKS

    return sorted(MAZE2D_TASKS) + [f"{r}-{d}-v2" for r in _ROBOTS for d in _DATASETS]


@dataclass(frozen=True)
class EvalTarget:
    """Where a task is evaluated: ``kind`` ("maze2d" or "gym"), the gymnasium ``env_id``, and how the scores
    compare with published ones (``comparison``: "exact", "approximate" or "none", and a ``note`` saying why)."""

    task: str
    env_id: str
    kind: str
    comparison: str
    note: str


def eval_target(task: str, env: str | None = None, env_version: str = "v4") -> EvalTarget:
    """The evaluation env of ``task``; ``env`` (a gymnasium id) overrides it. Raises ValueError for an unknown task
    (listing the known ones) and for a locomotion version other than v4 / v5."""
    from stlflow.envs.maze2d import MAZE2D_TASKS, gym_id

    if env:
        return EvalTarget(task, str(env), "gym", "none", f"env={env} chosen by the user; scores are not comparable "
                          "with published ones unless that env reproduces the data's")
    if task in MAZE2D_TASKS:
        return EvalTarget(task, gym_id(task), "maze2d", "exact", "stlflow's rebuild of D4RL maze2d: same MJCF, "
                          "reset, goal, reward and horizon, on the maintained MuJoCo bindings")
    m = _LOCOMOTION.match(task)
    if m and m.group(2) in _DATASETS:
        if env_version not in ("v4", "v5"):
            raise ValueError(f"env_version must be v4 (D4RL v2's reward) or v5, got {env_version!r}")
        env_id = f"{_ROBOTS[m.group(1)]}-{env_version}"
        if env_version == "v5":
            return EvalTarget(task, env_id, "gym", "approximate", f"{env_id} changes the reward (and Walker2d's "
                              "foot friction) from D4RL's v2 data: asked for with env_version=v5")
        return EvalTarget(task, env_id, "gym", "approximate", f"gymnasium {env_id} has the model and reward of "
                          "D4RL's v2 data, on the new MuJoCo bindings (D4RL used mujoco-py)")
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(known_tasks())} "
                     "(or give env=<gymnasium id> to evaluate another task's file)")


@dataclass
class D4RLRunJob:
    """Settings of one ``stlflow d4rl run`` (see the verb's --help for each)."""

    task: str
    data: str
    out: str
    agent: str = "ofql"
    steps: int = 1_000_000
    eval_every: int = 5000
    eval_episodes: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    workers: int = 2
    resume: bool = False
    batch_size: int = 256
    agent_settings: dict[str, Any] = field(default_factory=dict)
    env: str | None = None
    env_version: str = "v4"
    eval_seed: int = 1_000_000
    max_minutes: float | None = None  # per seed, training time only; a final evaluation follows
    progress: bool = True

    def check(self) -> None:
        for name in ("steps", "eval_every", "eval_episodes", "workers", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(self.seeds)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 (or null), got {self.max_minutes}")


def load_data(task: str, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The file's transitions (``qlearning_dataset`` with the task's D4RL settings); ValueError when it is missing,
    truncated or lacks a key."""
    from stlflow.datasets.importers import qlearning_dataset

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data={p}: no such file (a D4RL-format HDF5 file; `stlflow d4rl generate` makes "
                                "maze2d ones)")
    try:
        return qlearning_dataset(p, **d4rl_task_settings(task))
    except KeyError as err:
        raise ValueError(f"data={p}: {err.args[0]}") from None


def _env_dims(env_id: str) -> tuple[int, int]:
    import gymnasium as gym

    import stlflow.envs  # noqa: F401 -- registers the stlflow/ ids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gymnasium's "v4 is out of date" notice: v4 is chosen on purpose
        try:
            env = gym.make(env_id)
        except Exception as err:  # noqa: BLE001 -- gymnasium raises several types for unknown or broken ids
            raise ValueError(f"cannot make the evaluation env {env_id!r}: {type(err).__name__}: {err}") from err
    try:
        return int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    finally:
        env.close()


def gym_returns(env_id: str, act, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns ``(episodes,)`` of ``act`` (obs (B, Do) -> actions (B, Da)) on gymnasium ``env_id``,
    the episodes run side by side (episode i reset with seed ``seed + i``) until terminated or truncated."""
    import gymnasium as gym

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        envs = [gym.make(env_id) for _ in range(episodes)]
    try:
        obs = np.stack([np.asarray(e.reset(seed=seed + i)[0], np.float64).ravel() for i, e in enumerate(envs)])
        returns, live = np.zeros(episodes), np.ones(episodes, bool)
        while live.any():
            idx = np.flatnonzero(live)
            actions = np.asarray(act(obs[idx]))
            for j, i in enumerate(idx):
                o, r, terminated, truncated, _ = envs[i].step(actions[j])
                obs[i], returns[i] = np.asarray(o).ravel(), returns[i] + float(r)
                live[i] = not (terminated or truncated)
        return returns
    finally:
        for e in envs:
            e.close()


def evaluate_agent(agent: Any, target: EvalTarget, episodes: int, seed: int) -> dict[str, Any]:
    """``{"returns": (E,), "success": (E,) | None, "stl_satisfied": (E,) | None}`` over ``episodes`` episodes."""
    if hasattr(agent, "reset_act_noise"):
        agent.reset_act_noise(seed)
    if target.kind == "maze2d":
        from stlflow.control.d4rl_data import rollout_returns

        res = rollout_returns(target.task, agent.act, episodes, seed)
        return {"returns": np.asarray(res["returns"], np.float64), "success": np.asarray(res["success"], float),
                "stl_satisfied": np.asarray(res["stl_satisfied"], float)}
    return {"returns": gym_returns(target.env_id, agent.act, episodes, seed), "success": None, "stl_satisfied": None}


# ------------------------------------------------------------------------------------------------ one seed
BASE_COLUMNS = ["step", "train_s", "eval_s", "ms_per_update", "return_mean", "return_std", "score_mean",
                "score_std", "success", "stl_satisfied"]


class _Metrics:
    """A seed's ``metrics.csv``: rows appended, flushed and fsynced one at a time."""

    def __init__(self, path: Path, rows: list[dict[str, Any]], columns: list[str] | None):
        self.path, self.rows, self.columns = path, rows, columns
        if columns:  # resume: keep the rows up to the checkpoint, rewritten atomically
            text = ",".join(columns) + "\n" + "".join(self._line(r) for r in rows)
            atomic_write_text(path, text)
        else:
            path.unlink(missing_ok=True)

    def _line(self, row: dict[str, Any]) -> str:
        return ",".join("" if row.get(c) is None else repr(float(row[c])) for c in self.columns) + "\n"

    def append(self, row: dict[str, Any]) -> None:
        new = self.columns is None
        if new:
            self.columns = BASE_COLUMNS + sorted(k for k in row if k not in BASE_COLUMNS)
        with open(self.path, "a") as f:
            f.write((",".join(self.columns) + "\n" if new else "") + self._line(row))
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)


def _start(job: D4RLRunJob, seed: int, data, seed_dir: Path):
    """(agent, metrics, training seconds so far) for a fresh or resumed seed."""
    from stlflow.policy.agents import load_agent, make_agent

    ckpt = seed_dir / "checkpoint"
    metrics_path = seed_dir / "metrics.csv"
    if job.resume and (ckpt / CONFIG_FILE).exists():
        agent, cfg = load_agent(ckpt)
        if cfg.get("task") != job.task or cfg.get("agent") != job.agent:
            raise ValueError(f"{ckpt} holds agent {cfg.get('agent')!r} on {cfg.get('task')!r}, not {job.agent!r} on "
                             f"{job.task!r}; resume with the same task and agent or choose another out")
        rows, columns = [], None
        if metrics_path.exists():
            rows = [r for r in read_metrics(metrics_path) if r["step"] is not None and r["step"] <= agent.steps]
            with open(metrics_path, newline="") as f:
                columns = next(csv.reader(f), None)
        return agent, _Metrics(metrics_path, rows, columns if rows else None), float(cfg.get("train_seconds", 0.0))
    agent = make_agent(job.agent, data.obs_dim, data.action_dim, seed=seed, **job.agent_settings)
    agent.prepare(data)
    return agent, _Metrics(metrics_path, [], None), 0.0


def _evaluate_row(agent, target: EvalTarget, job: D4RLRunJob, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = evaluate_agent(agent, target, job.eval_episodes, job.eval_seed + 1000 * seed)
    ret = res["returns"]
    row = {"step": agent.steps, "return_mean": float(ret.mean()), "return_std": float(ret.std())}
    refs = reference_scores(job.task)
    if refs is not None:
        score = 100.0 * (ret - refs[0]) / (refs[1] - refs[0])
        row.update(score_mean=float(score.mean()), score_std=float(score.std()))
    for key in ("success", "stl_satisfied"):
        if res[key] is not None:
            row[key] = float(np.mean(res[key]))
    row["eval_s"] = time.perf_counter() - t0
    return row


def _ms_per_action(agent, obs: np.ndarray, calls: int = 200) -> float:
    for i in range(10):
        agent.act(obs[i % len(obs)])
    t0 = time.perf_counter()
    for i in range(calls):
        agent.act(obs[i % len(obs)])
    return (time.perf_counter() - t0) / calls * 1e3


def run_seed(args: tuple[D4RLRunJob, EvalTarget, int]) -> dict[str, Any]:
    """Train and evaluate one seed (a worker's job); returns ``{"seed", "rows", "ms_per_action"}``."""
    from stlflow.policy.agents import Transitions, save_agent

    job, target, seed = args
    limit_threads(1)
    data = Transitions(load_data(job.task, job.data))
    seed_dir = Path(job.out) / f"seed_{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    agent, metrics, train_s = _start(job, seed, data, seed_dir)
    budget = None if job.max_minutes is None else job.max_minutes * 60.0
    sums: dict[str, float] = {}
    done_at_start = agent.steps
    interval_updates, interval_s = 0, 0.0
    while agent.steps < job.steps and (budget is None or train_s < budget):
        t0 = time.perf_counter()
        for k, v in agent.update(data.sample(job.batch_size, agent.generator)).items():
            sums[k] = sums.get(k, 0.0) + v
        dt = time.perf_counter() - t0
        train_s, interval_s, interval_updates = train_s + dt, interval_s + dt, interval_updates + 1
        final = agent.steps >= job.steps or (budget is not None and train_s >= budget)
        if agent.steps % job.eval_every == 0 or final:
            row = _evaluate_row(agent, target, job, seed)
            row.update(train_s=train_s, ms_per_update=interval_s / interval_updates * 1e3,
                       **{k: v / interval_updates for k, v in sums.items()})
            metrics.append(row)
            save_agent(agent, seed_dir / "checkpoint", {"task": job.task, "train_seconds": train_s})
            sums, interval_updates, interval_s = {}, 0, 0.0
            if job.progress:
                score = row.get("score_mean", row["return_mean"])
                print(f"[d4rl seed {seed}] step {agent.steps}: {score:.1f} ({row['eval_s']:.0f} s evaluation)",
                      file=sys.stderr, flush=True)
    if not metrics.rows or metrics.rows[-1]["step"] != agent.steps:  # a checkpoint without its row
        row = _evaluate_row(agent, target, job, seed)
        row.update(train_s=train_s)
        metrics.append(row)
        save_agent(agent, seed_dir / "checkpoint", {"task": job.task, "train_seconds": train_s})
    return {"seed": seed, "rows": metrics.rows, "updates_this_run": agent.steps - done_at_start,
            "agent_config": dict(agent.config),
            "ms_per_action": _ms_per_action(agent, data.obs[:64].numpy())}


# ------------------------------------------------------------------------------------------------ the job
def _check_out(job: D4RLRunJob, data_dims: tuple[int, int]) -> Path:
    out = Path(job.out)
    this = {"task": job.task, "agent": job.agent, "data": str(Path(job.data).resolve()), "dims": list(data_dims)}
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not job.resume:
            raise FileExistsError(f"out={out} exists and is not empty; resume=true continues that run, or choose "
                                  "another out")
        try:
            before = json.loads((out / RUN_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"out={out} holds no readable {RUN_FILE} ({err}): not a `stlflow d4rl run` folder"
                             ) from None
        diff = [k for k in this if before.get(k) != this[k]]
        if diff:
            raise ValueError(f"resume=true but {', '.join(f'{k}={this[k]!r} (was {before.get(k)!r})' for k in diff)}"
                             f" differ from the run in {out}")
    return out


def run(job: D4RLRunJob) -> dict[str, Any]:
    """Train ``job.agent`` for every seed, evaluate, write ``OUT/report.{json,md}``; returns the report dict."""
    from stlflow.policy.agents import AGENTS

    job.check()
    if job.agent not in AGENTS:
        raise ValueError(f"unknown agent {job.agent!r}; known agents: {', '.join(AGENTS)}")
    target = eval_target(job.task, job.env, job.env_version)
    data = load_data(job.task, job.data)
    dims = (int(np.prod(data["observations"].shape[1:])), int(np.prod(data["actions"].shape[1:])))
    env_dims = _env_dims(target.env_id)
    if dims != env_dims:
        raise ValueError(f"data={job.data} has observations of size {dims[0]} and actions of size {dims[1]}, but "
                         f"{target.env_id} has {env_dims[0]} and {env_dims[1]}: a file of another task?")
    # the agent's published per-task settings, under the user's; unknown settings fail here, before any writing
    job = replace(job, agent_settings={**AGENTS[job.agent].task_defaults(job.task), **job.agent_settings})
    AGENTS[job.agent](dims[0], dims[1], **job.agent_settings)
    del data
    out = _check_out(job, dims)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**asdict(job), "data": str(Path(job.data).resolve()), "dims": list(dims), "env_id": target.env_id}
    atomic_write_text(out / RUN_FILE, json.dumps(settings, indent=2) + "\n")
    jobs = [(job, target, int(s)) for s in job.seeds]
    results = list(parallel_map(run_seed, jobs, workers=min(job.workers, len(jobs)), threads_per_worker=1,
                                desc=f"d4rl {job.agent} seeds", unit="seed", progress=job.progress))
    return report(job, target, results)


def report(job: D4RLRunJob, target: EvalTarget, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the seeds' results and write ``report.json`` / ``report.md`` in ``job.out``."""
    scored = reference_scores(job.task) is not None
    summary = aggregate({r["seed"]: r["rows"] for r in results}, scored)
    rep = {"task": job.task, "agent": job.agent, "data": str(job.data), "env_id": target.env_id,
           "comparison": target.comparison, "comparison_note": target.note, "seeds": [r["seed"] for r in results],
           "eval_episodes": job.eval_episodes, "agent_settings": dict(job.agent_settings),
           "agent_config": results[0].get("agent_config", {}) if results else {},
           "anchors": CORL_LAST.get(job.task, {}), "ms_per_action": float(np.mean([r["ms_per_action"]
                                                                                   for r in results])),
           **summary}
    rep["steps"] = summary["steps"]
    if not scored:
        rep["warning"] = (f"no D4RL reference scores for task {job.task!r}: raw returns are reported, not "
                          "normalised scores")
        warnings.warn(rep["warning"], UserWarning, stacklevel=2)
    write_report(Path(job.out), rep)
    return rep
