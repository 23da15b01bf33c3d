"""Calibration: tightest values are data values, every demo satisfies its own spec, dataset quantiles, margins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stlflow.stl import calibrate, parse
from stlflow.stl.calibrate import parameter_direction

torch.set_num_threads(1)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

demos = st.integers(1, 4).flatmap(
    lambda B: st.integers(1, 12).flatmap(
        lambda T: st.tuples(*[arrays(np.float64, (B, T), elements=st.floats(-3, 3, width=32)) for _ in range(2)])))

# (formula, the exact tightest value per demo as a function of x, y)
THRESHOLD_CASES = [
    ("G(x <= {p})", lambda x, y: x.max(1)),
    ("G(x - y <= {p})", lambda x, y: (x - y).max(1)),
    ("!F(x > {p})", lambda x, y: x.max(1)),
    ("G(x >= {p})", lambda x, y: x.min(1)),
    ("F(2 * x + 1 >= {p})", lambda x, y: (2 * x + 1).max(1)),
    ("G(x <= {p} + 1) | y > 5", lambda x, y: x.max(1) - 1),
]


@SETTINGS
@given(demos, st.sampled_from(THRESHOLD_CASES))
def test_tightest_threshold_is_the_data_value_and_satisfied(xy, case):
    x, y = xy
    text, expected = case
    spec = parse(text)
    res = calibrate(spec, {"x": x, "y": y}, 0.1, ["p"])
    want = expected(x, y)
    np.testing.assert_allclose(res.values["p"], want, rtol=1e-12, atol=1e-12)
    assert res.satisfied.all()
    # one step tighter than the tightest value violates the spec
    d = res.direction["p"]
    tighter = res.values["p"] - d * 1e-6 * (1 + np.abs(want))
    rho = spec.robustness({"x": x, "y": y}, 0.1, {"p": tighter})
    assert (rho < 0).all()


@SETTINGS
@given(demos, st.floats(0.1, 1.0))
def test_time_bounds_are_scanned_exactly(xy, dt):
    x, _ = xy
    spec = parse("F[0,{T}](x >= 0.5)")
    res = calibrate(spec, {"x": x}, dt, ["T"])
    for b in range(x.shape[0]):
        hits = np.nonzero(x[b] >= 0.5)[0]
        if hits.size:
            assert res.values["T"][b] == pytest.approx(hits[0] * dt) and res.satisfied[b]
        else:
            assert np.isnan(res.tightest["T"][b]) and not res.satisfied[b]
    # G[{a}, end]: the loosest demo-wise start: larger a loosens G
    g = calibrate(parse("G[{a},1.0](x < 4)"), {"x": x}, 0.1, ["a"])
    assert (g.values["a"] == 0).all() and g.satisfied.all()


def test_several_parameters_and_margin():
    rng = np.random.default_rng(0)
    speed, dist = rng.uniform(0, 2, (6, 40)), np.abs(rng.normal(1, 1, (6, 40)))
    spec = parse("G(speed <= {v_max}) & F[0,{T}](dist_goal <= {eps})")
    sig = {"speed": speed, "dist_goal": dist}
    res = calibrate(spec, sig, 0.1, ["v_max", "eps", "T"])
    assert res.satisfied.all() and np.array_equal(res.values["v_max"], speed.max(1))
    assert np.array_equal(res.values["eps"], dist.min(1))
    for b in range(6):
        assert res.values["T"][b] == pytest.approx(0.1 * np.argmin(dist[b]))
        assert spec.robustness({k: v[b] for k, v in sig.items()}, 0.1, res.params(b))[0] >= 0
    loose = calibrate(spec, sig, 0.1, ["v_max"], margin=0.25, fixed={"eps": 10.0, "T": 1.0})
    np.testing.assert_allclose(loose.values["v_max"], speed.max(1) + 0.25)
    np.testing.assert_allclose(loose.robustness, 0.25)


def test_dataset_mode_quantile():
    x = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]])
    spec = parse("G(x <= {p})")
    all_demos = calibrate(spec, {"x": x}, 1.0, ["p"], mode="dataset")
    assert all_demos.dataset["p"] == 4.0 and all_demos.satisfied.all()
    assert np.array_equal(all_demos.values["p"], np.full(4, 4.0))
    half = calibrate(spec, {"x": x}, 1.0, ["p"], mode="dataset", q=0.5)
    assert half.dataset["p"] == 2.0 and half.satisfied.tolist() == [True, True, False, False]
    low = calibrate(parse("G(x >= {p})"), {"x": x + 1}, 1.0, ["p"], mode="dataset", q=0.75)
    assert low.dataset["p"] == 1.0 and low.satisfied.mean() == 1.0


def test_direction_detection_and_non_monotone_parameters():
    assert parameter_direction(parse("G(x <= {p})"), "p") == 1
    assert parameter_direction(parse("G(x <= -{p})"), "p") == -1
    assert parameter_direction(parse("F[0,{T}](x > 1)"), "T") == 1
    assert parameter_direction(parse("G[0,{T}](x > 1)"), "T") == -1
    assert parameter_direction(parse("G[{a},5](x > 1) -> y < 0"), "a") == -1
    with pytest.raises(ValueError, match="not monotone"):
        calibrate(parse("G(x <= {p}) & F(x > {p})"), {"x": np.zeros(3)}, 1.0, ["p"])
    with pytest.raises(ValueError, match="not monotone"):
        parameter_direction(parse("G(x * {p} <= 1)"), "p")
    with pytest.raises(ValueError, match="neither calibrated nor given"):
        calibrate(parse("G(x <= {p}) & F(x > {q})"), {"x": np.zeros(3)}, 1.0, ["p"])
