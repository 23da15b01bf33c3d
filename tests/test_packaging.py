"""The installed layout: every sub-package under the `stlflow` root, no bare top-level names."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["stl", "datasets", "envs", "policy", "control", "conf"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_imports_under_stlflow(name):
    mod = importlib.import_module(f"stlflow.{name}")
    assert Path(mod.__file__).resolve().parent == ROOT / name


def test_no_bare_top_level_modules_installed():
    # Run from a neutral directory so the checkout itself is not on sys.path.
    names = ("datasets", "policy", "envs", "stl", "control", "conf")
    code = f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _expected_files() -> set[str]:
    files = set()
    for name in SUBPACKAGES:
        for p in (ROOT / name).rglob("*"):
            if p.suffix in (".py", ".yaml", ".xml") and "__pycache__" not in p.parts:
                files.add(f"stlflow/{name}/{p.relative_to(ROOT / name).as_posix()}")
    for p in (ROOT / "stlflow").rglob("*.py"):
        files.add(f"stlflow/{p.relative_to(ROOT / 'stlflow').as_posix()}")
    return files


def test_built_wheel_contains_every_subpackage_and_yaml(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("stlflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _expected_files() - names
    assert not missing, f"wheel lacks {sorted(missing)[:10]}"
    assert any(n.startswith("stlflow/conf/") and n.endswith(".yaml") for n in names)
    bare = {n.split("/")[0] for n in names if not n.startswith(("stlflow/", "stlflow-"))}
    assert not bare, f"wheel installs bare top-level names {bare}"
