"""STL-driven data augmentation: diverse, rule-satisfying synthetic episodes by trajectory optimisation.

The method follows "Diverse Controllable Diffusion Policy with Signal Temporal Logic" (Meng & Fan, 2024)
and adds an explicit diversity selection and a replay check in the real simulator:

1. For one demonstration, take its start state (a :class:`DemoWindow`, built by the caller from the task).
2. Sample STL parameter vectors θ for every behaviour mode of the task (:class:`ModeSpec`), including modes
   and values the demonstration did not show. The demonstrated mode keeps the demo's calibrated θ first.
3. For each (mode, θ) group, optimise ``n_init`` random control sequences at once with Adam through the
   task's differentiable dynamics model, minimising ``relu(margin - ρ_τ) + w_b · bound_violation²``, where
   ρ_τ is the smooth (log-sum-exp, temperature τ) robustness of ``rules & mode_formula`` at θ.
4. Among candidates whose *exact* robustness in the model is ≥ ``margin``, select ``per_demo`` by
   group-balanced farthest-point sampling on the position trajectories (diversity is chosen, not hoped for).
5. Replay each selected control sequence open loop in the real (MuJoCo) env from the same seed; keep it only
   if the exact robustness of its specification at its θ on the replayed signals is ≥ 0 and nothing collided.
   A rejected candidate is replaced by the next farthest one of its group, up to ``max_replays``.

This module holds the problem's types and the per-demonstration algorithm (:func:`augment_demo`); θ sampling and
the specification text are in :mod:`stlflow.datasets.augment_theta`, the optimisers in
:mod:`stlflow.datasets.augment_optim`, selection and diversity measures in
:mod:`stlflow.datasets.augment_select`, and the loop over a whole store (worker processes, the output store,
the report) is ``stlflow.control.augment.augment_store``.

Layering: these modules import only ``stlflow.stl`` (and torch/numpy). Everything task-specific -- the
dynamics model, signal extraction, the replay in MuJoCo -- arrives through :class:`DemoWindow` callables
that the caller wires in from the task layer.

Symbols: B candidates, H horizon (control steps), Du control dimension, P position dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stlflow.datasets.augment_optim import CandidateGroup, WindowBatch
from stlflow.datasets.augment_select import farthest_point_selection, mean_pairwise_distance
from stlflow.datasets.augment_theta import sample_theta, spec_text

__all__ = [
    "AugmentReport",
    "AugmentSettings",
    "AugmentTask",
    "DemoResult",
    "DemoWindow",
    "ModeSpec",
    "ReplayResult",
    "WindowBatch",
    "augment_demo",
]


# ----------------------------------------------------------------------------------------------------------------
# Task description handed in by the caller
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModeSpec:
    """A behaviour mode: an extra STL formula conjoined with the task rules, and ranges for its own parameters.

    ``formula`` is parametric STL text over the signals that :attr:`DemoWindow.signals` returns
    (``None`` = the rules alone). ``param_ranges`` maps a parameter of ``formula`` to the (low, high) range
    it is drawn from uniformly; every parameter of ``formula`` must have a range.
    """

    name: str
    formula: str | None = None
    param_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class ReplayResult:
    """One control sequence replayed in the real env from the demo's start.

    ``obs``: (H', Do); ``action``: (H', Du) the actions actually executed; ``signals``: name -> (H',) arrays,
    covering every signal of the rules and of the mode formulas; ``collision``: any contact with an obstacle.
    ``H' <= H`` when the env terminated early (e.g. goal reached). ``attrs``: extra JSON-able episode
    attributes to store (e.g. ``success``, ``length``).
    """

    obs: np.ndarray
    action: np.ndarray
    signals: dict[str, np.ndarray]
    collision: bool
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoWindow:
    """Everything the optimiser needs about one demonstration's start state (built by the task layer).

    - ``horizon``: H, control steps to optimise.
    - ``rollout(controls (B, H, Du) tensor) -> states (B, H, Ds)``: differentiable dynamics from the start state.
    - ``signals(states) -> {name: (B, H)}``: the STL signals (rules and mode formulas) of the rolled-out states.
    - ``positions(states) -> (B, H, P)``: what trajectory diversity is measured on (e.g. planar position, metres).
    - ``replay(controls (H, Du) ndarray) -> ReplayResult``: the same controls executed in the real simulator.
    - ``nominal``: (H, Du) controls the sampling-based optimiser perturbs (e.g. the demo's actions), or a dict
      ``{mode name: (H, Du)}`` with one nominal per behaviour mode (e.g. the demo retargeted to another zone;
      modes missing from the dict use the ``"*"`` entry); needed for ``optimiser="cem"``. ``rollout`` need not
      be differentiable for it (it may step MuJoCo). Nominals shorter than H hold their last control.
    - ``retime``: optional ``retime(nominal (T, Du), theta) -> (T', Du)``: the nominal adapted to a group's θ
      before the optimiser perturbs it (e.g. played faster or slower to match a requested speed limit, which
      small perturbations of the demo cannot do).
    - ``data``: what the task's ``stack`` (:attr:`AugmentTask.stack`) reads to batch this window with others
      (e.g. its start state and context); not used otherwise.
    """

    horizon: int
    rollout: Callable[[torch.Tensor], torch.Tensor]
    signals: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    positions: Callable[[torch.Tensor], torch.Tensor]
    replay: Callable[[np.ndarray], ReplayResult]
    nominal: np.ndarray | dict[str, np.ndarray] | None = None
    retime: Callable[[np.ndarray, dict[str, float]], np.ndarray] | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def nominal_for(self, mode: str, theta: dict[str, float] | None = None) -> np.ndarray:
        """The nominal controls (H, Du) of behaviour ``mode`` at θ (see the class docstring)."""
        if self.nominal is None:
            raise ValueError("optimiser='cem' needs DemoWindow.nominal (the controls to perturb)")
        nom = self.nominal
        if isinstance(nom, dict):
            if mode not in nom and "*" not in nom:
                raise KeyError(f"DemoWindow.nominal has no entry for mode {mode!r} (nor '*'): {sorted(nom)}")
            nom = nom.get(mode, nom.get("*"))
        if self.retime is not None and theta is not None:
            nom = self.retime(np.asarray(nom, dtype=np.float64), dict(theta))
        nom = np.asarray(nom, dtype=np.float64)[: self.horizon]
        if len(nom) < self.horizon:
            nom = np.concatenate([nom, np.repeat(nom[-1:], self.horizon - len(nom), axis=0)])
        return nom


@dataclass
class AugmentSettings:
    """Optimisation and selection settings (defaults chosen by measurement).

    ``n_theta`` θ vectors per mode, ``n_init`` random initialisations per (mode, θ) group; at most ``iters``
    Adam iterations at learning rate ``lr`` (control units per step), with an exact check every
    ``check_every`` (satisfied candidates leave the batch); smooth robustness temperature ``smooth``
    (τ; 25-50 converges ~7x faster than 10); hinge ``margin`` on robustness (signal units);
    ``bound_weight`` on the squared control-bound violation; controls are piecewise linear between knots
    every ``knot_every`` steps; at most ``max_replays`` replays in the real env per demo; ``time_params`` are
    time-bound parameters (sampled on the dt grid); ``dtype`` of the optimisation (``"float32"`` or ``"float64"``).

    ``optimiser``: ``"adam"`` (gradient through a differentiable model) or ``"cem"`` (cross-entropy method for
    tasks without one: ``cem_iters`` rounds of ``cem_samples`` perturbations of the window's nominal controls per
    group, knots drawn from N(mean, std²) starting at ``cem_std`` (Du,) (default 5% of the control range), the
    ``cem_elites`` best by exact robustness update mean and std with smoothing ``cem_alpha``).

    Batching (``stlflow.datasets.augment_batch``): ``batch_demos`` demonstrations are optimised together in one
    tensor program and their replays run together (1: one at a time); ``replay_threads`` threads replay them when
    the task replays in parallel. Neither changes which episodes are stored beyond float round-off.
    ``prune_at`` > 0: at that iteration's check, candidates whose exact robustness is still below ``prune_below``
    stop (they rarely satisfy later; fewer candidate-iterations, a few satisfying candidates fewer); 0: never.
    """

    per_demo: int = 8
    n_theta: int = 2
    n_init: int = 32
    iters: int = 120
    lr: float = 0.03
    smooth: float = 30.0
    margin: float = 0.02
    bound_weight: float = 10.0
    knot_every: int = 5
    max_replays: int = 32
    check_every: int = 10
    time_params: tuple[str, ...] = ()
    dtype: str = "float32"
    optimiser: str = "adam"
    cem_iters: int = 5
    cem_samples: int = 24
    cem_elites: int = 6
    cem_std: tuple[float, ...] | None = None
    cem_alpha: float = 0.7
    batch_demos: int = 8
    replay_threads: int = 1
    prune_at: int = 0
    prune_below: float = -0.3


# ----------------------------------------------------------------------------------------------------------------
# One demonstration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    """What :func:`augment_demo` made for one demonstration.

    ``episodes``: accepted synthetic episodes, each ``(arrays, attrs)`` with arrays ``obs``, ``action`` and
    ``signals`` (dict) and attrs ``mode``, ``stl_params``, ``rho_model``, ``rho_replay``.
    Counters: ``n_candidates`` optimised, ``n_satisfying`` (exact ρ ≥ margin in the model), ``n_replayed``,
    ``n_accepted``, ``n_rejected_collision`` (replays rejected for a collision; the rest failed their θ),
    ``rejected_modes`` (the mode of each rejected replay);
    ``div_candidates`` mean pairwise distance of satisfying candidates (all random inits),
    ``div_random`` the same for a random subset of the stored size (what selection without the diversity step
    would give), ``div_selected`` for the stored episodes (model trajectories); ``modes_satisfied`` the modes
    with at least one satisfying candidate; ``seconds`` wall time.
    """

    episodes: list[tuple[dict[str, Any], dict[str, Any]]]
    n_candidates: int
    n_satisfying: int
    n_replayed: int
    n_accepted: int
    n_rejected_collision: int
    rejected_modes: list[str]
    div_candidates: float
    div_random: float
    div_selected: float
    modes_satisfied: list[str]
    seconds: float
    optimise_seconds: float


def augment_demo(
    window: DemoWindow,
    rules: str,
    modes: Sequence[ModeSpec],
    demo_mode: str | None,
    demo_theta: dict[str, float],
    param_ranges: dict[str, tuple[float, float]],
    control_low: np.ndarray,
    control_high: np.ndarray,
    dt: float,
    settings: AugmentSettings,
    seed: int | Sequence[int],
    parse: Callable[[str], Any],
    init_low: np.ndarray | None = None,
    init_high: np.ndarray | None = None,
) -> DemoResult:
    """Augment one demonstration: sample θ per mode, optimise, select diverse satisfying candidates, replay.

    ``demo_theta``: the demo's calibrated parameters (also the base for parameters without a range);
    ``param_ranges``: sampling ranges of the rule parameters for θ the demo did not show; the demonstrated mode's
    first θ is ``demo_theta`` itself. ``parse``: ``stlflow.stl.parse`` (passed in so that callers may cache).
    ``init_low``/``init_high``: (Du,) range of the random initial controls (default: the control bounds).
    Deterministic for ``seed`` (an int or a sequence of ints, e.g. ``(seed, episode_index)``).
    """
    from stlflow.datasets.augment_batch import DemoSpec, augment_demos

    demo = DemoSpec(window, demo_mode, demo_theta, seed)
    return augment_demos([demo], rules, modes, param_ranges, control_low, control_high, dt, settings, parse,
                         init_low=init_low, init_high=init_high)[0]


def _demo_random_streams(seed: int | Sequence[int]) -> tuple[np.random.Generator, torch.Generator]:
    """The demo's two random streams from ``seed``: numpy for θ sampling, torch for the optimiser and selection."""
    ss = np.random.SeedSequence(seed)
    rng = np.random.default_rng(ss.spawn(1)[0])
    generator = torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))
    return rng, generator


def _mode_groups(
    mode: ModeSpec,
    rules: str,
    parse: Callable[[str], Any],
    demo_mode: str | None,
    demo_theta: dict[str, float],
    param_ranges: dict[str, tuple[float, float]],
    settings: AugmentSettings,
    dt: float,
    rng: np.random.Generator,
    n_per_group: int,
) -> list[CandidateGroup]:
    """The ``n_theta`` candidate groups of one behaviour mode, each at a θ sampled for it (the demo's θ first)."""
    spec = parse(spec_text(rules, mode))
    # Time bounds are drawn once per mode (the demo's own for its mode), so that the mode's groups share
    # one robustness call; thresholds vary per θ.
    time_names = set(spec.interval_params)
    shared: dict[str, float] | None = None
    groups: list[CandidateGroup] = []
    for j in range(settings.n_theta):
        theta = sample_theta(param_ranges, rng, base=demo_theta, time_params=settings.time_params, dt=dt)
        if mode.name == demo_mode and j == 0:
            theta = {**theta, **demo_theta}
        theta = sample_theta(mode.param_ranges, rng, base=theta, time_params=settings.time_params, dt=dt)
        if shared is None:
            shared = {k: theta[k] for k in time_names if k in theta}
        theta.update(shared)
        missing = set(spec.params) - set(theta)
        if missing:
            raise ValueError(
                f"mode {mode.name!r}: no value or range for parameter(s) {sorted(missing)}; θ has {sorted(theta)}"
            )
        groups.append(CandidateGroup(mode.name, spec, {k: theta[k] for k in spec.params}, n_per_group))
    return groups


def _select_diverse(
    rho: torch.Tensor,
    positions: torch.Tensor,
    group_of: torch.Tensor,
    margin: float,
    per_demo: int,
    generator: torch.Generator,
    max_order: int | None = None,
) -> tuple[torch.Tensor, list[int], float, float]:
    """Satisfying candidates (ρ ≥ margin) in replay order, by group-balanced farthest-point selection.

    Returns ``(ok, order, div_candidates, div_random)``: the satisfying indices, the candidates in selection
    order (the first ``max_order`` of it: the greedy order's prefix does not depend on its length), and the
    diversity of all satisfying candidates and of a random ``per_demo``-subset of them.
    """
    ok = torch.nonzero(rho >= margin).squeeze(1)
    feats = positions.reshape(positions.shape[0], -1)

    div_candidates = mean_pairwise_distance(positions[ok])
    perm = torch.randperm(len(ok), generator=generator)[:per_demo]
    div_random = mean_pairwise_distance(positions[ok[perm]])

    k = len(ok) if max_order is None else min(len(ok), int(max_order))
    order = [int(ok[i]) for i in farthest_point_selection(feats[ok], k, group_of[ok].tolist())] if len(ok) else []
    return ok, order, div_candidates, div_random


def _replay_robustness(group: CandidateGroup, replay: ReplayResult, dt: float) -> float:
    """Exact robustness of the group's specification at its θ on the replayed signals."""
    sig = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in replay.signals.items()}
    missing = set(group.spec.signals) - set(sig)
    if missing:
        raise KeyError(f"replay returned no signal(s) {sorted(missing)}; it returned {sorted(sig)}")
    return float(group.spec.robustness({k: sig[k] for k in group.spec.signals}, dt=dt, params=group.theta))


# ----------------------------------------------------------------------------------------------------------------
# A whole store (driven by stlflow.control.augment.augment_store)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class AugmentTask:
    """A task as the augmentation sees it (built by the task layer; see ``stlflow augment``).

    - ``rules``: the task's parametric STL rules; ``modes``: behaviour modes (at least one).
    - ``param_ranges``: sampling ranges of the rule parameters for θ not shown by a demo.
    - ``defaults``: values for parameters neither calibrated nor sampled (e.g. the goal tolerance).
    - ``control_low``/``control_high``: (Du,) control bounds in physical units; ``dt`` seconds per step.
    - ``window(episode, attrs) -> DemoWindow``: the optimisation problem from one demo's start state.
    - ``init_low``/``init_high``: (Du,) range of the random initial controls (default: the control bounds).
    - ``stack(windows, replay_threads) -> WindowBatch``: several windows as one batched problem (None:
      :meth:`WindowBatch.of`, which loops over the windows).
    """

    rules: str
    modes: list[ModeSpec]
    param_ranges: dict[str, tuple[float, float]]
    defaults: dict[str, float]
    control_low: np.ndarray
    control_high: np.ndarray
    dt: float
    window: Callable[[dict[str, np.ndarray], dict[str, Any]], DemoWindow]
    init_low: np.ndarray | None = None
    init_high: np.ndarray | None = None
    stack: Callable[[Sequence[DemoWindow], int], WindowBatch] | None = None


@dataclass
class AugmentReport:
    """Totals over a store: counts, acceptance rate, diversity before/after, throughput (see :class:`DemoResult`).

    Diversity figures are means over demonstrations of the per-start-state mean pairwise RMS distance between
    position trajectories (model rollouts): ``div_candidates`` all satisfying candidates, ``div_random`` a random
    ``per_demo``-subset of them (random restarts alone), ``div_selected`` the stored episodes (after farthest-point
    selection). ``modes_per_demo_before``: distinct behaviour modes the demonstrations show per start state (env
    seed); ``modes_per_demo_after``: distinct modes among the stored episodes per demonstration, each verified in
    the replay (its mode formula is part of the specification checked there).
    """

    n_demos: int = 0
    per_demo: int = 0
    n_candidates: int = 0
    n_satisfying: int = 0
    n_replayed: int = 0
    n_accepted: int = 0
    n_rejected_collision: int = 0
    div_candidates: float = 0.0
    div_random: float = 0.0
    div_selected: float = 0.0
    modes_per_demo_before: float = 0.0
    modes_per_demo_after: float = 0.0
    mode_counts_demos: dict[str, int] = field(default_factory=dict)
    mode_counts_augmented: dict[str, int] = field(default_factory=dict)
    rejected_by_mode: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    worker_seconds: float = 0.0
    optimise_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / replayed: how often a model-satisfying candidate also satisfies its θ in MuJoCo."""
        return self.n_accepted / self.n_replayed if self.n_replayed else 0.0

    @property
    def satisfying_per_second(self) -> float:
        """Stored (replay-verified) trajectories per second of wall time."""
        return self.n_accepted / self.seconds if self.seconds else 0.0

    @property
    def model_satisfying_per_second(self) -> float:
        """Candidates satisfying their θ in the model per second of optimisation (summed over workers)."""
        return self.n_satisfying / self.optimise_seconds if self.optimise_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(
            acceptance_rate=self.acceptance_rate,
            satisfying_per_second=self.satisfying_per_second,
            model_satisfying_per_second=self.model_satisfying_per_second,
        )
        return d
