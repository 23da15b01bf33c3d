"""STL augmentation of many demonstrations at once: the steps of :func:`stlflow.datasets.augment.augment_demo`,
each run for a whole batch of demonstrations.

1. θ groups per demonstration, each from the demonstration's own random streams (seed pair).
2. One optimisation for all of them: :func:`~stlflow.datasets.augment_optim.optimise_batch` over a
   :class:`~stlflow.datasets.augment_optim.WindowBatch` (``optimiser="adam"``); the cross-entropy method runs
   per demonstration, its rollouts through the batch's (PickPlace: ``mujoco.rollout`` in threads).
3. Diverse selection per demonstration, as before.
4. Replays in rounds: each round replays, for every demonstration still short of ``per_demo`` accepted episodes,
   its next candidates in selection order (as many as it still needs, within ``max_replays``), all in one call
   of the batch's ``replay`` (which may run them in parallel). Within a demonstration candidates are accepted in
   selection order, so the stored episodes and the replay counts are those of replaying one candidate at a time.

A candidate's optimisation does not depend on which other candidates share its batch (see ``optimise_batch``), so
the stored episodes are those of augmenting each demonstration alone, up to float round-off.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stlflow.datasets.augment import (
    AugmentSettings,
    DemoResult,
    DemoWindow,
    ModeSpec,
    _demo_random_streams,
    _mode_groups,
    _replay_robustness,
    _select_diverse,
)
from stlflow.datasets.augment_optim import (
    CandidateGroup,
    DemoProblem,
    WindowBatch,
    cem_controls,
    group_index,
    optimise_batch,
)
from stlflow.datasets.augment_select import mean_pairwise_distance

__all__ = ["DemoSpec", "augment_demos"]


@dataclass
class DemoSpec:
    """One demonstration to augment: its window, its mode and calibrated θ, and its seed (e.g. ``(seed, i)``)."""

    window: DemoWindow
    mode: str | None
    theta: dict[str, float]
    seed: int | Sequence[int]


@dataclass
class _Candidates:
    """One demonstration's optimised candidates and selection order."""

    groups: list[CandidateGroup]
    group_of: torch.Tensor
    controls: torch.Tensor
    rho: torch.Tensor
    positions: torch.Tensor
    generator: torch.Generator
    order: list[int] = field(default_factory=list)
    ok: torch.Tensor | None = None
    div_candidates: float = 0.0
    div_random: float = 0.0


@dataclass
class _Replays:
    """The replay step's outcome: accepted episodes with their candidate indices, and the rejection counters."""

    episodes: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    n_replayed: int = 0
    n_collided: int = 0
    rejected_modes: list[str] = field(default_factory=list)


def augment_demos(
    demos: Sequence[DemoSpec],
    rules: str,
    modes: Sequence[ModeSpec],
    param_ranges: dict[str, tuple[float, float]],
    control_low: np.ndarray,
    control_high: np.ndarray,
    dt: float,
    settings: AugmentSettings,
    parse: Callable[[str], Any],
    init_low: np.ndarray | None = None,
    init_high: np.ndarray | None = None,
    stack: Callable[[Sequence[DemoWindow], int], WindowBatch] | None = None,
) -> list[DemoResult]:
    """Augment ``demos`` together (arguments as :func:`stlflow.datasets.augment.augment_demo`); one
    :class:`DemoResult` per demonstration, in order. ``stack`` batches the windows (default
    :meth:`WindowBatch.of`); windows with different horizons go to separate batches. ``seconds`` and
    ``optimise_seconds`` of each result are the batch's, shared equally among its demonstrations."""
    t0 = time.perf_counter()
    if not modes:
        raise ValueError("augment_demo needs at least one ModeSpec")
    if settings.optimiser not in ("adam", "cem"):
        raise ValueError(f"optimiser must be 'adam' or 'cem', got {settings.optimiser!r}")
    if not demos:
        return []
    dtype = {"float32": torch.float32, "float64": torch.float64}[settings.dtype]
    low, high = (torch.as_tensor(np.asarray(a), dtype=dtype) for a in (control_low, control_high))
    init = [None if a is None else torch.as_tensor(np.asarray(a), dtype=dtype) for a in (init_low, init_high)]
    n_per_group = settings.n_init if settings.optimiser == "adam" else settings.cem_iters * settings.cem_samples
    problems = []
    for d in demos:
        rng, generator = _demo_random_streams(d.seed)
        groups: list[CandidateGroup] = []
        for mode in modes:
            groups += _mode_groups(mode, rules, parse, d.mode, d.theta, param_ranges, settings, dt, rng, n_per_group)
        problems.append(DemoProblem(groups, generator))

    by_horizon: dict[int, list[int]] = {}
    for i, d in enumerate(demos):
        by_horizon.setdefault(d.window.horizon, []).append(i)
    cands: list[_Candidates | None] = [None] * len(demos)
    batches: list[tuple[WindowBatch, int] | None] = [None] * len(demos)  # (its batch, its index in the batch)
    for idx in by_horizon.values():
        windows = [demos[i].window for i in idx]
        batch = (stack or (lambda w, _threads: WindowBatch.of(w)))(windows, int(settings.replay_threads))
        for k, i in enumerate(idx):
            batches[i] = (batch, k)
        if settings.optimiser == "adam":
            outs = optimise_batch([problems[i] for i in idx], batch, low, high, dt, settings, *init)
        else:
            outs = [cem_controls(problems[i].groups, demos[i].window, low, high, dt, settings, problems[i].generator,
                                 batch, k) for k, i in enumerate(idx)]
        for i, (controls, rho, positions) in zip(idx, outs):
            p = problems[i]
            cands[i] = _Candidates(p.groups, group_index(p.groups), controls, rho, positions, p.generator)
    t_opt = time.perf_counter() - t0
    for c in cands:
        c.ok, c.order, c.div_candidates, c.div_random = _select_diverse(
            c.rho, c.positions, c.group_of, settings.margin, settings.per_demo, c.generator, settings.max_replays)
    replays = _replay_rounds(cands, batches, dt, settings)
    share = (time.perf_counter() - t0) / len(demos)
    return [
        DemoResult(
            episodes=r.episodes,
            n_candidates=len(c.rho),
            n_satisfying=len(c.ok),
            n_replayed=r.n_replayed,
            n_accepted=len(r.episodes),
            n_rejected_collision=r.n_collided,
            rejected_modes=r.rejected_modes,
            div_candidates=c.div_candidates,
            div_random=c.div_random,
            div_selected=mean_pairwise_distance(c.positions[r.accepted]),
            modes_satisfied=sorted({c.groups[int(c.group_of[i])].mode for i in c.ok.tolist()}),
            seconds=share,
            optimise_seconds=t_opt / len(demos),
        )
        for c, r in zip(cands, replays)
    ]


def _replay_rounds(cands: list[_Candidates], batches: list[tuple[WindowBatch, int]], dt: float,
                   settings: AugmentSettings) -> list[_Replays]:
    """Replay candidates in selection order in the real env, keeping those that satisfy their θ without collision,
    until each demonstration has ``per_demo`` accepted or has spent ``max_replays`` (rounds: see the module doc)."""
    outs = [_Replays() for _ in cands]
    cursor = [0] * len(cands)
    while True:
        rounds: dict[int, list[tuple[int, int]]] = {}  # id(batch) -> [(demo, candidate)]
        for d, c in enumerate(cands):
            need = min(settings.per_demo - len(outs[d].episodes), settings.max_replays - outs[d].n_replayed)
            take = c.order[cursor[d] : cursor[d] + max(need, 0)]
            cursor[d] += len(take)
            rounds.setdefault(id(batches[d][0]), []).extend((d, i) for i in take)
        pending = [pairs for pairs in rounds.values() if pairs]
        if not pending:
            return outs
        for pairs in pending:
            batch = batches[pairs[0][0]][0]
            results = batch.replay([(batches[d][1], cands[d].controls[i].numpy()) for d, i in pairs])
            for (d, i), replay in zip(pairs, results):
                _accept(outs[d], cands[d], i, replay, dt)


def _accept(out: _Replays, c: _Candidates, i: int, replay: Any, dt: float) -> None:
    """Keep candidate ``i``'s replay if it satisfies its θ without collision; else count the rejection."""
    g = c.groups[int(c.group_of[i])]
    out.n_replayed += 1
    rho_replay = _replay_robustness(g, replay, dt)
    if replay.collision or not rho_replay >= 0.0:
        out.n_collided += int(replay.collision)
        out.rejected_modes.append(g.mode)
        return
    arrays = {"obs": replay.obs, "action": replay.action, "signals": replay.signals}
    attrs = {
        **replay.attrs,
        "collision": False,
        "mode": g.mode,
        "stl_params": dict(g.theta),
        "rho_model": float(c.rho[i]),
        "rho_replay": rho_replay,
    }
    out.episodes.append((arrays, attrs))
    out.accepted.append(i)
