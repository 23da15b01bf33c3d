"""Typed jobs: each stage of the pipeline is one function taking one job object.

=================  =======================================================  ===================================
job                function                                                 returns
=================  =======================================================  ===================================
``CollectJob``     :func:`collect <stlflow.control.collect.collect>`        the new EpisodeStore
``CalibrateJob``   :func:`calibrate <stlflow.control.stl_data.calibrate>`   ``CalibrationReport``
``AugmentJob``     :func:`augment <stlflow.control.stl_data.augment>`       ``AugmentReport``
``TrainJob``       :func:`train_policy <stlflow.control.training.train_policy>`  the trained (EMA) ``Policy``
``EvalJob``        :func:`evaluate <stlflow.control.evaluate.evaluate>`     ``Report``
=================  =======================================================  ===================================

The command-line verbs turn their Hydra configuration into a job and call the function; the pipeline, the
benchmarks and user code build jobs directly. The functions are importable from here as well
(``from stlflow.control.jobs import TrainJob, train_policy``). Every job names its task by the registry's short
name (``crossing``) or gymnasium id (:func:`stlflow.control.tasks.get_task`). Bad input raises :class:`JobError`
(or the lower layers' own errors) with a message that names the input and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["JobError", "CollectJob", "CalibrateJob", "AugmentJob", "TrainJob", "EvalJob", "policy_config",
           "conf_defaults", "controller_defaults"]  # and, imported on first use, the functions below (_ELSEWHERE)


class JobError(ValueError):
    """A job cannot run as given: the message names the input and how to fix it."""


def conf_defaults(*path: str) -> dict[str, Any]:
    """A shipped config file ``stlflow.conf/<path>.yaml`` as a plain dict (resolving nothing)."""
    import yaml

    file = resources.files("stlflow.conf").joinpath(*path[:-1], f"{path[-1]}.yaml")
    if not file.is_file():
        raise JobError(f"no shipped configuration {'/'.join(path)}.yaml")
    return dict(yaml.safe_load(file.read_text()) or {})


def controller_defaults(name: str, task: str) -> dict[str, Any]:
    """The shipped options of controller ``name`` (``conf/control/<name>.yaml``) for ``task``, as ``stlflow eval``
    composes them: unset (null) options dropped, ``${env.KEY}`` read from ``conf/env/<task>.yaml``."""
    env = conf_defaults("env", task)
    out: dict[str, Any] = {}
    for key, value in conf_defaults("control", name).items():
        if isinstance(value, str) and value.startswith("${env.") and value.endswith("}"):
            value = env.get(value[len("${env."):-1])
        if key != "name" and value is not None:
            out[key] = value
    return out


def policy_config(head: str = "flow", net: str = "mlp", overrides: Mapping[str, Any] | None = None,
                  net_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The policy block of ``stlflow train`` for ``policy=<head> net=<net>``: the shipped group files merged with
    ``overrides`` (top-level keys; ``head`` merges key by key) and ``net_overrides``."""
    cfg = conf_defaults("policy", head)
    cfg["net"] = {**conf_defaults("net", net), **dict(net_overrides or {})}
    for key, value in dict(overrides or {}).items():
        if key in ("head", "net") and isinstance(value, Mapping):
            cfg[key] = {**cfg[key], **dict(value)}
        else:
            cfg[key] = value
    return cfg


@dataclass
class CollectJob:
    """Record ``episodes`` expert episodes (seeds ``seed ..``) of ``task`` into a new EpisodeStore at ``out``."""

    task: str
    episodes: int
    out: str | Path
    seed: int = 0
    workers: int = 1
    overwrite: bool = False
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


@dataclass
class CalibrateJob:
    """Fit θ per episode and dataset-wide on the store ``data`` (written into it).

    ``task``: None = the store's own; ``params``: θ names to calibrate (None: the task's ``calibrate_params``);
    ``margin``: one margin for all, a mapping per name, or None (the task's); ``q``: fraction of the
    demonstrations the dataset-level θ must satisfy; ``stl``: the task's STL settings (None: the shipped ones).
    """

    data: str | Path
    task: str | None = None
    params: list[str] | None = None
    margin: float | dict[str, float] | None = None
    q: float = 0.95
    stl: dict[str, Any] | None = None


@dataclass
class AugmentJob:
    """Diverse rule-satisfying synthetic episodes from the calibrated demonstrations ``data`` into ``out``.

    ``episodes``: the first N demonstrations (None: all); ``modes``: restrict to these behaviour modes;
    ``opt``: overrides of the optimisation settings (defaults: the ``opt`` block of ``conf/augment.yaml``, then
    the task's own ``stl.opt``); ``stl``: the task's STL settings (None: the shipped ones).
    """

    data: str | Path
    out: str | Path
    task: str | None = None
    per_demo: int = 8
    episodes: int | None = None
    modes: list[str] | None = None
    workers: int = 1
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    opt: dict[str, Any] = field(default_factory=dict)
    stl: dict[str, Any] | None = None


@dataclass
class TrainJob:
    """Train a policy on the EpisodeStore ``data``; the final EMA policy goes to ``out``.

    ``policy``: the policy block (:func:`policy_config`: head, net, To/Tp/Ta, ``cond_params``...); ``train``:
    :class:`stlflow.policy.trainer.TrainConfig` fields; ``eval_episodes`` closed-loop episodes at every
    ``train.eval_every`` and at the end (0: none).
    """

    task: str
    data: str | Path
    out: str | Path
    policy: dict[str, Any] = field(default_factory=policy_config)
    train: dict[str, Any] = field(default_factory=dict)
    val_ratio: float = 0.1
    pad_after: int | None = None
    eval_episodes: int = 0
    eval_seed: int = 100000
    eval_workers: int = 1
    resume: bool = False
    log: Any = print


@dataclass
class EvalJob:
    """Closed-loop evaluation of a controller on ``task`` over ``episodes`` seeds (``seed ..``).

    ``policy``: a ``Policy``, a checkpoint directory, or None with ``controller.name == "expert"``;
    ``controller``: a :class:`~stlflow.control.controllers.ControllerSpec` (None: receding horizon);
    ``delay``: injected observation-to-action delay in ticks; ``max_steps``: cap on episode length;
    ``stl_params``: θ requested of a conditioned policy and used for the satisfaction metric (unrequested names:
    the rules' defaults); ``workers``: processes (1 = this one); ``keep_ticks``: keep every tick's latency and NFE.
    """

    task: str
    policy: Any = None
    controller: Any = None
    episodes: int = 100
    seed: int = 0
    workers: int = 1
    delay: int = 0
    max_steps: int | None = None
    stl_params: dict[str, float] = field(default_factory=dict)
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    keep_ticks: bool = True


# The functions and the controller spec live with the code that runs them; they are importable from here too.
_ELSEWHERE = {
    "collect": "stlflow.control.collect",
    "calibrate": "stlflow.control.stl_data",
    "augment": "stlflow.control.stl_data",
    "train_policy": "stlflow.control.training",
    "evaluate": "stlflow.control.evaluate",
    "Report": "stlflow.control.evaluate",
    "ControllerSpec": "stlflow.control.controllers",
}


def __getattr__(name: str) -> Any:
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
