"""D4RL's reference scores and normalised score, and per-task data settings.

``normalized_score(task, returns) = 100 * (returns - random) / (expert - random)`` with D4RL's published
reference returns (its ``REF_MIN_SCORE`` / ``REF_MAX_SCORE``), shipped as package data in
``data/d4rl_refs.json``:

- maze2d ``maze2d-{umaze,medium,large}-v1`` (sparse reward) and ``maze2d-{...}-dense-v1``: random actions /
  the waypoint controller.
- Locomotion ``{hopper,halfcheetah,walker2d,ant}-{random,medium,expert,medium-replay,full-replay,
  medium-expert}-{v0,v1,v2}`` (v0 has no full-replay): one pair per robot, the same for every dataset and
  version, as in D4RL.
- antmaze ``antmaze-{umaze,umaze-diverse,medium-play,medium-diverse,large-play,large-diverse}-{v0,v2}``: 0 / 1.

Minari's regenerated datasets (``D4RL/pointmaze/...``) and gymnasium-robotics' PointMaze are different
environments with their own references: these numbers do not apply to them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType
from typing import Any

import numpy as np


def _load() -> Mapping[str, tuple[float, float]]:
    text = resources.files("stlflow.datasets").joinpath("data/d4rl_refs.json").read_text()
    scores = json.loads(text)["scores"]
    return MappingProxyType({task: (float(lo), float(hi)) for task, (lo, hi) in scores.items()})


REF_SCORES: Mapping[str, tuple[float, float]] = _load()
"""task -> (random return, expert return), D4RL's published values."""


def known_tasks() -> list[str]:
    """The task names with reference scores, sorted."""
    return sorted(REF_SCORES)


def reference_scores(task: str) -> tuple[float, float] | None:
    """``(random, expert)`` reference returns of ``task`` (a D4RL dataset name), or None when D4RL publishes none."""
    return REF_SCORES.get(task)


def normalized_score(task: str, returns: Any, strict: bool = False) -> float | np.ndarray | None:
    """D4RL's normalised score ``100 * (returns - random) / (expert - random)`` of ``returns`` (a number or an
    array of episode returns; the result has the same shape).

    A task without reference scores returns None with a :class:`UserWarning` (report raw returns instead), or
    raises a ValueError listing the known tasks when ``strict``.
    """
    refs = reference_scores(task)
    if refs is None:
        msg = f"no D4RL reference scores for task {task!r}; known tasks: {', '.join(known_tasks())}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + "; report raw returns", UserWarning, stacklevel=2)
        return None
    lo, hi = refs
    score = 100.0 * (np.asarray(returns, dtype=np.float64) - lo) / (hi - lo)
    return float(score) if score.ndim == 0 else score


def d4rl_task_settings(task: str) -> dict[str, Any]:
    """Per-task keyword arguments for :func:`stlflow.datasets.importers.qlearning_dataset`.

    maze2d: ``ignore_terminals=True``. Its data generator marks a terminal wherever a random intermediate
    target was reached (or given up), but the evaluation episodes never terminate, so a Q-learner must
    bootstrap through those steps. Every other task: ``{}`` (D4RL's semantics as stored).
    """
    if task.startswith("maze2d-"):
        return {"ignore_terminals": True}
    return {}
