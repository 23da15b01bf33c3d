"""`stlflow data info` and `stlflow data import` through the CLI dispatcher and the installed console script;
inconsistent stores give exit status 2 and one line naming the store and the problem."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from stlflow import cli
from stlflow.datasets import EpisodeStore
from stlflow.datasets.store import LOCK_FILE, StoreCorruptError


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
    assert cli.main(["data", "info", str(tmp_path / "junk")]) == 2
    assert "junk" in capsys.readouterr().err
    assert cli.main(["data", "info", str(tmp_path / "missing.zarr")]) == 2
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
    assert proc.returncode == 2 and "already exists" in proc.stderr
    broken = tmp_path / "broken.hdf5"
    broken.write_bytes(src.read_bytes()[:900])
    proc = subprocess.run(
        [stlflow_exe(), "data", "import", "d4rl", str(broken), str(tmp_path / "b.zarr")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "broken.hdf5" in proc.stderr
    assert not (tmp_path / "b.zarr").exists()


# ------------------------------------------------------------------------------------------------------------------
# inconsistent metadata: exit status 2 and one line naming the store and the problem, never a traceback


def _commit(path: Path) -> dict:
    return json.loads((path / "stlflow.json").read_text())


def _set_commit(path: Path, record: dict) -> None:
    (path / "stlflow.json").write_text(json.dumps(record))


def _replace_array(path: Path, name: str, values: np.ndarray) -> None:
    root = zarr.open_group(path, mode="r+")
    group, key = name.split("/")
    del root[group][key]
    root[group].create_array(key, shape=values.shape, dtype=values.dtype)[:] = values


def ends_not_increasing(path):
    zarr.open_group(path, mode="r+")["meta"]["episode_ends"][:] = [12, 10, 49]


def ends_negative(path):
    zarr.open_group(path, mode="r+")["meta"]["episode_ends"][:] = [-3, 42, 49]


def ends_past_the_arrays(path):
    record = _commit(path)
    record["n_steps"] = 60
    _set_commit(path, record)
    zarr.open_group(path, mode="r+")["meta"]["episode_ends"][:] = [12, 42, 60]


def ends_wrong_dtype(path):
    _replace_array(path, "meta/episode_ends", np.array([12.0, 42.0, 49.0]))


def ends_fewer_than_committed(path):
    zarr.open_group(path, mode="r+")["meta"]["episode_ends"].resize((2,))


def commit_record_missing(path):
    (path / "stlflow.json").unlink()


def commit_record_garbled(path):
    (path / "stlflow.json").write_bytes((path / "stlflow.json").read_bytes()[:40])


def commit_record_wrong_type(path):
    record = _commit(path)
    record["n_steps"] = "forty-nine"
    _set_commit(path, record)


def key_arrays_of_different_lengths(path):
    zarr.open_group(path, mode="r+")["data"]["action"].resize((20, 2))


def record_shape_disagrees(path):
    record = _commit(path)
    record["keys"]["obs"]["shape"] = [4]
    _set_commit(path, record)


def record_dtype_disagrees(path):
    record = _commit(path)
    record["keys"]["action"]["dtype"] = "<f8"
    _set_commit(path, record)


def episode_attrs_garbled(path):
    zarr.open_group(path, mode="r+")["meta"]["episode_attrs"][1] = '{"seed": 1, "mode": '


def dp_store(path, lengths=(7, 3, 12), ends=None, action_rows=22):
    root = zarr.open_group(path, mode="w", zarr_format=2)
    root.create_array("data/state", shape=(22, 5), dtype="float32")[:] = np.ones((22, 5), np.float32)
    root.create_array("data/action", shape=(action_rows, 2), dtype="float64")[:] = np.ones((action_rows, 2))
    ends = np.cumsum(lengths) if ends is None else ends
    root.create_array("meta/episode_ends", shape=(len(ends),), dtype=np.asarray(ends).dtype)[:] = ends


def dp_float_episode_ends(path):
    shutil.rmtree(path)
    dp_store(path, ends=np.array([7.0, 10.5, 22.0]))


def dp_arrays_of_different_lengths(path):
    shutil.rmtree(path)
    dp_store(path, action_rows=20)


def dp_ends_past_the_data(path):
    shutil.rmtree(path)
    dp_store(path, ends=np.array([7, 10, 30]))


INCONSISTENT = [
    (
        ends_not_increasing,
        r"meta/episode_ends is not strictly increasing: episode 1 ends at 10 and episode 0 ends at 12",
    ),
    (ends_negative, r"meta/episode_ends holds a negative end \(-3 for episode 0\)"),
    (ends_past_the_arrays, r"data/obs holds 49 steps but 60 are committed"),
    (ends_wrong_dtype, r"meta/episode_ends has dtype float64, expected integers"),
    (ends_fewer_than_committed, r"meta/episode_ends holds 2 entries but 3 episodes are committed"),
    (commit_record_missing, r"the commit record stlflow.json is missing"),
    (commit_record_garbled, r"stlflow.json is not valid JSON"),
    (commit_record_wrong_type, r"stlflow.json: n_steps is 'forty-nine', expected an integer >= 0"),
    (key_arrays_of_different_lengths, r"data/action holds 20 steps but 49 are committed"),
    (
        record_shape_disagrees,
        r"data/obs has shape \(49, 5\) \(per step \(5,\)\) but the commit record says per-step "
        r"shape \(4,\)",
    ),
    (record_dtype_disagrees, r"data/action has dtype float32 but the commit record says float64"),
    (episode_attrs_garbled, r"meta/episode_attrs\[1\] is not valid JSON"),
    (dp_float_episode_ends, r"meta/episode_ends has dtype float64, expected integers \(refusing to round"),
    (dp_arrays_of_different_lengths, r"the data arrays have different lengths \(rows: data/action 20, data/state 22\)"),
    (dp_ends_past_the_data, r"meta/episode_ends ends at step 30 but the data arrays hold 22 rows"),
]


@pytest.mark.parametrize("damage, problem", INCONSISTENT, ids=[d.__name__ for d, _ in INCONSISTENT])
def test_info_on_inconsistent_metadata(demo_store, capsys, damage, problem):
    path = demo_store.path
    demo_store.close()
    damage(path)
    assert cli.main(["data", "info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"stlflow data info: error: {path}")
    assert re.search(problem, lines[0]), lines[0]
    # the library raises the same named error, in both modes, and repairs nothing
    before = tree_digest(path)
    for mode in ("r", "a") if (path / "stlflow.json").exists() else ("r",):
        with pytest.raises(StoreCorruptError, match=problem):
            EpisodeStore.open(path, mode=mode).all_episode_attrs()
    assert tree_digest(path) == before


def tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file() and p.name != LOCK_FILE}


def test_inconsistent_store_through_the_console_script(demo_store):
    """No traceback from the installed command either; --debug shows it."""
    path = demo_store.path
    demo_store.close()
    ends_not_increasing(path)
    proc = subprocess.run([stlflow_exe(), "data", "info", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        f"stlflow data info: error: {path}: meta/episode_ends is not strictly increasing: episode 1 ends at 10 and "
        "episode 0 ends at 12"
    )
    proc = subprocess.run([stlflow_exe(), "--debug", "data", "info", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "StoreCorruptError" in proc.stderr


def test_info_on_a_corrupt_chunk_names_the_store(demo_store, capsys):
    path = demo_store.path
    demo_store.close()
    chunk = next(p for p in (path / "meta" / "episode_attrs").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"not a compressed chunk")
    assert cli.main(["data", "info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert f"error: {path}: cannot read the store" in captured.err


def test_info_while_a_writer_holds_the_lock(demo_store, capsys):
    """Readers take no lock: `data info` works while the store is open for writing."""
    assert demo_store.mode == "a" and not demo_store.closed
    assert cli.main(["data", "info", str(demo_store.path)]) == 0
    assert "episodes: 3" in capsys.readouterr().out
