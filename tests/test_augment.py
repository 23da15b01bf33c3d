"""STL augmentation (stlflow.datasets.augment): building blocks, optimisation through a dynamics model, replay check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stlflow.datasets.augment import (
    farthest_point_selection,
    knot_matrix,
    mean_pairwise_distance,
    sample_theta,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ building blocks
@given(horizon=st.integers(1, 60), every=st.integers(1, 12))
def test_knot_matrix_interpolates_exactly(horizon, every):
    w = knot_matrix(horizon, every)
    assert w.shape[0] == horizon
    assert torch.allclose(w.sum(1), torch.ones(horizon, dtype=w.dtype))  # a partition of unity
    assert (w >= 0).all()
    # a linear ramp through the knots is reproduced exactly
    knots = [k for k in range(0, horizon, every)]
    if knots[-1] != horizon - 1:
        knots.append(horizon - 1)
    ramp = torch.tensor(knots, dtype=w.dtype)
    assert torch.allclose(w @ ramp, torch.arange(horizon, dtype=w.dtype)) or horizon == 1


@given(
    lo=st.floats(-5, 5),
    width=st.floats(0, 3),
    seed=st.integers(0, 2**31),
    dt=st.sampled_from([0.05, 0.1, 0.5]),
)
def test_sample_theta_within_ranges_and_deterministic(lo, width, seed, dt):
    ranges = {"v_max": (lo, lo + width), "T": (1.0, 3.0)}
    a = sample_theta(ranges, np.random.default_rng(seed), base={"eps": 0.2}, time_params=["T"], dt=dt)
    b = sample_theta(dict(reversed(list(ranges.items()))), np.random.default_rng(seed), base={"eps": 0.2},
                     time_params=["T"], dt=dt)
    assert a == b
    assert lo <= a["v_max"] <= lo + width
    assert a["eps"] == 0.2
    assert math.isclose(a["T"] / dt, round(a["T"] / dt), abs_tol=1e-9)


def test_sample_theta_rejects_empty_range():
    with pytest.raises(ValueError, match="v_max"):
        sample_theta({"v_max": (2.0, 1.0)}, np.random.default_rng(0))


def _brute_fps(points: np.ndarray, k: int) -> list[int]:
    chosen = [0]
    while len(chosen) < min(k, len(points)):
        d = np.array([min(np.linalg.norm(p - points[c]) for c in chosen) for p in points])
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
    return chosen


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 20), k=st.integers(1, 25), seed=st.integers(0, 10_000))
def test_farthest_point_matches_brute_force(n, k, seed):
    pts = np.random.default_rng(seed).normal(size=(n, 3))
    got = farthest_point_selection(torch.as_tensor(pts), k)
    assert got == _brute_fps(pts, k)
    assert len(set(got)) == len(got) == min(n, k)


def test_farthest_point_balances_groups():
    # group 0 is a wide cloud, group 1 a tight one: unbalanced FPS would take only group 0 first
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(0, 10, size=(20, 2)), rng.normal(0, 0.01, size=(20, 2))])
    groups = [0] * 20 + [1] * 20
    got = farthest_point_selection(torch.as_tensor(pts), 8, groups)
    assert sorted(groups[i] for i in got) == [0] * 4 + [1] * 4


def test_mean_pairwise_distance():
    a = torch.zeros(1, 4, 2)
    assert mean_pairwise_distance(a) == 0.0
    two = torch.stack([torch.zeros(4, 2), torch.ones(4, 2) * torch.tensor([3.0, 4.0])])
    assert math.isclose(mean_pairwise_distance(two), 5.0, rel_tol=1e-9)  # RMS over time of a constant 5 m gap
