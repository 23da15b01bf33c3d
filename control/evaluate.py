"""Closed-loop evaluation: a controller on a task env in lock-step over N seeds, in parallel worker
processes (:class:`~stlflow.control.jobs.EvalJob` -> :class:`Report`).

Episode i runs with seed ``seed + i`` (env reset and the controller's noise), in a fresh env, so its result does
not depend on the number of workers. Per episode the runner records success (the env's final
``info["success"]``), collision (any step's ``info["collision"]``), the STL robustness of the task's rules at
the given parameters (default: the env's ``rule_defaults``) over the signals of the whole trajectory from the
reset state to the last state (``env.signals(obs)``), the wall latency of every ``act`` call and its network
evaluations (``last_nfe``).

Aggregate metrics (:func:`aggregate`): ``success_rate``, ``stl_satisfaction_rate`` (robustness >= 0),
``stl_<rule>_rate`` per conjunct, ``collision_rate``, ``latency_p50_ms`` / ``p95`` / ``p99`` / ``max`` over all
ticks of all episodes, the same over warm ticks (every tick but each episode's first, as RTI-DP reports),
``nfe_per_action`` (network evaluations per executed action, one per tick, including any plan made in the
controller's ``reset``), ``nfe_per_call`` (mean over ticks that ran the network), ``nfe_per_tick_max``, and, when
the controller planned in ``reset`` (RTI ``plan_at_reset``), ``reset_plan_p50_ms`` / ``p95`` / ``p99`` / ``max``
(that plan is outside the ticks: the loop makes it before its first tick). Latencies are per-process wall
times; with several workers on a loaded machine they include contention, so time with ``workers=1`` and
``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.controllers import EXPERT, ControllerSpec
from stlflow.control.jobs import EvalJob, JobError
from stlflow.control.loop import run_episode
from stlflow.control.tasks import get_task
from stlflow.control.workers import parallel_map

_POLICY_CACHE: dict[str, Any] = {}
_SPEC_CACHE: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------- STL
def rule_robustness(rules: str, rule_list: dict[str, str] | None, signals: dict[str, np.ndarray], dt: float,
                    params: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Exact robustness at t = 0 of ``rules`` and of each named conjunct, on signals name -> (T,)."""
    import torch

    from stlflow.stl import parse

    def rho(text: str) -> float:
        if text not in _SPEC_CACHE:
            _SPEC_CACHE[text] = parse(text)
        spec = _SPEC_CACHE[text]
        sig = {k: torch.as_tensor(np.asarray(signals[k], dtype=np.float64))[None] for k in spec.signals}
        used = {k: float(v) for k, v in params.items() if k in spec.params}
        return float(spec.robustness(sig, dt=dt, params=used).reshape(-1)[0])

    return rho(rules), {name: rho(text) for name, text in (rule_list or {}).items()}


# ---------------------------------------------------------------------------------------------- one episode
def load_policy(ref: Any) -> Any:
    """A Policy as is, or the Policy of a checkpoint directory (loaded once per process, in eval mode)."""
    if not isinstance(ref, (str, os.PathLike)):
        return ref
    if str(ref) not in _POLICY_CACHE:
        from stlflow.policy import Policy

        policy = Policy.load(ref, map_location="cpu")
        policy.eval()
        _POLICY_CACHE[str(ref)] = policy
    return _POLICY_CACHE[str(ref)]


def policy_theta(policy: Any, theta: dict[str, float]) -> dict[str, float] | None:
    """The part of the resolved θ a conditioned policy is asked for (None: the policy is not conditioned)."""
    names = list(getattr(policy, "param_names", []) or [])
    if not names:
        return None
    missing = [n for n in names if n not in theta]
    if missing:
        raise JobError(f"the policy is conditioned on {names}; give values for {missing} in stl_params")
    return {n: theta[n] for n in names}


def evaluate_episode(job: EvalJob, seed: int, render: bool = False) -> dict[str, Any]:
    """Run one episode of ``job`` with ``seed`` and return its record (see the module docstring); ``frames`` is
    added when rendering."""
    task = get_task(job.task)
    spec = job.controller or ControllerSpec()
    env = task.make_env(job.env_kwargs, render_mode="rgb_array" if render else None)
    try:
        u = env.unwrapped
        theta = task.resolve_theta(job.stl_params)
        if spec.name == EXPERT:
            ctrl = spec.build(None, expert=u.make_expert(int(seed)))
        else:
            policy = load_policy(job.policy)
            ctrl = spec.build(policy, seed=int(seed), stl_params=policy_theta(policy, theta), delay=job.delay)
        loop_delay = 0 if getattr(ctrl, "handles_delay", False) else job.delay  # a controller that models it itself
        result = run_episode(env, ctrl, int(seed), delay=loop_delay, max_steps=job.max_steps, render=render)
        signals = {k: np.asarray(v, dtype=np.float64) for k, v in u.signals(result.obs).items()}
        rho, per_rule = rule_robustness(u.rules, dict(getattr(u, "rule_list", {}) or {}), signals, u.dt, theta)
        record = {
            "seed": int(seed),
            "length": result.length,
            "success": bool(result.success),
            "collision": bool(result.collision),
            "robustness": rho,
            "rule_robustness": per_rule,
            "latency_s": result.latency_s.tolist(),
            "nfe": result.nfe.tolist(),
            "return": float(result.reward.sum()),
            **action_change(result.action, getattr(u, "discrete_action_mask", None)),
        }
        log = getattr(ctrl, "log", None)
        if isinstance(log, dict) and "residual" in log:  # RTI telemetry: contraction is measured, not assumed
            res = np.asarray(log["residual"][-result.length:], dtype=np.float64)
            record["residual_mean"] = float(np.nanmean(res)) if np.isfinite(res).any() else float("nan")
            record["cold_ticks"] = int(np.sum(log["cold"][-result.length:]))
        # a plan made in reset (RTI plan_at_reset): outside the ticks, reported apart and counted in NFE/action
        record["reset_nfe"] = int(getattr(ctrl, "last_reset_nfe", 0) or 0)
        record["reset_latency_s"] = float(getattr(ctrl, "last_reset_latency_s", 0.0) or 0.0)
        if render:
            record["frames"] = result.frames
        return record
    finally:
        env.close()


def action_change(actions: np.ndarray, discrete_mask: Any = None) -> dict[str, float]:
    """Smoothness of the executed actions (T, Da), physical units: the Euclidean norm of the per-tick change of the
    continuous channels (discrete ones, e.g. a gripper, are left out), its mean and its max over the episode."""
    a = np.asarray(actions, dtype=np.float64)
    if discrete_mask is not None:
        a = a[:, ~np.asarray(discrete_mask, dtype=bool).reshape(-1)]
    if a.shape[0] < 2 or a.shape[1] == 0:
        return {"action_change_mean": 0.0, "action_change_max": 0.0}
    step = np.linalg.norm(np.diff(a, axis=0), axis=1)
    return {"action_change_mean": float(step.mean()), "action_change_max": float(step.max())}


def _episode_of(args: tuple[EvalJob, int]) -> dict[str, Any]:
    return evaluate_episode(*args)


# ---------------------------------------------------------------------------------------------- metrics
def percentiles(latency_s: np.ndarray, prefix: str) -> dict[str, float]:
    """``<prefix>_p50_ms`` / ``p95`` / ``p99`` / ``max`` of latencies in seconds (NaN when there are none)."""
    from stlflow.policy.rti import latency_summary

    return {f"{prefix}_{k}": v for k, v in latency_summary(latency_s).items() if k != "mean_ms"}


def aggregate(records: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregate metrics of per-episode records (see the module docstring for the names)."""
    if not records:
        raise ValueError("no episodes to aggregate")
    n = len(records)
    lat = np.concatenate([np.asarray(r["latency_s"], dtype=np.float64) for r in records])
    warm = np.concatenate([np.asarray(r["latency_s"][1:], dtype=np.float64) for r in records])
    nfe = np.concatenate([np.asarray(r["nfe"], dtype=np.float64) for r in records])
    metrics = {
        "episodes": float(n),
        "success_rate": sum(r["success"] for r in records) / n,
        "stl_satisfaction_rate": sum(r["robustness"] >= 0 for r in records) / n,
        "collision_rate": sum(r["collision"] for r in records) / n,
        "mean_length": float(np.mean([r["length"] for r in records])),
        "mean_robustness": float(np.mean([r["robustness"] for r in records])),
    }
    for name in records[0]["rule_robustness"]:
        metrics[f"stl_{name}_rate"] = sum(r["rule_robustness"][name] >= 0 for r in records) / n
    if all("action_change_mean" in r for r in records):  # mean over all ticks; the max: mean of episode maxima
        lengths = np.asarray([max(r["length"] - 1, 0) for r in records], dtype=np.float64)
        means = np.asarray([r["action_change_mean"] for r in records])
        metrics["action_change_mean"] = float((means * lengths).sum() / max(lengths.sum(), 1.0))
        metrics["action_change_max"] = float(np.mean([r["action_change_max"] for r in records]))
    metrics.update(percentiles(lat, "latency"))
    metrics.update(percentiles(warm, "latency_warm"))
    if all("residual_mean" in r for r in records):
        metrics["residual_mean"] = float(np.nanmean([r["residual_mean"] for r in records]))
        metrics["cold_ticks_per_episode"] = float(np.mean([r["cold_ticks"] for r in records]))
    ran = nfe[nfe > 0]
    reset_nfe = float(sum(r.get("reset_nfe", 0) for r in records))
    metrics["nfe_per_action"] = float((nfe.sum() + reset_nfe) / nfe.size)
    planned = np.asarray([r["reset_latency_s"] for r in records if r.get("reset_nfe", 0) > 0])
    if planned.size:
        metrics.update(percentiles(planned, "reset_plan"))
    metrics["nfe_per_call"] = float(ran.mean()) if ran.size else 0.0
    metrics["nfe_per_tick_max"] = float(nfe.max())
    return metrics


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class Report:
    """What :func:`evaluate` measured: ``metrics`` (aggregate, see the module docstring), ``episodes`` (one record
    each, without per-tick arrays), ``ticks`` (every tick's ``latency_ms`` and ``nfe`` when kept) and the job's
    description (``env_id``, ``controller`` spec, ``delay``, ``seed``, ``stl_params``)."""

    env_id: str
    controller: dict[str, Any]
    label: str
    delay: int
    seed: int
    stl_params: dict[str, float]
    metrics: dict[str, float]
    episodes: list[dict[str, Any]]
    ticks: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # set by callers (checkpoint path, guidance, ...)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("env_id", "controller", "label", "delay", "seed", "stl_params", "metrics",
                                           "episodes", "ticks")}
        return {**d, **self.extra}


def evaluate(job: EvalJob) -> Report:
    """Evaluate ``job.controller`` on ``job.task`` over ``job.episodes`` seeds (``job.seed ..``).

    With several workers an in-memory policy is saved to a temporary checkpoint for them. Bad input (unknown
    task, θ name, controller option; a policy missing) raises before any episode runs.
    """
    spec = job.controller or ControllerSpec()
    if job.episodes < 1 or job.workers < 1:
        raise JobError(f"episodes and workers must be >= 1, got episodes={job.episodes}, workers={job.workers}")
    if spec.name != EXPERT and job.policy is None:
        raise JobError(f"controller {spec.name!r} needs a policy or a checkpoint directory")
    task = get_task(job.task)
    theta = task.resolve_theta(job.stl_params)  # unknown θ names fail here, in the caller's process
    policy = None if spec.name == EXPERT else load_policy(job.policy)
    if policy is not None:
        policy_theta(policy, theta)
    job = replace(job, controller=spec, task=task.name, policy=policy)
    seeds = [int(job.seed) + i for i in range(int(job.episodes))]
    tmp: tempfile.TemporaryDirectory | None = None
    was_training = bool(getattr(policy, "training", False))
    try:
        if job.workers > 1 and policy is not None and not isinstance(job.policy, (str, os.PathLike)):
            tmp = tempfile.TemporaryDirectory(prefix="stlflow-eval-")
            policy.save(tmp.name)
            job = replace(job, policy=tmp.name)
        elif policy is not None:
            policy.eval()
        records = list(parallel_map(_episode_of, [(job, s) for s in seeds], workers=job.workers,
                                    desc=f"eval {spec.name}", unit="ep", progress=job.progress))
    finally:
        if tmp is not None:
            tmp.cleanup()
        if was_training:
            policy.train()
    ticks = {}
    if job.keep_ticks:
        ticks = {"latency_ms": [x * 1e3 for r in records for x in r["latency_s"]],
                 "nfe": [x for r in records for x in r["nfe"]]}
    return Report(env_id=task.env_id, controller=spec.as_dict(), label=spec.label() + (
        f" delay={job.delay}" if job.delay else ""), delay=int(job.delay), seed=int(job.seed),
        stl_params=dict(job.stl_params or {}), metrics=aggregate(records),
        episodes=[{k: v for k, v in r.items() if k not in ("latency_s", "nfe")} for r in records], ticks=ticks)


def evaluation_callback(task: str, episodes: int, seed: int = 0, workers: int = 1,
                        controller: ControllerSpec | None = None, **job: Any):
    """The trainer's periodic-evaluation callback ``fn(policy, step) -> metrics`` (always has ``success_rate``);
    ``job``: further :class:`EvalJob` fields (``delay``, ``max_steps``, ``stl_params``, ``env_kwargs``)."""

    def evaluate_policy(policy: Any, step: int = 0) -> dict[str, float]:
        report = evaluate(EvalJob(task, policy, controller, int(episodes), seed=int(seed), workers=int(workers),
                                  keep_ticks=False, **job))
        return report.metrics

    return evaluate_policy


# ---------------------------------------------------------------------------------------------- outputs
def plot_latency_hist(ax: Any, series: list[tuple[str, Any]], xlabel: str = "per-tick latency of act() (ms)") -> None:
    """Step histograms (log-log, shared log bins) of per-tick latencies in ms, one per (label, values)."""
    arrays = [(label, np.asarray(v, dtype=np.float64)) for label, v in series]
    positive = np.concatenate([x[x > 0] for _, x in arrays]) if arrays else np.array([])
    if positive.size:
        bins = np.logspace(math.log10(positive.min()), math.log10(positive.max() * 1.01), 40)
        for label, x in arrays:
            if x.size:
                ax.hist(np.clip(x, positive.min(), None), bins=bins, histtype="step", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ticks")


def markdown_table(reports: list[Report]) -> str:
    """The comparison table of several evaluation reports (one row each)."""
    head = ("| controller | success | STL sat. | collision | NFE/call | NFE/action | p50 ms | p99 ms | "
            "p99 warm ms | max ms | reset plan p99 ms | episodes |")
    rows = [head, "|" + "---|" * 12]
    for r in reports:
        m = r.metrics
        plan = f"{m['reset_plan_p99_ms']:.2f}" if "reset_plan_p99_ms" in m else "-"
        rows.append(
            f"| {r.label} | {m['success_rate']:.1%} | {m['stl_satisfaction_rate']:.1%} | "
            f"{m['collision_rate']:.1%} | {m['nfe_per_call']:.1f} | {m['nfe_per_action']:.2f} | "
            f"{m['latency_p50_ms']:.2f} | {m['latency_p99_ms']:.2f} | {m['latency_warm_p99_ms']:.2f} | "
            f"{m['latency_max_ms']:.2f} | {plan} | {int(m['episodes'])} |")
    return "\n".join(rows) + "\n"


def write_report(reports: list[Report], out_dir: str | Path, title: str = "closed-loop evaluation"
                 ) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the plots (``success_vs_nfe.png``, ``latency_hist.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md",
             "success_vs_nfe": out / "success_vs_nfe.png", "latency_hist": out / "latency_hist.png"}
    paths["json"].write_text(json.dumps([r.as_dict() for r in reports], indent=1, default=json_default))
    env_ids = sorted({r.env_id for r in reports})
    paths["markdown"].write_text(f"# {title}: {', '.join(env_ids)}\n\n{markdown_table(reports)}")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        m = r.metrics
        ax.scatter(max(m["nfe_per_action"], 1e-2), m["success_rate"], s=40)
        ax.annotate(r.label, (max(m["nfe_per_action"], 1e-2), m["success_rate"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per tick (= per executed action)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"success vs NFE per tick ({', '.join(env_ids)})")
    fig.tight_layout()
    fig.savefig(paths["success_vs_nfe"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_latency_hist(ax, [(r.label, r.ticks.get("latency_ms", [])) for r in reports])
    ax.set_title("per-tick latency")
    fig.tight_layout()
    fig.savefig(paths["latency_hist"], dpi=120)
    plt.close(fig)
    return paths


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays (anything else becomes its ``str``)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_videos(job: EvalJob, seeds: list[int], out_dir: str | Path) -> list[Path]:
    """Re-run ``seeds`` of ``job`` in this process with off-screen rendering; one MP4 per episode (imageio)."""
    import imageio.v2 as imageio

    task = get_task(job.task)
    spec = job.controller or ControllerSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        record = evaluate_episode(job, s, render=True)
        path = out / f"{task.env_id.split('/')[-1]}_{spec.name}_seed{s}_{'ok' if record['success'] else 'fail'}.mp4"
        with imageio.get_writer(path, fps=max(1, round(1.0 / task.info.dt)), macro_block_size=1) as writer:
            for frame in record["frames"]:
                writer.append_data(np.asarray(frame))
        paths.append(path)
    return paths
