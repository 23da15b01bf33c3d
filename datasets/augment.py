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

Layering: this module imports only ``stlflow.stl`` (and torch/numpy). Everything task-specific -- the
dynamics model, signal extraction, the replay in MuJoCo -- arrives through :class:`DemoWindow` callables
that the caller (``stlflow augment``) wires in from ``stlflow.envs``.

Symbols: B candidates, H horizon (control steps), Du control dimension, P position dimension.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "AugmentSettings",
    "CandidateGroup",
    "DemoResult",
    "DemoWindow",
    "ModeSpec",
    "ReplayResult",
    "augment_demo",
    "bound_penalty",
    "cem_controls",
    "farthest_point_selection",
    "mean_pairwise_distance",
    "optimise_controls",
    "random_smooth_controls",
    "sample_theta",
    "spec_text",
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
    """

    horizon: int
    rollout: Callable[[torch.Tensor], torch.Tensor]
    signals: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    positions: Callable[[torch.Tensor], torch.Tensor]
    replay: Callable[[np.ndarray], ReplayResult]
    nominal: np.ndarray | dict[str, np.ndarray] | None = None
    retime: Callable[[np.ndarray, dict[str, float]], np.ndarray] | None = None

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
    """Optimisation and selection settings (defaults from the measurements in DESIGN.md).

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


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
def spec_text(rules: str, mode: ModeSpec) -> str:
    """The STL text optimised for ``mode``: ``(rules) & (mode.formula)``, or the rules alone."""
    return rules if not mode.formula else f"({rules}) & ({mode.formula})"


def sample_theta(
    ranges: dict[str, tuple[float, float]],
    rng: np.random.Generator,
    *,
    base: dict[str, float] | None = None,
    time_params: Sequence[str] = (),
    dt: float = 1.0,
) -> dict[str, float]:
    """One θ: each parameter uniform in its (low, high) range; parameters only in ``base`` keep their value.

    Time-bound parameters (``time_params``) are rounded to a multiple of ``dt`` (STL interval bounds must be).
    The draw order is the sorted parameter names, so a seed gives the same θ whatever the dict order.
    """
    theta = dict(base or {})
    for name in sorted(ranges):
        lo, hi = ranges[name]
        if not hi >= lo:
            raise ValueError(f"parameter range for {name!r} is empty: ({lo}, {hi})")
        value = float(rng.uniform(lo, hi))
        if name in time_params:
            value = max(round(value / dt), 1) * dt
        theta[name] = value
    return theta


def knot_matrix(horizon: int, knot_every: int) -> torch.Tensor:
    """(H, K) linear-interpolation weights from K knots (every ``knot_every`` steps, last step included) to H steps."""
    if horizon < 1 or knot_every < 1:
        raise ValueError(f"horizon and knot_every must be >= 1, got {horizon}, {knot_every}")
    knots = list(range(0, horizon, knot_every))
    if knots[-1] != horizon - 1:
        knots.append(horizon - 1)
    w = torch.zeros(horizon, len(knots), dtype=torch.float64)
    for j in range(len(knots) - 1):
        a, b = knots[j], knots[j + 1]
        s = torch.arange(a, b + 1, dtype=torch.float64)
        frac = (s - a) / (b - a)
        w[a : b + 1, j] = 1.0 - frac
        w[a : b + 1, j + 1] = frac
    if len(knots) == 1:
        w[:, 0] = 1.0
    return w


def random_smooth_controls(
    n: int, n_knots: int, low: torch.Tensor, high: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """(n, n_knots, Du) knot values uniform in [low, high]; interpolated, they give smooth random controls."""
    u = torch.rand(n, n_knots, low.numel(), generator=generator, dtype=low.dtype)
    return low + (high - low) * u


def bound_penalty(controls: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared violation of ``low <= controls <= high`` over time and channels (0 inside the box)."""
    over = torch.relu(controls - high) + torch.relu(low - controls)
    return (over**2).mean(dim=(-2, -1))


@dataclass
class CandidateGroup:
    """``n`` candidates optimised against one specification at one θ (plain floats shared by the group)."""

    mode: str
    spec: Any  # stlflow.stl formula
    theta: dict[str, float]
    n: int


def optimise_controls(
    groups: Sequence[CandidateGroup],
    window: DemoWindow,
    low: torch.Tensor,
    high: torch.Tensor,
    dt: float,
    settings: AugmentSettings,
    generator: torch.Generator,
    init_low: torch.Tensor | None = None,
    init_high: torch.Tensor | None = None,
    on_check: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam on smooth robustness through the dynamics model, all groups in one batch.

    Knots start uniform in ``[init_low, init_high]`` (default the control bounds). Every ``check_every``
    iterations the exact robustness of the still-active candidates is checked on clipped controls; those at or
    above the margin are frozen as they are and leave the batch (so the batch shrinks as candidates succeed).

    Returns ``controls (B, H, Du)`` clipped to the bounds, ``rho (B,)`` the exact robustness of each
    candidate's own specification at its θ for those controls (in the model), and ``positions (B, H, P)``.
    B = sum of the groups' ``n``, in group order. ``on_check(iteration, done (B,))`` follows each check.
    """
    horizon = window.horizon
    w = knot_matrix(horizon, settings.knot_every).to(low.dtype)
    n_total = sum(g.n for g in groups)
    lo0 = low if init_low is None else init_low.to(low)
    hi0 = high if init_high is None else init_high.to(low)
    knots = random_smooth_controls(n_total, w.shape[1], lo0, hi0, generator).requires_grad_(True)
    opt = torch.optim.Adam([knots], lr=settings.lr)
    group_of = torch.cat([torch.full((g.n,), i, dtype=torch.long) for i, g in enumerate(groups)])
    units = _evaluation_units(groups, low.dtype)

    def evaluate(controls: torch.Tensor, rows: torch.Tensor, smooth: float | None) -> torch.Tensor:
        return _evaluate(window, units, group_of, controls, rows, dt, smooth)

    active = torch.arange(n_total)
    check_every = max(int(settings.check_every), 1)
    for it in range(settings.iters + 1):
        if it % check_every == 0 or it == settings.iters:
            with torch.no_grad():
                controls = torch.einsum("hk,bkd->bhd", w, knots[active]).clamp(low, high)
                ok = evaluate(controls, active, None) >= settings.margin
                active = active[~ok]
            if on_check is not None:
                done = torch.ones(n_total, dtype=torch.bool)
                done[active] = False
                on_check(it, done)
            if len(active) == 0 or it == settings.iters:
                break
        controls = torch.einsum("hk,bkd->bhd", w, knots[active])
        rho = evaluate(controls, active, settings.smooth)
        loss = torch.relu(settings.margin - rho) + settings.bound_weight * bound_penalty(controls, low, high)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        # Frozen candidates get no gradient; zero their Adam moments' effect by restoring them after the step.
        frozen = knots.detach()[~_mask(active, n_total)].clone()
        opt.step()
        with torch.no_grad():
            knots[~_mask(active, n_total)] = frozen
    with torch.no_grad():
        controls = torch.einsum("hk,bkd->bhd", w, knots).clamp(low, high)
        rows = torch.arange(n_total)
        rho = evaluate(controls, rows, None)
        positions = window.positions(window.rollout(controls))
    return controls.detach(), rho.detach(), positions.detach()


def _evaluate(
    window: DemoWindow,
    units: list[tuple[Any, torch.Tensor, dict]],
    group_of: torch.Tensor,
    controls: torch.Tensor,
    rows: torch.Tensor,
    dt: float,
    smooth: float | None,
) -> torch.Tensor:
    """Robustness (len(rows),) of candidates ``rows`` (indices into the groups' layout) with ``controls``."""
    sig = window.signals(window.rollout(controls))
    rho = torch.empty(len(rows), dtype=controls.dtype)
    gid = group_of[rows]
    for spec, member, row_params in units:
        sel = torch.nonzero(member[gid]).squeeze(1)
        if len(sel) == 0:
            continue
        part = {k: sig[k].index_select(0, sel).to(controls.dtype) for k in spec.signals}
        params = {k: v if isinstance(v, float) else v[rows[sel]] for k, v in row_params.items()}
        rho = rho.index_put((sel,), spec.robustness(part, dt=dt, params=params, smooth=smooth).to(rho.dtype))
    return rho


def cem_controls(
    groups: Sequence[CandidateGroup],
    window: DemoWindow,
    low: torch.Tensor,
    high: torch.Tensor,
    dt: float,
    settings: AugmentSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy method around each group's nominal (``window.nominal_for(mode, theta)``), all groups' samples
    rolled out together each round.

    Each group's ``n`` must be ``cem_iters * cem_samples``: every sample of every round is a candidate (round r,
    sample j of group g sits at ``start_g + r * cem_samples + j``); round 0 includes the nominal itself. The
    perturbation is piecewise linear between knots (``knot_every``). Returns ``controls (B, H, Du)`` clipped to
    the bounds, exact ``rho (B,)`` and ``positions (B, H, P)`` as :func:`optimise_controls` does.
    """
    n_s, n_r = int(settings.cem_samples), int(settings.cem_iters)
    for g in groups:
        if g.n != n_s * n_r:
            raise ValueError(f"group {g.mode!r} has n={g.n}; optimiser='cem' needs cem_iters*cem_samples={n_s * n_r}")
    w = knot_matrix(window.horizon, settings.knot_every).to(low.dtype)
    base = torch.stack([torch.as_tensor(window.nominal_for(g.mode, g.theta), dtype=low.dtype)
                        for g in groups])  # (G, H, Du)
    std0 = (high - low) * 0.05 if settings.cem_std is None else torch.as_tensor(settings.cem_std, dtype=low.dtype)
    n_g, n_k, n_u = len(groups), w.shape[1], low.numel()
    mean = torch.zeros(n_g, n_k, n_u, dtype=low.dtype)
    std = std0.expand(n_g, n_k, n_u).clone()
    units = _evaluation_units(groups, low.dtype)
    group_of = torch.cat([torch.full((g.n,), i, dtype=torch.long) for i, g in enumerate(groups)])
    starts = torch.as_tensor(np.cumsum([0] + [g.n for g in groups])[:-1])
    n_total = int(group_of.numel())
    all_controls = torch.empty(n_total, window.horizon, n_u, dtype=low.dtype)
    all_rho = torch.empty(n_total, dtype=low.dtype)
    n_elite = max(1, min(int(settings.cem_elites), n_s))
    for r in range(n_r):
        eps = torch.randn(n_g, n_s, n_k, n_u, generator=generator, dtype=low.dtype)
        knots = mean[:, None] + std[:, None] * eps
        if r == 0:
            knots[:, 0] = 0.0  # the nominal controls themselves
        controls = (base[:, None] + torch.einsum("hk,gskd->gshd", w, knots)).clamp(low, high)
        rows = (starts[:, None] + r * n_s + torch.arange(n_s)[None]).reshape(-1)
        with torch.no_grad():
            rho = _evaluate(window, units, group_of, controls.reshape(-1, window.horizon, n_u), rows, dt, None)
        all_controls[rows] = controls.reshape(-1, window.horizon, n_u)
        all_rho[rows] = rho
        top = torch.topk(rho.reshape(n_g, n_s), n_elite, dim=1).indices  # (G, E)
        elite = torch.gather(knots, 1, top[..., None, None].expand(-1, -1, n_k, n_u))
        a = float(settings.cem_alpha)
        mean = (1 - a) * mean + a * elite.mean(1)
        std = (1 - a) * std + a * elite.std(1, unbiased=False).clamp_min(1e-6)
    with torch.no_grad():
        positions = window.positions(window.rollout(all_controls))
    return all_controls, all_rho, positions


def _evaluation_units(groups: Sequence[CandidateGroup], dtype: torch.dtype) -> list[tuple[Any, torch.Tensor, dict]]:
    """Groups that share a specification (same mode, same time bounds) -> one robustness call each.

    Returns ``(spec, member (n_groups,) bool, params)`` with ``params[name]`` a float when all the unit's groups
    share the value (always so for time bounds) or a per-candidate tensor (n_total,) of real thresholds.
    """
    time_names = {n for g in groups for n in getattr(g.spec, "interval_params", set())}
    n_total = sum(g.n for g in groups)
    keys: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        key = (str(g.spec), tuple(sorted((k, v) for k, v in g.theta.items() if k in time_names)))
        keys.setdefault(key, []).append(i)
    starts = np.cumsum([0] + [g.n for g in groups])
    units = []
    for members in keys.values():
        spec = groups[members[0]].spec
        member = torch.zeros(len(groups), dtype=torch.bool)
        member[members] = True
        params: dict[str, Any] = {}
        for name in groups[members[0]].theta:
            values = {groups[i].theta[name] for i in members}
            if len(values) == 1:
                params[name] = float(values.pop())
            else:
                table = torch.zeros(n_total, dtype=dtype)
                for i in members:
                    table[starts[i] : starts[i + 1]] = groups[i].theta[name]
                params[name] = table
        units.append((spec, member, params))
    return units


def _mask(rows: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[rows] = True
    return m


def farthest_point_selection(
    points: torch.Tensor, k: int, groups: Sequence[int] | None = None, start: int = 0
) -> list[int]:
    """Up to ``k`` indices of ``points (N, F)``, each the farthest (Euclidean) from those already chosen.

    With ``groups`` (length N, a group id per point) the choice is balanced: each step serves the group with
    the fewest selections so far (ties: smallest id), picking its point farthest from *all* chosen points.
    ``start`` is the first index chosen. Returns the selection order.
    """
    n = points.shape[0]
    if n == 0 or k <= 0:
        return []
    gid = torch.zeros(n, dtype=torch.long) if groups is None else torch.as_tensor(list(groups), dtype=torch.long)
    chosen = [start]
    dist = torch.cdist(points, points[start : start + 1]).squeeze(1)
    taken = torch.zeros(n, dtype=torch.bool)
    taken[start] = True
    counts: dict[int, int] = {int(g): 0 for g in gid.unique()}
    counts[int(gid[start])] += 1
    while len(chosen) < min(k, n):
        open_groups = [g for g in sorted(counts) if bool(((gid == g) & ~taken).any())]
        g = min(open_groups, key=lambda x: counts[x])
        score = torch.where((gid == g) & ~taken, dist, torch.full_like(dist, -1.0))
        i = int(torch.argmax(score))
        chosen.append(i)
        taken[i] = True
        counts[g] += 1
        dist = torch.minimum(dist, torch.cdist(points, points[i : i + 1]).squeeze(1))
    return chosen


def mean_pairwise_distance(trajectories: torch.Tensor) -> float:
    """Mean over pairs of the RMS distance between trajectories ``(N, H, P)`` (units of P; 0 when N < 2)."""
    n, horizon = trajectories.shape[0], trajectories.shape[1]
    if n < 2:
        return 0.0
    d = torch.cdist(trajectories.reshape(n, -1).double(), trajectories.reshape(n, -1).double()) / math.sqrt(horizon)
    return float(d.sum() / (n * (n - 1)))


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
    t0 = time.perf_counter()
    if not modes:
        raise ValueError("augment_demo needs at least one ModeSpec")
    ss = np.random.SeedSequence(seed)
    rng = np.random.default_rng(ss.spawn(1)[0])
    generator = torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))
    dtype = {"float32": torch.float32, "float64": torch.float64}[settings.dtype]
    low = torch.as_tensor(np.asarray(control_low), dtype=dtype)
    high = torch.as_tensor(np.asarray(control_high), dtype=dtype)

    if settings.optimiser not in ("adam", "cem"):
        raise ValueError(f"optimiser must be 'adam' or 'cem', got {settings.optimiser!r}")
    n_per_group = settings.n_init if settings.optimiser == "adam" else settings.cem_iters * settings.cem_samples
    groups: list[CandidateGroup] = []
    for mode in modes:
        spec = parse(spec_text(rules, mode))
        # Time bounds are drawn once per mode (the demo's own for its mode), so that the mode's groups share
        # one robustness call; thresholds vary per θ.
        time_names = set(spec.interval_params)
        shared: dict[str, float] | None = None
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

    init = [None if a is None else torch.as_tensor(np.asarray(a), dtype=dtype) for a in (init_low, init_high)]
    if settings.optimiser == "adam":
        controls, rho, positions = optimise_controls(groups, window, low, high, dt, settings, generator, *init)
    else:
        controls, rho, positions = cem_controls(groups, window, low, high, dt, settings, generator)
    t_opt = time.perf_counter() - t0
    group_of = torch.cat([torch.full((g.n,), i, dtype=torch.long) for i, g in enumerate(groups)])
    ok = torch.nonzero(rho >= settings.margin).squeeze(1)
    feats = positions.reshape(positions.shape[0], -1)

    div_candidates = mean_pairwise_distance(positions[ok])
    perm = torch.randperm(len(ok), generator=generator)[: settings.per_demo]
    div_random = mean_pairwise_distance(positions[ok[perm]])

    # Candidates in selection order (group-balanced farthest point), replayed until per_demo are accepted.
    order = [int(ok[i]) for i in farthest_point_selection(feats[ok], len(ok), group_of[ok].tolist())] if len(ok) else []
    episodes: list[tuple[dict[str, Any], dict[str, Any]]] = []
    accepted_idx: list[int] = []
    n_replayed = n_collided = 0
    rejected: list[str] = []
    for i in order:
        if len(episodes) >= settings.per_demo or n_replayed >= settings.max_replays:
            break
        g = groups[int(group_of[i])]
        replay = window.replay(controls[i].numpy())
        n_replayed += 1
        sig = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in replay.signals.items()}
        missing = set(g.spec.signals) - set(sig)
        if missing:
            raise KeyError(f"replay returned no signal(s) {sorted(missing)}; it returned {sorted(sig)}")
        rho_replay = float(g.spec.robustness({k: sig[k] for k in g.spec.signals}, dt=dt, params=g.theta))
        if replay.collision or not rho_replay >= 0.0:
            n_collided += int(replay.collision)
            rejected.append(g.mode)
            continue
        arrays = {"obs": replay.obs, "action": replay.action, "signals": replay.signals}
        attrs = {
            **replay.attrs,
            "collision": False,
            "mode": g.mode,
            "stl_params": dict(g.theta),
            "rho_model": float(rho[i]),
            "rho_replay": rho_replay,
        }
        episodes.append((arrays, attrs))
        accepted_idx.append(i)
    return DemoResult(
        episodes=episodes,
        n_candidates=len(rho),
        n_satisfying=len(ok),
        n_replayed=n_replayed,
        n_accepted=len(episodes),
        n_rejected_collision=n_collided,
        rejected_modes=rejected,
        div_candidates=div_candidates,
        div_random=div_random,
        div_selected=mean_pairwise_distance(positions[accepted_idx]),
        modes_satisfied=sorted({groups[int(group_of[i])].mode for i in ok.tolist()}),
        seconds=time.perf_counter() - t0,
        optimise_seconds=t_opt,
    )


# ----------------------------------------------------------------------------------------------------------------
# A whole store, with worker processes
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


_WORKER: dict[str, Any] = {}


def _worker_init(make_task: Callable[[], AugmentTask], data_path: str, parse: Callable, settings, seed) -> None:
    torch.set_num_threads(1)  # one thread per worker: oversubscription costs 15-60x on this class of machine
    from stlflow.datasets.store import EpisodeStore

    _WORKER.update(task=make_task(), store=EpisodeStore.open(data_path), parse=parse, settings=settings, seed=seed)


def _worker_demo(i: int) -> tuple[int, DemoResult, dict[str, Any]]:
    task: AugmentTask = _WORKER["task"]
    store = _WORKER["store"]
    attrs = store.episode_attrs(i)
    episode = store.episode(i)
    theta = {**task.defaults, **dict(attrs.get("stl_params") or {})}
    result = augment_demo(
        task.window(episode, attrs),
        task.rules,
        task.modes,
        attrs.get("mode"),
        theta,
        task.param_ranges,
        task.control_low,
        task.control_high,
        task.dt,
        _WORKER["settings"],
        seed=(int(_WORKER["seed"]), int(i)),
        parse=_WORKER["parse"],
        init_low=task.init_low,
        init_high=task.init_high,
    )
    return i, result, attrs


def augment_store(
    data_path: str,
    out_path: str,
    make_task: Callable[[], AugmentTask],
    settings: AugmentSettings,
    parse: Callable[[str], Any],
    *,
    seed: int = 0,
    workers: int = 1,
    episodes: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    out_attrs: dict[str, Any] | None = None,
) -> AugmentReport:
    """Augment every demonstration of the store at ``data_path`` into a new EpisodeStore at ``out_path``.

    ``make_task`` builds the :class:`AugmentTask` (it runs once in each worker process, so it must be
    picklable: a module-level function or a ``functools.partial`` of one). Demo ``i`` is processed with seed
    ``(seed, i)`` on one torch thread, and episodes are written in demo order, so the output is identical for
    any ``workers``. Output keys: the demo store's ``obs``, ``action`` and ``signal_<name>`` (same dtypes, so
    the two stores merge); episode attrs ``source="augmented"``, ``stl_params``, ``mode``, ``seed`` (the
    parent's env seed), ``parent_episode``, ``rho_model``, ``rho_replay``.
    """
    import multiprocessing as mp

    from tqdm.auto import tqdm

    from stlflow.datasets.store import EpisodeStore

    t0 = time.perf_counter()
    demos = EpisodeStore.open(data_path)
    indices = list(range(demos.n_episodes)) if episodes is None else [int(i) for i in episodes]
    keys = [k for k in demos.keys if k in ("obs", "action") or k.startswith("signal_")]
    for k in ("obs", "action"):
        if k not in keys:
            raise KeyError(f"{data_path} has no key {k!r} (keys: {demos.keys}); augmentation needs obs and action")
    schema = {k: (demos.key_shape(k), demos.key_dtype(k)) for k in keys}
    attrs = {**demos.attrs, **(out_attrs or {}), "source": "augmented", "augmented_from": str(data_path)}
    out = EpisodeStore.create(out_path, dt=demos.dt, attrs=attrs, overwrite=overwrite, schema=schema)

    report = AugmentReport(n_demos=len(indices), per_demo=settings.per_demo)
    div_c, div_r, div_s, modes_after = [], [], [], []
    init_args = (make_task, str(data_path), parse, settings, seed)
    threads = torch.get_num_threads()
    pool = None
    bar = tqdm(total=len(indices), desc="augment", unit="demo", disable=not progress)
    try:
        if workers <= 1:
            _worker_init(*init_args)
            results = map(_worker_demo, indices)
        else:
            pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=init_args)
            results = pool.imap(_worker_demo, indices)
        for i, res, parent in results:
            for arrays, ep_attrs in res.episodes:
                episode = {"obs": arrays["obs"], "action": arrays["action"]}
                for k in keys:
                    if k.startswith("signal_"):
                        episode[k] = np.asarray(arrays["signals"][k[len("signal_") :]])
                out.add_episode(
                    episode,
                    {
                        "source": "augmented",
                        **ep_attrs,
                        "seed": parent.get("seed"),
                        "parent_episode": int(i),
                        "parent_mode": parent.get("mode"),
                        "env_id": parent.get("env_id"),
                    },
                )
                counts = report.mode_counts_augmented
                counts[ep_attrs["mode"]] = counts.get(ep_attrs["mode"], 0) + 1
            mode = str(parent.get("mode"))
            report.mode_counts_demos[mode] = report.mode_counts_demos.get(mode, 0) + 1
            report.n_candidates += res.n_candidates
            report.n_satisfying += res.n_satisfying
            report.n_replayed += res.n_replayed
            report.n_accepted += res.n_accepted
            report.n_rejected_collision += res.n_rejected_collision
            for m in res.rejected_modes:
                report.rejected_by_mode[m] = report.rejected_by_mode.get(m, 0) + 1
            report.worker_seconds += res.seconds
            report.optimise_seconds += res.optimise_seconds
            div_c.append(res.div_candidates)
            div_r.append(res.div_random)
            div_s.append(res.div_selected)
            modes_after.append(len({a["mode"] for _, a in res.episodes}))
            bar.update(1)
            bar.set_postfix(accepted=report.n_accepted, rate=f"{report.acceptance_rate:.2f}")
    finally:
        bar.close()
        if workers <= 1:
            torch.set_num_threads(threads)
            _WORKER.clear()
        elif pool is not None:
            pool.close()
            pool.join()
    report.div_candidates = float(np.mean(div_c)) if div_c else 0.0
    report.div_random = float(np.mean(div_r)) if div_r else 0.0
    report.div_selected = float(np.mean(div_s)) if div_s else 0.0
    # Start states are env seeds: how many distinct modes the demonstrations show from each one.
    by_seed: dict[Any, set] = {}
    for i in indices:
        a = demos.episode_attrs(i)
        by_seed.setdefault(a.get("seed", ("episode", i)), set()).add(a.get("mode"))
    report.modes_per_demo_before = float(np.mean([len(m) for m in by_seed.values()])) if by_seed else 0.0
    report.modes_per_demo_after = float(np.mean(modes_after)) if modes_after else 0.0
    report.seconds = time.perf_counter() - t0
    out.set_attrs({"augment_report": report.as_dict()})
    return report
