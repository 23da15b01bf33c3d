"""Sliding-window kernels of STL robustness on (B, T) tensors: exact and smooth min/max, Until, n-ary min/max.

Every kernel works on future windows, ``[t+a, t+b] ∩ [0, n−1]``, truncated at the end of the signal (the
identity ±inf fills windows that are empty); past operators call them on time-reversed signals. Smooth kernels
replace min/max by a log-sum-exp at temperature τ. These conventions, and the error bound of the smooth
kernels, are stated in the docstring of :mod:`stlflow.stl.semantics`; this module only computes them.

Cost. Exact sliding min/max: sparse-table doubling, O(B·T·log w) time, O(B·T) memory (measured faster here
than the O(B·T) van Herk/Gil-Werman blocks, whose cumulative min/max kernels are slow on CPU); unbounded
windows use one cumulative min/max; with autograd, a custom backward scatters the gradient onto each
window's arg-extremum. Exact Until: the recursion y(t) = max(ψ(t), min(φ(t), y(t+1))) composes functions of
the form y ↦ max(p, min(q, y)), a family closed under composition, so windows of them are combined by binary
lifting: O(B·T·log w) time, O(B·T) memory. Smooth windows use binary lifting of log-add-exp: O(B·T·log w).
Smooth Until loops over the window offset: O(B·T·w) time and O(B·T) forward memory (the autograd graph keeps
O(B·T·w)). ``logsumexp_rows`` reduces one window per row (the point mode of ``robustness``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["filled", "cumulative", "sliding_extremum", "future_window", "sliding_until", "nary", "logsumexp_rows"]

INF = math.inf


def filled(like: torch.Tensor, n: int, value: float) -> torch.Tensor:
    """A (B, n) tensor of ``value`` with the batch size, dtype and device of ``like`` (B, ·)."""
    return torch.full((like.shape[0], n), value, dtype=like.dtype, device=like.device)


def cumulative(x: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    """Running min (``kind="min"``) or max (``"max"``) of ``x`` along ``dim``."""
    return (torch.cummin(x, dim) if kind == "min" else torch.cummax(x, dim)).values


def sliding_extremum(x: torch.Tensor, w: int, kind: str) -> torch.Tensor:
    """y[t] = min/max of x[t .. min(t+w−1, m−1)] over (B, m): O(B·m·log w).

    Sparse-table doubling on x padded with the identity (±inf, so windows truncate at the end): level p holds
    the aggregate of [u, u+p); a window of w is the overlap of two level-p windows (min/max are idempotent).
    """
    B, m = x.shape
    if w >= m:
        return cumulative(x.flip(1), kind, 1).flip(1)
    if w == 1:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _SlidingExtremum.apply(x, w, kind)
    op = torch.minimum if kind == "min" else torch.maximum
    level = torch.cat([x, filled(x, w - 1, INF if kind == "min" else -INF)], 1)
    p = 1
    while 2 * p <= w:
        level = op(level[:, :-p], level[:, p:])  # length shrinks by p: still covers every window start needed
        p *= 2
    return op(level[:, :m], level[:, w - p : w - p + m])


class _SlidingExtremum(torch.autograd.Function):
    """Sliding min/max whose backward is one scatter-add onto the arg-extremum of each window.

    The same doubling as :func:`sliding_extremum`, carrying indices; much cheaper to differentiate than a chain of
    ``torch.minimum`` (whose backward re-compares every pair). Ties go to the earliest sample; NaN wins.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: int, kind: str) -> torch.Tensor:
        B, m = x.shape
        better = torch.le if kind == "min" else torch.ge
        val = torch.cat([x, filled(x, w - 1, INF if kind == "min" else -INF)], 1)
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


def future_window(x: torch.Tensor, a: int, b: int | None, kind: str, tau: float | None) -> torch.Tensor:
    """min/max of x over [t+a, t+b] ∩ [0, n−1] (identity ±inf when empty); b=None is unbounded."""
    n = x.shape[1]
    ident = INF if kind == "min" else -INF
    if a >= n:
        return filled(x, n, ident)
    xs = x[:, a:]
    m = n - a
    w = m if b is None else min(b - a + 1, m)
    if tau is None:
        y = sliding_extremum(xs, w, kind)
    else:
        sign = tau if kind == "max" else -tau
        y = _smooth_sliding(xs * sign, w) / sign
    return torch.cat([y, filled(x, a, ident)], 1) if a else y


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
        return filled(phi, n, -INF)
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
    return torch.cat([y, filled(phi, a, -INF)], 1) if a else y


def sliding_until(phi, psi, a: int, b: int | None, tau: float | None, inclusive: bool) -> torch.Tensor:
    """φ U[a,b] ψ at every sample of (B, n) operand traces; exact (``tau`` None) or smooth at temperature ``tau``.

    Strict: φ holds on [t, t'); ``inclusive``: on [t, t']. −inf where the window is empty.
    """
    if inclusive:  # φ on [t, t'] ≡ strict until with ψ ∧ φ at t'
        psi = nary([psi, phi], "min", tau)
    if tau is not None:
        return _until_smooth(phi, psi, a, b, tau)
    n = phi.shape[1]
    if a >= n:
        return filled(phi, n, -INF)
    m = n - a
    z = _until_window_exact(phi[:, a:], psi[:, a:], m if b is None else b - a + 1)
    if a:
        z = torch.minimum(sliding_extremum(phi, a, "min")[:, :m], z)
        z = torch.cat([z, filled(phi, a, -INF)], 1)
    return z


def nary(xs: list[torch.Tensor], kind: str, tau: float | None) -> torch.Tensor:
    """Elementwise min/max of same-shape tensors (``&``, ``|``, ``->``); a log-sum-exp when ``tau`` is given."""
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


class _LogSumExp(torch.autograd.Function):
    """``torch.logsumexp(z, 1)`` with the plain softmax backward (PyTorch's own also masks infinite results, which
    cannot occur here: :func:`logsumexp_rows` removes +inf and all −inf rows first; measured 3× cheaper on CPU)."""

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


def logsumexp_rows(z: torch.Tensor) -> torch.Tensor:
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
