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
  Inputs are never modified; a one-sample signal works.

Smooth mode (``smooth=τ``): every min and max, including ``&``, ``|`` and ``->``, becomes a log-sum-exp at
temperature τ: max_τ(x₁..x_k) = log Σ exp(τ xᵢ) / τ and min_τ = −max_τ(−x). For an operator of arity k
(window operators: k = number of samples in the window) max ≤ max_τ ≤ max + log(k)/τ and
min − log(k)/τ ≤ min_τ ≤ min. Both are 1-Lipschitz, so the error of a formula is at most the sum of
log(k)/τ along its deepest path (``Formula.smooth_error_bound``). Until uses an outer max over the window
and an inner min over ψ(t') and φ on [t, t'), both smooth. Empty windows keep their ±inf values.

Shapes and cost: signals (T,) or (B, T) → robustness (B,) at sample 0, traces (B, T); a (T,) input is
B = 1. Exact sliding min/max: sparse-table doubling, O(B·T·log w) time, O(B·T) memory (measured faster here
than the O(B·T) van Herk/Gil-Werman blocks, whose cumulative min/max kernels are slow on CPU); unbounded
windows use one cumulative min/max. Exact Until: the recursion y(t) = max(ψ(t), min(φ(t), y(t+1))) composes functions
of the form y ↦ max(p, min(q, y)), a family closed under composition, so windows of them are combined by
binary lifting: O(B·T·log w) time, O(B·T) memory. Smooth windows use binary lifting of log-add-exp:
O(B·T·log w). Smooth Until loops over the window offset: O(B·T·w) time and O(B·T) forward memory (the
autograd graph keeps O(B·T·w)). Past operators are the future ones on time-reversed signals.

``robustness`` (ρ at sample 0) evaluates top-down in point mode: boolean nodes combine their operands' values
at 0, a ``G``/``F`` reduces its operand's trace over its single window at 0 (one min/max or one
``torch.logsumexp``: O(B·w)), ``H``/``O``/``S`` read their operands at 0 only, ``U`` falls back to its trace.
Exact values are bit-identical to ``robustness_trace(...)[:, 0]``; smooth ones agree to float round-off (one
log-sum-exp over the window instead of the trace's pairwise log-add-exp; same ±inf and NaN rules).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .syntax import (
    Abs,
    And,
    BinaryTemporal,
    BinOp,
    Expr,
    Formula,
    Implies,
    Interval,
    Neg,
    Not,
    Num,
    Or,
    Param,
    Predicate,
    Signal,
    Temporal,
)

__all__ = ["robustness", "robustness_trace", "horizon", "smooth_error_bound", "first_violation", "STLInputError"]

INF = math.inf
UNTIL_MODES = ("strict", "inclusive")
END_MODES = ("truncate", "violate")


class STLInputError(ValueError):
    """Signals, parameters or ``dt`` given to an evaluation do not fit the formula."""


# --------------------------------------------------------------------------- input handling


def _steps(bound: Expr, dt: float, params: Mapping[str, Any], where: Formula) -> int:
    """Interval bound (seconds) -> whole number of samples, with a clear error when it is not a multiple of dt."""
    if isinstance(bound, Num):
        v = bound.value
    else:
        assert isinstance(bound, Param)
        v = params[bound.name]
        if isinstance(v, torch.Tensor | np.ndarray):
            flat = np.unique(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64))
            if flat.size != 1:
                raise STLInputError(f"interval parameter {{{bound.name}}} must have one value per evaluation group")
            v = float(flat[0])
        v = float(v)
    if not math.isfinite(v) or v < 0:
        raise STLInputError(f"interval bound {v!r} of {where} must be a finite number >= 0")
    k = round(v / dt)
    if abs(v / dt - k) > 1e-6 * max(1.0, abs(k)):
        raise STLInputError(
            f"interval bound {v:g} of {where} is not an integer multiple of dt={dt:g} ({v:g}/{dt:g} = {v / dt:.6g}); "
            "use bounds that are whole numbers of samples")
    return int(k)


def _window(iv: Interval, dt: float, params: Mapping[str, Any], where: Formula) -> tuple[int, int | None]:
    a = _steps(iv.lo, dt, params, where)
    b = None if iv.hi is None else _steps(iv.hi, dt, params, where)
    if b is not None and b < a:
        raise STLInputError(f"empty interval in {where}: lower bound {a * dt:g} > upper bound {b * dt:g}")
    return a, b


def _check_options(until: str, end: str) -> None:
    if until not in UNTIL_MODES:
        raise ValueError(f"until={until!r}: expected one of {UNTIL_MODES}")
    if end not in END_MODES:
        raise ValueError(f"end={end!r}: expected one of {END_MODES}")


def _as_tensor(v: Any, name: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        t = v
    else:
        t = torch.as_tensor(np.asarray(v))
    if not (t.is_floating_point()):
        t = t.to(torch.get_default_dtype())
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise STLInputError(f"{name}: unsupported dtype {t.dtype}")
    return t


def _prepare(formula: Formula, signals: Mapping[str, Any], params: Mapping[str, Any] | None, dt: float):
    """Check names and shapes; return (signal tensors (B, T), params, B, T, dtype, device)."""
    if not isinstance(dt, int | float) or not math.isfinite(dt) or dt <= 0:
        raise STLInputError(f"dt must be a positive number of seconds, got {dt!r}")
    params = dict(params or {})
    missing = sorted(formula.signals - set(signals))
    if missing:
        raise STLInputError(f"missing signal(s) {missing} for {formula}; given signals: {sorted(signals)}")
    missing = sorted(formula.params - set(params))
    if missing:
        raise STLInputError(f"missing parameter(s) {missing} for {formula}; given parameters: {sorted(params)}")
    if not formula.signals:
        raise STLInputError(f"{formula} reads no signal, so the trace length is undefined")
    xs = {}
    for name in sorted(formula.signals):
        t = _as_tensor(signals[name], f"signal {name!r}")
        if t.ndim == 1:
            t = t.unsqueeze(0)
        if t.ndim != 2 or t.shape[1] == 0:
            raise STLInputError(f"signal {name!r} must have shape (T,) or (B, T) with T >= 1, got {tuple(t.shape)}")
        xs[name] = t
    dtype = xs[next(iter(xs))].dtype
    for t in xs.values():
        dtype = torch.promote_types(dtype, t.dtype)
    device = next(iter(xs.values())).device
    lengths = {n: t.shape[1] for n, t in xs.items()}
    if len(set(lengths.values())) != 1:
        raise STLInputError(f"signals have different lengths: {lengths}")
    T = next(iter(lengths.values()))
    batch = {n: t.shape[0] for n, t in xs.items() if t.shape[0] != 1}
    real_params: dict[str, Any] = {}
    for name in formula.params:
        v = params[name]
        if isinstance(v, list | tuple):
            v = np.asarray(v, dtype=np.float64)
        if name in formula.interval_params:
            real_params[name] = v  # resolved by _steps
            continue
        if isinstance(v, torch.Tensor | np.ndarray) and np.ndim(v) > 0:
            t = _as_tensor(v, f"parameter {name!r}").to(device=device, dtype=dtype)
            if t.ndim != 1:
                raise STLInputError(f"parameter {name!r} must be a number or shape (B,), got {tuple(t.shape)}")
            if t.shape[0] != 1:
                batch[f"{{{name}}}"] = t.shape[0]
            real_params[name] = t.unsqueeze(1)
        elif isinstance(v, torch.Tensor):
            real_params[name] = v.to(device=device, dtype=dtype).reshape(1, 1)
        else:
            real_params[name] = float(v)
    if len(set(batch.values())) > 1:
        raise STLInputError(f"batch sizes differ: {batch}")
    B = next(iter(batch.values()), 1)
    xs = {n: t.to(device=device, dtype=dtype).expand(B, T) for n, t in xs.items()}
    return xs, real_params, B, T, dtype, device


# --------------------------------------------------------------------------- window kernels


def _full(like: torch.Tensor, n: int, value: float) -> torch.Tensor:
    return torch.full((like.shape[0], n), value, dtype=like.dtype, device=like.device)


def _cum(x: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    return (torch.cummin(x, dim) if kind == "min" else torch.cummax(x, dim)).values


def _exact_sliding(x: torch.Tensor, w: int, kind: str) -> torch.Tensor:
    """y[t] = min/max of x[t .. min(t+w−1, m−1)] over (B, m): O(B·m·log w).

    Sparse-table doubling on x padded with the identity (±inf, so windows truncate at the end): level p holds
    the aggregate of [u, u+p); a window of w is the overlap of two level-p windows (min/max are idempotent).
    """
    B, m = x.shape
    if w >= m:
        return _cum(x.flip(1), kind, 1).flip(1)
    if w == 1:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _SlidingExtremum.apply(x, w, kind)
    op = torch.minimum if kind == "min" else torch.maximum
    level = torch.cat([x, _full(x, w - 1, INF if kind == "min" else -INF)], 1)
    p = 1
    while 2 * p <= w:
        level = op(level[:, :-p], level[:, p:])  # length shrinks by p: still covers every window start needed
        p *= 2
    return op(level[:, :m], level[:, w - p : w - p + m])


class _SlidingExtremum(torch.autograd.Function):
    """Sliding min/max whose backward is one scatter-add onto the arg-extremum of each window.

    The same doubling as :func:`_exact_sliding`, carrying indices; much cheaper to differentiate than a chain of
    ``torch.minimum`` (whose backward re-compares every pair). Ties go to the earliest sample; NaN wins.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: int, kind: str) -> torch.Tensor:
        B, m = x.shape
        better = torch.le if kind == "min" else torch.ge
        val = torch.cat([x, _full(x, w - 1, INF if kind == "min" else -INF)], 1)
        idx = torch.arange(m + w - 1, device=x.device).clamp_(max=m - 1).expand(B, -1)

        def pick(p: int, q: int, n: int):
            a, b = val[:, p : p + n], val[:, q : q + n]
            take = better(a, b) | torch.isnan(a)
            return torch.where(take, a, b), torch.where(take, idx[:, p : p + n], idx[:, q : q + n])

        p = 1
        while 2 * p <= w:
            val, idx = pick(0, p, val.shape[1] - p)
            p *= 2
        val, idx = pick(0, w - p, m)
        ctx.save_for_backward(idx)
        ctx.m = m
        return val

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        gx = torch.zeros(grad.shape[0], ctx.m, dtype=grad.dtype, device=grad.device)
        return gx.scatter_add_(1, idx, grad), None, None


def _lae(a: torch.Tensor, b: torch.Tensor, safe: bool) -> torch.Tensor:
    """log(exp a + exp b); with ``safe``, ±inf entries give exact ±inf values and zero (not NaN) gradients."""
    if not safe:
        return torch.logaddexp(a, b)
    pinf = torch.isposinf(a) | torch.isposinf(b)
    ninf = torch.isneginf(a) & torch.isneginf(b)
    bad = pinf | ninf
    r = torch.logaddexp(torch.where(bad, 0.0, a), torch.where(bad, 0.0, b))
    return torch.where(pinf, INF, torch.where(ninf, -INF, r))


def _shift_combine(A: torch.Tensor, Bt: torch.Tensor, s: int, combine) -> torch.Tensor:
    """out[u] = combine(A[u], Bt[u+s]) where u+s exists, else A[u] (the window is truncated at the end)."""
    m = A.shape[1]
    if s >= m:
        return A
    return torch.cat([combine(A[:, : m - s], Bt[:, s:]), A[:, m - s :]], 1)


def _smooth_sliding(z: torch.Tensor, w: int) -> torch.Tensor:
    """y[u] = log Σ exp z over [u, min(u+w−1, m−1)] by binary lifting: O(B·m·log w)."""
    safe = bool(torch.isinf(z).any())

    def lae(a, b):
        return _lae(a, b, safe)

    w = min(w, z.shape[1])
    level, step, acc = z, 1, None
    while True:
        if w & 1:
            acc = level if acc is None else _shift_combine(level, acc, step, lae)
        w >>= 1
        if not w:
            return acc
        level = _shift_combine(level, level, step, lae)
        step *= 2


def _future(x: torch.Tensor, a: int, b: int | None, kind: str, tau: float | None) -> torch.Tensor:
    """min/max of x over [t+a, t+b] ∩ [0, n−1] (identity ±inf when empty); b=None is unbounded."""
    n = x.shape[1]
    ident = INF if kind == "min" else -INF
    if a >= n:
        return _full(x, n, ident)
    xs = x[:, a:]
    m = n - a
    w = m if b is None else min(b - a + 1, m)
    if tau is None:
        y = _exact_sliding(xs, w, kind)
    else:
        sign = tau if kind == "max" else -tau
        y = _smooth_sliding(xs * sign, w) / sign
    return torch.cat([y, _full(x, a, ident)], 1) if a else y


def _lattice_compose(Ap, Aq, Bp, Bq, s):
    """(A ∘ B shifted by s) for functions y ↦ max(p, min(q, y)); truncated where B[u+s] does not exist."""
    m = Ap.shape[1]
    if s >= m:
        return Ap, Aq
    p = torch.maximum(Ap[:, : m - s], torch.minimum(Aq[:, : m - s], Bp[:, s:]))
    q = torch.minimum(Aq[:, : m - s], Bq[:, s:])
    return torch.cat([p, Ap[:, m - s :]], 1), torch.cat([q, Aq[:, m - s :]], 1)


def _until_window_exact(phi: torch.Tensor, psi: torch.Tensor, w: int) -> torch.Tensor:
    """z[u] = max over t' in [u, u+w−1] ∩ [0, m−1] of min(ψ(t'), min φ[u, t')): O(B·m·log w).

    z[u] = (f_u ∘ … ∘ f_{u+w−1})(−inf) with f_t(y) = max(ψ(t), min(φ(t), y)); the p-component of a composition
    never involves the φ of its last element, so unread samples never leak NaN.
    """
    w = min(w, phi.shape[1])
    lp, lq, step, ap, aq = psi, phi, 1, None, None
    while True:
        if w & 1:
            if ap is None:
                ap, aq = lp, lq
            else:
                ap, aq = _lattice_compose(lp, lq, ap, aq, step)
        w >>= 1
        if not w:
            return ap
        lp, lq = _lattice_compose(lp, lq, lp, lq, step)
        step *= 2


def _until_smooth(phi: torch.Tensor, psi: torch.Tensor, a: int, b: int | None, tau: float) -> torch.Tensor:
    """Smooth strict until, looping over the window offset k: O(B·T·w)."""
    n = phi.shape[1]
    last = n - 1 if b is None else min(b, n - 1)
    if a > last:
        return _full(phi, n, -INF)
    P, Q = -tau * phi, -tau * psi  # min-orientation: smin = −lse(−τx)/τ
    safe = bool(torch.isinf(P).any() or torch.isinf(Q).any())
    acc = None  # lse of P over [t, t+k)  for t < n−k+1
    out = None  # lse of τ·(inner min) over offsets a..k, valid for t < n−a
    for k in range(last + 1):
        L = n - k
        inner = Q[:, k:] if acc is None else _lae(acc[:, :L], Q[:, k:], safe)
        if k >= a:
            term = -inner
            out = term if out is None else torch.cat([_lae(out[:, :L], term, safe), out[:, L:]], 1)
        acc = P if acc is None else _lae(acc[:, :L], P[:, k:], safe)
    y = out / tau
    return torch.cat([y, _full(phi, a, -INF)], 1) if a else y


def _until(phi, psi, a: int, b: int | None, tau: float | None, inclusive: bool) -> torch.Tensor:
    if inclusive:  # φ on [t, t'] ≡ strict until with ψ ∧ φ at t'
        psi = _nary([psi, phi], "min", tau)
    if tau is not None:
        return _until_smooth(phi, psi, a, b, tau)
    n = phi.shape[1]
    if a >= n:
        return _full(phi, n, -INF)
    m = n - a
    z = _until_window_exact(phi[:, a:], psi[:, a:], m if b is None else b - a + 1)
    if a:
        z = torch.minimum(_exact_sliding(phi, a, "min")[:, :m], z)
        z = torch.cat([z, _full(phi, a, -INF)], 1)
    return z


def _nary(xs: list[torch.Tensor], kind: str, tau: float | None) -> torch.Tensor:
    if tau is None:
        op = torch.minimum if kind == "min" else torch.maximum
        out = xs[0]
        for x in xs[1:]:
            out = op(out, x)
        return out
    sign = tau if kind == "max" else -tau
    zs = [x * sign for x in xs]
    safe = any(bool(torch.isinf(z).any()) for z in zs)
    out = zs[0]
    for z in zs[1:]:
        out = _lae(out, z, safe)
    return out / sign


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
            y = torch.cat([y[:, : self.known], _full(y, self.T - self.known, -INF if side == "lo" else INF)], 1)
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
            return _nary([self(c, side) for c in node.args], "min", tau)
        if isinstance(node, Or):
            return _nary([self(c, side) for c in node.args], "max", tau)
        if isinstance(node, Implies):
            return _nary([-self(node.left, flip), self(node.right, side)], "max", tau)
        a, b = _window(node.interval, self.dt, self.params, node)  # type: ignore[attr-defined]
        if isinstance(node, Temporal):
            x = self(node.arg, side)
            kind = "min" if node.op in ("G", "H") else "max"
            if node.op in ("G", "F"):
                y = _future(x, a, b, kind, tau)
                if node.op == "G" and self.violate and b is not None and b > 0:
                    keep = max(self.T - b, 0)
                    y = torch.cat([y[:, :keep], _full(y, self.T - keep, -INF)], 1)
                return y
            return _future(x.flip(1), a, b, kind, tau).flip(1)
        assert isinstance(node, BinaryTemporal)
        phi, psi = self(node.left, side), self(node.right, side)
        if node.op == "U":
            return _until(phi, psi, a, b, tau, self.inclusive)
        return _until(phi.flip(1), psi.flip(1), a, b, tau, self.inclusive).flip(1)


def _groups(formula: Formula, params: Mapping[str, Any]) -> list[tuple[torch.Tensor | None, dict]] | None:
    """Split the batch where interval parameters take several values per trajectory (one evaluation per group)."""
    per_row = {}
    for name in formula.interval_params:
        v = params.get(name)
        if isinstance(v, list | tuple):
            v = np.asarray(v, dtype=np.float64)
        if isinstance(v, torch.Tensor | np.ndarray) and np.ndim(v) > 0:
            arr = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).reshape(-1)
            if np.unique(arr).size > 1:
                per_row[name] = arr
    if not per_row:
        return None
    names = sorted(per_row)
    table = np.stack([per_row[n] for n in names], 1)
    uniq, inverse = np.unique(table, axis=0, return_inverse=True)
    out = []
    for g, row in enumerate(uniq):
        idx = torch.as_tensor(np.nonzero(inverse.reshape(-1) == g)[0])
        p = dict(params)
        p.update({n: float(x) for n, x in zip(names, row)})
        out.append((idx, p))
    return out


def _rows(v: Any, idx: torch.Tensor, B: int, ndim: int) -> Any:
    """Rows ``idx`` of a signal (ndim=2) or parameter (ndim=1) that carries a batch axis of size B; else ``v``."""
    if isinstance(v, torch.Tensor | np.ndarray) and np.ndim(v) == ndim and np.shape(v)[0] == B:
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        return t.index_select(0, idx.to(t.device))
    return v



def _checked_inputs(signals: Mapping[str, Any], params: Mapping[str, Any] | None, smooth: float | None,
                    until: str, end: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate the options and turn list/tuple signals and parameters into arrays (inputs are not mutated)."""
    _check_options(until, end)
    if smooth is not None and not (smooth > 0):
        raise ValueError(f"smooth must be a temperature > 0 or None, got {smooth!r}")
    signals = {k: np.asarray(v) if isinstance(v, list | tuple) else v for k, v in signals.items()}
    params = {k: np.asarray(v, dtype=np.float64) if isinstance(v, list | tuple) else v
              for k, v in (params or {}).items()}
    return signals, params


def robustness_trace(formula: Formula, signals: Mapping[str, Any], dt: float, params: Mapping[str, Any] | None = None,
                     smooth: float | None = None, *, until: str = "strict", end: str = "truncate",
                     _known: int | None = None, _side: str | None = None, _memo: dict | None = None) -> torch.Tensor:
    """Robustness of ``formula`` at every sample.

    Args:
        signals: name -> array or tensor, shape (T,) or (B, T), float32/float64, any device (shared by all).
        dt: sample period in seconds (the unit of interval bounds).
        params: name -> float, 0-d tensor, or (B,) array/tensor (one value per trajectory). Gradients flow to
            tensors used in thresholds. Interval-bound parameters may differ per trajectory; the batch is then
            evaluated in groups of equal bounds.
        smooth: None for exact min/max, or the log-sum-exp temperature τ > 0 (error ≤ log(k)/τ per operator).
        until: "strict" (φ on [t, t')) or "inclusive" (φ on [t, t']).
        end: "truncate" or "violate" (see the module docstring).

    Returns: (B, T) tensor with the signals' dtype and device; B = 1 for (T,) inputs.
    """
    signals, params = _checked_inputs(signals, params, smooth, until, end)
    groups = _groups(formula, params) if _side is None else None
    if groups is not None:
        return _per_group(groups, signals, lambda sig, p: robustness_trace(formula, sig, dt, p, smooth, until=until,
                                                                            end=end))
    xs, real, B, T, _, _ = _prepare(formula, signals, params, dt)
    ev = _Evaluator(xs, real, B, T, dt, smooth, until, end, known=_known, memo=_memo)
    return ev(formula, _side)


class _LogSumExp(torch.autograd.Function):
    """``torch.logsumexp(z, 1)`` with the plain softmax backward (PyTorch's own also masks infinite results, which
    cannot occur here: :func:`_lse0` removes +inf and all −inf rows first; measured 3× cheaper on CPU)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        r = torch.logsumexp(z, 1)
        ctx.save_for_backward(z, r)
        return r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        z, r = ctx.saved_tensors
        return torch.exp(z - r.unsqueeze(1)).mul_(grad.unsqueeze(1))


def _lse0(z: torch.Tensor) -> torch.Tensor:
    """log Σ exp z over dim 1 of (B, w) → (B,): one ``torch.logsumexp``, with the ±inf rules of :func:`_lae`.

    A row holding +inf gives +inf (even with NaN, as the pairwise log-add-exp of the trace does), a row of only
    −inf gives −inf, otherwise NaN propagates; gradients into masked entries are 0, never NaN.
    """
    lse = _LogSumExp.apply if z.requires_grad and torch.is_grad_enabled() else lambda v: torch.logsumexp(v, 1)
    if not bool(torch.isinf(z).any()):
        return lse(z)
    pinf = torch.isposinf(z)
    prow, nrow = pinf.any(1), torch.isneginf(z).all(1)
    r = lse(torch.where(pinf | nrow.unsqueeze(1), 0.0, z))
    return torch.where(prow, INF, torch.where(nrow, -INF, r))


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
        return _nary([_point(ev, c, ev0) for c in node.args], "min", tau)
    if isinstance(node, Or):
        return _nary([_point(ev, c, ev0) for c in node.args], "max", tau)
    if isinstance(node, Implies):
        return _nary([-_point(ev, node.left, ev0), _point(ev, node.right, ev0)], "max", tau)
    a, b = _window(node.interval, ev.dt, ev.params, node)  # type: ignore[attr-defined]
    n = ev.T
    if isinstance(node, Temporal):
        kind = "min" if node.op in ("G", "H") else "max"
        ident = INF if kind == "min" else -INF
        if node.op in ("H", "O"):  # window [−b, −a] ∩ [0, 0]: sample 0 if a = 0, else empty
            x0 = _point(ev, node.arg, ev0)
            if a > 0:
                return _full(x0.unsqueeze(1), 1, ident)[:, 0]
            if tau is None:
                return x0
            sign = tau if kind == "max" else -tau
            return (x0 * sign) / sign
        x = ev(node.arg)
        if node.op == "G" and ev.violate and b is not None and b > 0 and b >= n:
            return _full(x, 1, -INF)[:, 0]
        if a >= n:
            return _full(x, 1, ident)[:, 0]
        xs = x[:, a:]
        m = n - a
        w = m if b is None else min(b - a + 1, m)
        if tau is not None:
            sign = tau if kind == "max" else -tau
            return _lse0(xs[:, :w] * sign) / sign
        if w >= m:  # the trace uses one cumulative min/max here: same op, same ties
            return _cum(xs.flip(1), kind, 1)[:, -1]
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
        return _full(psi0.unsqueeze(1), 1, -INF)[:, 0]
    if ev.inclusive:
        psi0 = _nary([psi0, phi0], "min", tau)
    if tau is None:
        return psi0
    return (-(-tau * psi0)) / tau  # the arithmetic of _until_smooth at its last sample


def _per_group(groups: list, signals: Mapping[str, Any], evaluate: Callable) -> torch.Tensor:
    """Evaluate each group of trajectories that share interval bounds (``_groups``) with ``evaluate(signals,
    params)`` and put the rows back in the batch's order."""
    B = sum(len(g[0]) for g in groups)
    parts, order = [], []
    for idx, p in groups:
        sig = {k: _rows(v, idx, B, 2) for k, v in signals.items()}
        parts.append(evaluate(sig, {k: _rows(v, idx, B, 1) for k, v in p.items()}))
        order.append(idx)
    inv = torch.argsort(torch.cat(order))
    return torch.cat(parts, 0).index_select(0, inv.to(parts[0].device))


def _robustness0(formula: Formula, signals: Mapping[str, Any], dt: float, params: Mapping[str, Any] | None,
                 smooth: float | None, until: str, end: str) -> torch.Tensor:
    """ρ at sample 0 in point mode (see :func:`_point`); per-trajectory interval bounds evaluated in groups."""
    signals, params = _checked_inputs(signals, params, smooth, until, end)
    groups = _groups(formula, params)
    if groups is not None:
        return _per_group(groups, signals, lambda sig, p: _robustness0(formula, sig, dt, p, smooth, until, end))
    xs, real, B, T, _, _ = _prepare(formula, signals, params, dt)
    ev = _Evaluator(xs, real, B, T, dt, smooth, until, end)
    ev0 = _Evaluator({k: v[:, :1] for k, v in xs.items()}, real, B, 1, dt, smooth, until, end)
    return _point(ev, formula, ev0)


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
    try:
        h = horizon(formula, dt, params)
    except (STLInputError, KeyError, TypeError):  # per-trajectory interval bounds or bad input: let the trace report
        h = INF
    arrays = {k: v if isinstance(v, torch.Tensor | np.ndarray) else np.asarray(v)
              for k, v in signals.items() if k in formula.signals}
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
    params = {k: float(np.max(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)))
              if k in formula.interval_params and np.ndim(v) > 0 else v for k, v in (params or {}).items()}
    node = formula
    if isinstance(node, Predicate):
        return 0
    if isinstance(node, Not | And | Or | Implies):
        return max(horizon(c, dt, params) for c in node.children())
    child = max(horizon(c, dt, params) for c in node.children())
    if node.op in ("H", "O", "S"):  # type: ignore[attr-defined]
        return child
    _, b = _window(node.interval, dt, params, node)  # type: ignore[attr-defined]
    return INF if b is None else b + child


def smooth_error_bound(formula: Formula, n: int, dt: float, smooth: float, params: Mapping[str, Any] | None = None
                       ) -> float:
    """Sum over the deepest path of log(k)/τ, k the arity of each smoothed min/max, for signals of n samples."""
    params = params or {}
    node = formula
    if isinstance(node, Predicate):
        return 0.0
    child = max(smooth_error_bound(c, n, dt, smooth, params) for c in node.children())
    if isinstance(node, Not):
        return child
    if isinstance(node, And | Or):
        return child + math.log(len(node.args)) / smooth
    if isinstance(node, Implies):
        return child + math.log(2) / smooth
    a, b = _window(node.interval, dt, params, node)  # type: ignore[attr-defined]
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
    memo: dict = {}
    with torch.no_grad():
        robustness_trace(formula, signals, dt, params, until=until, end=end, _memo=memo)
    traces = {k: v[batch].cpu().numpy() for k, v in memo.items()}
    n = len(traces[formula])
    params = params or {}

    def explain(node: Formula, t: int) -> tuple[Formula, int, float]:
        r = float(traces[node][t])
        if isinstance(node, And):
            cands = [explain(c, t) for c in node.args if traces[c][t] < 0 or np.isnan(traces[c][t])]
            return min(cands, key=lambda c: c[1]) if cands else (node, t, r)
        if isinstance(node, Temporal) and node.op in ("G", "H"):
            a, b = _window(node.interval, dt, params, node)
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
