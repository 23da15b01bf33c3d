"""The STL stages on stored demonstrations: calibrate θ (:class:`~stlflow.control.jobs.CalibrateJob`) and augment
with rule-satisfying synthetic episodes (:class:`~stlflow.control.jobs.AugmentJob`).

Calibration fits, per episode, the tightest values of the rules' parameters the episode satisfies
(:func:`stlflow.stl.calibrate`, loosened by a margin) and, dataset-wide, the tightest values a fraction q of the
demonstrations satisfies; both are written into the store (episode attribute ``stl_params``, store attribute
``stl_params_dataset``). Augmentation optimises control sequences for every behaviour mode of the task and keeps
those that satisfy their θ when replayed in MuJoCo (:func:`stlflow.control.augment.augment_store`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stlflow.control.jobs import AugmentJob, CalibrateJob, JobError, conf_defaults
from stlflow.control.tasks import Task, get_task


def store_task(store: Any, requested: str | None, path: Any) -> Task:
    """The task of a store: ``requested`` (checked against the store's ``env_id``) or the store's own."""
    stored = store.attrs.get("env_id")
    if requested is None:
        if not stored:
            raise JobError(f"{path} does not say which task it holds (no env_id attribute); name the task (env=...)")
        return get_task(stored)
    task = get_task(requested)
    if stored and stored != task.env_id:
        raise JobError(f"{path} holds {stored} episodes but the job names {task.name} ({task.env_id})")
    return task


def rule_set(store: Any, task: Task) -> tuple[dict[str, str], dict[str, float]]:
    """The task's separate rules and their defaults: from the store's attributes, else from the task."""
    rule_list, defaults = store.attrs.get("rule_list"), store.attrs.get("rule_defaults")
    if isinstance(rule_list, list):
        rule_list = None  # an older collector stored only names
    if not rule_list or not defaults:
        rule_list, defaults = task.info.rule_list, task.info.rule_defaults
    return dict(rule_list), {k: float(v) for k, v in defaults.items()}


@dataclass
class CalibrationReport:
    """What :func:`calibrate` fitted and wrote: ``dataset_theta`` (all θ names), ``per_episode`` θ, ``params``
    calibrated, ``own_theta_satisfied`` (episodes satisfying their own θ), ``notes``, and ``text`` (the table and
    notes a person reads)."""

    dataset_theta: dict[str, float]
    per_episode: list[dict[str, float]]
    params: list[str]
    episodes: int
    own_theta_satisfied: int
    notes: list[str] = field(default_factory=list)
    text: str = ""


def calibrate(job: CalibrateJob) -> CalibrationReport:
    """Calibrate θ on the store ``job.data`` and write it there (see the module docstring)."""
    from stlflow.datasets import EpisodeStore

    try:
        store = EpisodeStore.open(job.data, mode="a")
    except (FileNotFoundError, ValueError) as err:
        raise JobError(f"cannot open data={job.data}: {err}") from err
    with store:  # the writer lock is held while θ is written, released after
        return _calibrate_into(store, job)


def _calibrate_into(store: Any, job: CalibrateJob) -> CalibrationReport:
    """Fit θ on ``store`` (open for writing) and write it there."""
    from stlflow.datasets.calibration import calibrate_store, summary_table

    task = store_task(store, job.task, job.data)
    stl_cfg = job.stl if job.stl is not None else task.stl_config()
    rules, defaults = rule_set(store, task)
    params = list(job.params if job.params is not None else stl_cfg.get("calibrate_params") or [])
    margin = job.margin if job.margin is not None else dict(stl_cfg.get("margin") or {})
    margin = float(margin) if isinstance(margin, (int, float)) else margin
    cal = calibrate_store(store, rules, params, defaults, margin=margin, q=float(job.q))
    for i, theta in enumerate(cal.per_episode):
        store.set_episode_attrs(i, {"stl_params": {**defaults, **theta}, "stl_rho_own": float(cal.rho[i])})
    dataset_theta = {**defaults, **cal.dataset}
    store.set_attrs({"stl_params_dataset": dataset_theta,
                     "stl_calibration": {"q": float(job.q), "margin": margin, "params": params, "notes": cal.notes}})
    n = len(cal.per_episode)
    lines = [f"calibrated {params} on {n} episodes of {job.data} (q={job.q}; margin={margin})", summary_table(cal),
             f"each demo satisfies its own θ: {int(cal.satisfied.sum())}/{n}", *(f"note: {x}" for x in cal.notes)]
    return CalibrationReport(dataset_theta=dataset_theta, per_episode=[{**defaults, **t} for t in cal.per_episode],
                             params=params, episodes=n, own_theta_satisfied=int(np.sum(np.asarray(cal.rho) >= 0)),
                             notes=list(cal.notes), text="\n".join(lines))


def augment_settings(job: AugmentJob, stl_cfg: dict[str, Any]) -> Any:
    """:class:`~stlflow.datasets.augment.AugmentSettings` of a job: the ``opt`` block of ``conf/augment.yaml``,
    the job's ``opt`` on top, then the task's own ``stl.opt`` (e.g. PickPlace selects ``optimiser: cem``)."""
    from stlflow.datasets.augment import AugmentSettings

    opt = {**conf_defaults("augment")["opt"], **dict(job.opt or {}), **dict(stl_cfg.get("opt") or {})}
    if opt.get("cem_std") is not None:
        opt["cem_std"] = tuple(float(x) for x in opt["cem_std"])
    try:
        return AugmentSettings(per_demo=int(job.per_demo), time_params=tuple(stl_cfg.get("time_params") or ()), **opt)
    except TypeError as err:
        raise JobError(f"bad augmentation option: {err}") from err


def make_augment_task(name: str, env_kwargs: dict[str, Any], stl_cfg: dict[str, Any], modes: list[str] | None,
                      dtype: str) -> Any:
    """The task's :class:`~stlflow.datasets.augment.AugmentTask` (module level: built in each worker)."""
    return get_task(name).augmentation(env_kwargs, stl_cfg, modes, dtype)


def augment(job: AugmentJob) -> Any:
    """Run the augmentation of ``job``; returns its :class:`~stlflow.datasets.augment.AugmentReport`."""
    import functools

    from stlflow import stl
    from stlflow.control.augment import augment_store
    from stlflow.datasets import EpisodeStore

    demos = EpisodeStore.open(job.data)
    task = store_task(demos, job.task, job.data)
    if not any("stl_params" in a for a in demos.all_episode_attrs()):
        print(f"note: {job.data} has no calibrated stl_params (run `stlflow calibrate`); using the task defaults",
              file=sys.stderr)
    stl_cfg = job.stl if job.stl is not None else task.stl_config()
    env_kwargs = dict(demos.attrs.get("env_kwargs") or {})
    settings = augment_settings(job, stl_cfg)
    factory = functools.partial(make_augment_task, task.name, env_kwargs, stl_cfg, job.modes, settings.dtype)
    episodes = None if job.episodes is None else range(min(int(job.episodes), demos.n_episodes))
    report = augment_store(job.data, job.out, factory, settings, stl.parse, seed=int(job.seed),
                           workers=int(job.workers), episodes=episodes, overwrite=bool(job.overwrite),
                           progress=job.progress,
                           out_attrs={"augment_settings": {**settings.__dict__,
                                                           "time_params": list(settings.time_params)}})
    return report


def format_augment_report(r: Any) -> str:
    """The figures a user wants after an augmentation run, one per line."""
    lines = [
        f"demos: {r.n_demos}; candidates optimised: {r.n_candidates}; satisfying in the model: {r.n_satisfying} "
        f"({r.n_satisfying / max(r.n_candidates, 1):.1%})",
        f"replayed in MuJoCo: {r.n_replayed}; accepted: {r.n_accepted}; acceptance rate {r.acceptance_rate:.1%} "
        f"(rejected: {r.n_rejected_collision} collided, {r.n_replayed - r.n_accepted - r.n_rejected_collision} "
        f"missed their θ; by mode {json.dumps(r.rejected_by_mode, sort_keys=True)})",
        f"diversity (mean pairwise RMS distance of xy trajectories, m, per start state): all satisfying candidates "
        f"{r.div_candidates:.3f}; random {r.per_demo}-subset {r.div_random:.3f}; "
        f"selected {r.div_selected:.3f}",
        f"behaviour modes per start state: demos {r.modes_per_demo_before:.2f} -> "
        f"augmented {r.modes_per_demo_after:.2f}",
        f"modes: demos {json.dumps(r.mode_counts_demos, sort_keys=True)}; "
        f"augmented {json.dumps(r.mode_counts_augmented, sort_keys=True)}",
        f"throughput: {r.satisfying_per_second:.2f} stored (replay-verified) trajectories/s wall time "
        f"({r.seconds:.1f} s); {r.model_satisfying_per_second:.1f} model-satisfying candidates/s of optimisation",
    ]
    return "\n".join(lines)
