"""`stlflow data info` and `stlflow data import` through the CLI dispatcher and the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from stlflow import cli
from stlflow.datasets import EpisodeStore


@pytest.fixture
def demo_store(tmp_path):
    store = EpisodeStore.create(tmp_path / "demos.zarr", dt=0.1, attrs={"task": "crossing"})
    rng = np.random.default_rng(0)
    for i, T in enumerate((12, 30, 7)):
        store.add_episode(
            {"obs": rng.normal(size=(T, 5)).astype(np.float32), "action": rng.normal(size=(T, 2)).astype(np.float32)},
            attrs={"seed": i, "mode": "yield" if i != 1 else "left"},
        )
    return store


def test_info(demo_store, capsys):
    assert cli.main(["data", "info", str(demo_store.path), "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "episodes: 3" in out and "steps:    49" in out
    assert "dt:       0.1 s (4.9 s of data)" in out
    assert "obs     shape (49, 5)  dtype float32" in out
    assert "action  shape (49, 2)  dtype float32" in out
    assert 'task: "crossing"' in out
    assert 'mode (3/3 episodes): "yield" x2, "left" x1' in out
    assert "size on disk:" in out and "KiB" in out
    assert "1: 30 steps" in out and "2: 7 steps" not in out


def test_info_on_non_store(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert cli.main(["data", "info", str(tmp_path / "junk")]) == 1
    assert "junk" in capsys.readouterr().err
    assert cli.main(["data", "info", str(tmp_path / "missing.zarr")]) == 1
    assert "missing.zarr" in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "import" in out and "d4rl" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "import", "--help"])
    assert exc.value.code == 0
    assert "{d4rl,minari,dp}" in capsys.readouterr().out


def stlflow_exe() -> str:
    return shutil.which("stlflow") or str(Path(sys.executable).with_name("stlflow"))


def test_import_d4rl_with_console_script(tmp_path):
    n = 50
    rng = np.random.default_rng(1)
    src = tmp_path / "walker.hdf5"
    with h5py.File(src, "w") as f:
        f["observations"] = rng.normal(size=(n, 3))
        f["actions"] = rng.normal(size=(n, 2))
        f["rewards"] = rng.normal(size=n)
        f["terminals"] = np.arange(n) == 20
        f["timeouts"] = np.arange(n) == 39
    out = tmp_path / "walker.zarr"
    proc = subprocess.run(
        [stlflow_exe(), "data", "import", "d4rl", str(src), str(out), "--dt", "0.008", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "imported 3 episodes, 50 steps" in proc.stdout
    store = EpisodeStore.open(out)
    assert store.episode_ends.tolist() == [21, 40, 50] and store.dt == 0.008
    proc = subprocess.run([stlflow_exe(), "data", "info", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "episodes: 3" in proc.stdout and "terminal" in proc.stdout

    # a second import onto an existing store fails without --overwrite, and a broken file leaves nothing
    proc = subprocess.run([stlflow_exe(), "data", "import", "d4rl", str(src), str(out)], capture_output=True, text=True)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    broken = tmp_path / "broken.hdf5"
    broken.write_bytes(src.read_bytes()[:900])
    proc = subprocess.run(
        [stlflow_exe(), "data", "import", "d4rl", str(broken), str(tmp_path / "b.zarr")], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "broken.hdf5" in proc.stderr
    assert not (tmp_path / "b.zarr").exists()
