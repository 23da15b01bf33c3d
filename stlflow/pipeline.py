"""The main job, stage by stage: demonstrations -> calibrated θ -> augmented data -> θ-conditioned policy -> loop.

``stlflow demo`` (:func:`run_demo`) runs every stage on one task of the registry (``env=crossing``, the default, or
``env=pickplace``; the task's own settings are ``tasks.<name>`` in ``conf/demo.yaml``) and writes a results folder.
Each stage is one typed job (:mod:`stlflow.control.jobs`), the same functions the verbs and the benchmarks call:

==========  =================================================================  =================================
stage       job -> function                                                    output
==========  =================================================================  =================================
collect     ``CollectJob`` -> :func:`stlflow.control.collect.collect`          ``data/demos.zarr``
calibrate   ``CalibrateJob`` -> :func:`stlflow.control.stl_data.calibrate`     ``stl_params`` per episode
augment     ``AugmentJob`` -> :func:`stlflow.control.stl_data.augment`         ``data/augmented.zarr``
train       ``TrainJob`` -> :func:`stlflow.control.training.train_policy`      ``policy/`` (θ-conditioned flow)
evaluate    ``EvalJob`` -> :func:`stlflow.control.evaluate.evaluate` (RTI) at  metrics and one record per episode
            each requested θ, with and without STL guidance; diversity and     per requested θ
            trajectories from extra closed-loop samples per start state
            (:func:`stlflow.demo_scene.scene_samples`, which keep the scene)
report      :mod:`stlflow.report`: tables, JSON, plots, MP4s                   ``report.json``, ``results.md``, ...
==========  =================================================================  =================================

A failing stage raises :class:`StageError` naming the stage and the cause.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.controllers import ControllerSpec
from stlflow.control.jobs import (
    AugmentJob,
    CalibrateJob,
    CollectJob,
    EvalJob,
    TrainJob,
    controller_defaults,
    policy_config,
)
from stlflow.control.samples import sample_metrics
from stlflow.control.tasks import get_task
from stlflow.policy.rti import DEFAULT_K
from stlflow.report import HEAD_NAMES, EvalRow, episode_record, results_table, write_demo_outputs, write_json

__all__ = ["StageError", "stage_collect", "stage_calibrate", "stage_augment", "stage_train", "stage_evaluate",
           "run_demo"]

TASK = "crossing"  # the stages' default task (``stlflow demo env=...`` picks another)


class StageError(RuntimeError):
    """A pipeline stage failed: ``stage`` names it, the message says why."""

    def __init__(self, stage: str, cause: BaseException | str) -> None:
        self.stage, self.cause = stage, cause
        why = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause)
        super().__init__(f"stage '{stage}' failed: {why}")


@contextmanager
def stage(name: str, index: int, total: int, log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Announce a stage, time it, and turn any exception inside it into a :class:`StageError`."""
    info: dict[str, Any] = {}
    log(f"[{index}/{total}] {name} ...")
    t0 = time.perf_counter()
    try:
        yield info
    except StageError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 - every failure is reported with its stage
        raise StageError(name, err) from err
    info["seconds"] = time.perf_counter() - t0
    log(f"[{index}/{total}] {name} done in {info['seconds']:.1f} s")


# ============================================================================================ stages
def stage_collect(out: Path, episodes: int, seed: int = 0, workers: int = 1, progress: bool = True,
                  task: str = TASK) -> Path:
    """Expert demonstrations of ``task`` into ``out`` (an EpisodeStore, replaced if it exists)."""
    from stlflow.control.collect import collect

    collect(CollectJob(task, int(episodes), out, seed=int(seed), workers=int(workers), overwrite=True,
                       progress=progress))
    return out


def stage_calibrate(data: Path, q: float = 0.95, log: Callable[[str], None] = print, task: str = TASK
                    ) -> dict[str, Any]:
    """Per-episode θ (``stl_params``) and dataset θ into the store; returns them with the calibration table."""
    from stlflow.control.stl_data import calibrate

    report = calibrate(CalibrateJob(data, task=task, q=float(q)))
    log(report.text)
    return {"dataset_theta": report.dataset_theta, "own_theta_satisfied": report.own_theta_satisfied,
            "episodes": report.episodes, "table": report.text}


def stage_augment(data: Path, out: Path, per_demo: int, demos: int | None, workers: int = 1, seed: int = 0,
                  opt: Mapping[str, Any] | None = None, modes: Sequence[str] | None = None,
                  progress: bool = True, task: str = TASK, stl_opt: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Augmentation of the first ``demos`` demonstrations; returns its report as a dict (with its text).

    ``opt``: options under the task's own (``conf/stl/<task>.yaml`` ``opt``, which win); ``stl_opt``: overrides of
    the task's own options (e.g. fewer CEM iterations for PickPlace in a smoke run)."""
    from stlflow.control.stl_data import augment, format_augment_report

    stl = None
    if stl_opt:
        stl = get_task(task).stl_config()
        stl["opt"] = {**dict(stl.get("opt") or {}), **dict(stl_opt)}
    report = augment(AugmentJob(data, out, task=task, per_demo=int(per_demo), episodes=demos,
                                modes=list(modes) if modes else None, workers=int(workers), seed=int(seed),
                                overwrite=True, progress=progress, opt=dict(opt or {}), stl=stl))
    if report.n_accepted == 0:
        raise RuntimeError(f"augmentation accepted no episode ({report.n_replayed} replayed); "
                           "raise the optimisation budget (opt.iters, opt.n_init)")
    return {**report.as_dict(), "text": format_augment_report(report)}


def stage_train(stores: Sequence[Path], merged: Path, out: Path, cond_params: Sequence[str], steps: int,
                batch_size: int, net: Mapping[str, Any] | None = None, seed: int = 0, threads: int = 1,
                progress: bool = True, task: str = TASK, head: str = "flow") -> Any:
    """A θ-conditioned policy (``head``: flow, ddpm or meanflow; MLP) trained on the concatenation of ``stores``;
    returns the Policy."""
    from stlflow.control.training import train_policy
    from stlflow.datasets import EpisodeStore

    data = stores[0]
    if len(stores) > 1:
        EpisodeStore.merge(list(stores), merged, overwrite=True)
        data = merged
    steps = int(steps)
    train = {"steps": steps, "batch_size": int(batch_size), "seed": int(seed), "threads": int(threads),
             "warmup_steps": max(1, min(500, steps // 10)), "val_every": max(1, steps // 4), "ckpt_every": steps,
             "tensorboard": False, "progress": bool(progress)}
    policy = policy_config(head, "mlp", {"cond_params": list(cond_params)}, net_overrides=net)
    return train_policy(TrainJob(task, data, out, policy=policy, train=train))


def rti_options(task: str, k: int | None = None) -> dict[str, Any]:
    """The RTI controller's options for ``task`` as ``stlflow eval`` ships them (``conf/control/rti.yaml``); ``k``
    (not None) fixes the solver steps of a plan and turns the per-tick budget ``nfe_per_tick`` off, as the ``k=``
    shortcut of ``stlflow eval`` does."""
    opts = dict(controller_defaults("rti", task))
    if k is not None:
        opts["k"] = int(k)
        opts.pop("nfe_per_tick", None)
        opts.pop("ddpm_nfe_per_tick", None)
    return opts


def describe_rti(opts: Mapping[str, Any]) -> str:
    """``a plan every 4 ticks, 1 network evaluation per tick``: the RTI schedule of :func:`rti_options` in words."""
    every = f"a plan every {opts['interval']} ticks" if opts.get("interval") else "a plan every tick"
    if float(opts.get("t_start", 0.0)) >= 1.0 and int(opts.get("k", 0)) == 1:
        return f"{every}, each a one-step plan from noise"
    if opts.get("nfe_per_tick"):
        per = float(opts["nfe_per_tick"])
        return f"{every}, {per:g} network evaluation{'s' if per != 1 else ''} per tick"
    return f"{every}, k={int(opts.get('k', DEFAULT_K))} solver steps a plan"


def stage_evaluate(policy: Any, thetas: Sequence[Mapping[str, float]], episodes: int, *, seed: int = 1000,
                   k: int | None = None, guidance: Mapping[str, Any] | None = None, compare_guidance: bool = True,
                   diversity_starts: int = 2, diversity_samples: int = 4, max_steps: int | None = None,
                   workers: int = 1, progress: bool = True, log: Callable[[str], None] = print,
                   task: str = TASK) -> list[EvalRow]:
    """Closed loop with the RTI controller (:func:`rti_options`: the shipped options of ``conf/control/rti.yaml`` for
    the task, or a fixed ``k`` solver steps per plan) at each requested θ, without and with STL guidance.

    ``guidance``: options of the task's :meth:`~stlflow.control.tasks.Task.guidance` (``enabled`` false: no
    guided rows). Metrics per row come
    from :func:`stlflow.control.evaluate.evaluate` (seeds ``seed ..``, satisfaction at the requested θ); diversity,
    modes, realised max speed and trajectories from ``diversity_starts`` start states x ``diversity_samples``
    (:func:`stlflow.demo_scene.scene_samples`: the samples keep their observations, collisions and rule violations
    for the trajectory plot). Each row keeps one :func:`stlflow.report.episode_record` per evaluated episode.
    """
    from stlflow.control.evaluate import evaluate
    from stlflow.demo_scene import scene_samples

    t = get_task(task)
    gopts = dict(guidance or {})
    enabled = bool(gopts.pop("enabled", False))
    settings = [False, True] if (enabled and compare_guidance) else [enabled]
    rows: list[EvalRow] = []
    div_seeds = [int(seed) + i for i in range(int(diversity_starts))]
    for theta in thetas:
        theta = {k_: float(v) for k_, v in theta.items()}
        for guided in settings:
            g = t.guidance(theta, **gopts) if guided else None
            spec = ControllerSpec.create("rti", **rti_options(t.name, k), guidance=g)
            label = f"v_max={theta.get('v_max', float('nan')):.2f}" + (" +guidance" if guided else "")
            t0 = time.perf_counter()
            rep = evaluate(EvalJob(t.name, policy, spec, int(episodes), seed=int(seed), workers=int(workers),
                                   stl_params=theta, max_steps=max_steps, progress=progress))
            row = EvalRow(label, theta, guided, dict(rep.metrics), list(rep.ticks["latency_ms"]), controller=spec,
                          episodes=[episode_record(t, ep, theta, guided, max_steps) for ep in rep.episodes])
            if g is not None:
                g.reset_counters()
            row.samples = scene_samples(policy, div_seeds, int(diversity_samples), theta, controller=spec,
                                        max_steps=max_steps, task=t.name)
            if g is not None and g.calls:
                ticks = sum(len(s["xy"]) - 1 for s in row.samples)
                row.guidance_ms_per_tick = 1e3 * g.seconds / max(ticks, 1)
            row.metrics.update(sample_metrics(row.samples, t.cell))
            row.metrics["max_speed_mean"] = float(np.mean([s["max_speed"] for s in row.samples]))
            row.metrics["meets_v_max"] = float(np.mean([s["max_speed"] <= theta["v_max"] for s in row.samples]))
            log(f"  {label}: success {row.metrics['success_rate']:.0%}, STL sat. "
                f"{row.metrics['stl_satisfaction_rate']:.0%}, collisions {row.metrics['collision_rate']:.0%} "
                f"({time.perf_counter() - t0:.1f} s)")
            rows.append(row)
    return rows


# ============================================================================================ the demo
def demo_settings(c: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of one demo run from the composed ``demo`` config (plain dict): ``task`` (the registry's name for
    ``env.name``), ``budget`` (``budgets.<budget>`` with the task's ``tasks.<name>.budgets.<budget>`` on top),
    ``cond_params``, ``sweep`` (requested v_max), ``guidance`` (the task's block, then the non-null top-level
    values). A top-level ``cond_params`` / ``v_max_sweep`` that is not null wins over the task's."""
    name = get_task(str((c.get("env") or {}).get("name", TASK))).name
    per_task = dict((c.get("tasks") or {}).get(name) or {})
    if not per_task:
        raise ValueError(f"conf/demo.yaml has no settings for task {name!r} (tasks.{name}); tasks with settings: "
                         f"{sorted(c.get('tasks') or {})}")
    if c["budget"] not in c["budgets"]:
        raise ValueError(f"budget={c['budget']!r} is not one of {sorted(c['budgets'])}")
    budget = {**c["budgets"][c["budget"]], **dict((per_task.get("budgets") or {}).get(c["budget"]) or {})}
    guidance = {**dict(per_task.get("guidance") or {}),
                **{k: v for k, v in dict(c.get("guidance") or {}).items() if v is not None}}
    cond = c.get("cond_params") or per_task.get("cond_params")
    sweep = c.get("v_max_sweep") or per_task.get("v_max_sweep")
    if not cond or not sweep:
        raise ValueError(f"task {name!r} needs cond_params and v_max_sweep (tasks.{name} in conf/demo.yaml)")
    head = str(c.get("head") or "flow")
    if head not in HEAD_NAMES:
        raise ValueError(f"head={head!r} is not one of {list(HEAD_NAMES)}")
    return {"task": name, "budget": budget, "cond_params": [str(x) for x in cond],
            "sweep": [float(v) for v in sweep], "guidance": guidance, "head": head}


def run_demo(cfg: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage of ``stlflow demo`` with the composed ``demo`` config; returns the summary (also in report.json).

    Raises :class:`StageError` naming the failing stage.
    """
    import torch
    from omegaconf import OmegaConf

    torch.set_num_threads(int(cfg.threads))
    c = OmegaConf.to_container(cfg, resolve=True)
    try:
        d = demo_settings(c)
    except ValueError as err:
        raise StageError("config", err) from err
    task, b = d["task"], d["budget"]
    out = Path(c["out"])
    out.mkdir(parents=True, exist_ok=True)
    progress, seed = bool(c["progress"]), int(c["seed"])
    workers = int(c["workers"] if c.get("workers") is not None else b.get("workers", 1))
    summary: dict[str, Any] = {"task": task, "budget": c["budget"], "budget_settings": b, "seed": seed,
                               "stages": {}, "eval_seed": int(c["eval_seed"]), "config": c}
    total, t_start = 6, time.perf_counter()
    demos, augmented = out / "data" / "demos.zarr", out / "data" / "augmented.zarr"

    with stage("collect demonstrations (scripted expert)", 1, total, log) as info:
        stage_collect(demos, b["demos"], seed=seed, workers=workers, progress=progress, task=task)
    summary["stages"]["collect"] = {"seconds": info["seconds"], "episodes": b["demos"]}

    with stage("calibrate θ on the demonstrations", 2, total, log) as info:
        cal = stage_calibrate(demos, q=float(c["calibrate_q"]), log=log, task=task)
    summary["stages"]["calibrate"] = {"seconds": info["seconds"], **{k: v for k, v in cal.items() if k != "table"}}

    with stage("augment (trajectory optimisation + MuJoCo replay)", 3, total, log) as info:
        aug = stage_augment(demos, augmented, b["per_demo"], b["augment_demos"], workers=workers, seed=seed,
                            opt=b.get("augment_opt"), modes=b.get("augment_modes"), progress=progress, task=task,
                            stl_opt=b.get("augment_stl_opt"))
        log(aug["text"])
    summary["stages"]["augment"] = {"seconds": info["seconds"], **{k: v for k, v in aug.items() if k != "text"}}

    train_threads = int(c.get("train_threads") or c["threads"])  # training runs alone: it may use every core
    with stage(f"train a θ-conditioned {HEAD_NAMES[d['head']]} policy", 4, total, log) as info:
        policy = stage_train([demos, augmented], out / "data" / "train.zarr", out / "policy", d["cond_params"],
                             b["train_steps"], b["batch_size"], net=b.get("net"), seed=seed, threads=train_threads,
                             progress=progress, task=task, head=d["head"])
    torch.set_num_threads(int(c["threads"]))  # the trainer set its own count; latency is measured on `threads`
    summary["stages"]["train"] = {"seconds": info["seconds"], "steps": b["train_steps"], "head": d["head"],
                                  "parameters": policy.num_parameters(), "threads": train_threads}

    k = None if c.get("k") is None else int(c["k"])
    resolved = ControllerSpec.create("rti", **rti_options(task, k)).for_policy(policy)  # one-step heads: cold plans
    summary["controller"] = {"name": "rti", **dict(resolved.options)}
    summary["controller_text"] = describe_rti(summary["controller"])
    dataset_theta = {name: float(v) for name, v in cal["dataset_theta"].items()}
    thetas = [{**dataset_theta, **dict(c.get("stl_params") or {}), "v_max": v} for v in d["sweep"]]
    with stage(f"evaluate closed loop (RTI: {summary['controller_text']}) at {len(thetas)} requested θ", 5, total,
               log) as info:
        rows = stage_evaluate(policy, thetas, b["eval_episodes"], seed=int(c["eval_seed"]), k=k,
                              guidance=d["guidance"], compare_guidance=True,
                              diversity_starts=b["diversity_starts"], diversity_samples=b["diversity_samples"],
                              max_steps=b.get("max_steps"), workers=workers, progress=progress, log=log, task=task)
    summary["stages"]["evaluate"] = {"seconds": info["seconds"]}
    return _report_stage(out, rows, summary, policy, b, task, t_start, log, workers)


def _report_stage(out: Path, rows: list[EvalRow], summary: dict[str, Any], policy: Any, b: Mapping[str, Any],
                  task: str, t_start: float, log: Callable[[str], None], workers: int = 1) -> dict[str, Any]:
    """Stage 6: the files of :func:`stlflow.report.write_demo_outputs`, then the stage times into report.json."""
    with stage("report (table, JSON, plots, videos)", 6, 6, log) as info:
        summary["total_seconds"] = time.perf_counter() - t_start
        paths = write_demo_outputs(out, rows, summary, policy=policy, video_episodes=b["video_episodes"],
                                   video_max_steps=b.get("video_max_steps"), task=task,
                                   video_search_seeds=int(b.get("video_search_seeds", 0) or 0),
                                   video_size=b.get("video_size") or (320, 240), log=log,
                                   workers=workers, policy_dir=out / "policy")
    summary["stages"]["report"] = {"seconds": info["seconds"]}
    summary["total_seconds"] = time.perf_counter() - t_start
    summary["table"] = results_table(rows)
    summary["paths"] = {k: str(v) for k, v in paths.items()}
    data = json.loads(paths["json"].read_text())
    data.update({k: summary[k] for k in ("stages", "total_seconds", "paths")})
    write_json(paths["json"], data)
    stages = ", ".join(f"{name} {v['seconds']:.1f} s" for name, v in summary["stages"].items())
    summary["stage_times"] = f"stage times: {stages}; total {summary['total_seconds']:.1f} s"
    return summary
