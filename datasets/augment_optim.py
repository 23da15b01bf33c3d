"""Optimisers of the STL augmentation: control sequences that satisfy a specification at a θ, many at once.

Controls are piecewise linear between knots (:func:`knot_matrix`). Candidates come in :class:`CandidateGroup` s,
each optimised against one specification at one θ; all groups share one batch.

- :func:`optimise_controls`: Adam on smooth robustness through a differentiable dynamics model
  (``optimiser="adam"``), satisfied candidates leaving the batch as they succeed.
- :func:`cem_controls`: the cross-entropy method around a nominal control sequence, for tasks without a
  differentiable model (``optimiser="cem"``; the rollout may step the simulator).

Symbols: B candidates, H horizon (control steps), Du control dimension, P position dimension.
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
    group_of = group_index(groups)
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
    group_of = group_index(groups)
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
