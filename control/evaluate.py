"""Closed-loop evaluation: a controller on a task env in lock-step over N seeds, in parallel worker processes.

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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.collect import init_worker, make_env, resolve_env_id
from stlflow.control.controllers import CONTROLLERS, make_controller
from stlflow.control.loop import run_episode

EXPERT = "expert"  # evaluate the task's scripted expert (no policy): the reference row of every table

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
def _load_policy(ref: str) -> Any:
    if ref not in _POLICY_CACHE:
        from stlflow.policy import Policy

        policy = Policy.load(ref, map_location="cpu")
        policy.eval()
        _POLICY_CACHE[ref] = policy
    return _POLICY_CACHE[ref]


def evaluate_episode(policy: Any, env_id: str, seed: int, controller: str = "receding",
                     controller_kw: dict[str, Any] | None = None, *, delay: int = 0, max_steps: int | None = None,
                     stl_params: dict[str, float] | None = None, env_kwargs: dict[str, Any] | None = None,
                     render: bool = False) -> dict[str, Any]:
    """Run one episode and return its record (see the module docstring); ``frames`` is added when rendering."""
    env = make_env(env_id, env_kwargs, render_mode="rgb_array" if render else None)
    try:
        u = env.unwrapped
        params = {**{k: float(v) for k, v in u.rule_defaults.items()}, **dict(stl_params or {})}
        if controller == EXPERT:
            ctrl = u.make_expert(int(seed))
        else:
            if isinstance(policy, (str, os.PathLike)):
                policy = _load_policy(str(policy))
            kw = dict(controller_kw or {})
            names = list(getattr(policy, "param_names", []))
            if names and kw.get("params") is None:  # a controllable policy is asked for the measured parameters
                missing = [n for n in names if n not in params]
                if missing:
                    raise KeyError(f"the policy is conditioned on {names}; give values for {missing} in stl_params")
                kw["params"] = {n: params[n] for n in names}
            ctrl = make_controller(controller, policy, seed=int(seed), **kw)
        result = run_episode(env, ctrl, int(seed), delay=delay, max_steps=max_steps, render=render)
        signals = {k: np.asarray(v, dtype=np.float64) for k, v in u.signals(result.obs).items()}
        rho, per_rule = rule_robustness(u.rules, dict(getattr(u, "rule_list", {}) or {}), signals, u.dt, params)
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


def _episode_star(job: tuple) -> dict[str, Any]:
    policy_ref, env_id, seed, controller, controller_kw, options = job
    return evaluate_episode(policy_ref, env_id, seed, controller, controller_kw, **options)


# ---------------------------------------------------------------------------------------------- metrics
def _percentiles(values_ms: np.ndarray, prefix: str) -> dict[str, float]:
    if values_ms.size == 0:
        return {f"{prefix}_{q}_ms": float("nan") for q in ("p50", "p95", "p99", "max")}
    p50, p95, p99 = np.percentile(values_ms, [50, 95, 99])
    return {f"{prefix}_p50_ms": float(p50), f"{prefix}_p95_ms": float(p95), f"{prefix}_p99_ms": float(p99),
            f"{prefix}_max_ms": float(values_ms.max())}


def aggregate(records: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregate metrics of per-episode records (see the module docstring for the names)."""
    if not records:
        raise ValueError("no episodes to aggregate")
    n = len(records)
    lat = np.concatenate([np.asarray(r["latency_s"], dtype=np.float64) for r in records]) * 1e3
    warm = np.concatenate([np.asarray(r["latency_s"][1:], dtype=np.float64) for r in records]) * 1e3
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
    metrics.update(_percentiles(lat, "latency"))
    metrics.update(_percentiles(warm, "latency_warm"))
    if all("residual_mean" in r for r in records):
        metrics["residual_mean"] = float(np.nanmean([r["residual_mean"] for r in records]))
        metrics["cold_ticks_per_episode"] = float(np.mean([r["cold_ticks"] for r in records]))
    ran = nfe[nfe > 0]
    reset_nfe = float(sum(r.get("reset_nfe", 0) for r in records))
    metrics["nfe_per_action"] = float((nfe.sum() + reset_nfe) / nfe.size)
    planned = np.asarray([r["reset_latency_s"] for r in records if r.get("reset_nfe", 0) > 0]) * 1e3
    if planned.size:
        metrics.update(_percentiles(planned, "reset_plan"))
    metrics["nfe_per_call"] = float(ran.mean()) if ran.size else 0.0
    metrics["nfe_per_tick_max"] = float(nfe.max())
    return metrics


# ---------------------------------------------------------------------------------------------- the runner
def evaluate(
    policy: Any,
    env: str,
    episodes: int,
    *,
    seed: int = 0,
    workers: int = 1,
    controller: str = "receding",
    controller_kw: dict[str, Any] | None = None,
    delay: int = 0,
    max_steps: int | None = None,
    stl_params: dict[str, float] | None = None,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    keep_ticks: bool = True,
) -> dict[str, Any]:
    """Evaluate a controller over ``episodes`` seeds and return a report.

    Args:
        policy: a ``stlflow.policy.Policy``, a checkpoint directory, or None with ``controller="expert"``.
        env: task name or gymnasium id.
        episodes: number of episodes, seeds ``seed .. seed+episodes-1``.
        workers: worker processes (1 = this process). An in-memory policy is saved to a temporary
            checkpoint for the workers.
        controller: one of :data:`stlflow.control.controllers.CONTROLLERS` or ``"expert"``.
        controller_kw: keyword arguments of :func:`stlflow.control.controllers.make_controller`.
        delay: injected observation-to-action delay in ticks.
        max_steps: cap on episode length (None: the env's limit).
        stl_params: STL parameters for the satisfaction metric (default: the env's ``rule_defaults``).
        keep_ticks: keep every tick's latency (ms) and NFE in the report (for the histogram).

    Returns ``{"env_id", "controller", "controller_kw", "delay", "seed", "metrics", "episodes", "ticks"}``.
    """
    from tqdm import tqdm

    if controller not in (*CONTROLLERS, EXPERT):
        raise ValueError(f"unknown controller {controller!r}; choose one of {(*CONTROLLERS, EXPERT)}")
    if episodes < 1 or workers < 1:
        raise ValueError(f"episodes and workers must be >= 1, got episodes={episodes}, workers={workers}")
    if controller != EXPERT and policy is None:
        raise ValueError(f"controller {controller!r} needs a policy or a checkpoint directory")
    env_id = resolve_env_id(env)
    options = {"delay": int(delay), "max_steps": max_steps, "stl_params": dict(stl_params or {}),
               "env_kwargs": dict(env_kwargs or {})}
    controller_kw = dict(controller_kw or {})
    seeds = [int(seed) + i for i in range(int(episodes))]
    bar = tqdm(total=len(seeds), desc=f"eval {controller}", unit="ep", disable=not progress)
    records: list[dict[str, Any]] = []
    tmp: tempfile.TemporaryDirectory | None = None
    was_training = bool(getattr(policy, "training", False))
    try:
        if workers == 1:
            if hasattr(policy, "eval"):
                policy.eval()
            for s in seeds:
                records.append(evaluate_episode(policy, env_id, s, controller, controller_kw, **options))
                bar.update(1)
        else:
            import multiprocessing as mp

            ref = policy
            if controller != EXPERT and not isinstance(policy, (str, os.PathLike)):
                tmp = tempfile.TemporaryDirectory(prefix="stlflow-eval-")
                policy.save(tmp.name)
                ref = tmp.name
            ref = None if controller == EXPERT else str(ref)
            jobs = [(ref, env_id, s, controller, controller_kw, options) for s in seeds]
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                     initializer=init_worker) as pool:
                for record in pool.map(_episode_star, jobs):
                    records.append(record)
                    bar.update(1)
    finally:
        bar.close()
        if tmp is not None:
            tmp.cleanup()
        if was_training:
            policy.train()
    report = {
        "env_id": env_id,
        "controller": controller,
        "controller_kw": controller_kw,
        "delay": int(delay),
        "seed": int(seed),
        "stl_params": dict(stl_params or {}),
        "metrics": aggregate(records),
        "episodes": [{k: v for k, v in r.items() if k not in ("latency_s", "nfe")} for r in records],
    }
    if keep_ticks:
        report["ticks"] = {"latency_ms": [x * 1e3 for r in records for x in r["latency_s"]],
                           "nfe": [x for r in records for x in r["nfe"]]}
    return report


def evaluate_policy(policy: Any, env_id: str, episodes: int, seed: int = 0, workers: int = 1,
                    controller: str = "receding", **kw: Any) -> dict[str, float]:
    """The trainer's periodic-evaluation callback: aggregate metrics only (always has ``"success_rate"``).

    ``kw``: ``controller_kw``, ``delay``, ``max_steps``, ``stl_params``, ``env_kwargs`` of :func:`evaluate`; any
    other keyword goes into ``controller_kw`` (e.g. ``k=2``, ``steps=8``).
    """
    own = {k: kw.pop(k) for k in ("controller_kw", "delay", "max_steps", "stl_params", "env_kwargs") if k in kw}
    own["controller_kw"] = {**dict(own.get("controller_kw") or {}), **kw}
    report = evaluate(policy, env_id, episodes, seed=seed, workers=workers, controller=controller,
                      keep_ticks=False, **own)
    return report["metrics"]


# ---------------------------------------------------------------------------------------------- outputs
def run_label(report: dict[str, Any]) -> str:
    """A short row label: controller and its main options (``rti k=2``, ``receding Ta=8``)."""
    kw = report.get("controller_kw", {})
    parts = [report["controller"]] + [f"{k}={v}" for k, v in sorted(kw.items()) if v is not None]
    if report.get("delay"):
        parts.append(f"delay={report['delay']}")
    return " ".join(parts)


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """The comparison table of several evaluation reports (one row each)."""
    head = ("| controller | success | STL sat. | collision | NFE/call | NFE/action | p50 ms | p99 ms | "
            "p99 warm ms | max ms | reset plan p99 ms | episodes |")
    rows = [head, "|" + "---|" * 12]
    for r in reports:
        m = r["metrics"]
        plan = f"{m['reset_plan_p99_ms']:.2f}" if "reset_plan_p99_ms" in m else "-"
        rows.append(
            f"| {run_label(r)} | {m['success_rate']:.1%} | {m['stl_satisfaction_rate']:.1%} | "
            f"{m['collision_rate']:.1%} | {m['nfe_per_call']:.1f} | {m['nfe_per_action']:.2f} | "
            f"{m['latency_p50_ms']:.2f} | {m['latency_p99_ms']:.2f} | {m['latency_warm_p99_ms']:.2f} | "
            f"{m['latency_max_ms']:.2f} | {plan} | {int(m['episodes'])} |")
    return "\n".join(rows) + "\n"


def write_report(reports: list[dict[str, Any]], out_dir: str | Path, title: str = "closed-loop evaluation"
                 ) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the plots (``success_vs_nfe.png``, ``latency_hist.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md",
             "success_vs_nfe": out / "success_vs_nfe.png", "latency_hist": out / "latency_hist.png"}
    paths["json"].write_text(json.dumps(reports, indent=1, default=json_default))
    env_ids = sorted({r["env_id"] for r in reports})
    paths["markdown"].write_text(f"# {title}: {', '.join(env_ids)}\n\n{markdown_table(reports)}")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        m = r["metrics"]
        ax.scatter(max(m["nfe_per_action"], 1e-2), m["success_rate"], s=40)
        ax.annotate(run_label(r), (max(m["nfe_per_action"], 1e-2), m["success_rate"]), fontsize=7,
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
    lats = [np.asarray(r.get("ticks", {}).get("latency_ms", []), dtype=np.float64) for r in reports]
    positive = np.concatenate([x[x > 0] for x in lats]) if lats else np.array([])
    if positive.size:
        bins = np.logspace(math.log10(positive.min()), math.log10(positive.max() * 1.01), 50)
        for r, x in zip(reports, lats):
            if x.size:
                ax.hist(np.clip(x, positive.min(), None), bins=bins, histtype="step", label=run_label(r))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("per-tick latency of act() (ms)")
    ax.set_ylabel("ticks")
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


def write_videos(policy: Any, env: str, seeds: list[int], out_dir: str | Path, *, controller: str = "receding",
                 controller_kw: dict[str, Any] | None = None, delay: int = 0, max_steps: int | None = None,
                 env_kwargs: dict[str, Any] | None = None) -> list[Path]:
    """Re-run ``seeds`` in this process with off-screen rendering and write one MP4 per episode (imageio)."""
    import imageio.v2 as imageio

    env_id = resolve_env_id(env)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe = make_env(env_id, env_kwargs)
    dt = float(probe.unwrapped.dt)
    probe.close()
    paths = []
    for s in seeds:
        record = evaluate_episode(policy, env_id, s, controller, controller_kw, delay=delay, max_steps=max_steps,
                                  env_kwargs=env_kwargs, render=True)
        path = out / f"{env_id.split('/')[-1]}_{controller}_seed{s}_{'ok' if record['success'] else 'fail'}.mp4"
        with imageio.get_writer(path, fps=max(1, round(1.0 / dt)), macro_block_size=1) as writer:
            for frame in record["frames"]:
                writer.append_data(np.asarray(frame))
        paths.append(path)
    return paths
