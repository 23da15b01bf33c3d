"""EpisodeStore: round trips, validation (nothing half-written), repair of an uncommitted tail, filter/merge,
Diffusion Policy zarr v2 stores."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import zarr

import stlflow.datasets.store_io as store_mod
from stlflow.datasets import EpisodeStore, EpisodeStoreError
from stlflow.datasets.store import CHUNK_BYTES, COMMIT_FILE


def make_episode(rng: np.random.Generator, T: int) -> dict[str, np.ndarray]:
    return {
        "obs": rng.normal(size=(T, 4)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(T, 2)).astype(np.float32),
        "signal_speed": rng.uniform(0, 2, size=T),
        "step": np.arange(T, dtype=np.int32),
    }


def tree_digest(path) -> dict[str, str]:
    """Every file under ``path`` with a hash of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


@pytest.fixture
def filled(tmp_path):
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(tmp_path / "demo.zarr", dt=0.05, attrs={"task": "crossing", "source": "test"})
    episodes = [make_episode(rng, int(T)) for T in rng.integers(1, 40, size=6)]
    attrs = [{"seed": i, "mode": ["yield", "left", "right"][i % 3], "theta": {"v_max": 0.5 + i}} for i in range(6)]
    for i, (ep, at) in enumerate(zip(episodes, attrs)):
        assert store.add_episode(ep, attrs=at) == i
    return store, episodes, attrs


def assert_episode_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert np.array_equal(got[k], want[k]), k


def test_round_trip(filled):
    store, episodes, attrs = filled
    lengths = [len(ep["obs"]) for ep in episodes]
    reader = EpisodeStore.open(store.path)
    assert reader.mode == "r"
    assert reader.n_episodes == 6 and len(reader) == 6
    assert reader.n_steps == sum(lengths)
    assert reader.keys == ["obs", "action", "signal_speed", "step"]
    assert reader.dt == 0.05
    assert reader.attrs == {"task": "crossing", "source": "test"}
    assert reader.schema_version == 1
    assert reader.episode_ends.dtype == np.int64
    assert reader.episode_ends.tolist() == np.cumsum(lengths).tolist()
    assert reader.episode_lengths.tolist() == lengths
    assert reader.key_shape("obs") == (4,) and reader.key_shape("signal_speed") == ()
    assert reader.key_dtype("step") == np.int32
    for i in range(6):
        assert_episode_equal(reader.episode(i), episodes[i])
        assert reader.episode_attrs(i) == attrs[i]
    assert_episode_equal(reader.episode(-1), episodes[-1])
    for got, want in zip(reader, episodes):
        assert_episode_equal(got, want)
    assert np.array_equal(reader.get("obs"), np.concatenate([ep["obs"] for ep in episodes]))
    assert reader.all_episode_attrs() == attrs
    with pytest.raises(IndexError, match="6 episodes"):
        reader.episode(6)
    with pytest.raises(KeyError, match="'nope'"):
        reader.get("nope")


def test_layout_is_diffusion_policy_compatible(filled):
    """A committed store has data/<key> of exactly episode_ends[-1] steps and meta/episode_ends (DP asserts it)."""
    store, episodes, _ = filled
    root = zarr.open_group(store.path, mode="r")
    ends = root["meta"]["episode_ends"][:]
    assert ends.tolist() == store.episode_ends.tolist()
    for key in store.keys:
        assert root["data"][key].shape[0] == ends[-1]


def test_chunking_and_compression_defaults(filled):
    store, _, _ = filled
    root = zarr.open_group(store.path, mode="r")
    for key in store.keys:
        arr = root["data"][key]
        step_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
        assert arr.chunks[1:] == arr.shape[1:]  # per-step dims never split
        assert arr.chunks[0] * step_bytes <= CHUNK_BYTES
        assert (arr.chunks[0] + 1) * step_bytes > CHUNK_BYTES
        (codec,) = arr.compressors
        assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd"


def test_dtype_cast_same_kind(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", schema={"x": ((2,), "float32"), "n": ((), "int64")})
    store.add_episode({"x": np.ones((3, 2), dtype=np.float64), "n": np.arange(3, dtype=np.int8)})
    ep = EpisodeStore.open(store.path).episode(0)
    assert ep["x"].dtype == np.float32 and ep["n"].dtype == np.int64


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda ep: {k: v for k, v in ep.items() if k != "action"}, "missing \\['action'\\]"),
        (lambda ep: {**ep, "extra": ep["step"]}, "unexpected \\['extra'\\]"),
        (lambda ep: {**ep, "signal_speed": ep["signal_speed"][:-1]}, "ragged.*signal_speed"),
        (lambda ep: {**ep, "obs": ep["obs"][:, :3]}, "'obs' has per-step shape"),
        (lambda ep: {**ep, "step": ep["step"].astype(np.float64)}, "'step' has dtype float64"),
        (lambda ep: {**ep, "obs": ep["obs"].astype(str)}, "'obs': dtype <U"),
        (lambda ep: {**ep, "step": np.int32(3)}, "'step' is a scalar"),
        (lambda ep: {k: v[:0] for k, v in ep.items()}, "0 steps"),
        (lambda ep: {**ep, "a/b": ep["step"]}, "bad key name 'a/b'"),
        (lambda ep: [1, 2], "expected a non-empty dict"),
    ],
)
def test_bad_input_names_the_key_and_writes_nothing(filled, bad, match):
    store, episodes, _ = filled
    before = tree_digest(store.path)
    with pytest.raises(EpisodeStoreError, match=match):
        store.add_episode(bad(make_episode(np.random.default_rng(1), 5)))
    assert tree_digest(store.path) == before
    assert store.n_episodes == 6
    # and the store still takes good episodes
    store.add_episode(episodes[0])
    assert_episode_equal(EpisodeStore.open(store.path).episode(6), episodes[0])


def test_bad_attrs_write_nothing(filled):
    store, _, _ = filled
    before = tree_digest(store.path)
    with pytest.raises(EpisodeStoreError, match=r"attrs\['fn'\]"):
        store.add_episode(make_episode(np.random.default_rng(1), 5), attrs={"fn": object()})
    assert tree_digest(store.path) == before


def test_numpy_attrs_become_json(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", attrs={"limits": np.array([1.0, 2.0])})
    store.add_episode({"x": np.zeros(2)}, attrs={"seed": np.int64(3), "theta": np.float32(0.5)})
    reader = EpisodeStore.open(store.path)
    assert reader.attrs == {"limits": [1.0, 2.0]}
    assert reader.episode_attrs(0) == {"seed": 3, "theta": 0.5}


def test_first_episode_defines_schema_and_batch_append(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", dt=None)
    rng = np.random.default_rng(2)
    eps = [make_episode(rng, T) for T in (3, 1, 7)]
    assert store.add_episodes(eps, [{"i": 0}, None, {"i": 2}]) == [0, 1, 2]
    reader = EpisodeStore.open(store.path)
    assert reader.dt is None
    assert reader.episode_ends.tolist() == [3, 4, 11]
    assert [reader.episode_attrs(i) for i in range(3)] == [{"i": 0}, {}, {"i": 2}]
    for i in range(3):
        assert_episode_equal(reader.episode(i), eps[i])


def test_read_only_and_bad_paths(filled, tmp_path):
    store, _, _ = filled
    reader = EpisodeStore.open(store.path)
    with pytest.raises(EpisodeStoreError, match="read-only"):
        reader.add_episode(make_episode(np.random.default_rng(0), 3))
    with pytest.raises(EpisodeStoreError, match="read-only"):
        reader.set_episode_attrs(0, {"x": 1})
    missing = tmp_path / "nothing.zarr"
    with pytest.raises(FileNotFoundError, match="nothing.zarr"):
        EpisodeStore.open(missing)
    plain = tmp_path / "plain_dir"
    plain.mkdir()
    (plain / "file.txt").write_text("hello")
    with pytest.raises(EpisodeStoreError, match="plain_dir.*not an EpisodeStore"):
        EpisodeStore.open(plain)
    with pytest.raises(EpisodeStoreError, match="plain_dir"):
        EpisodeStore.open(plain, mode="a")
    with pytest.raises(EpisodeStoreError, match="file.txt"):
        EpisodeStore.open(plain / "file.txt")
    bad_commit = tmp_path / "broken.zarr"
    bad_commit.mkdir()
    (bad_commit / COMMIT_FILE).write_text("{not json")
    with pytest.raises(EpisodeStoreError, match="stlflow.json is not valid JSON"):
        EpisodeStore.open(bad_commit)
    with pytest.raises(ValueError, match="mode"):
        EpisodeStore.open(store.path, mode="w")


def test_create_refuses_to_clobber(filled, tmp_path):
    store, _, _ = filled
    with pytest.raises(FileExistsError, match="demo.zarr"):
        EpisodeStore.create(store.path)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(EpisodeStoreError, match="not an EpisodeStore"):
        EpisodeStore.create(other, overwrite=True)
    assert (other / "thesis.tex").exists()
    fresh = EpisodeStore.create(store.path, overwrite=True, dt=0.2)
    assert fresh.n_episodes == 0 and fresh.dt == 0.2
    with pytest.raises(EpisodeStoreError, match="dt"):
        EpisodeStore.create(tmp_path / "x.zarr", dt=-1.0)
    assert not (tmp_path / "x.zarr").exists()


def test_set_episode_attrs_and_store_attrs(filled):
    store, _, attrs = filled
    store.set_episode_attrs(2, {"theta": {"v_max": 9.0}, "calibrated": True})
    store.set_attrs({"calibration": "tightest"})
    reader = EpisodeStore.open(store.path)
    assert reader.episode_attrs(2) == {**attrs[2], "theta": {"v_max": 9.0}, "calibrated": True}
    assert reader.episode_attrs(1) == attrs[1]
    assert reader.attrs["calibration"] == "tightest" and reader.attrs["task"] == "crossing"
    store.set_episode_attrs(2, {"only": 1}, replace=True)
    assert EpisodeStore.open(store.path).episode_attrs(2) == {"only": 1}


def test_uncommitted_tail_is_ignored_and_repaired(filled):
    """Steps and episode metadata written past the commit (a killed writer) are invisible and then dropped."""
    store, episodes, attrs = filled
    n_steps, n_ep = store.n_steps, store.n_episodes
    root = zarr.open_group(store.path, mode="r+")
    for key in store.keys:
        arr = root["data"][key]
        arr.resize((n_steps + 5, *arr.shape[1:]))
        arr[n_steps:] = 7
    for name in ("episode_ends", "episode_attrs"):
        root["meta"][name].resize((n_ep + 1,))
    root["meta"]["episode_ends"][n_ep] = n_steps + 5
    root["meta"]["episode_attrs"][n_ep] = json.dumps({"ghost": True})
    root.create_array("data/ghost_key", shape=(3,), dtype="float32")
    (store.path / "data" / "obs" / ".junk.stlflow-tmp").write_bytes(b"partial")

    reader = EpisodeStore.open(store.path)
    assert reader.n_steps == n_steps and reader.n_episodes == n_ep
    assert reader.keys == store.keys
    assert len(reader.get("obs")) == n_steps

    writer = EpisodeStore.open(store.path, mode="a")  # repairs
    root = zarr.open_group(store.path, mode="r")
    assert all(root["data"][k].shape[0] == n_steps for k in store.keys)
    assert "ghost_key" not in root["data"]
    assert root["meta"]["episode_ends"].shape == (n_ep,)
    assert not list(store.path.rglob("*.stlflow-tmp"))
    new = make_episode(np.random.default_rng(5), 4)
    writer.add_episode(new, attrs={"new": 1})
    reader = EpisodeStore.open(store.path)
    for i in range(n_ep):
        assert_episode_equal(reader.episode(i), episodes[i])
        assert reader.episode_attrs(i) == attrs[i]
    assert_episode_equal(reader.episode(n_ep), new)
    assert reader.episode_attrs(n_ep) == {"new": 1}


def test_failure_during_write_leaves_committed_state(filled, monkeypatch):
    """An exception in the middle of an append (disk full at the 3rd file write) leaves the committed store."""
    store, episodes, _ = filled
    n_steps = store.n_steps
    calls = {"n": 0}
    real = store_mod._atomic_write_bytes

    def failing_write(path, data, durable=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("No space left on device")
        return real(path, data, durable)

    monkeypatch.setattr(store_mod, "_atomic_write_bytes", failing_write)
    with pytest.raises(OSError, match="No space"):
        store.add_episode(make_episode(np.random.default_rng(9), 11))
    monkeypatch.setattr(store_mod, "_atomic_write_bytes", real)
    assert calls["n"] > 3  # the other writes went through: there was a tail to clean up
    assert store.n_steps == n_steps and store.n_episodes == 6
    root = zarr.open_group(store.path, mode="r")
    assert all(root["data"][k].shape[0] == n_steps for k in store.keys)
    assert root["meta"]["episode_ends"].shape == (6,)
    store.add_episode(episodes[1])
    reader = EpisodeStore.open(store.path)
    assert reader.n_episodes == 7
    for i in range(6):
        assert_episode_equal(reader.episode(i), episodes[i])
    assert_episode_equal(reader.episode(6), episodes[1])


def test_filter_and_merge(filled, tmp_path):
    store, episodes, attrs = filled
    by_index = store.filter(tmp_path / "idx.zarr", episodes=[4, 1])
    assert by_index.n_episodes == 2
    assert_episode_equal(by_index.episode(0), episodes[4])
    assert by_index.episode_attrs(1) == attrs[1]
    assert by_index.dt == store.dt and by_index.attrs["filtered_from"] == str(store.path)

    yields = store.filter(tmp_path / "yield.zarr", episodes=lambda a: a["mode"] == "yield")
    assert [a["seed"] for a in yields.all_episode_attrs()] == [0, 3]

    merged = EpisodeStore.merge([store, str(by_index.path)], tmp_path / "merged.zarr")
    reader = EpisodeStore.open(merged.path)
    assert reader.n_episodes == 8
    for i, want in enumerate(episodes + [episodes[4], episodes[1]]):
        assert_episode_equal(reader.episode(i), want)
    assert reader.attrs["merged_from"] == [str(store.path), str(by_index.path)]

    other = EpisodeStore.create(tmp_path / "other.zarr", dt=0.05)
    other.add_episode({"obs": np.zeros((2, 4), np.float32)})
    with pytest.raises(EpisodeStoreError, match="other.zarr"):
        EpisodeStore.merge([store, other], tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()
    with pytest.raises(IndexError):
        store.filter(tmp_path / "oob.zarr", episodes=[99])


def test_pickle_reopens_read_only(filled):
    store, episodes, _ = filled
    clone = pickle.loads(pickle.dumps(store))
    assert clone.mode == "r" and clone.n_episodes == store.n_episodes
    assert_episode_equal(clone.episode(3), episodes[3])


def write_dp_store(path, episodes, zarr_format=2):
    """A Diffusion Policy ReplayBuffer-style store: data/<key> concatenated, meta/episode_ends."""
    root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    data = root.create_group("data")
    for key in episodes[0]:
        value = np.concatenate([ep[key] for ep in episodes])
        arr = data.create_array(key, shape=value.shape, dtype=value.dtype, chunks=(7, *value.shape[1:]))
        arr[:] = value
    ends = np.cumsum([len(next(iter(ep.values()))) for ep in episodes]).astype(np.int64)
    meta = root.create_group("meta")
    meta.create_array("episode_ends", shape=ends.shape, dtype=ends.dtype)[:] = ends
    return root


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_opens_diffusion_policy_store_read_only(tmp_path, zarr_format):
    rng = np.random.default_rng(3)
    episodes = [
        {"state": rng.normal(size=(T, 5)), "action": rng.normal(size=(T, 2)).astype(np.float32)} for T in (9, 4, 13)
    ]
    path = tmp_path / "pusht_replay.zarr"
    write_dp_store(path, episodes, zarr_format)
    if zarr_format == 2:
        assert (path / ".zgroup").exists()
    store = EpisodeStore.open(path)
    assert store.source_format == "diffusion_policy"
    assert store.n_episodes == 3 and store.n_steps == 26
    assert sorted(store.keys) == ["action", "state"]
    assert store.dt is None
    for i in range(3):
        assert_episode_equal(store.episode(i), episodes[i])
        assert store.episode_attrs(i) == {}
    with pytest.raises(EpisodeStoreError, match="read-only.*stlflow data import dp"):
        EpisodeStore.open(path, mode="a")


def test_iter_episodes_blocks(filled):
    store, episodes, _ = filled
    order = [4, 1, 2, 3, 0, 5]
    for block_steps in (1, 25, 1 << 18):
        got = list(store.iter_episodes(order, block_steps=block_steps))
        assert len(got) == len(order)
        for ep, i in zip(got, order):
            assert_episode_equal(ep, episodes[i])
    only_obs = list(store.iter_episodes(keys=["obs"]))
    assert [set(ep) for ep in only_obs] == [{"obs"}] * 6


def test_durable_store_round_trip(tmp_path):
    store = EpisodeStore.create(tmp_path / "d.zarr", durable=True)
    ep = make_episode(np.random.default_rng(0), 9)
    store.add_episode(ep, attrs={"x": 1})
    reopened = EpisodeStore.open(tmp_path / "d.zarr", mode="a")
    reopened.add_episode(ep)
    assert_episode_equal(EpisodeStore.open(tmp_path / "d.zarr").episode(1), ep)


def test_opens_diffusion_policy_zip_store(tmp_path):
    from zarr.storage import ZipStore

    path = tmp_path / "replay.zarr.zip"
    zstore = ZipStore(path, mode="w")
    root = zarr.open_group(zstore, mode="w", zarr_format=2)
    obs = np.arange(20, dtype=np.float32).reshape(10, 2)
    root.create_array("data/obs", shape=obs.shape, dtype=obs.dtype)[:] = obs
    root.create_array("meta/episode_ends", shape=(2,), dtype="int64")[:] = [4, 10]
    zstore.close()
    store = EpisodeStore.open(path)
    assert store.n_episodes == 2 and store.source_format == "diffusion_policy"
    assert np.array_equal(store.episode(1)["obs"], obs[4:])
