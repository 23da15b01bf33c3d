"""Normalizer: min-max to [-1, 1], Gaussian, constant dimensions, inverse round trip, numpy/torch, safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stlflow.datasets import Normalizer

torch.set_num_threads(1)


@st.composite
def feature_data(draw):
    """(N, D) float64 data with some constant columns and wide value ranges."""
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 6))
    x = draw(hnp.arrays(np.float64, (n, d), elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)))
    const = draw(st.lists(st.booleans(), min_size=d, max_size=d))
    for j, c in enumerate(const):
        if c:
            x[:, j] = x[0, j]
    return x


@settings(max_examples=200, deadline=None)
@given(feature_data(), st.sampled_from(["minmax", "gaussian", "identity"]))
def test_fit_properties_and_round_trip(x, mode):
    eps = 1e-4
    norm = Normalizer.fit({"k": x}, modes=mode, eps=eps)
    y = norm.normalize("k", x)
    assert y.shape == x.shape and y.dtype == np.float64
    assert np.all(np.isfinite(y))
    back = norm.unnormalize("k", y)
    assert np.allclose(back, x, rtol=1e-9, atol=1e-7 * (1 + np.abs(x).max()))
    rng = x.max(0) - x.min(0)
    const = rng < eps if mode == "minmax" else x.std(0) < eps
    if mode == "minmax":
        assert np.all(y >= -1 - 1e-9) and np.all(y <= 1 + 1e-9)
        live = ~const
        assert np.allclose(y.min(0)[live], -1) and np.allclose(y.max(0)[live], 1)
        assert np.all(np.abs(y[:, const]) <= eps / 2 + 1e-12)  # (near-)constant features are centred on 0
    elif mode == "gaussian":
        assert np.allclose(y.mean(0), 0, atol=1e-6)
        live = ~const
        assert np.allclose(y.std(0)[live], 1, atol=1e-6)
    else:
        assert np.array_equal(y, x)


@settings(max_examples=50, deadline=None)
@given(feature_data())
def test_torch_matches_numpy_any_leading_dims(x):
    norm = Normalizer.fit({"obs": x}, modes={"obs": "gaussian"})
    xb = np.broadcast_to(x, (3, *x.shape)).copy()  # (B, T, D)
    t = torch.from_numpy(xb)
    yt = norm.normalize("obs", t)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float64
    assert np.allclose(yt.numpy(), norm.normalize("obs", xb))
    y32 = norm.normalize("obs", t.float())
    assert y32.dtype == torch.float32
    assert torch.allclose(norm.unnormalize("obs", y32), t.float(), rtol=1e-4, atol=1e-2)


def test_constant_data_gives_no_nan():
    x = np.full((50, 3), 7.0)
    for mode in ("minmax", "gaussian"):
        norm = Normalizer.fit({"a": x}, modes=mode)
        y = norm.normalize("a", x)
        assert np.all(np.isfinite(y)) and np.allclose(y, 0)
        assert np.allclose(norm.unnormalize("a", np.zeros((2, 3))), 7.0)


def test_scalar_feature_and_integer_input():
    reward = np.array([0.0, 1.0, 2.0, 4.0])
    norm = Normalizer.fit({"reward": reward, "count": np.arange(10)})
    assert norm.normalize("reward", reward).tolist() == [-1.0, -0.5, 0.0, 1.0]
    y = norm.normalize("count", np.arange(10))
    assert y.dtype == np.float32 and y[0] == -1 and y[-1] == 1
    yt = norm.normalize("count", torch.arange(10))
    assert yt.dtype == torch.float32


def test_state_dict_and_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = {"obs": rng.normal(3, 2, size=(100, 5)), "action": rng.uniform(-4, 9, size=(100, 2))}
    data["obs"][:, 2] = 1.5
    norm = Normalizer.fit(data, modes={"obs": "gaussian", "action": "minmax"})
    sd = norm.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert "obs.scale" in sd and "action.mode" in sd
    path = tmp_path / "normalizer.safetensors"
    norm.save(path)
    for other in (Normalizer.from_state_dict(sd), Normalizer.load(path)):
        assert other.keys == ["obs", "action"]
        assert "obs" in other and "reward" not in other
        assert other.mode("obs") == "gaussian" and other.mode("action") == "minmax"
        for k, x in data.items():
            assert np.allclose(other.normalize(k, x), norm.normalize(k, x), atol=1e-5)
            assert np.allclose(other.unnormalize(k, other.normalize(k, x)), x, atol=1e-4)


def test_errors_name_the_key():
    norm = Normalizer.fit({"obs": np.zeros((4, 3))})
    with pytest.raises(ValueError, match="'obs'.*last dimension 3"):
        norm.normalize("obs", np.zeros((4, 2)))
    with pytest.raises(KeyError, match="'action'"):
        norm.normalize("action", np.zeros((4, 3)))
    with pytest.raises(ValueError, match="'bad'.*NaN"):
        Normalizer.fit({"bad": np.array([[0.0, np.nan]])})
    with pytest.raises(ValueError, match="'obs'.*unknown mode 'zscore'"):
        Normalizer.fit({"obs": np.zeros((4, 3))}, modes="zscore")
    with pytest.raises(ValueError, match="'e'.*empty"):
        Normalizer.fit({"e": np.zeros((0, 3))})


def test_normalize_dict_as_dataset_transform():
    from stlflow.datasets import SequenceDataset, SequenceSampler

    rng = np.random.default_rng(0)
    data = {"obs": rng.normal(size=(40, 3)), "action": rng.uniform(-5, 5, size=(40, 2)), "t": np.arange(40)}
    norm = Normalizer.fit({"obs": data["obs"], "action": data["action"]}, modes={"obs": "gaussian"})
    ds = SequenceDataset(SequenceSampler(data, 4, episode_ends=[15, 40]), transform=norm.normalize_dict)
    item, batch = ds[3], ds[[3, 5]]
    assert torch.equal(item["t"], torch.tensor([3.0, 4.0, 5.0, 6.0]))  # not a normaliser key: unchanged
    assert torch.allclose(batch["action"][0], item["action"])
    assert float(batch["action"].abs().max()) <= 1.0 + 1e-6
    back = norm.unnormalize_dict(item)
    assert torch.allclose(back["obs"], torch.from_numpy(data["obs"][3:7]).float(), atol=1e-5)
