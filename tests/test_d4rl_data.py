"""The maze2d data generator (D4RL protocol and layout) through import and Q-learning transitions, and rollouts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from stlflow.control import d4rl_data
from stlflow.control.d4rl_data import generate, reference_policy, rollout_returns
from stlflow.datasets.d4rl_refs import d4rl_task_settings
from stlflow.datasets.importers import DatasetImportError, import_d4rl, qlearning_dataset
from stlflow.datasets.store import EpisodeStore
from stlflow.envs.maze2d import reward

N = 3000


@pytest.fixture(scope="module")
def umaze_file(tmp_path_factory) -> Path:
    return generate("maze2d-umaze-v1", tmp_path_factory.mktemp("gen") / "umaze.hdf5", N, seed=0, progress=False)


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
        out.update({f"infos/{k}": f["infos"][k][()] for k in f["infos"]})
        out["meta"] = {k: f["metadata"][k][()] for k in f["metadata"]}
    return out


def test_layout_dtypes_and_metadata(umaze_file):
    d = read(umaze_file)
    shapes = {k: (v.shape, v.dtype.str) for k, v in d.items() if k != "meta"}
    assert shapes == {
        "observations": ((N, 4), "<f4"), "actions": ((N, 2), "<f4"), "rewards": ((N,), "<f4"),
        "terminals": ((N,), "|b1"), "timeouts": ((N,), "|b1"), "infos/goal": ((N, 2), "<f4"),
        "infos/qpos": ((N, 2), "<f4"), "infos/qvel": ((N, 2), "<f4"),
    }
    meta = d["meta"]
    assert meta["task"] == b"maze2d-umaze-v1" and meta["seed"] == 0 and meta["samples"] == N
    assert meta["generator"] == b"stlflow.control.d4rl_data" and b"stlflow" in meta["provenance"]
    assert not d["timeouts"].any()
    np.testing.assert_array_equal(d["infos/qpos"], d["observations"][:, :2])
    assert not list(umaze_file.parent.glob(".*stlflow-tmp"))


def test_protocol_noisy_waypoint_stream(umaze_file):
    d = read(umaze_file)
    obs, act, term, goal = d["observations"], d["actions"], d["terminals"], d["infos/goal"]
    assert np.all(np.abs(act) <= 1.0) and 0 < np.mean(np.abs(act) == 1.0) < 1  # noise, then the clip
    ends = np.flatnonzero(term)
    assert len(ends) >= 5  # intermediate targets reached (or given up after 300 steps)
    assert np.all(np.diff(np.r_[-1, ends]) <= 301)
    # the target is constant between terminals and redrawn after each: a start cell + U(-0.1, 0.1)
    for a, b in zip(np.r_[0, ends[:-1] + 1], ends + 1):
        assert np.all(goal[a:b] == goal[a])
    assert np.all(np.abs(goal - np.rint(goal)) <= 0.1 + 1e-6)
    reached = [np.linalg.norm(obs[e, :2] - np.rint(goal[e])) < 0.1 for e in ends]
    assert np.mean(reached) > 0.5  # most segments end at the target's cell
    # one continuous stream: each next observation is the physical successor: per step and axis at most
    # 0.01 s * (5 + 0.01 s * 100 N / 4.19 kg) (velocity clipped to 5, then one semi-implicit Euler step)
    assert np.max(np.abs(np.diff(obs[:, :2], axis=0))) <= 0.01 * (5 + 0.01 * 100 / 4.18)


def test_rewards_relabelled_for_the_evaluation_goal(tmp_path, umaze_file):
    sparse = read(umaze_file)
    dense = read(generate("maze2d-umaze-dense-v1", tmp_path / "dense.hdf5", N, seed=0, progress=False))
    np.testing.assert_array_equal(sparse["observations"], dense["observations"])  # same stream, other reward
    goal = np.array([1.0, 1.0])
    xy = sparse["observations"][:, :2].astype(np.float64)
    np.testing.assert_array_equal(sparse["rewards"], reward(xy, goal, "sparse").astype(np.float32))
    np.testing.assert_allclose(dense["rewards"], np.exp(-np.linalg.norm(xy - goal, axis=1)), rtol=1e-6)
    assert 0 < sparse["rewards"].mean() < 1


def test_same_seed_same_file_other_seed_other_data(tmp_path, umaze_file):
    again = read(generate("maze2d-umaze-v1", tmp_path / "a.hdf5", N, seed=0, progress=False))
    other = read(generate("maze2d-umaze-v1", tmp_path / "b.hdf5", N, seed=1, progress=False))
    first = read(umaze_file)
    for key in ("observations", "actions", "terminals", "infos/goal"):
        np.testing.assert_array_equal(again[key], first[key])
    assert not np.array_equal(other["observations"], first["observations"])


def test_generate_import_qlearning_without_terminals(tmp_path, umaze_file):
    store = import_d4rl(umaze_file, tmp_path / "umaze.zarr", dt=0.01, progress=False)
    d = read(umaze_file)
    assert store.n_steps == N and store.n_episodes == int(d["terminals"].sum()) + (not d["terminals"][-1])
    q = qlearning_dataset(umaze_file, **d4rl_task_settings("maze2d-umaze-v1"))
    assert len(q["rewards"]) == N - 1 and not q["terminals"].any()
    np.testing.assert_array_equal(q["next_observations"], d["observations"][1:])
    assert qlearning_dataset(umaze_file)["terminals"].sum() == d["terminals"][:-1].sum()  # D4RL's default keeps them
    qs = qlearning_dataset(EpisodeStore.open(tmp_path / "umaze.zarr"), ignore_terminals=True)
    assert not qs["terminals"].any() and len(qs["rewards"]) >= N - 1 - (store.n_episodes - int(d["terminals"].sum()))


def test_cli_imports_the_file(tmp_path, umaze_file):
    exe = shutil.which("stlflow") or str(Path(sys.executable).with_name("stlflow"))
    out = tmp_path / "cli.zarr"
    proc = subprocess.run([exe, "data", "import", "d4rl", str(umaze_file), str(out), "--dt", "0.01", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert EpisodeStore.open(out).n_steps == N


def test_bad_input_leaves_nothing(tmp_path, umaze_file, monkeypatch):
    with pytest.raises(ValueError, match="unknown task 'maze2d-open-v0'.*maze2d-umaze-v1.*maze2d-large-dense-v1"):
        generate("maze2d-open-v0", tmp_path / "x.hdf5", 10, progress=False)
    with pytest.raises(ValueError, match="samples"):
        generate("maze2d-umaze-v1", tmp_path / "x.hdf5", 0, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate("maze2d-umaze-v1", tmp_path / "no" / "x.hdf5", 10, progress=False)
    existing = tmp_path / "existing.hdf5"
    existing.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate("maze2d-umaze-v1", existing, 10, progress=False)
    assert existing.read_bytes() == b"keep"

    def dies(path, arrays, meta):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(d4rl_data, "_write_hdf5", dies)
    with pytest.raises(KeyboardInterrupt):
        generate("maze2d-umaze-v1", existing, 10, progress=False, overwrite=True)
    assert existing.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["existing.hdf5"]
    monkeypatch.undo()
    generate("maze2d-umaze-v1", existing, 10, progress=False, overwrite=True)
    assert read(existing)["observations"].shape == (10, 4)

    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(umaze_file.read_bytes()[: umaze_file.stat().st_size // 2])
    with pytest.raises(DatasetImportError, match="truncated.hdf5"):
        import_d4rl(truncated, tmp_path / "t.zarr", progress=False)
    assert not (tmp_path / "t.zarr").exists()
    with pytest.raises(DatasetImportError, match="no such"):
        import_d4rl(tmp_path / "missing.hdf5", tmp_path / "m.zarr", progress=False)


def test_rollout_returns_expert_and_random():
    task = "maze2d-umaze-v1"
    expert = rollout_returns(task, reference_policy(task, "expert-replan", 0), episodes=6, seed=0)
    rand = rollout_returns(task, reference_policy(task, "random", 0), episodes=6, seed=0)
    assert expert["returns"].shape == (6,) and expert["observations"].shape == (6, 301, 4)
    np.testing.assert_array_equal(expert["observations"][:, 0], rand["observations"][:, 0])  # same starts
    assert expert["reached"].all() and expert["success"].all() and expert["stl_satisfied"].all()
    assert set(expert["stl"]) == {"reach", "clearance", "speed", "all"}
    assert expert["normalized"].mean() > rand["normalized"].mean() + 50
    np.testing.assert_allclose(expert["normalized"], 100 * (expert["returns_sparse"] - 23.85) / (161.86 - 23.85))
    with pytest.raises(ValueError, match="unknown task"):
        rollout_returns("hopper-medium-v2", lambda o: np.zeros(2), 1, 0)
