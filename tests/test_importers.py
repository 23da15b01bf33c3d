"""Importers: D4RL HDF5 (episode split, qlearning_dataset semantics), Minari folders, Diffusion Policy zarr;
truncated or malformed sources raise a clear error and leave nothing behind; the staging folder of a SIGKILLed
import is removed by the next import once its owner is dead."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from stlflow.datasets import EpisodeStore
from stlflow.datasets.importers import (
    DatasetImportError,
    d4rl_episode_bounds,
    import_d4rl,
    import_dp,
    import_minari,
    qlearning_dataset,
)
from stlflow.datasets.staging import remove_stale_staging, staging_folders
from stlflow.datasets.store import StoreLockedError


def d4rl_arrays(n: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    terminals[[9, 30]] = True
    timeouts[[19, 44]] = True  # steps 45..n-1 form an incomplete final episode
    return {
        "observations": rng.normal(size=(n, 3)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "next_observations": rng.normal(size=(n, 3)).astype(np.float32),
        "infos/qpos": rng.normal(size=(n, 4)),
        "infos/goal/xy": rng.normal(size=(n, 2)),
    }


def write_d4rl(path, arrays, metadata=True):
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value)
        if metadata:
            f.create_dataset("metadata/algorithm", data="SAC")
            f.create_dataset("metadata/policy/fc0/weight", data=np.zeros((2, 2)))  # not scalar: skipped
    return path


def no_leftovers(folder) -> bool:
    return not [p for p in folder.iterdir() if "stlflow-tmp" in p.name or p.suffix == ".zarr"]


def test_d4rl_import_splits_episodes(tmp_path):
    arrays = d4rl_arrays()
    src = write_d4rl(tmp_path / "hopper-medium-v2.hdf5", arrays)
    store = import_d4rl(src, tmp_path / "hopper.zarr", dt=0.008, progress=False)
    assert store.n_episodes == 5 and store.n_steps == 60
    assert store.episode_ends.tolist() == [10, 20, 31, 45, 60]
    assert store.dt == 0.008
    assert sorted(store.keys) == sorted(
        ["obs", "action", "reward", "terminal", "timeout", "next_obs", "info_qpos", "info_goal_xy"]
    )
    assert store.attrs["source"] == "d4rl" and store.attrs["d4rl_metadata"] == {"algorithm": "SAC"}
    ep = store.episode(2)
    assert np.array_equal(ep["obs"], arrays["observations"][20:31])
    assert np.array_equal(ep["info_goal_xy"], arrays["infos/goal/xy"][20:31])
    assert ep["terminal"].dtype == bool and ep["terminal"].tolist() == [False] * 10 + [True]
    attrs = store.all_episode_attrs()
    assert [a["terminal"] for a in attrs] == [True, False, True, False, False]
    assert [a["timeout"] for a in attrs] == [False, True, False, True, False]
    assert [a["complete"] for a in attrs] == [True, True, True, True, False]
    assert attrs[3]["start"] == 31


def reference_qlearning(data, terminate_on_end=False):
    """D4RL's loop, written out: one transition per step i < N-1, skipping timeouts."""
    out = {k: [] for k in ("observations", "actions", "next_observations", "rewards", "terminals")}
    n = len(data["rewards"])
    for i in range(n - 1):
        if data["timeouts"][i] and not terminate_on_end:
            continue
        out["observations"].append(data["observations"][i])
        out["next_observations"].append(data["observations"][i + 1])
        out["actions"].append(data["actions"][i])
        out["rewards"].append(data["rewards"][i])
        out["terminals"].append(bool(data["terminals"][i]))
    return {k: np.array(v) for k, v in out.items()}


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.data(), st.booleans())
def test_qlearning_matches_d4rl_loop(n, data, terminate_on_end):
    flags = data.draw(st.lists(st.sampled_from([0, 1, 2]), min_size=n, max_size=n))  # 1 terminal, 2 timeout
    arrays = {
        "observations": np.arange(n * 2, dtype=np.float64).reshape(n, 2),
        "actions": -np.arange(n, dtype=np.float64)[:, None],
        "rewards": np.arange(n, dtype=np.float64) / 10,
        "terminals": np.array(flags) == 1,
        "timeouts": np.array(flags) == 2,
    }
    got = qlearning_dataset(arrays, terminate_on_end=terminate_on_end)
    want = reference_qlearning(arrays, terminate_on_end)
    for k in want:
        assert np.array_equal(got[k].reshape(want[k].shape), want[k]), k
    # a timeout step is dropped, never marked terminal
    assert len(got["rewards"]) == (n - 1) - (0 if terminate_on_end else int(arrays["timeouts"][:-1].sum()))


def test_qlearning_from_file_and_from_store_agree(tmp_path):
    arrays = d4rl_arrays()
    src = write_d4rl(tmp_path / "d.hdf5", arrays)
    from_file = qlearning_dataset(src)
    store = import_d4rl(src, tmp_path / "d.zarr", progress=False)
    from_store = qlearning_dataset(store)
    for k in from_file:
        assert np.array_equal(from_file[k], from_store[k]), k
    assert not from_file["terminals"][[19 - 1]].any()  # step 19 (timeout) is dropped, step 18 is not terminal
    assert len(from_file["rewards"]) == 59 - 2


def test_d4rl_episode_bounds_without_timeouts():
    assert d4rl_episode_bounds(np.array([0, 0, 1, 0, 1]), None) == [(0, 3), (3, 5)]
    assert d4rl_episode_bounds(np.array([0, 0, 0]), np.array([0, 1, 0])) == [(0, 2), (2, 3)]


def test_d4rl_truncated_file_leaves_nothing(tmp_path):
    arrays = d4rl_arrays(n=5000)
    src = write_d4rl(tmp_path / "big.hdf5", arrays)
    raw = src.read_bytes()
    src.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetImportError, match="big.hdf5"):
        import_d4rl(src, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists() and no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.pop("actions"), "missing dataset 'actions'"),
        (lambda a: a.__setitem__("rewards", a["rewards"][:-3]), "'observations' has 60 rows but 'rewards' has 57"),
        (lambda a: a.__setitem__("infos/qpos", a["infos/qpos"][:10]), "'infos/qpos' has 10 rows"),
    ],
)
def test_d4rl_malformed_file(tmp_path, mutate, match):
    arrays = d4rl_arrays()
    mutate(arrays)
    src = write_d4rl(tmp_path / "bad.hdf5", arrays)
    with pytest.raises(DatasetImportError, match=match):
        import_d4rl(src, tmp_path / "out.zarr", progress=False)
    assert no_leftovers(tmp_path)


def test_not_hdf5_and_existing_output(tmp_path):
    src = tmp_path / "notes.hdf5"
    src.write_text("this is not HDF5")
    with pytest.raises(DatasetImportError, match="notes.hdf5.*not a readable HDF5"):
        import_d4rl(src, tmp_path / "out.zarr", progress=False)
    good = write_d4rl(tmp_path / "good.hdf5", d4rl_arrays())
    import_d4rl(good, tmp_path / "out.zarr", progress=False)
    with pytest.raises(FileExistsError, match="out.zarr"):
        import_d4rl(good, tmp_path / "out.zarr", progress=False)
    assert import_d4rl(good, tmp_path / "out.zarr", overwrite=True, progress=False).n_episodes == 5


def write_minari(root, lengths, dict_obs=False, seed=0, metadata_extra=None):
    """A Minari dataset folder: data/main_data.hdf5 (episode_<id> groups) and data/metadata.json."""
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True)
    episodes = []
    with h5py.File(root / "data" / "main_data.hdf5", "w") as f:
        for eid, T in enumerate(lengths):
            g = f.create_group(f"episode_{eid}")
            g.attrs["id"] = eid
            g.attrs["total_steps"] = T
            g.attrs["seed"] = 100 + eid
            ep = {
                "observations": rng.normal(size=(T + 1, 4)),
                "actions": rng.normal(size=(T, 2)).astype(np.float32),
                "rewards": rng.normal(size=T),
                "terminations": np.arange(T) == T - 1,
                "truncations": np.zeros(T, bool),
                "success": rng.integers(0, 2, size=T + 1).astype(bool),
            }
            if dict_obs:
                og = g.create_group("observations")
                og.create_dataset("observation", data=ep["observations"])
                og.create_dataset("desired_goal", data=ep["observations"][:, :2] * 0 + eid)
            else:
                g.create_dataset("observations", data=ep["observations"])
            for name in ("actions", "rewards", "terminations", "truncations"):
                g.create_dataset(name, data=ep[name])
            g.create_group("infos").create_dataset("success", data=ep["success"])
            episodes.append(ep)
    metadata = {
        "dataset_id": "pointmaze/test-v0",
        "total_episodes": len(lengths),
        "total_steps": int(sum(lengths)),
        "env_spec": json.dumps({"id": "PointMaze_UMaze-v3"}),
        **(metadata_extra or {}),
    }
    (root / "data" / "metadata.json").write_text(json.dumps(metadata))
    return episodes


def test_minari_import(tmp_path):
    episodes = write_minari(tmp_path / "pointmaze-test-v0", [5, 8, 3])
    store = import_minari(tmp_path / "pointmaze-test-v0", tmp_path / "m.zarr", progress=False)
    assert store.n_episodes == 3 and store.n_steps == 16
    assert sorted(store.keys) == sorted(["obs", "next_obs", "action", "reward", "terminal", "timeout", "info_success"])
    assert store.attrs["dataset_id"] == "pointmaze/test-v0" and store.attrs["env_id"] == "PointMaze_UMaze-v3"
    for i, want in enumerate(episodes):
        ep = store.episode(i)
        assert np.array_equal(ep["obs"], want["observations"][:-1])
        assert np.array_equal(ep["next_obs"], want["observations"][1:])
        assert np.array_equal(ep["action"], want["actions"])
        assert np.array_equal(ep["terminal"], want["terminations"])
        assert np.array_equal(ep["info_success"], want["success"][1:])
        attrs = store.episode_attrs(i)
        assert attrs["source"] == "minari" and attrs["episode_id"] == i and attrs["seed"] == 100 + i


def test_minari_dict_observations(tmp_path):
    write_minari(tmp_path / "ds", [4, 6], dict_obs=True)
    store = import_minari(tmp_path / "ds" / "data", tmp_path / "m.zarr", progress=False)
    assert {"obs_observation", "obs_desired_goal", "next_obs_desired_goal"} <= set(store.keys)
    assert np.all(store.episode(1)["obs_desired_goal"] == 1)


def test_minari_malformed(tmp_path):
    write_minari(tmp_path / "ds", [5, 8, 3])
    with h5py.File(tmp_path / "ds" / "data" / "main_data.hdf5", "a") as f:
        del f["episode_1/observations"]
        f["episode_1"].create_dataset("observations", data=np.zeros((8, 4)))  # should be 9 rows
    with pytest.raises(DatasetImportError, match="episode_1: observations 'obs' has 8 rows, expected steps \\+ 1 = 9"):
        import_minari(tmp_path / "ds", tmp_path / "m.zarr", progress=False)
    assert no_leftovers(tmp_path)


def test_minari_metadata_disagrees_with_file(tmp_path):
    write_minari(tmp_path / "ds", [5, 8], metadata_extra={"total_episodes": 3})
    with pytest.raises(DatasetImportError, match="total_episodes=3.*2 episodes"):
        import_minari(tmp_path / "ds", tmp_path / "m.zarr", progress=False)
    write_minari(tmp_path / "ds2", [5, 8], metadata_extra={"total_steps": 20})
    with pytest.raises(DatasetImportError, match="total_steps=20.*13"):
        import_minari(tmp_path / "ds2", tmp_path / "m.zarr", progress=False)
    assert no_leftovers(tmp_path)
    with pytest.raises(DatasetImportError, match="not a Minari dataset"):
        import_minari(tmp_path, tmp_path / "m.zarr", progress=False)


def test_minari_truncated(tmp_path):
    write_minari(tmp_path / "ds", [400, 500, 300])
    h5 = tmp_path / "ds" / "data" / "main_data.hdf5"
    raw = h5.read_bytes()
    h5.write_bytes(raw[: int(len(raw) * 0.6)])
    with pytest.raises(DatasetImportError, match="main_data.hdf5"):
        import_minari(tmp_path / "ds", tmp_path / "m.zarr", progress=False)
    assert no_leftovers(tmp_path)


def test_dp_import(tmp_path):
    rng = np.random.default_rng(4)
    lengths = [7, 3, 12]
    root = zarr.open_group(tmp_path / "dp.zarr", mode="w", zarr_format=2)
    state = rng.normal(size=(22, 5)).astype(np.float32)
    action = rng.normal(size=(22, 2))
    root.create_array("data/state", shape=state.shape, dtype=state.dtype)[:] = state
    root.create_array("data/action", shape=action.shape, dtype=action.dtype)[:] = action
    root.create_array("meta/episode_ends", shape=(3,), dtype="int64")[:] = np.cumsum(lengths)
    store = import_dp(tmp_path / "dp.zarr", tmp_path / "out.zarr", dt=0.1, progress=False)
    assert store.source_format == "stlflow" and store.dt == 0.1
    assert store.episode_ends.tolist() == [7, 10, 22]
    assert np.array_equal(store.get("state"), state) and np.array_equal(store.get("action"), action)
    assert store.episode_attrs(1)["episode"] == 1
    assert EpisodeStore.open(tmp_path / "out.zarr", mode="a").n_episodes == 3
    with pytest.raises(DatasetImportError, match="nothing.zarr"):
        import_dp(tmp_path / "nothing.zarr", tmp_path / "x.zarr", progress=False)


def test_dp_corrupt_chunk(tmp_path):
    root = zarr.open_group(tmp_path / "dp.zarr", mode="w", zarr_format=2)
    root.create_array("data/state", shape=(30, 2), dtype="float64", chunks=(10, 2))[:] = np.ones((30, 2))
    root.create_array("meta/episode_ends", shape=(2,), dtype="int64")[:] = [12, 30]
    (tmp_path / "dp.zarr" / "data" / "state" / "1.0").write_bytes(b"garbage, not a compressed chunk")
    with pytest.raises(DatasetImportError, match="dp.zarr"):
        import_dp(tmp_path / "dp.zarr", tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists() and no_leftovers(tmp_path / "dp.zarr")


# ---------------------------------------------------------------------------------------------- malformed D4RL files
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.__setitem__("rewards", np.float32(1.5)), r"'rewards' is a scalar \(shape \(\)\)"),
        (lambda a: a.__setitem__("timeouts", np.bool_(True)), r"'timeouts' is a scalar"),
        (
            lambda a: a.__setitem__(
                "terminals", np.where(np.arange(60) == 7, np.nan, a["terminals"]).astype(np.float32)
            ),
            r"'terminals' holds NaN \(1 rows, the first at row 7\)",
        ),
        (
            lambda a: a.__setitem__("timeouts", np.where(np.arange(60) == 3, 0.5, a["timeouts"])),
            r"'timeouts' holds 0.5 at row 3 \(1 rows not 0 or 1\)",
        ),
        (
            lambda a: a.__setitem__("terminals", np.where(a["terminals"], 2, 0)),
            r"'terminals' holds 2 at row 9 \(2 rows",
        ),
    ],
    ids=["scalar-rewards", "scalar-timeouts", "nan-terminals", "half-timeouts", "terminals-2"],
)
def test_d4rl_bad_arrays_are_refused(tmp_path, mutate, match):
    arrays = d4rl_arrays()
    mutate(arrays)
    src = write_d4rl(tmp_path / "bad.hdf5", arrays)
    with pytest.raises(DatasetImportError, match="bad.hdf5: " + match):
        import_d4rl(src, tmp_path / "out.zarr", progress=False)
    assert no_leftovers(tmp_path)


def test_d4rl_float_flags_of_zero_and_one_import(tmp_path):
    arrays = d4rl_arrays()
    arrays["terminals"] = arrays["terminals"].astype(np.float32)
    arrays["timeouts"] = arrays["timeouts"].astype(np.int8)
    store = import_d4rl(write_d4rl(tmp_path / "f.hdf5", arrays), tmp_path / "f.zarr", progress=False)
    assert store.episode_ends.tolist() == [10, 20, 31, 45, 60]
    assert store.key_dtype("terminal") == np.dtype(bool)


def test_d4rl_non_utf8_metadata(tmp_path):
    src = write_d4rl(tmp_path / "m.hdf5", d4rl_arrays(), metadata=False)
    with h5py.File(src, "a") as f:
        f.create_dataset("metadata/algorithm", data=np.bytes_(b"caf\xe9 SAC"))  # Latin-1, not UTF-8
        f.create_dataset("metadata/env", data="Hopper-v3")
        f.create_dataset("metadata/seed", data=np.int64(3))
    store = import_d4rl(src, tmp_path / "m.zarr", progress=False)
    assert store.attrs["d4rl_metadata"] == {"algorithm": "caf\\xe9 SAC", "env": "Hopper-v3", "seed": 3}
    assert EpisodeStore.open(tmp_path / "m.zarr").attrs == store.attrs


def test_cli_d4rl_nan_terminals_one_line(tmp_path, capsys):
    from stlflow import cli

    arrays = d4rl_arrays()
    arrays["terminals"] = np.full(60, np.nan)
    src = write_d4rl(tmp_path / "nan.hdf5", arrays)
    assert cli.main(["data", "import", "d4rl", str(src), str(tmp_path / "o.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "nan.hdf5" in err and "'terminals' holds NaN" in err


# ---------------------------------------------------------------------------------------------- staging folders
def big_d4rl(path, n=400_000):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
        f["actions"] = rng.normal(size=(n, 3)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = (np.arange(n) % 1000) == 999
    return path


def test_sigkilled_import_leaves_staging_that_the_next_import_removes(tmp_path):
    src = big_d4rl(tmp_path / "big.hdf5")
    out = tmp_path / "big.zarr"
    code = (
        "import sys\nfrom stlflow.datasets.importers import import_d4rl\n"
        "import_d4rl(sys.argv[1], sys.argv[2], progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(out)])

    def committing() -> bool:  # the staging store is in place and holds a first batch
        for folder, _ in staging_folders(out):
            try:
                if (
                    folder.name.startswith(".big.zarr.")
                    and json.loads((folder / "stlflow.json").read_text())["n_steps"]
                ):
                    return True
            except (OSError, ValueError):
                pass
        return False

    deadline = time.monotonic() + 60
    while not committing() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the import finished before it could be killed"
    left = staging_folders(out)
    assert [p.name.startswith(f".big.zarr.importing-{proc.pid}-") for p, _ in left] == [True], left
    assert left[0][1] == proc.pid and not out.exists()

    # a live import's staging folder is left alone: one held by this process, one by another live process
    mine = tmp_path / f".big.zarr.importing-{os.getpid()}-{'a' * 32}.stlflow-tmp"
    held_here = EpisodeStore.create(mine)
    other = tmp_path / f".big.zarr.importing-1-{'b' * 32}.stlflow-tmp"  # pid 1 lives; the lock decides anyway
    EpisodeStore.create(other).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom stlflow.datasets import EpisodeStore\n"
            "s = EpisodeStore.open(sys.argv[1], 'a')\nprint('held', flush=True)\ntime.sleep(600)\n",
            str(other),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        store = import_d4rl(src, out, progress=False)
        assert store.n_steps == 400_000 and store.n_episodes == 400
        assert {p for p, _ in staging_folders(out)} == {mine, other}  # the killed import's folder is gone
    finally:
        holder.kill()
        holder.wait()
    held_here.close()
    # now both owners are gone (the lock of `other` died with its process): the next import cleans up
    assert sorted(remove_stale_staging(out)) == sorted([mine, other])
    assert not staging_folders(out)


def test_staging_folder_without_lock_uses_the_pid(tmp_path):
    out = tmp_path / "x.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    gone = tmp_path / f".x.zarr.importing-{dead_pid}-{'c' * 32}.stlflow-tmp"
    alive = tmp_path / f"..x.zarr.importing-{os.getpid()}-{'d' * 32}.stlflow-tmp.{'e' * 32}.stlflow-tmp"
    old_style = tmp_path / f".x.zarr.importing-{'f' * 32}.stlflow-tmp"  # no pid, no lock: unknown owner
    unrelated = tmp_path / f".y.zarr.importing-{dead_pid}-{'c' * 32}.stlflow-tmp"
    for folder in (gone, alive, old_style, unrelated):
        folder.mkdir()
    assert remove_stale_staging(out) == [gone]
    assert alive.exists() and old_style.exists() and unrelated.exists()


def test_import_does_not_replace_a_store_another_process_writes(tmp_path):
    src = write_d4rl(tmp_path / "d.hdf5", d4rl_arrays())
    out = tmp_path / "d.zarr"
    import_d4rl(src, out, progress=False)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom stlflow.datasets import EpisodeStore\n"
            "s = EpisodeStore.open(sys.argv[1], 'a')\nprint('held', flush=True)\ntime.sleep(600)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            StoreLockedError, match=rf"d.zarr is locked for writing by another process \(pid {holder.pid}"
        ):
            import_d4rl(src, out, overwrite=True, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert no_leftovers_but(tmp_path, out) and EpisodeStore.open(out).n_episodes == 5
    assert import_d4rl(src, out, overwrite=True, progress=False).n_episodes == 5  # the holder is dead now


def no_leftovers_but(folder, keep) -> bool:
    return not [p for p in folder.iterdir() if "stlflow-tmp" in p.name or (p.suffix == ".zarr" and p != keep)]
