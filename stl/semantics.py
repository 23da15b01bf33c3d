"""Batched quantitative robustness of STL formulas, exact and smooth, with autograd.

Semantics (the default; every operator is tested against a brute-force evaluator written from this text)
-------------------------------------------------------------------------------------------------------
- ρ(φ, w) = ρ(φ, w, 0); everything is computed per sample index t = 0 .. n−1 of a signal of n samples.
- Predicates: ``a < b`` and ``a <= b`` give b − a; ``a > b`` and ``a >= b`` give a − b.
  ``!`` → −ρ; ``&`` → min; ``|`` → max; ``φ -> ψ`` → max(−ρ(φ), ρ(ψ)).
- Interval bounds are in the unit of ``dt`` (seconds) and must be integer multiples of ``dt`` (else a
  ``ValueError`` naming the bound); ``G[0,0.3]`` with ``dt = 0.1`` covers samples t .. t+3. No interval
  means ``[0, inf]``.
- Bounded future, at sample t: ``G[a,b]`` = min over [t+a, t+b] ∩ [0, n−1], +inf if that set is empty;
  ``F[a,b]`` = max over the same set, −inf if empty. ``φ U[a,b] ψ`` = max over t' in that set of
  min(ψ(t'), min of φ over [t, t')): the left operand holds from t up to but excluding t' (the min over an
  empty range is +inf). Windows are truncated at the end of the signal; nothing is padded.
  ``G φ`` = ``!F!φ`` holds exactly, at every sample, including the end.
- Past: ``H[a,b]`` / ``O[a,b]`` = min / max over [t−b, t−a] ∩ [0, t] (+inf / −inf if empty);
  ``φ S[a,b] ψ`` = max over t' in that set of min(ψ(t'), min of φ over (t', t]).
- Options: ``until="inclusive"`` makes the left operand of U hold on [t, t'] (and of S on [t', t]), as
  stlcg++ does; ``end="violate"`` makes a bounded future ``G[a,b]`` whose window runs past the last sample
  −inf (missing samples count as a violation); every other operator keeps the truncation rule, so the
  G/F duality holds only under the default ``end="truncate"``.
- NaN in any sample an operator reads makes its result NaN, wherever the NaN sits in the window.
  Inputs are never modified; a one-sample signal works. Bad input (``dt``, ``smooth``, a parameter or signal
  that is not numbers, a missing name, an interval bound that is not a whole number of samples) raises
  :class:`~stlflow.stl.inputs.STLInputError` naming it, never another exception or a NaN.

Smooth mode (``smooth=τ``): every min and max, including ``&``, ``|`` and ``->``, becomes a log-sum-exp at
temperature τ: max_τ(x₁..x_k) = log Σ exp(τ xᵢ) / τ and min_τ = −max_τ(−x). For an operator of arity k
(window operators: k = number of samples in the window) max ≤ max_τ ≤ max + log(k)/τ and
min − log(k)/τ ≤ min_τ ≤ min. Both are 1-Lipschitz, so the error of a formula is at most the sum of
log(k)/τ along its deepest path (``Formula.smooth_error_bound``). Until uses an outer max over the window
and an inner min over ψ(t') and φ on [t, t'), both smooth. Empty windows keep their ±inf values.

Shapes: signals (T,) or (B, T) → robustness (B,) at sample 0, traces (B, T); a (T,) input is B = 1. The
window kernels and their cost (O(B·T·log w) for exact windows and exact Until, O(B·T·w) for smooth Until) are
in :mod:`stlflow.stl.kernels`; input checking is in :mod:`stlflow.stl.inputs`.

``robustness`` (ρ at sample 0) evaluates top-down in point mode: boolean nodes combine their operands' values
at 0, a ``G``/``F`` reduces its operand's trace over its single window at 0 (one min/max or one
``torch.logsumexp``: O(B·w)), ``H``/``O``/``S`` read their operands at 0 only, ``U`` falls back to its trace.
Exact values are bit-identical to ``robustness_trace(...)[:, 0]``; smooth ones agree to float round-off (one
log-sum-exp over the window instead of the trace's pairwise log-add-exp; same ±inf and NaN rules).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .inputs import (
    STLInputError,
    as_param,
    check_dt,
    check_inputs,
    check_smooth,
    interval_groups,
    interval_steps,
    prepare_batch,
)
from .kernels import cumulative, filled, future_window, logsumexp_rows, nary, sliding_until
from .syntax import (
    Abs,
    And,
    BinaryTemporal,
    BinOp,
    Expr,
    Formula,
    Implies,
    Neg,
    Not,
    Num,
    Or,
    Param,
    Predicate,
    Signal,
    Temporal,
)

__all__ = [
    "robustness", "robustness_trace", "robustness_bounds", "horizon", "smooth_error_bound", "first_violation",
    "STLInputError",
]

INF = math.inf

# --------------------------------------------------------------------------- evaluator


class _Evaluator:
    """Evaluates formula nodes to traces (B, T). ``side`` ('lo'/'hi') evaluates interval bounds for the monitor:
    samples from ``known`` on are unknown and every node's value there is widened to ∓inf."""

    def __init__(self, xs, params, B, T, dt, tau, until, end, known=None, memo=None):
        self.xs, self.params, self.B, self.T, self.dt = xs, params, B, T, dt
        self.tau, self.inclusive, self.violate = tau, until == "inclusive", end == "violate"
        self.known, self.memo = known, memo
        self.like = next(iter(xs.values()))

    def expr(self, e: Expr):
        if isinstance(e, Num):
            return e.value
        if isinstance(e, Signal):
            return self.xs[e.name]
        if isinstance(e, Param):
            return self.params[e.name]
        if isinstance(e, Neg):
            return -self.expr(e.arg)
        if isinstance(e, Abs):
            v = self.expr(e.arg)
            return v.abs() if isinstance(v, torch.Tensor) else abs(v)
        assert isinstance(e, BinOp)
        l, r = self.expr(e.left), self.expr(e.right)
        return l + r if e.op == "+" else l - r if e.op == "-" else l * r

    def __call__(self, node: Formula, side: str | None = None) -> torch.Tensor:
        y = self._eval(node, side)
        if side is not None and self.known is not None and self.known < self.T:
            y = torch.cat([y[:, : self.known], filled(y, self.T - self.known, -INF if side == "lo" else INF)], 1)
        if self.memo is not None:
            self.memo[node] = y
        return y

    def _eval(self, node: Formula, side: str | None) -> torch.Tensor:
        flip = {None: None, "lo": "hi", "hi": "lo"}[side]
        tau = self.tau
        if isinstance(node, Predicate):
            l, r = self.expr(node.left), self.expr(node.right)
            v = r - l if node.op in ("<", "<=") else l - r
            if not isinstance(v, torch.Tensor) or v.shape != (self.B, self.T):
                v = torch.zeros((self.B, self.T), dtype=self.like.dtype, device=self.like.device) + v
            return v
        if isinstance(node, Not):
            return -self(node.arg, flip)
        if isinstance(node, And):
            return nary([self(c, side) for c in node.args], "min", tau)
        if isinstance(node, Or):
            return nary([self(c, side) for c in node.args], "max", tau)
        if isinstance(node, Implies):
            return nary([-self(node.left, flip), self(node.right, side)], "max", tau)
        a, b = interval_steps(node.interval, self.dt, self.params, node)  # type: ignore[attr-defined]
        if isinstance(node, Temporal):
            x = self(node.arg, side)
            kind = "min" if node.op in ("G", "H") else "max"
            if node.op in ("G", "F"):
                y = future_window(x, a, b, kind, tau)
                if node.op == "G" and self.violate and b is not None and b > 0:
                    keep = max(self.T - b, 0)
                    y = torch.cat([y[:, :keep], filled(y, self.T - keep, -INF)], 1)
                return y
            return future_window(x.flip(1), a, b, kind, tau).flip(1)
        assert isinstance(node, BinaryTemporal)
        phi, psi = self(node.left, side), self(node.right, side)
        if node.op == "U":
            return sliding_until(phi, psi, a, b, tau, self.inclusive)
        return sliding_until(phi.flip(1), psi.flip(1), a, b, tau, self.inclusive).flip(1)


def _rows(v: Any, idx: torch.Tensor, B: int, ndim: int) -> Any:
    """Rows ``idx`` of a signal (ndim=2) or parameter (ndim=1) that carries a batch axis of size B; else ``v``."""
    if isinstance(v, torch.Tensor | np.ndarray) and np.ndim(v) == ndim and np.shape(v)[0] == B:
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        return t.index_select(0, idx.to(t.device))
    return v


def _per_group(groups: list, signals: Mapping[str, Any], evaluate: Callable) -> torch.Tensor:
    """Evaluate each group of trajectories that share interval bounds (``interval_groups``) with ``evaluate(signals,
    params)`` and put the rows back in the batch's order."""
    B = sum(len(g[0]) for g in groups)
    parts, order = [], []
    for idx, p in groups:
        sig = {k: _rows(v, idx, B, 2) for k, v in signals.items()}
        parts.append(evaluate(sig, {k: _rows(v, idx, B, 1) for k, v in p.items()}))
        order.append(idx)
    inv = torch.argsort(torch.cat(order))
    return torch.cat(parts, 0).index_select(0, inv.to(parts[0].device))


def robustness_trace(formula: Formula, signals: Mapping[str, Any], dt: float, params: Mapping[str, Any] | None = None,
                     smooth: float | None = None, *, until: str = "strict", end: str = "truncate") -> torch.Tensor:
    """Robustness of ``formula`` at every sample.

    Args:
        signals: name -> array, tensor or list, shape (T,) or (B, T), float32/float64 (integers and bools are
            computed in float64), any device (shared by all).
        dt: sample period in seconds (the unit of interval bounds): a positive number, Python, numpy or 0-d torch.
        params: name -> number, 0-d tensor, or (B,) array/tensor/list (one value per trajectory). Gradients flow to
            tensors used in thresholds. Interval-bound parameters may differ per trajectory; the batch is then
            evaluated in groups of equal bounds.
        smooth: None for exact min/max, or the log-sum-exp temperature τ > 0, finite and within the normal range
            of the signals' dtype (error ≤ log(k)/τ per operator).
        until: "strict" (φ on [t, t')) or "inclusive" (φ on [t, t']).
        end: "truncate" or "violate" (see the module docstring).

    Returns: (B, T) tensor with the signals' dtype and device; B = 1 for (T,) inputs.

    Raises :class:`STLInputError` (a ``ValueError``) naming the input, for every bad one (see
    :mod:`stlflow.stl.inputs`).
    """
    return _trace(formula, signals, dt, params, smooth, until, end)


def robustness_bounds(formula: Formula, signals: Mapping[str, Any], dt: float, params: Mapping[str, Any] | None = None,
                      *, known: int, until: str = "strict", end: str = "truncate"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of the exact robustness trace when only the first ``known`` samples are known.

    The samples from ``known`` on are placeholders (any values): every sub-formula's value there is widened to
    −inf for the lower and +inf for the upper bound, so, as every operator is monotone in its operands, the
    bounds hold for any values of the unknown samples. Arguments as :func:`robustness_trace` (exact only, one
    value per interval parameter). Returns two (B, T) tensors, lower then upper (the online monitor's bounds).
    """
    if isinstance(known, bool) or not isinstance(known, numbers.Integral) or known < 0:
        raise STLInputError(f"known must be a number of samples, an integer >= 0; got {known!r}")
    lo, hi = (_trace(formula, signals, dt, params, None, until, end, known=known, side=side) for side in ("lo", "hi"))
    return lo, hi


def _trace(formula: Formula, signals: Mapping[str, Any], dt: float, params: Mapping[str, Any] | None,
           smooth: float | None, until: str, end: str, known: int | None = None, side: str | None = None,
           memo: dict | None = None) -> torch.Tensor:
    """:func:`robustness_trace`; with ``side`` one bound of :func:`robustness_bounds`; ``memo`` collects the trace
    of every node (:func:`first_violation`)."""
    signals, params = check_inputs(signals, params, smooth, until, end)
    dt, smooth = check_dt(dt), check_smooth(smooth)
    groups = interval_groups(formula, params) if side is None else None
    if groups is not None:
        return _per_group(groups, signals, lambda sig, p: _trace(formula, sig, dt, p, smooth, until, end))
    xs, real, B, T, _, _ = prepare_batch(formula, signals, params, dt, smooth)
    ev = _Evaluator(xs, real, B, T, dt, smooth, until, end, known=known, memo=memo)
    return ev(formula, side)


# --------------------------------------------------------------------------- point mode: robustness at sample 0


def _point(ev: _Evaluator, node: Formula, ev0: _Evaluator) -> torch.Tensor:
    """ρ(node, w, 0), shape (B,): ``ev(node)[:, 0]`` (exact: bit-identical; smooth: to round-off), without its trace.

    Boolean nodes combine their children's values at 0; a future ``G``/``F`` reduces its child's trace over its
    window at 0 once; ``H``/``O``/``S`` at 0 only read their operands at 0; ``U`` falls back to the trace.
    ``ev0`` is the evaluator on the first sample only (predicates).
    """
    tau = ev.tau
    if isinstance(node, Predicate):
        return ev0(node)[:, 0]
    if isinstance(node, Not):
        return -_point(ev, node.arg, ev0)
    if isinstance(node, And):
        return nary([_point(ev, c, ev0) for c in node.args], "min", tau)
    if isinstance(node, Or):
        return nary([_point(ev, c, ev0) for c in node.args], "max", tau)
    if isinstance(node, Implies):
        return nary([-_point(ev, node.left, ev0), _point(ev, node.right, ev0)], "max", tau)
    a, b = interval_steps(node.interval, ev.dt, ev.params, node)  # type: ignore[attr-defined]
    n = ev.T
    if isinstance(node, Temporal):
        kind = "min" if node.op in ("G", "H") else "max"
        ident = INF if kind == "min" else -INF
        if node.op in ("H", "O"):  # window [−b, −a] ∩ [0, 0]: sample 0 if a = 0, else empty
            x0 = _point(ev, node.arg, ev0)
            if a > 0:
                return filled(x0.unsqueeze(1), 1, ident)[:, 0]
            if tau is None:
                return x0
            sign = tau if kind == "max" else -tau
            return (x0 * sign) / sign
        x = ev(node.arg)
        if node.op == "G" and ev.violate and b is not None and b > 0 and b >= n:
            return filled(x, 1, -INF)[:, 0]
        if a >= n:
            return filled(x, 1, ident)[:, 0]
        xs = x[:, a:]
        m = n - a
        w = m if b is None else min(b - a + 1, m)
        if tau is not None:
            sign = tau if kind == "max" else -tau
            return logsumexp_rows(xs[:, :w] * sign) / sign
        if w >= m:  # the trace uses one cumulative min/max here: same op, same ties
            return cumulative(xs.flip(1), kind, 1)[:, -1]
        if w == 1:
            return xs[:, 0]
        red = xs[:, :w].min(1) if kind == "min" else xs[:, :w].max(1)  # ties: earliest sample, as the trace
        return red.values
    assert isinstance(node, BinaryTemporal)
    if node.op == "U":
        return ev(node)[:, 0]
    # S at 0: t' = 0 only (if a = 0); strict: ψ(0) (φ over (0, 0] is empty); inclusive: min(ψ(0), φ(0))
    phi0, psi0 = _point(ev, node.left, ev0), _point(ev, node.right, ev0)
    if a > 0:
        return filled(psi0.unsqueeze(1), 1, -INF)[:, 0]
    if ev.inclusive:
        psi0 = nary([psi0, phi0], "min", tau)
    if tau is None:
        return psi0
    return (-(-tau * psi0)) / tau  # the arithmetic of the smooth Until kernel at its last sample


def _robustness0(formula: Formula, signals: Mapping[str, Any], dt: float, params: Mapping[str, Any] | None,
                 smooth: float | None, until: str, end: str) -> torch.Tensor:
    """ρ at sample 0 in point mode (see :func:`_point`); per-trajectory interval bounds evaluated in groups."""
    signals, params = check_inputs(signals, params, smooth, until, end)
    dt, smooth = check_dt(dt), check_smooth(smooth)
    groups = interval_groups(formula, params)
    if groups is not None:
        return _per_group(groups, signals, lambda sig, p: _robustness0(formula, sig, dt, p, smooth, until, end))
    xs, real, B, T, _, _ = prepare_batch(formula, signals, params, dt, smooth)
    ev = _Evaluator(xs, real, B, T, dt, smooth, until, end)
    ev0 = _Evaluator({k: v[:, :1] for k, v in xs.items()}, real, B, 1, dt, smooth, until, end)
    return _point(ev, formula, ev0)


def _array_or_self(v: Any) -> Any:
    """``v`` as an array when it is a tensor, an array or converts to one of numbers; else ``v`` (the trace reports
    what is wrong with it)."""
    if isinstance(v, torch.Tensor | np.ndarray):
        return v
    try:
        a = np.asarray(v)
    except (ValueError, TypeError):
        return v
    return a if a.dtype.kind in "biuf" else v


def robustness(formula: Formula, signals: Mapping[str, Any], dt: float, params: Mapping[str, Any] | None = None,
               smooth: float | None = None, *, until: str = "strict", end: str = "truncate") -> torch.Tensor:
    """ρ(φ, w, 0) for every trajectory: shape (B,). Arguments as :func:`robustness_trace`.

    Equal to ``robustness_trace(...)[:, 0]`` (exact: bit-identical; smooth: to float round-off) but cheaper:
    only the first horizon + 1 samples are read (ρ at 0 depends on nothing else, also under truncation: every
    window that matters ends at or before the horizon), and the formula is evaluated top-down in point mode:
    boolean nodes combine their operands' values at 0, and a temporal node needed only at 0 reduces its
    operand's trace over its one window (one min/max, or one log-sum-exp in smooth mode) instead of
    computing its own trace. Operands of temporal nodes still get full traces; a top-level ``U`` falls back
    to its trace.
    """
    signals, params = check_inputs(signals, params, smooth, until, end)  # lists as arrays; bad input reported
    try:
        h = horizon(formula, dt, params)
    except STLInputError:  # per-trajectory interval bounds or bad input: let the trace report
        h = INF
    arrays = {k: _array_or_self(v) for k, v in signals.items() if k in formula.signals}
    lengths = {np.shape(v)[-1] if np.ndim(v) else 0 for v in arrays.values()}
    if math.isfinite(h) and len(lengths) == 1 and len(arrays) == len(formula.signals):  # else the trace reports
        signals = {k: v[..., : int(h) + 1] if np.ndim(v) else v for k, v in arrays.items()}
    return _robustness0(formula, signals, dt, params, smooth, until, end)
# --------------------------------------------------------------------------- static analysis


def horizon(formula: Formula, dt: float, params: Mapping[str, Any] | None = None) -> float:
    """Future samples read: ρ at t depends on samples up to t + horizon (an int, or ``math.inf``).

    For U[a,b] this is b + max(horizons of both operands) (strict Until reads its left operand one sample less).
    Per-trajectory interval parameters count with their largest value.
    """
    dt = check_dt(dt)
    if params is not None and not isinstance(params, Mapping):
        raise STLInputError(f"params must be a mapping parameter name -> value, or None; got {params!r}")
    params = {k: as_param(v, k) for k, v in (params or {}).items()}
    params = {k: float(np.max(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)))
              if k in formula.interval_params and (v.numel() if isinstance(v, torch.Tensor) else np.size(v)) > 1 else v
              for k, v in params.items()}
    return _horizon(formula, dt, params)


def _horizon(node: Formula, dt: float, params: Mapping[str, Any]) -> float:
    """:func:`horizon` on checked arguments."""
    if isinstance(node, Predicate):
        return 0
    if isinstance(node, Not | And | Or | Implies):
        return max(_horizon(c, dt, params) for c in node.children())
    child = max(_horizon(c, dt, params) for c in node.children())
    if node.op in ("H", "O", "S"):  # type: ignore[attr-defined]
        return child
    _, b = interval_steps(node.interval, dt, params, node)  # type: ignore[attr-defined]
    return INF if b is None else b + child


def smooth_error_bound(formula: Formula, n: int, dt: float, smooth: float, params: Mapping[str, Any] | None = None
                       ) -> float:
    """Sum over the deepest path of log(k)/τ, k the arity of each smoothed min/max, for signals of n samples."""
    dt, tau = check_dt(dt), check_smooth(smooth)
    if tau is None:
        raise STLInputError("smooth must be a finite temperature > 0 (the bound of exact min/max is 0)")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise STLInputError(f"n must be the number of samples, an integer >= 1; got {n!r}")
    return _smooth_error_bound(formula, int(n), dt, tau, params or {})


def _smooth_error_bound(node: Formula, n: int, dt: float, smooth: float, params: Mapping[str, Any]) -> float:
    """:func:`smooth_error_bound` on checked arguments."""
    if isinstance(node, Predicate):
        return 0.0
    child = max(_smooth_error_bound(c, n, dt, smooth, params) for c in node.children())
    if isinstance(node, Not):
        return child
    if isinstance(node, And | Or):
        return child + math.log(len(node.args)) / smooth
    if isinstance(node, Implies):
        return child + math.log(2) / smooth
    a, b = interval_steps(node.interval, dt, params, node)  # type: ignore[attr-defined]
    w = n if b is None else min(b - a + 1, n)
    if isinstance(node, Temporal):
        return child + math.log(w) / smooth
    inner = n + 1 if b is None else min(b + 2, n + 1)  # ψ(t'), φ(t') (inclusive) and φ on [t, t')
    return child + (math.log(w) + math.log(inner)) / smooth


def first_violation(formula: Formula, signals: Mapping[str, Any], dt: float, params: Mapping[str, Any] | None = None,
                    *, batch: int = 0, until: str = "strict", end: str = "truncate"
                    ) -> tuple[Formula, int, float] | None:
    """Explain a violation of trajectory ``batch``: (sub-formula, sample index, its ρ there), or None if ρ(0) ≥ 0.

    From the root at sample 0 it descends into the sub-formula responsible: for ``&`` the violated operand whose
    explanation comes first, for ``G``/``H`` the earliest violated sample of the window; a violated predicate,
    ``|``, ``->``, ``F``, ``O``, ``U``, ``S`` or ``!`` is reported itself.
    """
    signals, params = check_inputs(signals, params, None, until, end)
    dt = check_dt(dt)
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral):
        raise STLInputError(f"batch must be the index of a trajectory, an int; got {batch!r}")
    groups = interval_groups(formula, params)
    if groups is not None:  # per-trajectory interval bounds: explain within the group of trajectory `batch`
        B = sum(len(g[0]) for g in groups)
        if not -B <= batch < B:
            raise STLInputError(f"batch={batch} is out of range for {B} trajectories")
        b = batch % B
        idx, p = next((idx, p) for idx, p in groups if bool((idx == b).any()))
        signals = {k: _rows(v, idx, B, 2) for k, v in signals.items()}
        params = {k: _rows(v, idx, B, 1) for k, v in p.items()}
        batch = int((idx == b).nonzero()[0, 0])
    memo: dict = {}
    with torch.no_grad():
        _trace(formula, signals, dt, params, None, until, end, memo=memo)
    B = memo[formula].shape[0]
    if not -B <= batch < B:
        raise STLInputError(f"batch={batch} is out of range for {B} trajectories")
    traces = {k: v[batch].cpu().numpy() for k, v in memo.items()}
    n = len(traces[formula])

    def explain(node: Formula, t: int) -> tuple[Formula, int, float]:
        r = float(traces[node][t])
        if isinstance(node, And):
            cands = [explain(c, t) for c in node.args if traces[c][t] < 0 or np.isnan(traces[c][t])]
            return min(cands, key=lambda c: c[1]) if cands else (node, t, r)
        if isinstance(node, Temporal) and node.op in ("G", "H"):
            a, b = interval_steps(node.interval, dt, params, node)
            if node.op == "G":
                lo, hi = t + a, n - 1 if b is None else min(t + b, n - 1)
            else:
                lo, hi = (0 if b is None else max(t - b, 0)), t - a
            child = traces[node.arg]
            for s in range(lo, hi + 1):
                if child[s] < 0 or np.isnan(child[s]):
                    return explain(node.arg, s)
        return (node, t, r)

    r0 = float(traces[formula][0])
    if r0 >= 0:
        return None
    return explain(formula, 0)
