"""`stlflow calibrate` as a user runs it: a real subprocess on a real demo store."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _stlflow() -> list[str]:
    exe = shutil.which("stlflow") or str(Path(sys.executable).with_name("stlflow"))
    return [exe]


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from stlflow.control.collect import collect
    from stlflow.control.jobs import CollectJob

    path = tmp_path_factory.mktemp("cal") / "demos.zarr"
    collect(CollectJob("crossing", 4, path, seed=10, progress=False))
    return path


def test_calibrate_writes_attrs_and_prints_table(demo_store):
    from stlflow.datasets import EpisodeStore

    proc = subprocess.run([*_stlflow(), "calibrate", f"data={demo_store}", "env=crossing", "q=0.5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("param"))
    assert header.split() == ["param", "mode", "n", "min", "median", "max", "dataset"]
    store = EpisodeStore.open(demo_store)
    modes = {store.episode_attrs(i)["mode"] for i in range(store.n_episodes)}
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["v_max"], ["d_safe"], ["w"], ["T"])]
    assert {(r[0], r[1]) for r in rows} == {(p, m) for p in ("v_max", "d_safe", "w", "T") for m in ("all", *modes)}
    assert "each demo satisfies its own θ: 4/4" in out

    speeds = []
    for i in range(store.n_episodes):
        theta = store.episode_attrs(i)["stl_params"]
        assert set(theta) == {"v_max", "d_safe", "w", "T", "eps"}
        speeds.append(theta["v_max"])
        assert theta["v_max"] == pytest.approx(float(store.episode(i)["signal_speed"].max()) + 0.05, abs=1e-6)
    # the printed v_max row for "all" is min / median / max of the stored values
    row = next(r for r in rows if r[:2] == ["v_max", "all"])
    assert [float(x) for x in row[3:6]] == pytest.approx([min(speeds), np.median(speeds), max(speeds)], rel=1e-3)
    ds = store.attrs["stl_params_dataset"]
    # q = 0.5 of 4 demos: the 2nd tightest speed limit (sorted ascending) is satisfied by half of them
    assert ds["v_max"] == pytest.approx(sorted(speeds)[1], abs=1e-6)
    assert store.attrs["stl_calibration"]["q"] == 0.5


def test_calibrate_rejects_wrong_env_and_missing_store(demo_store, tmp_path):
    proc = subprocess.run([*_stlflow(), "calibrate", f"data={demo_store}", "env=pickplace"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Crossing" in proc.stderr
    proc = subprocess.run([*_stlflow(), "calibrate", f"data={tmp_path / 'nope.zarr'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nope.zarr" in proc.stderr
