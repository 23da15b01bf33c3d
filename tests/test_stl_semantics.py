"""Semantics of stlflow.stl against a brute-force evaluator written from its documented definitions.

First half: the reference (plain loops over samples) and hypothesis strategies that generate formula trees and
signals. Second half: the tests (hand-computed operators, brute force on random formulas, smooth bounds, G/F
duality, round trips, NaN, batching, gradients, memory, errors).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stlflow.stl import STLInputError, parse
from stlflow.stl.semantics import first_violation, robustness_trace
from stlflow.stl.syntax import (
    Abs,
    And,
    BinaryTemporal,
    BinOp,
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

INF = math.inf


def _agg(values, kind, tau):
    """min/max (tau None) or log-sum-exp at temperature tau; NaN if any value is NaN; ±inf if empty."""
    if any(math.isnan(v) for v in values):
        return math.nan
    if not values:
        return INF if kind == "min" else -INF
    if tau is None:
        return min(values) if kind == "min" else max(values)
    s = tau if kind == "max" else -tau
    z = [v * s for v in values]
    if any(v == INF for v in z):
        return INF / s
    finite = [v for v in z if v != -INF]
    if not finite:
        return -INF / s
    m = max(finite)
    return (m + math.log(sum(math.exp(v - m) for v in finite))) / s


def _expr(e, sig, params, t):
    if isinstance(e, Num):
        return e.value
    if isinstance(e, Signal):
        return sig[e.name][t]
    if isinstance(e, Param):
        return params[e.name]
    if isinstance(e, Neg):
        return -_expr(e.arg, sig, params, t)
    if isinstance(e, Abs):
        return abs(_expr(e.arg, sig, params, t))
    a, b = _expr(e.left, sig, params, t), _expr(e.right, sig, params, t)
    return a + b if e.op == "+" else a - b if e.op == "-" else a * b


def _bound(b, params, dt):
    v = b.value if isinstance(b, Num) else params[b.name]
    return round(v / dt)


def reference(node, sig, dt, params=None, t=0, tau=None, until="strict", end="truncate"):
    """ρ(node, sig, t) by the definitions; sig: name -> list of floats (one trajectory)."""
    params = params or {}
    n = len(next(iter(sig.values())))

    def rho(nd, t):
        return reference(nd, sig, dt, params, t, tau, until, end)

    if isinstance(node, Predicate):
        l, r = _expr(node.left, sig, params, t), _expr(node.right, sig, params, t)
        return r - l if node.op in ("<", "<=") else l - r
    if isinstance(node, Not):
        return -rho(node.arg, t)
    if isinstance(node, And):
        return _agg([rho(c, t) for c in node.args], "min", tau)
    if isinstance(node, Or):
        return _agg([rho(c, t) for c in node.args], "max", tau)
    if isinstance(node, Implies):
        return _agg([-rho(node.left, t), rho(node.right, t)], "max", tau)
    a = _bound(node.interval.lo, params, dt)
    b = None if node.interval.hi is None else _bound(node.interval.hi, params, dt)
    if isinstance(node, Temporal):
        if node.op in ("G", "F"):
            hi = n - 1 if b is None else min(t + b, n - 1)
            window = range(t + a, hi + 1)
            if node.op == "G" and end == "violate" and b is not None and b > 0 and t + b > n - 1:
                return -INF
        else:
            lo = 0 if b is None else max(t - b, 0)
            window = range(lo, t - a + 1)
        kind = "min" if node.op in ("G", "H") else "max"
        return _agg([rho(node.arg, s) for s in window], kind, tau)
    assert isinstance(node, BinaryTemporal)
    terms = []
    if node.op == "U":
        hi = n - 1 if b is None else min(t + b, n - 1)
        for tp in range(t + a, hi + 1):
            left = list(range(t, tp + 1 if until == "inclusive" else tp))
            terms.append(_agg([rho(node.right, tp)] + [rho(node.left, s) for s in left], "min", tau))
    else:
        lo = 0 if b is None else max(t - b, 0)
        for tp in range(lo, t - a + 1):
            left = list(range(tp if until == "inclusive" else tp + 1, t + 1))
            terms.append(_agg([rho(node.right, tp)] + [rho(node.left, s) for s in left], "min", tau))
    return _agg(terms, "max", tau)


def reference_trace(node, sig, dt, params=None, **kw):
    n = len(next(iter(sig.values())))
    return [reference(node, sig, dt, params, t, **kw) for t in range(n)]


# --------------------------------------------------------------------------- strategies

SIGNALS = ("x", "y")


EDGE_CONSTANTS = [0, 0.0, -0.0, 1, -1, 2, 0.5, -2.5, 1e-300, -1e-300, 1e300, -1e300, 5e-324, 2**60]


@st.composite
def predicates(draw, edge=False):
    """Predicates on x, y; ``edge``: constants also drawn from EDGE_CONSTANTS (zero of both signs, ints, tiny and
    huge values), negated (``Neg(Num(c))``, which prints as ``-(c)``) or not (the parser round trip)."""
    name = draw(st.sampled_from(SIGNALS))
    c = Num(float(draw(st.integers(-2, 2))))
    if edge:
        c = draw(st.sampled_from([c, Num(draw(st.sampled_from(EDGE_CONSTANTS)))]))
        c = draw(st.sampled_from([c, Neg(c)]))
    lhs = draw(st.sampled_from([
        Signal(name),
        BinOp("+", Signal("x"), Signal("y")),
        BinOp("-", BinOp("*", Num(2.0), Signal(name)), Num(1.0)),
        Abs(Signal(name)),
        Neg(Signal(name)),
    ] + ([BinOp("*", Neg(c), Signal(name)), BinOp("-", Signal(name), c)] if edge else [])))
    op = draw(st.sampled_from(["<", "<=", ">", ">="]))
    return Predicate(lhs, op, c) if draw(st.booleans()) else Predicate(c, op, lhs)


@st.composite
def intervals(draw, max_b=4):
    a = draw(st.integers(0, 2))
    if draw(st.integers(0, 4)) == 0:
        return Interval(Num(float(a)), None)
    return Interval(Num(float(a)), Num(float(a + draw(st.integers(0, max_b)))))


def formulas(max_leaves=6, edge=False):
    def extend(children):
        return st.one_of(
            st.builds(Not, children),
            st.builds(lambda xs: And(tuple(xs)), st.lists(children, min_size=2, max_size=3)),
            st.builds(lambda xs: Or(tuple(xs)), st.lists(children, min_size=2, max_size=3)),
            st.builds(Implies, children, children),
            st.builds(Temporal, st.sampled_from(["G", "F", "H", "O"]), intervals(), children),
            st.builds(BinaryTemporal, st.sampled_from(["U", "S"]), intervals(), children, children),
        )

    return st.recursive(predicates(edge), extend, max_leaves=max_leaves)


VALUES = st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0])


@st.composite
def signal_sets(draw, max_n=7, nan=False):
    n = draw(st.integers(1, max_n))
    vals = st.one_of(VALUES, st.just(math.nan)) if nan else VALUES
    return {s: draw(st.lists(vals, min_size=n, max_size=n)) for s in SIGNALS}


# =========================================================================== tests


torch.set_num_threads(1)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tensors(sig, dtype=torch.float64):
    return {k: torch.tensor(v, dtype=dtype) for k, v in sig.items()}


def _same(a, b, tol=1e-9):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    close = np.isclose(a, b, rtol=tol, atol=tol) | (a == b)
    return bool(np.all(both_nan | close)), (a, b)


UNTIL = ["strict", "inclusive"]
X = [0.0, 1.0, 2.0, 3.0, 0.5]
Y = [0.0, 1.0, 0.0, 0.0, 2.0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x < 1", [1, 0, -1, -2, 0.5]),
        ("x >= 1", [-1, 0, 1, 2, -0.5]),
        ("!(x < 1)", [-1, 0, 1, 2, -0.5]),
        ("x < 1 & y > 0.5", [-0.5, 0, -1, -2, 0.5]),
        ("x < 1 | y > 0.5", [1, 0.5, -0.5, -0.5, 1.5]),
        ("x < 1 -> y > 0.5", [-0.5, 0.5, 1, 2, 1.5]),
        ("G[0,2](x < 1)", [-1, -2, -2, -2, 0.5]),
        ("G[1,2](x < 1)", [-1, -2, -2, 0.5, np.inf]),
        ("F[1,3](y > 0.5)", [0.5, 1.5, 1.5, 1.5, -np.inf]),
        ("G(x < 1)", [-2, -2, -2, -2, 0.5]),
        ("F(y > 0.5)", [1.5, 1.5, 1.5, 1.5, 1.5]),
        ("(x < 1) U[0,2] (y > 0.5)", [0.5, 0.5, -0.5, -0.5, 1.5]),
        ("(x < 1) U (y > 0.5)", [0.5, 0.5, -0.5, -0.5, 1.5]),
        ("(x < 1) U[1,2] (y > 0.5)", [0.5, -0.5, -1, -2, -np.inf]),
        ("H[1,2](x < 3)", [np.inf, 3, 2, 1, 0]),
        ("O[0,1](y > 0.5)", [-0.5, 0.5, 0.5, -0.5, 1.5]),
        ("(x < 1) S[0,2] (y > 0.5)", [-0.5, 0.5, -0.5, -0.5, 1.5]),
    ],
)
def test_operators_hand_computed(text, expected):
    trace = robustness_trace(parse(text), _tensors({"x": X, "y": Y}), dt=1.0)
    assert trace.shape == (1, 5)
    np.testing.assert_array_equal(trace[0].numpy(), np.array(expected, dtype=np.float64))


def test_interval_in_seconds_and_inclusive_until():
    sig = _tensors({"x": X, "y": Y})
    # G[0,0.3] with dt=0.1 covers samples t..t+3
    trace = robustness_trace(parse("G[0,0.3](x < 1)"), sig, 0.1)[0].numpy()
    np.testing.assert_array_equal(trace, [-2, -2, -2, -2, 0.5])
    # inclusive: φ must also hold at t'; at t=0, t'=1 now needs min(ψ(1)=.5, φ(0)=1, φ(1)=0) = 0
    f = parse("(x < 1) U[0,2] (y > 0.5)")
    np.testing.assert_array_equal(robustness_trace(f, sig, 1.0, until="inclusive")[0].numpy(), [0, 0, -1, -2, 0.5])
    # violate: windows running past the end count as violation
    g = parse("G[0,2](x < 1)")
    trace = robustness_trace(g, sig, 1.0, end="violate")[0].numpy()
    np.testing.assert_array_equal(trace, [-1, -2, -2, -np.inf, -np.inf])


@SETTINGS
@given(formulas(), signal_sets(nan=True), st.sampled_from(UNTIL), st.sampled_from(["truncate", "violate"]))
def test_exact_matches_brute_force(f, sig, until, end):
    got = robustness_trace(f, _tensors(sig), 1.0, until=until, end=end)[0]
    want = reference_trace(f, sig, 1.0, until=until, end=end)
    ok, detail = _same(got.numpy(), want, tol=0)
    assert ok, (str(f), sig, detail)


@SETTINGS
@given(formulas(max_leaves=4), signal_sets(), st.sampled_from([0.5, 2.0, 10.0]), st.sampled_from(UNTIL))
def test_smooth_matches_brute_force_and_bound(f, sig, tau, until):
    smooth = robustness_trace(f, _tensors(sig), 1.0, smooth=tau, until=until)[0].numpy()
    want = reference_trace(f, sig, 1.0, tau=tau, until=until)
    ok, detail = _same(smooth, want, tol=1e-9)
    assert ok, (str(f), sig, detail)
    exact = robustness_trace(f, _tensors(sig), 1.0, until=until)[0].numpy()
    bound = f.smooth_error_bound(len(sig["x"]), 1.0, tau)
    finite = np.isfinite(exact)
    assert np.array_equal(np.isfinite(smooth), finite)
    assert np.all(np.abs(smooth[finite] - exact[finite]) <= bound + 1e-9), (str(f), smooth, exact, bound)


@SETTINGS
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=40), st.integers(0, 5), st.integers(0, 50),
       st.floats(0.1, 100.0), st.sampled_from(["G", "F", "H", "O"]))
def test_smooth_window_bound_per_operator(xs, a, w, tau, op):
    f = parse(f"{op}[{a},{a + w}](x > 0)")
    x = torch.tensor(xs, dtype=torch.float64)
    exact = robustness_trace(f, {"x": x}, 1.0)[0]
    smooth = robustness_trace(f, {"x": x}, 1.0, smooth=tau)[0]
    k = min(w + 1, len(xs))
    finite = torch.isfinite(exact)
    err = (smooth - exact)[finite]
    assert torch.all(err.abs() <= math.log(k) / tau + 1e-9)
    assert torch.all(err >= -1e-12) if op in "FO" else torch.all(err <= 1e-12)  # smooth max ≥ max, min ≤ min


@SETTINGS
@given(formulas(max_leaves=4), signal_sets(nan=True), intervals(), st.sampled_from([None, 3.0]))
def test_duality_holds_exactly_everywhere(f, sig, iv, smooth):
    x = _tensors(sig)
    for a, b in (("G", "F"), ("H", "O")):
        lhs = robustness_trace(Temporal(a, iv, f), x, 1.0, smooth=smooth)
        rhs = robustness_trace(Not(Temporal(b, iv, Not(f))), x, 1.0, smooth=smooth)
        assert torch.equal(lhs.isnan(), rhs.isnan())
        assert torch.equal(lhs.nan_to_num(0.0), rhs.nan_to_num(0.0)), (str(f), sig)


@SETTINGS
@given(formulas(edge=True), st.sampled_from([0.1, 0.25, 1.0]))
def test_parser_round_trip(f, dt):
    """Negated and edge constants included: ``-(0)`` once printed as ``-0.0``, which reads back as ``Num(-0.0)``."""
    text = str(f)
    g = parse(text)
    assert g == f and str(g) == text
    assert g.signals <= set(SIGNALS)


def test_nan_position_in_window_does_not_matter():
    f = parse("G[0,3](x > 0) | F[0,3](x > 0)")
    for pos in range(4):
        x = torch.ones(6, dtype=torch.float64)
        x[pos] = math.nan
        assert torch.isnan(robustness_trace(f, {"x": x}, 1.0)[0, 0])
        assert torch.isnan(robustness_trace(f, {"x": x}, 1.0, smooth=5.0)[0, 0])


def test_batch_dtype_device_and_no_mutation():
    f = parse("G[0,2](x < {c}) & F(y > 0)")
    x = np.random.default_rng(0).normal(size=(3, 9)).astype(np.float32)
    y = torch.tensor(np.random.default_rng(1).normal(size=9), dtype=torch.float32)
    x0, y0 = x.copy(), y.clone()
    for smooth in (None, 4.0):
        tr = f.robustness_trace({"x": x, "y": y}, 0.5, {"c": 0.5}, smooth=smooth)
        assert tr.shape == (3, 9) and tr.dtype == torch.float32
        rho = f.robustness({"x": x, "y": y}, 0.5, {"c": 0.5}, smooth=smooth)
        assert rho.shape == (3,) and rho.dtype == torch.float32
        # ρ(0) comes from the point fast path: bit-identical when exact, equal to round-off when smooth
        assert torch.equal(rho, tr[:, 0]) if smooth is None else torch.allclose(rho, tr[:, 0], rtol=1e-6, atol=1e-6)
        for b in range(3):  # batched rows equal single-row evaluations
            single = f.robustness_trace({"x": x[b], "y": y}, 0.5, {"c": 0.5}, smooth=smooth)
            assert torch.allclose(single[0], tr[b])
    assert np.array_equal(x, x0) and torch.equal(y, y0)
    one = f.robustness({"x": [0.2], "y": [1.0]}, 0.5, {"c": 0.5})
    assert one.dtype == torch.float64 and one.tolist() == [0.3]


def test_per_trajectory_params_and_gradients():
    f = parse("G[0,1](x <= {v}) & F[0,{T}](y > {eps})")
    gen = torch.Generator().manual_seed(0)
    shift = torch.tensor([[0.0], [0.0], [-5.0], [-5.0]], dtype=torch.float64)  # rows 0, 1: G binds; rows 2, 3: F
    x = (torch.randn(4, 6, dtype=torch.float64, generator=gen) + shift).requires_grad_(True)
    y = (torch.randn(4, 6, dtype=torch.float64, generator=gen) - 0.5 * shift).requires_grad_(True)
    v = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    T = np.array([0.0, 1.0, 1.0, 3.0])
    for smooth in (None, 3.0):
        rho = f.robustness({"x": x, "y": y}, 1.0, {"v": v, "T": T, "eps": 0.1}, smooth=smooth)
        for b in range(4):
            pb = {"v": float(v[b].detach()), "T": float(T[b]), "eps": 0.1}
            single = f.robustness({"x": x[b], "y": y[b]}, 1.0, pb, smooth=smooth)
            assert torch.allclose(rho[b], single[0])
        as_lists = f.robustness({"x": x.tolist(), "y": y.tolist()}, 1.0, {"v": v.tolist(), "T": T.tolist(), "eps": 0.1},
                                smooth=smooth)
        assert torch.allclose(as_lists, rho)
        gx, gy, gv = torch.autograd.grad(rho.sum(), (x, y, v))
        assert torch.isfinite(gx).all() and torch.isfinite(gv).all() and gv.abs().sum() > 0
        assert gx.abs().sum() > 0 and gy.abs().sum() > 0


def test_smooth_gradient_matches_finite_differences():
    f = parse("G[0,2](x < 1) & (F[1,3](y > 0.5) | (x < 0) U[0,2] (y > 0))")
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: f.robustness({"x": x, "y": y}, 1.0, smooth=2.0), (x, y))


def test_smooth_gradients_stay_finite_with_empty_windows():
    f = parse("F(G[2,3](x > 0)) & G(F[2,3](x > 0) | x > 1)")
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    rho = f.robustness({"x": x}, 1.0, smooth=5.0)
    (g,) = torch.autograd.grad(rho.sum(), x)
    assert torch.isfinite(g).all()


def test_memory_linear_in_T():
    n = 200_000  # a (T, T) mask would need 320 GB
    x = torch.randn(1, n, dtype=torch.float64)
    f = parse("G[0,50000](x < 10) & (x < 3) U (x > 4) & F[10,20000](x > 0)")
    assert f.robustness({"x": x}, 1.0).shape == (1,)


def test_missing_names_and_bad_dt_are_explained():
    f = parse("G[0,{T}](speed <= {v_max})")
    with pytest.raises(STLInputError, match=r"missing signal\(s\) \['speed'\].*given signals: \['velocity'\]"):
        f.robustness({"velocity": [1.0]}, 0.1, {"T": 0.1, "v_max": 1.0})
    with pytest.raises(STLInputError, match=r"missing parameter\(s\) \['T'\].*given parameters: \['v_max'\]"):
        f.robustness({"speed": [1.0]}, 0.1, {"v_max": 1.0})
    with pytest.raises(STLInputError, match=r"0\.25 .* not an integer multiple of dt=0\.1"):
        parse("F[0,0.25](speed < 1)").robustness({"speed": [1.0, 2.0]}, 0.1)
    with pytest.raises(STLInputError, match="different lengths"):
        parse("x < y").robustness({"x": [1.0, 2.0], "y": [1.0]}, 0.1)


def test_horizon():
    assert parse("x < 1").horizon(0.1) == 0
    assert parse("G[0,0.5](x < 1) & F[0.2,0.3](G[0,0.1] y > 0)").horizon(0.1) == 5
    assert parse("H[0,3](F[0,2] x > 0)").horizon(1.0) == 2
    assert parse("(x > 0) U[1,{b}] (y > 0)").horizon(1.0, {"b": 4}) == 4
    assert parse("G(x < 1)").horizon(1.0) == math.inf


def test_first_violation():
    f = parse("G[0,4](x < 2) & F[0,4](y > 1)")
    node, t, rho = first_violation(f, {"x": X, "y": Y}, 1.0)
    assert str(node) == "x < 2.0" and t == 3 and rho == -1.0
    # the earliest explanation wins: F is violated at sample 0 already
    node, t, rho = first_violation(parse("G[0,4](x < 2) & F[0,4](y > 5)"), {"x": X, "y": Y}, 1.0)
    assert str(node) == "F[0.0,4.0](y > 5.0)" and t == 0 and rho == -3.0
    assert first_violation(parse("G(x < 10)"), {"x": X}, 1.0) is None


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 12), st.sampled_from(["min", "max"]), st.booleans())
def test_sliding_window_gradient_goes_to_the_window_extremum(n, w, kind, with_nan):
    from stlflow.stl.kernels import sliding_extremum as _exact_sliding

    gen = torch.Generator().manual_seed(n * 100 + w)
    x = torch.randn(3, n, dtype=torch.float64, generator=gen)
    if with_nan:
        x[1, n // 2] = math.nan
    xg = x.clone().requires_grad_(True)
    y = _exact_sliding(xg, w, kind)  # the autograd path (custom backward when w < n)
    with torch.no_grad():
        assert torch.equal(y.isnan(), _exact_sliding(x, w, kind).isnan())
        assert torch.equal(y.nan_to_num(), _exact_sliding(x, w, kind).nan_to_num())
    pad = torch.full((3, w - 1), math.inf if kind == "min" else -math.inf, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    windows = torch.cat([xr, pad], 1).unfold(1, w, 1)  # (3, n, w): reference, quadratic memory, tests only
    ref = windows.amin(-1) if kind == "min" else windows.amax(-1)
    ok = ~ref.isnan()
    g = torch.randn(3, n, dtype=torch.float64, generator=gen)
    (gy,) = torch.autograd.grad(y, xg, g * ok)
    (gr,) = torch.autograd.grad(ref, xr, g * ok)
    assert torch.equal(y[ok], ref[ok].detach())
    rows = [0, 2] if with_nan else [0, 1, 2]  # amin's own gradient is NaN around a NaN
    assert torch.allclose(gy[rows], gr[rows])


# --------------------------------------------------------------------------- point mode: robustness() vs the trace


def _point_and_trace(f, x, dt=1.0, params=None, **kw):
    """(robustness(...), robustness_trace(...)[:, 0]) on the same input (the point fast path vs the trace)."""
    from stlflow.stl.semantics import robustness

    return robustness(f, x, dt, params, **kw), robustness_trace(f, x, dt, params, **kw)[:, 0]


def _nan_equal(a, b, smooth=None):
    """Bit-identical (NaN where NaN) in exact mode; in smooth mode equal up to float round-off (the log/exp kernels
    round differently on a (B,) vector and on a (B, T) trace), with the same NaN and ±inf entries."""
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    a, b = a.nan_to_num(0.0, INF, -INF), b.nan_to_num(0.0, INF, -INF)
    if smooth is None:
        return torch.equal(a, b)
    tol = 1e-5 if a.dtype == torch.float32 else 1e-12
    return torch.equal(torch.isfinite(a), torch.isfinite(b)) and torch.allclose(a, b, rtol=tol, atol=tol)


@SETTINGS
@given(formulas(), signal_sets(max_n=12, nan=True), st.sampled_from(UNTIL), st.sampled_from(["truncate", "violate"]),
       st.sampled_from([None, 0.5, 3.0, 30.0]))
def test_point_mode_equals_trace_at_zero(f, sig, until, end, smooth):
    """robustness() (top-down point mode) equals robustness_trace()[:, 0]: bit-identical exact, round-off smooth."""
    point, trace = _point_and_trace(f, _tensors(sig), until=until, end=end, smooth=smooth)
    assert point.shape == (1,) and point.dtype == torch.float64
    assert _nan_equal(point, trace, smooth), (str(f), sig, point, trace)
    has_nan = any(math.isnan(v) for s in sig.values() for v in s)
    if smooth is None or not has_nan:  # (the reference's smooth NaN rule is only tested without NaN)
        want = [reference(f, sig, 1.0, until=until, end=end, tau=smooth)]
        assert _same(point.numpy(), want, tol=1e-9 if smooth else 0)[0], (str(f), sig, point, want)


@SETTINGS
@given(st.integers(1, 300), st.integers(0, 3), st.one_of(st.none(), st.integers(0, 300)), st.sampled_from("GFHO"),
       st.sampled_from([None, 0.5, 30.0]), st.sampled_from(["truncate", "violate"]), st.integers(0, 2**31 - 1))
def test_point_mode_long_windows_float32(n, a, w, op, smooth, end, seed):
    """Windows of any length (the log-sum-exp tree over every bit pattern of w), float32, batch of 3."""
    iv = f"[{a},inf]" if w is None else f"[{a},{a + w}]"
    f = parse(f"{op}{iv}(x > 0.1) & y < 1")
    gen = torch.Generator().manual_seed(seed)
    x = {"x": torch.randn(3, n, generator=gen), "y": torch.randn(3, n, generator=gen)}
    point, trace = _point_and_trace(f, x, smooth=smooth, end=end)
    assert point.dtype == torch.float32 and _nan_equal(point, trace, smooth), (str(f), point, trace)


def test_point_mode_infinite_values_and_nan_everywhere_in_window():
    f = parse("G[0,5](x > 0) | F(x > 1)")
    for smooth in (None, 2.0):
        for pos in range(8):
            for val in (math.nan, math.inf, -math.inf):
                x = torch.linspace(-1, 1, 8, dtype=torch.float64)
                x[pos] = val
                point, trace = _point_and_trace(f, {"x": x}, smooth=smooth)
                assert _nan_equal(point, trace, smooth), (smooth, pos, val, point, trace)


def test_point_mode_per_trajectory_params_and_interval_bounds():
    f = parse("G(x <= {v}) & F[0,{T}](y > {eps}) & G[{a},{T}](abs(x) < 3)")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 9, dtype=torch.float64, generator=gen), torch.randn(6, 9, dtype=torch.float64, generator=gen)
    params = {"v": torch.linspace(-0.5, 2.0, 6, dtype=torch.float64), "T": np.array([0.0, 1.0, 1.0, 3.0, 8.0, 12.0]),
              "a": np.array([0.0, 0.0, 1.0, 2.0, 2.0, 0.0]), "eps": 0.1}
    for smooth in (None, 4.0):
        for end in ("truncate", "violate"):
            point, trace = _point_and_trace(f, {"x": x, "y": y}, params=params, smooth=smooth, end=end)
            assert point.shape == (6,) and _nan_equal(point, trace, smooth), (smooth, end, point, trace)


@SETTINGS
@given(formulas(max_leaves=5), st.integers(1, 10), st.sampled_from(UNTIL), st.sampled_from(["truncate", "violate"]),
       st.sampled_from([None, 0.5, 5.0]), st.integers(0, 2**31 - 1))
def test_point_mode_gradients_equal_trace_gradients(f, n, until, end, smooth, seed):
    """Autograd through the point path equals autograd through trace[:, 0] (signals and a threshold tensor)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, dtype=torch.float64, generator=gen)
    y = torch.randn(2, n, dtype=torch.float64, generator=gen)
    grads = []
    for path in (0, 1):
        xs = {"x": x.clone().requires_grad_(True), "y": y.clone().requires_grad_(True)}
        out = _point_and_trace(f, xs, until=until, end=end, smooth=smooth)[path]
        w = torch.tensor([1.0, -0.7], dtype=torch.float64)
        keep = torch.isfinite(out)
        if not keep.any():
            return
        grads.append(torch.autograd.grad((out[keep] * w[keep]).sum(), (xs["x"], xs["y"]), allow_unused=True))
    for gp, gt in zip(*grads):
        gp = torch.zeros_like(x) if gp is None else gp
        gt = torch.zeros_like(x) if gt is None else gt
        assert torch.allclose(gp, gt, rtol=1e-9, atol=1e-12), (str(f), gp, gt)


def test_point_mode_gradient_reaches_threshold_parameters():
    f = parse("G(speed <= {v_max}) & F[0,{T}](dist < {eps})")
    gen = torch.Generator().manual_seed(2)
    speed, dist = torch.rand(4, 20, generator=gen, dtype=torch.float64), torch.rand(4, 20, generator=gen,
                                                                                     dtype=torch.float64)
    for smooth in (None, 10.0):
        gs = []
        for path in (0, 1):
            v = torch.full((4,), 0.8, dtype=torch.float64, requires_grad=True)
            eps = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
            out = _point_and_trace(f, {"speed": speed, "dist": dist}, params={"v_max": v, "T": 5.0, "eps": eps},
                                   smooth=smooth)[path]
            gs.append(torch.autograd.grad(out.sum(), (v, eps)))
        assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(*gs))
        assert gs[0][0].abs().sum() > 0
