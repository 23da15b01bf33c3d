"""Optimisers of the STL augmentation: control sequences that satisfy a specification at a θ, many at once.

Controls are piecewise linear between knots (:func:`knot_matrix`). Candidates come in :class:`CandidateGroup` s,
each optimised against one specification at one θ; all groups share one batch.

- :func:`optimise_batch`: Adam on smooth robustness through a differentiable dynamics model
  (``optimiser="adam"``) for the groups of many demonstrations at once (a :class:`WindowBatch`: one tensor
  program), satisfied candidates leaving the batch as they succeed; :func:`optimise_controls` is the same for
  one demonstration.
- :func:`cem_controls`: the cross-entropy method around a nominal control sequence, for tasks without a
  differentiable model (``optimiser="cem"``; the rollout may step the simulator).

Time bounds of the form ``F[0,{T}](signal <= c)`` (or ``>=``, ``<``, ``>``), conjoined at the top of a
specification, do not split the batch: rows with a smaller ``T`` see the signal replaced by a value that makes the
predicate false by ``MASK`` beyond their own bound, and the whole unit is evaluated at its largest ``T`` -- exactly
the same robustness (exact and smooth, to float round-off) with one evaluation instead of one per distinct ``T``.

Symbols: B candidates, H horizon (control steps), Du control dimension, P position dimension, N demonstrations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from stlflow.datasets.augment import AugmentSettings, DemoWindow

__all__ = [
    "CandidateGroup",
    "bound_penalty",
    "cem_controls",
    "group_index",
    "knot_matrix",
    "DemoProblem",
    "WindowBatch",
    "maskable_time_bound",
    "optimise_batch",
    "optimise_controls",
    "random_smooth_controls",
]


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


def group_index(groups: Sequence[CandidateGroup]) -> torch.Tensor:
    """(B,) long: the index of each candidate's group, candidates laid out group after group."""
    return torch.cat([torch.full((g.n,), i, dtype=torch.long) for i, g in enumerate(groups)])


MASK = 1e6  # signal units: a masked sample sits this far on the wrong side of its threshold (see the module doc)


@dataclass
class WindowBatch:
    """The windows of N demonstrations as one batched problem (built by the task's ``stack``, or :meth:`of`).

    Row b of every call belongs to demonstration ``demo[b]`` ((B,) long, an index into the stacked windows):

    - ``rollout(controls (B, H, Du), demo) -> states (B, H, Ds)``: each row from its demonstration's start state;
    - ``signals(states, demo) -> {name: (B, H)}`` and ``positions(states) -> (B, H, P)`` as in ``DemoWindow``;
    - ``replay(items) -> [ReplayResult]``: ``items`` is a list of ``(demo, controls (H, Du) ndarray)``, each
      replayed in the real simulator from its demonstration's start (the task may run them in parallel).

    ``horizon`` H is shared by every window of the batch.
    """

    horizon: int
    rollout: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    signals: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    positions: Callable[[torch.Tensor], torch.Tensor]
    replay: Callable[[list[tuple[int, np.ndarray]]], list[Any]]

    @classmethod
    def of(cls, windows: Sequence[DemoWindow]) -> WindowBatch:
        """A batch that calls each window's own callables on its rows, one demonstration after the other (any
        task; a task's ``stack`` runs every row in one program instead)."""
        windows = list(windows)
        horizons = sorted({w.horizon for w in windows})
        if len(horizons) != 1:
            raise ValueError(f"windows of one batch must share their horizon; got horizons {horizons}")

        def per_demo(fn: Callable, x: torch.Tensor, demo: torch.Tensor) -> Any:
            if len(windows) == 1:
                return fn(windows[0], x)
            order = torch.argsort(demo, stable=True)
            parts = [fn(windows[int(i)], x[order[demo[order] == i]]) for i in demo.unique()]
            inverse = torch.argsort(order)
            if isinstance(parts[0], dict):
                return {k: torch.cat([p[k] for p in parts])[inverse] for k in parts[0]}
            return torch.cat(parts)[inverse]

        return cls(
            horizon=horizons[0],
            rollout=lambda controls, demo: per_demo(lambda w, c: w.rollout(c), controls, demo),
            signals=lambda states, demo: per_demo(lambda w, st: w.signals(st), states, demo),
            positions=windows[0].positions,
            replay=lambda items: [windows[i].replay(c) for i, c in items],
        )


@dataclass
class DemoProblem:
    """One demonstration's share of a batch: its candidate groups and its random stream (its knots come from it)."""

    groups: list[CandidateGroup]
    generator: torch.Generator


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
    """:func:`optimise_batch` for one demonstration (its window's own callables)."""
    problem = DemoProblem(list(groups), generator)
    return optimise_batch([problem], WindowBatch.of([window]), low, high, dt, settings, init_low, init_high,
                          on_check)[0]


def optimise_batch(
    problems: Sequence[DemoProblem],
    batch: WindowBatch,
    low: torch.Tensor,
    high: torch.Tensor,
    dt: float,
    settings: AugmentSettings,
    init_low: torch.Tensor | None = None,
    init_high: torch.Tensor | None = None,
    on_check: Callable[[int, torch.Tensor], None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Adam on smooth robustness through the dynamics model, the groups of every demonstration in one batch.

    Problem i's knots start uniform in ``[init_low, init_high]`` (default the control bounds), drawn from its own
    generator, so a candidate gets the same start whatever else shares the batch; Adam acts element-wise and each
    candidate's loss is its own, so its path does not depend on the batch either (to float round-off). Every
    ``check_every`` iterations the exact robustness of the still-active candidates is checked on clipped controls;
    those at or above the margin are frozen as they are and leave the batch. At the check of iteration
    ``settings.prune_at`` (0: never) those still below ``settings.prune_below`` leave it too, unsatisfied.

    Returns, per problem, ``controls (B_i, H, Du)`` clipped to the bounds, ``rho (B_i,)`` the exact robustness of
    each candidate's own specification at its θ for those controls (in the model), and ``positions (B_i, H, P)``,
    B_i = sum of the problem's group sizes, in group order. ``on_check(iteration, done (B,))`` follows each check
    (B = all candidates, problem after problem).
    """
    w = knot_matrix(batch.horizon, settings.knot_every).to(low.dtype)
    groups = [g for p in problems for g in p.groups]
    sizes = [sum(g.n for g in p.groups) for p in problems]
    n_total = sum(sizes)
    lo0 = low if init_low is None else init_low.to(low)
    hi0 = high if init_high is None else init_high.to(low)
    knots = torch.cat([random_smooth_controls(n, w.shape[1], lo0, hi0, p.generator)
                       for n, p in zip(sizes, problems)]).requires_grad_(True)
    opt = torch.optim.Adam([knots], lr=settings.lr)
    group_of = group_index(groups)
    row_demo = torch.repeat_interleave(torch.arange(len(problems)), torch.as_tensor(sizes))
    units = _evaluation_units(groups, low.dtype, dt)

    def evaluate(controls: torch.Tensor, rows: torch.Tensor, smooth: float | None) -> torch.Tensor:
        return _evaluate(batch, units, group_of, row_demo, controls, rows, dt, smooth)

    active = torch.arange(n_total)
    check_every = max(int(settings.check_every), 1)
    for it in range(settings.iters + 1):
        if it % check_every == 0 or it == settings.iters:
            with torch.no_grad():
                controls = torch.einsum("hk,bkd->bhd", w, knots[active]).clamp(low, high)
                rho = evaluate(controls, active, None)
                keep = rho < settings.margin
                if settings.prune_at and it == settings.prune_at:  # far from satisfying by now: rarely ever will
                    keep &= rho >= settings.prune_below
                active = active[keep]
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
        positions = batch.positions(batch.rollout(controls, row_demo))
    return list(zip(controls.detach().split(sizes), rho.detach().split(sizes), positions.detach().split(sizes)))


@dataclass
class _Unit:
    """Groups that share one robustness call: their specification, member groups, parameters (floats, or (B,)
    per-candidate tables of thresholds) and the masked time bounds ``(signal, sign, steps (B,) long)``."""

    spec: Any
    member: torch.Tensor
    params: dict[str, Any]
    masks: list[tuple[str, float, torch.Tensor]]


def _evaluate(
    batch: WindowBatch,
    units: list[_Unit],
    group_of: torch.Tensor,
    row_demo: torch.Tensor,
    controls: torch.Tensor,
    rows: torch.Tensor,
    dt: float,
    smooth: float | None,
) -> torch.Tensor:
    """Robustness (len(rows),) of candidates ``rows`` (indices into the groups' layout) with ``controls``."""
    demo = row_demo[rows]
    sig = batch.signals(batch.rollout(controls, demo), demo)
    rho = torch.empty(len(rows), dtype=controls.dtype)
    gid = group_of[rows]
    for unit in units:
        sel = torch.nonzero(unit.member[gid]).squeeze(1)
        if len(sel) == 0:
            continue
        part = {k: sig[k].index_select(0, sel).to(controls.dtype) for k in unit.spec.signals}
        for name, sign, steps in unit.masks:
            beyond = torch.arange(part[name].shape[1]) > steps[rows[sel], None]
            part[name] = torch.where(beyond, torch.full_like(part[name], sign * MASK), part[name])
        params = {k: v if isinstance(v, float) else v[rows[sel]] for k, v in unit.params.items()}
        value = unit.spec.robustness(part, dt=dt, params=params, smooth=smooth)
        rho = rho.index_put((sel,), value.to(rho.dtype))
    return rho


def cem_controls(
    groups: Sequence[CandidateGroup],
    window: DemoWindow,
    low: torch.Tensor,
    high: torch.Tensor,
    dt: float,
    settings: AugmentSettings,
    generator: torch.Generator,
    batch: WindowBatch | None = None,
    demo: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy method around each group's nominal (``window.nominal_for(mode, theta)``), all groups' samples
    rolled out together each round.

    Each group's ``n`` must be ``cem_iters * cem_samples``: every sample of every round is a candidate (round r,
    sample j of group g sits at ``start_g + r * cem_samples + j``); round 0 includes the nominal itself. The
    perturbation is piecewise linear between knots (``knot_every``). Returns ``controls (B, H, Du)`` clipped to
    the bounds, exact ``rho (B,)`` and ``positions (B, H, P)`` as :func:`optimise_controls` does. With ``batch``
    (holding ``window`` as its demonstration ``demo``) the rollouts run through the batch's (e.g. in parallel).
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
    units = _evaluation_units(groups, low.dtype, dt)
    group_of = group_index(groups)
    batch = WindowBatch.of([window]) if batch is None else batch
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
            rho = _evaluate(batch, units, group_of, torch.full((n_total,), demo, dtype=torch.long),
                            controls.reshape(-1, window.horizon, n_u), rows, dt, None)
        all_controls[rows] = controls.reshape(-1, window.horizon, n_u)
        all_rho[rows] = rho
        top = torch.topk(rho.reshape(n_g, n_s), n_elite, dim=1).indices  # (G, E)
        elite = torch.gather(knots, 1, top[..., None, None].expand(-1, -1, n_k, n_u))
        a = float(settings.cem_alpha)
        mean = (1 - a) * mean + a * elite.mean(1)
        std = (1 - a) * std + a * elite.std(1, unbiased=False).clamp_min(1e-6)
    with torch.no_grad():
        positions = batch.positions(batch.rollout(all_controls, torch.full((n_total,), demo, dtype=torch.long)))
    return all_controls, all_rho, positions


def _evaluation_units(groups: Sequence[CandidateGroup], dtype: torch.dtype, dt: float) -> list[_Unit]:
    """Groups that share a specification (same mode, same unmaskable time bounds) -> one robustness call each.

    A parameter is a float when all the unit's groups share its value, else a per-candidate table (n_total,); a
    time bound that :func:`maskable_time_bound` accepts and that differs between the groups is evaluated at its
    largest value with the signal masked beyond each row's own bound.
    """
    time_names = {n for g in groups for n in getattr(g.spec, "interval_params", set())}
    n_total = sum(g.n for g in groups)
    keys: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        fixed = [(k, v) for k, v in g.theta.items() if k in time_names and maskable_time_bound(g.spec, k) is None]
        keys.setdefault((str(g.spec), tuple(sorted(fixed))), []).append(i)
    starts = np.cumsum([0] + [g.n for g in groups])
    units = []
    for members in keys.values():
        spec = groups[members[0]].spec
        member = torch.zeros(len(groups), dtype=torch.bool)
        member[members] = True
        params: dict[str, Any] = {}
        masks: list[tuple[str, float, torch.Tensor]] = []
        for name in groups[members[0]].theta:
            values = {groups[i].theta[name] for i in members}
            if len(values) == 1:
                params[name] = float(values.pop())
                continue
            table = torch.zeros(n_total, dtype=torch.float64)
            for i in members:
                table[starts[i] : starts[i + 1]] = groups[i].theta[name]
            if name in time_names:  # maskable (else it is part of the key): the largest bound, rows masked
                signal, sign = maskable_time_bound(spec, name)
                params[name] = float(max(values))
                masks.append((signal, sign, torch.round(table / dt).long()))
            else:
                params[name] = table.to(dtype)
        units.append(_Unit(spec, member, params, masks))
    return units


def maskable_time_bound(spec: Any, name: str) -> tuple[str, float] | None:
    """``(signal, sign)`` when time-bound parameter ``name`` occurs only in one top-level conjunct
    ``F[0,{name}](signal <op> expr)`` (``expr`` free of signals), whose signal occurs nowhere else in ``spec``; else
    None. Replacing the signal by ``sign * MASK`` beyond a row's own bound then gives that row's robustness at any
    larger bound. ``sign`` is +1 for ``signal <= expr`` / ``signal < expr`` and -1 for ``>=`` / ``>`` (mirrored when
    the signal is on the right)."""
    from stlflow.stl.syntax import And, Num, Param, Predicate, Signal, Temporal

    def conjuncts(f: Any) -> list[Any]:
        return [c for a in f.args for c in conjuncts(a)] if isinstance(f, And) else [f]

    found, rest = [], []
    for c in conjuncts(spec):
        iv = getattr(c, "interval", None)
        hit = (isinstance(c, Temporal) and c.op == "F" and isinstance(iv.lo, Num) and iv.lo.value == 0
               and iv.hi == Param(name) and isinstance(c.arg, Predicate))
        (found if hit else rest).append(c)
    if len(found) != 1 or any(name in c.params for c in rest):
        return None
    pred = found[0].arg
    less = pred.op in ("<=", "<")
    if isinstance(pred.left, Signal) and not pred.right.names(Signal):
        signal, sign = pred.left.name, 1.0 if less else -1.0
    elif isinstance(pred.right, Signal) and not pred.left.names(Signal):
        signal, sign = pred.right.name, -1.0 if less else 1.0
    else:
        return None
    if name in pred.params or any(signal in c.signals for c in rest):
        return None
    return signal, sign


def _mask(rows: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[rows] = True
    return m
