"""Online STL operators: each formula node as a stream operator, one sample in, at most one value out.

:func:`build_online` turns a formula into a tree of operators whose root emits ρ(φ, w, t) for t = 0, 1, ...,
each value as soon as every sample it reads has arrived: the value of sample t comes out at update
t + delay, and ``delay`` is the formula's horizon (in samples). Values are exactly those of the offline trace
(:func:`stlflow.stl.semantics.robustness_trace`), NaN rules included. Work per update: bounded G/F/H/O use
monotonic deques (constant amortised work), unbounded H/O and S running aggregates, bounded U/S loop over their
window (O(b)). A sub-formula with an unbounded future operator (``G``, ``F``, ``U`` without interval) never
emits. The conventions (interval bounds in the unit of ``dt``, windows truncated at the end of the signal) are
stated in :mod:`stlflow.stl.semantics`; :mod:`stlflow.stl.monitor` puts these operators behind its API.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping

from .inputs import interval_steps
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

__all__ = ["build_online", "pad_horizon"]

INF = math.inf
NAN = math.nan


def _min(a: float, b: float) -> float:  # NaN-propagating, order independent
    return a if (a <= b or a != a) else b


def _max(a: float, b: float) -> float:
    return a if (a >= b or a != a) else b


# --------------------------------------------------------------------------- online operators
# Each node's step(sample) returns the next value of its output stream (index 0, 1, ...) or None.
# A node emits exactly one value per update once `delay` updates have passed.


class _Pred:
    def __init__(self, fn: Callable[[Mapping[str, float]], float]):
        self.fn, self.delay = fn, 0

    def reset(self) -> None:
        pass

    def step(self, s):
        return self.fn(s)


class _Neg:
    def __init__(self, child):
        self.child, self.delay = child, child.delay

    def reset(self) -> None:
        self.child.reset()

    def step(self, s):
        v = self.child.step(s)
        return None if v is None else -v


class _Nary:
    """min/max of operands with different delays: buffer the early ones until the latest arrives."""

    def __init__(self, children, kind: str, negate_first: bool = False):
        self.children, self.op, self.neg = children, _min if kind == "min" else _max, negate_first
        self.delay = max(c.delay for c in children)
        self.reset()

    def reset(self) -> None:
        self.queues = [deque() for _ in self.children]
        for c in self.children:
            c.reset()

    def step(self, s):
        ready = True
        for c, q in zip(self.children, self.queues):
            v = c.step(s)
            if v is not None:
                q.append(v)
            ready = ready and bool(q)
        if not ready:
            return None
        qs = self.queues
        out = -qs[0].popleft() if self.neg else qs[0].popleft()
        for q in qs[1:]:
            out = self.op(out, q.popleft())
        return out


class _Window:
    """Sliding min/max over the last w values of a stream, by a monotonic deque (amortised O(1))."""

    def __init__(self, w: int | None, kind: str):
        self.w, self.is_min = w, kind == "min"
        self.reset()

    def reset(self) -> None:
        self.dq: deque = deque()
        self.j = -1
        self.last_nan = -(1 << 62)
        self.run = INF if self.is_min else -INF

    def push(self, v: float) -> float:
        """Add value j+1; return the aggregate over the last w values (all values if w is None)."""
        self.j = j = self.j + 1
        if v != v:
            self.last_nan = j
        if self.w is None:  # running aggregate
            self.run = (_min if self.is_min else _max)(self.run, v)
            return self.run
        dq = self.dq
        if v == v:
            if self.is_min:
                while dq and dq[-1][1] >= v:
                    dq.pop()
            else:
                while dq and dq[-1][1] <= v:
                    dq.pop()
            dq.append((j, v))
        while dq and dq[0][0] <= j - self.w:
            dq.popleft()
        if self.last_nan > j - self.w:
            return NAN
        return dq[0][1] if dq else (INF if self.is_min else -INF)


class _Future:
    """G/F[a,b]: y[t] = agg u[t+a .. t+b], emitted when u[t+b] arrives."""

    def __init__(self, child, a: int, b: int, kind: str):
        self.child, self.b = child, b
        self.window = _Window(b - a + 1, kind)
        self.delay = child.delay + b

    def reset(self) -> None:
        self.child.reset()
        self.window.reset()

    def step(self, s):
        v = self.child.step(s)
        if v is None:
            return None
        y = self.window.push(v)
        return y if self.window.j >= self.b else None


class _Past:
    """H/O[a,b]: y[t] = agg u[t−b .. t−a] ∩ [0, t]; u[t−a] enters the window through a delay line of length a."""

    def __init__(self, child, a: int, b: int | None, kind: str):
        self.child, self.a = child, a
        self.window = _Window(None if b is None else b - a + 1, kind)
        self.ident = INF if kind == "min" else -INF
        self.delay = child.delay

    def reset(self) -> None:
        self.child.reset()
        self.window.reset()
        self.line: deque = deque()
        self.last = self.ident

    def step(self, s):
        v = self.child.step(s)
        if v is None:
            return None
        if self.a == 0:
            return self.window.push(v)
        self.line.append(v)
        if len(self.line) > self.a:
            self.last = self.window.push(self.line.popleft())
        return self.last


class _Aligned:
    """Two operand streams aligned by index; keeps the last `keep` pairs."""

    def __init__(self, left, right, keep: int):
        self.left, self.right, self.keep = left, right, keep

    def reset(self) -> None:
        self.left.reset()
        self.right.reset()
        self.lq, self.rq = deque(), deque()
        self.phi: deque = deque(maxlen=self.keep)
        self.psi: deque = deque(maxlen=self.keep)
        self.t = -1

    def advance(self, s) -> bool:
        """Step both operands; True when a new aligned pair (index self.t) was appended."""
        v, w = self.left.step(s), self.right.step(s)
        if v is not None:
            self.lq.append(v)
        if w is not None:
            self.rq.append(w)
        if self.lq and self.rq:
            self.phi.append(self.lq.popleft())
            self.psi.append(self.rq.popleft())
            self.t += 1
            return True
        return False


class _Until(_Aligned):
    """φ U[a,b] ψ: y[t] from φ, ψ on [t, t+b], by the backward recursion r = max(ψ, min(φ, r)): O(b) per value."""

    def __init__(self, left, right, a: int, b: int, inclusive: bool):
        super().__init__(left, right, b + 1)
        self.a, self.b, self.inclusive = a, b, inclusive
        self.delay = b + max(left.delay, right.delay)
        self.reset()

    def step(self, s):
        if not self.advance(s) or self.t < self.b:
            return None
        phi, psi, a, b = list(self.phi), list(self.psi), self.a, self.b  # indices 0..b ↔ samples t..t+b
        r = _min(psi[b], phi[b]) if self.inclusive else psi[b]
        for k in range(b - 1, a - 1, -1):
            p = _min(psi[k], phi[k]) if self.inclusive else psi[k]
            r = _max(p, _min(phi[k], r))
        for k in range(a):
            r = _min(phi[k], r)
        return r


class _Since(_Aligned):
    """φ S[a,b] ψ at t: max over t' in [t−b, t−a] ∩ [0, t] of min(ψ(t'), min φ on (t', t])."""

    def __init__(self, left, right, a: int, b: int | None, inclusive: bool):
        super().__init__(left, right, (b if b is not None else a) + 1)
        self.a, self.b, self.inclusive = a, b, inclusive
        self.delay = max(left.delay, right.delay)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.z: deque = deque(maxlen=self.a + 1)  # unbounded: z[t] = S[0,inf) value, last a+1 of them

    def step(self, s):
        if not self.advance(s):
            return None
        phi, psi, t, a = self.phi, self.psi, self.t, self.a
        if self.b is None:
            p, q = phi[-1], psi[-1]
            if not self.z:
                z = _min(p, q) if self.inclusive else q
            elif self.inclusive:
                z = _min(p, _max(q, self.z[-1]))
            else:
                z = _max(q, _min(p, self.z[-1]))
            self.z.append(z)
            if t < a:
                return -INF
            r = self.z[0]
            for k in range(1, a + 1):
                r = _min(r, phi[-k])
            return r
        lo = max(0, t - self.b)
        r, m = -INF, INF  # m = min φ on (t', t]
        for tp in range(t, lo - 1, -1):
            k = tp - t - 1  # index from the end
            if tp <= t - a:
                term = _min(psi[k], m)
                r = _max(r, _min(term, phi[k]) if self.inclusive else term)
            if tp > lo:
                m = _min(m, phi[k])
        return r


class _Never:
    """A sub-formula with an unbounded future: no value is ever final."""

    delay = INF

    def reset(self) -> None:
        pass

    def step(self, s):
        return None


def _compile_expr(e: Expr, params: Mapping[str, float]) -> Callable[[Mapping[str, float]], float]:
    if isinstance(e, Num):
        c = e.value
        return lambda s: c
    if isinstance(e, Param):
        c = float(params[e.name])
        return lambda s: c
    if isinstance(e, Signal):
        name = e.name
        return lambda s: s[name]
    if isinstance(e, Neg):
        f = _compile_expr(e.arg, params)
        return lambda s: -f(s)
    if isinstance(e, Abs):
        f = _compile_expr(e.arg, params)
        return lambda s: abs(f(s))
    assert isinstance(e, BinOp)
    f, g = _compile_expr(e.left, params), _compile_expr(e.right, params)
    if e.op == "+":
        return lambda s: f(s) + g(s)
    if e.op == "-":
        return lambda s: f(s) - g(s)
    return lambda s: f(s) * g(s)


def build_online(node: Formula, dt: float, params: Mapping[str, float], inclusive: bool):
    """The online operator of ``node``: ``reset()``, ``step(sample) -> value or None``, ``delay`` (samples).

    ``params``: one float per free parameter; ``inclusive``: the ``until="inclusive"`` option.
    """
    if isinstance(node, Predicate):
        lhs, rhs = _compile_expr(node.left, params), _compile_expr(node.right, params)
        if isinstance(node.right, Num) and isinstance(node.left, Signal):  # the common case, one call less
            c, name = node.right.value, node.left.name
            return _Pred((lambda s: c - s[name]) if node.op in ("<", "<=") else (lambda s: s[name] - c))
        return _Pred((lambda s: rhs(s) - lhs(s)) if node.op in ("<", "<=") else (lambda s: lhs(s) - rhs(s)))
    kids = [build_online(c, dt, params, inclusive) for c in node.children()]
    if any(isinstance(k, _Never) for k in kids):
        return _Never()
    if isinstance(node, Not):
        return _Neg(kids[0])
    if isinstance(node, And):
        return _Nary(kids, "min")
    if isinstance(node, Or):
        return _Nary(kids, "max")
    if isinstance(node, Implies):
        return _Nary(kids, "max", negate_first=True)
    a, b = interval_steps(node.interval, dt, params, node)  # type: ignore[attr-defined]
    if isinstance(node, Temporal):
        kind = "min" if node.op in ("G", "H") else "max"
        if node.op in ("G", "F"):
            return _Never() if b is None else _Future(kids[0], a, b, kind)
        return _Past(kids[0], a, b, kind)
    assert isinstance(node, BinaryTemporal)
    if node.op == "U":
        return _Never() if b is None else _Until(kids[0], kids[1], a, b, inclusive)
    return _Since(kids[0], kids[1], a, b, inclusive)


def pad_horizon(node: Formula, dt: float, params: Mapping[str, float]) -> int:
    """Like ``horizon``, but an unbounded window counts its lower bound: how many unknown samples to append to a
    prefix so that every window that could still change ρ(0) reaches into them (the monitor's bounds)."""
    if isinstance(node, Predicate):
        return 0
    child = max(pad_horizon(c, dt, params) for c in node.children())
    if isinstance(node, Temporal | BinaryTemporal) and node.op in ("G", "F", "U"):
        a, b = interval_steps(node.interval, dt, params, node)
        return child + (a if b is None else b)
    return child
