"""Bad input to the STL evaluation raises STLInputError naming what is wrong, never another exception or NaN.

``dt``, ``smooth``, parameters, signals and monitor samples: property tests over junk values (strings, None, bools,
non-finite and non-positive numbers, complex numbers, ragged lists); numpy and torch scalars are accepted and give
the same results as floats; integer signals are computed in float64, so a tiny temperature gives no NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stlflow.stl import STLInputError, parse
from stlflow.stl.semantics import first_violation, robustness, robustness_trace

torch.set_num_threads(1)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

F = parse("G[0,1](x < {c}) & F[0,{T}](y > 0) | (x > 0) U[0,2] (y < {c})")
SIG = {"x": [0.0, 1.0, 2.0, 3.0, 0.5], "y": [1.0, -1.0, 0.0, 2.0, 1.0]}
PARAMS = {"c": 1.5, "T": 2.0}

# values that are not a positive, finite number of seconds
BAD_DT = st.one_of(
    st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, -math.inf, 0, -1]),
    st.text(max_size=4), st.none(), st.booleans(), st.just(1 + 1j), st.just([0.1]),
    st.just(np.array([0.1, 0.2])), st.just(torch.tensor([0.1, 0.2])), st.just(np.float64("nan")),
    st.just(torch.tensor(0.0)), st.just({"dt": 0.1}),
)
# values that are not a finite temperature > 0 (None is valid: exact min/max)
BAD_SMOOTH = st.one_of(
    st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, -math.inf, 0, -3]),
    st.text(max_size=4), st.booleans(), st.just(2j), st.just([1.0]), st.just(torch.tensor([1.0, 2.0])),
)
# values that are not a number or an array of numbers
BAD_PARAM = st.one_of(
    st.text(max_size=4), st.none(), st.booleans(), st.just(1 + 2j), st.just([None]), st.just(["1"]),
    st.just([[1.0, 2.0], [3.0]]), st.just({"a": 1}), st.just(np.array(["a"])), st.just(torch.tensor([1j])),
    st.just(object()), st.just(10**400),
)


def _calls(dt=1.0, smooth=None, params=PARAMS, signals=SIG):
    """Every public entry point that takes these arguments, as thunks."""
    return {
        "robustness": lambda: robustness(F, signals, dt, params, smooth),
        "robustness_trace": lambda: robustness_trace(F, signals, dt, params, smooth),
        "first_violation": lambda: first_violation(F, signals, dt, params),
        "horizon": lambda: F.horizon(dt, params),
        "smooth_error_bound": lambda: F.smooth_error_bound(5, dt, 2.0 if smooth is None else smooth, params),
        "monitor": lambda: F.monitor(dt, params),
    }


@SETTINGS
@given(BAD_DT)
def test_bad_dt_is_an_input_error_everywhere(dt):
    for name, call in _calls(dt=dt).items():
        with pytest.raises(STLInputError, match="dt") as info:
            call()
        assert "Traceback" not in str(info.value), name


@SETTINGS
@given(st.sampled_from([0.25, 0.5, 1.0]), st.sampled_from([np.float64, np.float32, np.array, torch.tensor,
                                                          lambda v: torch.tensor(v, dtype=torch.float64)]))
def test_dt_as_numpy_or_torch_scalar_gives_the_float_result(dt, kind):
    for smooth in (None, 3.0):
        want = robustness_trace(F, SIG, dt, PARAMS, smooth)
        assert torch.equal(robustness_trace(F, SIG, kind(dt), PARAMS, smooth), want)
        assert torch.equal(robustness(F, SIG, kind(dt), PARAMS, smooth), robustness(F, SIG, dt, PARAMS, smooth))
    assert F.horizon(kind(dt), PARAMS) == F.horizon(dt, PARAMS)
    assert F.monitor(kind(dt), PARAMS).h == F.monitor(dt, PARAMS).h
    assert robustness(F, SIG, np.int64(1), PARAMS).tolist() == robustness(F, SIG, 1.0, PARAMS).tolist()


@SETTINGS
@given(BAD_SMOOTH)
def test_bad_smooth_is_an_input_error(smooth):
    for name in ("robustness", "robustness_trace", "smooth_error_bound"):
        with pytest.raises(STLInputError, match="smooth"):
            _calls(smooth=smooth)[name]()


@SETTINGS
@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=8),
       st.one_of(st.sampled_from([1e-300, 1e-50, 1e-40, 1e-30, 2.3e-308]), st.floats(1e-300, 1e3)))
def test_integer_signals_with_any_temperature_match_float64(xs, tau):
    """Integer signals are computed in float64: the temperature is kept, so no NaN where the float64 result has none."""
    f = parse("G[0,2](x < 1) & F(x > 0) | (x > 2) U[0,3] (x < 5)")
    ints = {"x": xs}
    floats = {"x": np.asarray(xs, dtype=np.float64)}
    for fn in (robustness, robustness_trace):
        got, want = fn(f, ints, 1.0, smooth=tau), fn(f, floats, 1.0, smooth=tau)
        assert got.dtype == torch.float64 and not got.isnan().any()
        assert torch.equal(got, want)
    t = torch.tensor(xs)  # an int64 tensor too
    assert torch.equal(robustness(f, {"x": t}, 1.0, smooth=tau), robustness(f, floats, 1.0, smooth=tau))


def test_temperature_outside_the_signal_dtype_is_an_input_error():
    x32 = {"x": np.array([0.0, 1.0, 2.0], dtype=np.float32)}
    f = parse("G(x < 1)")
    for tau in (1e-50, 1e39):
        with pytest.raises(STLInputError, match=r"outside the range of torch\.float32.*float64 signals"):
            f.robustness(x32, 1.0, smooth=tau)
    assert f.robustness(x32, 1.0, smooth=1e-3).dtype == torch.float32  # within range: unchanged, float32
    with pytest.raises(STLInputError, match="float16"):
        f.robustness({"x": torch.zeros(3, dtype=torch.float16)}, 1.0, smooth=1e5)
    with pytest.raises(STLInputError, match="float64"):  # subnormal: no precision left, the result would be -inf
        f.robustness({"x": [0, 1, 2]}, 1.0, smooth=5e-324)


@SETTINGS
@given(BAD_PARAM, st.sampled_from(["c", "T"]))
def test_bad_parameter_is_an_input_error_naming_it(value, name):
    params = {**PARAMS, name: value}
    for fn in ("robustness", "robustness_trace", "first_violation", "horizon", "monitor"):
        with pytest.raises(STLInputError, match=f"parameter '{name}'"):
            _calls(params=params)[fn]()


@SETTINGS
@given(BAD_PARAM.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)))
def test_bad_signal_is_an_input_error_naming_it(value):
    for fn in ("robustness", "robustness_trace", "first_violation"):
        with pytest.raises(STLInputError, match="signal 'x'"):
            _calls(signals={**SIG, "x": value})[fn]()


JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(), st.integers(-3, 3), st.just([]),
                 st.lists(st.floats(), max_size=4), st.just([[1.0], [2.0, 3.0]]), st.just(np.zeros((2, 0))),
                 st.just(np.ones((2, 2, 2))), st.just(torch.ones(3, dtype=torch.int32)), st.just(2j))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["x", "y", "z"]), JUNK, max_size=3),
       st.one_of(st.none(), st.dictionaries(st.sampled_from(["c", "T", "q"]), JUNK, max_size=3)), JUNK,
       st.one_of(st.none(), JUNK), st.sampled_from(["strict", "inclusive", "bogus"]))
def test_junk_inputs_raise_only_input_errors(signals, params, dt, smooth, until):
    """Whatever is passed, the evaluation returns a result or raises STLInputError; never another exception."""
    for fn in (robustness, robustness_trace):
        try:
            out = fn(F, signals, dt, params, smooth, until=until)
        except STLInputError:
            continue
        assert isinstance(out, torch.Tensor)


# --------------------------------------------------------------------------- the online monitor


def test_monitor_missing_or_bad_sample_is_an_input_error_and_changes_nothing():
    mon = parse("G[0,2](x < 1) & F[0,1](y > 0)").monitor(1.0)
    mon.update({"x": 0.0, "y": 1.0})
    with pytest.raises(STLInputError, match=r"missing signal\(s\) \['y'\] in the sample; given signals: \['x'\]"):
        mon.update({"x": 0.0})
    for bad in ("0.5", None, [0.5], 1j, True):
        with pytest.raises(STLInputError, match="signal 'y' in the sample must be a single number"):
            mon.update({"x": 0.0, "y": bad})
    with pytest.raises(STLInputError, match="mapping"):
        mon.update([0.0, 1.0])
    out = mon.update({"x": np.float64(0.5), "y": torch.tensor(2.0)})  # numpy and torch scalars are numbers
    assert out.t == 1  # the refused samples were not counted


@pytest.mark.parametrize("text, match", [
    ("G[0,1e300](x < 1)", r"needs 1e\+300 samples of memory"),
    ("(x < 1) S[0,1e300] (y > 0)", "samples of memory"),
    ("G[0,1e300](x < 1) & y > 0", "samples of memory"),
])
def test_monitor_refuses_windows_it_cannot_hold(text, match):
    with pytest.raises(STLInputError, match=match):
        parse(text).monitor(1.0)
    assert parse("H[0,1e300](x < 1)").monitor(1.0).update({"x": 0.0}).lower == 1.0  # past windows hold no samples


def test_huge_interval_offline_is_an_input_error_or_truncated():
    f = parse("G[0,1e300](x < 1)")
    with pytest.raises(STLInputError, match=r"too large for dt=1e-300.*use a smaller bound or a larger dt"):
        f.robustness({"x": [0.0, 2.0]}, 1e-300)
    assert f.robustness({"x": [0.0, 2.0]}, 1.0).tolist() == [-1.0]  # a window past the end is truncated
    assert f.horizon(1.0) == round(1e300)


def test_first_violation_checks_batch_and_explains_per_trajectory_interval_bounds():
    x = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    f = parse("G[0,{T}](x < {c})")
    params = {"c": -5.0, "T": np.array([1.0, 2.0])}
    with pytest.raises(STLInputError, match="out of range for 2 trajectories"):
        first_violation(f, {"x": x}, 1.0, params, batch=2)
    for b in (0, 1, -1):
        node, t, rho = first_violation(f, {"x": x}, 1.0, params, batch=b)
        assert (str(node), t, rho) == ("x < {c}", 0, -5.0 - x[b, 0])
