"""Online monitor: `delayed` equals the offline trace, bounds contain every possible final ρ(0), reset works."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stlflow.stl import STLInputError, parse
from stlflow.stl.syntax import And, BinaryTemporal, BinOp, Implies, Interval, Not, Num, Or, Predicate, Signal, Temporal

torch.set_num_threads(1)
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _interval(draw, unbounded_ok):
    a = draw(st.integers(0, 2))
    if unbounded_ok and draw(st.integers(0, 4)) == 0:
        return Interval(Num(float(a)), None)
    return Interval(Num(float(a)), Num(float(a + draw(st.integers(0, 3)))))


def formulas(unbounded_future=False):
    leaf = st.builds(
        Predicate,
        st.sampled_from([Signal("x"), Signal("y"), BinOp("-", Signal("x"), Signal("y"))]),
        st.sampled_from(["<", ">="]),
        st.sampled_from([Num(-1.0), Num(0.0), Num(0.5)]),
    )

    def extend(c):
        future = _interval(unbounded_future)
        return st.one_of(
            st.builds(Not, c),
            st.builds(lambda xs: And(tuple(xs)), st.lists(c, min_size=2, max_size=3)),
            st.builds(lambda xs: Or(tuple(xs)), st.lists(c, min_size=2, max_size=2)),
            st.builds(Implies, c, c),
            st.builds(Temporal, st.sampled_from(["G", "F"]), future, c),
            st.builds(Temporal, st.sampled_from(["H", "O"]), _interval(True), c),
            st.builds(BinaryTemporal, st.just("U"), future, c, c),
            st.builds(BinaryTemporal, st.just("S"), _interval(True), c, c),
        )

    return st.recursive(leaf, extend, max_leaves=5)


@st.composite
def signals(draw, nan=False):
    n = draw(st.integers(1, 14))
    vals = st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0] + ([math.nan] if nan else []))
    return {k: draw(st.lists(vals, min_size=n, max_size=n)) for k in ("x", "y")}


def _run(mon, sig):
    n = len(sig["x"])
    return [mon.update({k: v[i] for k, v in sig.items()}) for i in range(n)]


def _eq(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


@SETTINGS
@given(formulas(), signals(nan=True), st.sampled_from(["strict", "inclusive"]))
def test_delayed_equals_offline(f, sig, until):
    trace = f.robustness_trace(sig, 1.0, until=until)[0].tolist()
    mon = f.monitor(1.0, until=until)
    h = f.horizon(1.0)
    outs = _run(mon, sig)
    for i, out in enumerate(outs):
        if i < h:
            assert out.delayed is None
        else:
            assert out.delayed_t == i - h and _eq(out.delayed, trace[i - h]), (str(f), i, out.delayed, trace)


@SETTINGS
@given(formulas(unbounded_future=True), signals(), st.sampled_from(["truncate", "violate"]))
def test_so_far_and_bounds_contain_every_final_value(f, sig, end):
    n = len(sig["x"])
    rho0 = [float(f.robustness({k: v[: m + 1] for k, v in sig.items()}, 1.0, end=end)[0]) for m in range(n)]
    outs = _run(f.monitor(1.0, end=end), sig)
    for k, out in enumerate(outs):
        assert _eq(out.so_far, rho0[k])
        for m in range(k, n):  # the signal may stop at any later sample
            assert out.lower <= rho0[m] <= out.upper, (str(f), k, m, out.lower, rho0[m], out.upper)
        if k >= f.horizon(1.0):
            assert out.lower == out.upper == rho0[k]


def test_bounds_of_a_simple_rule_tighten():
    f = parse("G[0,3](x < 1)")
    outs = _run(f.monitor(1.0), {"x": [0.0, 0.5, 2.0, 0.0, 0.0]})
    assert (outs[0].lower, outs[0].upper, outs[0].verdict) == (-math.inf, 1.0, "undecided")
    assert outs[2].upper == -1.0 and outs[2].verdict == "violated"
    assert outs[3].lower == outs[3].upper == -1.0 and outs[3].delayed == -1.0 and outs[3].delayed_t == 0
    g = _run(parse("F[0,3](x > 0)").monitor(1.0), {"x": [1.0]})[0]
    assert g.lower == 1.0 and g.verdict == "satisfied"


def test_params_past_operators_and_reset_at_any_time():
    f = parse("H[0,{T}](x <= {v}) & O(y > 0) & (x < 2) S (y > 1)")
    params = {"T": 2.0, "v": 1.0}
    rng = np.random.default_rng(0)
    sig = {"x": rng.normal(size=30).tolist(), "y": rng.normal(size=30).tolist()}
    trace = f.robustness_trace(sig, 1.0, params)[0].tolist()
    mon = f.monitor(1.0, params)
    assert mon.h == 0
    _run(mon, {k: v[:7] for k, v in sig.items()})
    mon.reset()
    outs = _run(mon, sig)
    assert [o.delayed for o in outs] == pytest.approx(trace, abs=0)


def test_unbounded_future_has_no_delayed_value_and_missing_signal_is_named():
    mon = parse("G(x < 1) & F[0,2](y > 0)").monitor(0.5)
    out = mon.update({"x": 0.0, "y": 1.0})
    assert out.delayed is None and out.so_far == 1.0 and out.upper == 1.0 and out.lower == -math.inf
    with pytest.raises(STLInputError, match=r"missing signal\(s\) \['y'\].*given signals: \['x'\]"):
        mon.update({"x": 0.0})
