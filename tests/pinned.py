"""Pinned reports: the numbers a tiny run must reproduce exactly (timings left out), and their comparison.

Regenerate after a deliberate behaviour change with ``STLFLOW_REGEN_GOLDEN=1 python -m pytest tests/test_demo.py``
and say why in the commit message.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

PINNED = Path(__file__).parent / "data" / "pinned"
TIMING = ("latency", "_ms", "seconds", "per_second", "paths", "total")


def timeless(value: Any) -> Any:
    """``value`` without the keys that hold wall times (they differ run to run), recursively."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal structure and values; floats to 1e-9 relative (the run is deterministic on one machine)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        if math.isnan(want):
            assert isinstance(got, float) and math.isnan(got), f"{where}: {got} != nan"
        else:
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def check_pinned(name: str, got: Any) -> None:
    """Compare ``timeless(got)`` with ``tests/data/pinned/<name>.json`` (or write it when regenerating)."""
    path = PINNED / f"{name}.json"
    got = json.loads(json.dumps(timeless(got)))
    if os.environ.get("STLFLOW_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        return
    assert_same(got, json.loads(path.read_text()), name)
