"""SequenceSampler: Diffusion Policy padding semantics as hypothesis properties, split_episodes, DataLoader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stlflow.datasets import EpisodeStore, SequenceDataset, SequenceSampler, split_episodes

torch.set_num_threads(1)


def make_data(lengths: list[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Arrays whose values identify (episode, step): ``ep`` and ``t`` per step, ``obs`` = (global step, -step)."""
    ends = np.cumsum(lengths).astype(np.int64)
    ep = np.repeat(np.arange(len(lengths)), lengths)
    t = np.concatenate([np.arange(n) for n in lengths])
    g = np.arange(int(ends[-1]))
    return {"ep": ep, "t": t, "obs": np.stack([g, -g], axis=-1).astype(np.float64)}, ends


def reference_windows(lengths, horizon, pad_before, pad_after):
    """Windows by the definition, one loop per episode: (episode, start) with start from -pad_before on."""
    out = []
    for e, n in enumerate(lengths):
        for s in range(-pad_before, n - horizon + pad_after + 1):
            out.append((e, s))
    return out


@st.composite
def sampler_cases(draw):
    lengths = draw(st.lists(st.integers(1, 20), min_size=1, max_size=8))
    horizon = draw(st.integers(1, 12))
    n_obs = draw(st.integers(1, horizon))
    n_act = draw(st.integers(1, horizon))
    h_obs = draw(st.integers(1, horizon))
    return lengths, horizon, n_obs, n_act, h_obs


@settings(max_examples=150, deadline=None)
@given(sampler_cases())
def test_window_properties(case):
    lengths, horizon, n_obs, n_act, h_obs = case
    data, ends = make_data(lengths)
    sampler = SequenceSampler(
        data, horizon, n_obs_steps=n_obs, n_action_steps=n_act, key_horizons={"obs": h_obs}, episode_ends=ends
    )
    pb, pa = n_obs - 1, n_act - 1
    # the window count matches the formula (and the definition)
    assert len(sampler) == sum(max(0, n - horizon + pb + pa + 1) for n in lengths)
    assert list(zip(sampler.window_episode.tolist(), sampler.window_start.tolist())) == reference_windows(
        lengths, horizon, pb, pa
    )
    covered = [set() for _ in lengths]
    for w in range(len(sampler)):
        item = sampler[w]
        e, s = int(sampler.window_episode[w]), int(sampler.window_start[w])
        n = lengths[e]
        assert item["ep"].shape == (horizon,) and item["obs"].shape == (h_obs, 2)
        # every window lies within one episode
        assert np.all(item["ep"] == e)
        for j in range(horizon):
            real = s + j
            if real < 0:  # padded frames equal the edge frame
                assert item["t"][j] == 0
            elif real >= n:
                assert item["t"][j] == n - 1
            else:
                assert item["t"][j] == real
                covered[e].add(real)
        # per-key horizon: the first h frames of the full window
        g0 = int(ends[e - 1]) if e else 0
        assert np.array_equal(item["obs"][:, 0], g0 + item["t"][:h_obs])
    # every real step is covered (by any episode long enough to yield a window)
    for e, n in enumerate(lengths):
        if n >= horizon - pb - pa:
            assert covered[e] == set(range(n))
        else:
            assert not covered[e]


@settings(max_examples=50, deadline=None)
@given(sampler_cases(), st.data())
def test_batch_and_episode_subset_agree_with_items(case, data_strategy):
    lengths, horizon, n_obs, n_act, _ = case
    data, ends = make_data(lengths)
    full = SequenceSampler(data, horizon, n_obs, n_act, episode_ends=ends)
    if len(full):
        idx = data_strategy.draw(st.lists(st.integers(0, len(full) - 1), min_size=1, max_size=10))
        batch = full.sample_batch(idx)
        for b, w in enumerate(idx):
            for k, v in full[w].items():
                assert np.array_equal(batch[k][b], v)
    subset = sorted(data_strategy.draw(st.sets(st.integers(0, len(lengths) - 1))))
    part = SequenceSampler(data, horizon, n_obs, n_act, episode_ends=ends, episodes=subset)
    want = [w for w in range(len(full)) if int(full.window_episode[w]) in subset]
    assert len(part) == len(want)
    assert set(part.window_episode.tolist()) <= set(subset)
    for i, w in enumerate(want):
        for k in full.keys:
            assert np.array_equal(part[i][k], full[w][k])


def test_diffusion_policy_example():
    """To=2, Ta=8, Tp=16 on one 20-step episode: the first window starts one frame before step 0."""
    data, ends = make_data([20])
    s = SequenceSampler(data, horizon=16, n_obs_steps=2, n_action_steps=8, key_horizons={"obs": 2}, episode_ends=ends)
    assert len(s) == 20 - 16 + 1 + 7 + 1
    first, last = s[0], s[len(s) - 1]
    assert first["t"].tolist() == [0, 0] + list(range(1, 15))
    assert first["obs"][:, 0].tolist() == [0.0, 0.0]
    assert last["t"].tolist() == list(range(11, 20)) + [19] * 7


def test_pad_after_full_makes_every_step_a_window_present():
    """pad_after = Tp - To: the newest observation of the last window is the episode's last step (per-tick control
    re-plans there); Diffusion Policy's Ta - 1 stops Tp - To - Ta + 1 steps short of it."""
    from stlflow.policy.data import ChunkData

    data, ends = make_data([20])
    dp = SequenceSampler(data, horizon=16, n_obs_steps=2, n_action_steps=8, key_horizons={"obs": 2}, episode_ends=ends)
    full = SequenceSampler(data, horizon=16, n_obs_steps=2, n_action_steps=8, pad_after=14, key_horizons={"obs": 2},
                           episode_ends=ends)
    present = lambda smp: sorted({int(smp[i]["t"][1]) for i in range(len(smp))})  # noqa: E731  (frame To-1)
    assert present(dp) == list(range(0, 13))  # steps 13..19 are never the present
    assert present(full) == list(range(0, 20))
    assert full[len(full) - 1]["t"].tolist() == [18, 19] + [19] * 14  # the chunk repeats the last frame
    chunk = ChunkData({"obs": data["obs"], "action": data["t"][:, None].astype(np.float32)}, 16, 2, 8,
                      episode_ends=ends)
    assert len(chunk) == len(full)  # the policies' data uses the full padding by default
    with pytest.raises(ValueError, match="pad_after"):
        SequenceSampler(data, 16, n_obs_steps=2, pad_after=16, episode_ends=ends)


def test_short_episodes_yield_no_windows():
    data, ends = make_data([3, 10])
    s = SequenceSampler(data, horizon=8, n_obs_steps=2, n_action_steps=2, episode_ends=ends)
    assert set(s.window_episode.tolist()) == {1}
    assert len(s) == 10 - 8 + 1 + 1 + 1


def test_argument_errors():
    data, ends = make_data([5])
    with pytest.raises(ValueError, match="horizon"):
        SequenceSampler(data, 0, episode_ends=ends)
    with pytest.raises(ValueError, match="n_obs_steps"):
        SequenceSampler(data, 4, n_obs_steps=5, episode_ends=ends)
    with pytest.raises(KeyError, match="'nope'"):
        SequenceSampler(data, 4, keys=["nope"], episode_ends=ends)
    with pytest.raises(KeyError, match="'action'"):
        SequenceSampler(data, 4, key_horizons={"action": 2}, episode_ends=ends)
    with pytest.raises(ValueError, match="key_horizons"):
        SequenceSampler(data, 4, key_horizons={"obs": 5}, episode_ends=ends)
    with pytest.raises(IndexError):
        SequenceSampler(data, 4, episodes=[1], episode_ends=ends)
    with pytest.raises(ValueError, match="episode_ends"):
        SequenceSampler(data, 4)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 300), st.floats(0, 0.95), st.integers(0, 2**31))
def test_split_episodes_partition(n, ratio, seed):
    train, val = split_episodes(n, val_ratio=ratio, seed=seed)
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert len(np.intersect1d(train, val)) == 0
    expected = 0 if ratio == 0 or n <= 1 else min(max(1, round(n * ratio)), n - 1)
    assert len(val) == expected
    again = split_episodes(n, val_ratio=ratio, seed=seed)
    assert np.array_equal(again[1], val)


def test_split_seed_changes_split():
    assert not np.array_equal(split_episodes(100, 0.2, seed=0)[1], split_episodes(100, 0.2, seed=1)[1])
    with pytest.raises(ValueError, match="val_ratio"):
        split_episodes(10, 1.0)


@pytest.fixture
def small_store(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", dt=0.1)
    rng = np.random.default_rng(0)
    for T in (12, 30, 7, 18):
        store.add_episode(
            {"obs": rng.normal(size=(T, 3)).astype(np.float32), "action": rng.normal(size=(T, 2)), "t": np.arange(T)}
        )
    return store


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_with_workers(small_store, num_workers):
    train, val = split_episodes(small_store.n_episodes, 0.25, seed=0)
    sampler = SequenceSampler(
        EpisodeStore.open(small_store.path), 8, n_obs_steps=2, n_action_steps=4, key_horizons={"obs": 2}, episodes=train
    )
    ds = SequenceDataset(sampler, transform=lambda d: {**d, "action": d["action"] * 2})
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False, num_workers=num_workers)
    batches = list(loader)
    assert sum(len(b["obs"]) for b in batches) == len(sampler)
    got = {k: torch.cat([b[k] for b in batches]) for k in ("obs", "action", "t")}
    assert got["obs"].dtype == torch.float32 and got["t"].dtype == torch.float32
    assert got["obs"].shape == (len(sampler), 2, 3) and got["action"].shape == (len(sampler), 8, 2)
    for i in (0, len(sampler) // 2, len(sampler) - 1):
        assert torch.equal(got["obs"][i], torch.from_numpy(sampler[i]["obs"].astype(np.float32)))
        assert torch.allclose(got["action"][i], torch.from_numpy(2 * sampler[i]["action"]).float())
    assert set(sampler.window_episode.tolist()) <= set(train.tolist())


def test_sampler_pickles_without_store_handles(small_store):
    sampler = SequenceSampler(small_store, 4)
    clone = pickle.loads(pickle.dumps(sampler))
    assert all(isinstance(v, np.ndarray) for v in clone.data.values())
    for k in sampler.keys:
        assert np.array_equal(clone[3][k], sampler[3][k])


def test_batched_dataset_access_matches_items(small_store):
    sampler = SequenceSampler(small_store, 6, n_obs_steps=3, n_action_steps=2, key_horizons={"obs": 3})
    ds = SequenceDataset(sampler)
    batch_sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), 7, drop_last=False)
    loader = torch.utils.data.DataLoader(ds, sampler=batch_sampler, batch_size=None)
    batches = list(loader)
    assert [len(b["obs"]) for b in batches] == [7] * (len(ds) // 7) + ([len(ds) % 7] if len(ds) % 7 else [])
    flat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    assert flat["obs"].shape == (len(ds), 3, 3) and flat["action"].shape == (len(ds), 6, 2)
    for i in range(len(ds)):
        for k, v in ds[i].items():
            assert torch.equal(flat[k][i], v)
