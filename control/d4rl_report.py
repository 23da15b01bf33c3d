"""What ``stlflow d4rl run`` reports: per-seed metrics read back, "last" and "best" scores over seeds, published
anchor scores beside ours, ``report.json`` and ``report.md``.

"last" is each seed's score at its final evaluation, "best" its highest score over all evaluations; both are
given as mean ± std over seeds (population std, ddof = 0), and they are never mixed: "best" picks the maximum
of noisy evaluations after the fact and is always the higher of the two. Scores are D4RL-normalised
(``stlflow.datasets.d4rl_refs``); a task without reference scores reports raw returns instead and says so.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.policy.checkpoint import atomic_write_text

__all__ = ["CORL_LAST", "aggregate", "markdown", "read_metrics", "write_report"]

# CORL's published "last" normalised scores (Tarasov et al., "CORL: Research-oriented Deep Offline Reinforcement
# Learning Library", README tables; 4 seeds, final iterate of 1M updates), for the tasks stlflow can evaluate.
CORL_LAST: dict[str, dict[str, float]] = {
    "maze2d-umaze-v1": {"BC": 0.36, "TD3+BC": 29.41, "IQL": 42.11, "CQL": -8.90, "EDAC": 95.26},
    "maze2d-medium-v1": {"BC": 0.79, "TD3+BC": 59.45, "IQL": 34.85, "CQL": 86.11, "EDAC": 57.04},
    "maze2d-large-v1": {"BC": 2.26, "TD3+BC": 97.10, "IQL": 61.72, "CQL": 23.75, "EDAC": 95.60},
    "halfcheetah-medium-v2": {"BC": 42.40, "TD3+BC": 48.10, "IQL": 48.31, "CQL": 47.04, "EDAC": 67.70},
    "halfcheetah-medium-replay-v2": {"BC": 35.66, "TD3+BC": 44.84, "IQL": 44.46, "CQL": 45.04, "EDAC": 62.06},
    "halfcheetah-medium-expert-v2": {"BC": 55.95, "TD3+BC": 90.78, "IQL": 94.74, "CQL": 95.63, "EDAC": 104.76},
    "hopper-medium-v2": {"BC": 53.51, "TD3+BC": 60.37, "IQL": 67.53, "CQL": 59.08, "EDAC": 101.70},
    "hopper-medium-replay-v2": {"BC": 29.81, "TD3+BC": 64.42, "IQL": 97.43, "CQL": 95.11, "EDAC": 99.66},
    "hopper-medium-expert-v2": {"BC": 52.30, "TD3+BC": 101.17, "IQL": 107.42, "CQL": 99.26, "EDAC": 105.19},
    "walker2d-medium-v2": {"BC": 63.23, "TD3+BC": 82.71, "IQL": 80.91, "CQL": 80.75, "EDAC": 93.36},
    "walker2d-medium-replay-v2": {"BC": 21.80, "TD3+BC": 85.62, "IQL": 82.15, "CQL": 73.09, "EDAC": 87.10},
    "walker2d-medium-expert-v2": {"BC": 98.96, "TD3+BC": 110.03, "IQL": 111.72, "CQL": 109.56, "EDAC": 114.75},
}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a seed's ``metrics.csv`` with numbers parsed (empty cells -> None)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
    return rows


def _mean_std(values: Sequence[float | None]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}


def aggregate(per_seed: Mapping[int, list[dict[str, Any]]], scored: bool) -> dict[str, Any]:
    """Last / best over seeds from each seed's metric rows (in step order).

    ``scored``: the rows carry normalised scores (``score_mean``); otherwise raw returns (``return_mean``) are
    aggregated. Returns ``{"metric", "last", "best", "steps", "stl_satisfied_last", "success_last",
    "ms_per_update", "per_seed"}``.
    """
    key = "score_mean" if scored else "return_mean"
    seeds = {s: rows for s, rows in sorted(per_seed.items()) if rows}
    per = {}
    for s, rows in seeds.items():
        values = [r[key] for r in rows]
        per[s] = {"last": values[-1], "best": max(v for v in values if v is not None) if any(
            v is not None for v in values) else None, "steps": int(rows[-1]["step"]),
            "stl_satisfied": rows[-1].get("stl_satisfied"), "success": rows[-1].get("success"),
            "ms_per_update": rows[-1].get("ms_per_update"), "evaluations": len(rows)}
    return {
        "metric": "D4RL normalised score" if scored else "raw return (no reference scores)",
        "last": _mean_std([p["last"] for p in per.values()]),
        "best": _mean_std([p["best"] for p in per.values()]),
        "steps": [p["steps"] for p in per.values()],
        "stl_satisfied_last": _mean_std([p["stl_satisfied"] for p in per.values()]),
        "success_last": _mean_std([p["success"] for p in per.values()]),
        "ms_per_update": _mean_std([p["ms_per_update"] for p in per.values()]),
        "per_seed": {str(s): p for s, p in per.items()},
    }


def _pm(stat: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the settings, our last / best rows, the anchors, STL satisfaction where the task has rules."""
    r = report
    lines = [f"# stlflow d4rl run: {r['agent']} on {r['task']}", "",
             f"- data: `{r['data']}`", f"- evaluation env: `{r['env_id']}`; comparison with published scores: "
             f"**{r['comparison']}** ({r['comparison_note']})",
             f"- seeds: {r['seeds']}; updates per seed: {r['steps']}; {r['eval_episodes']} evaluation episodes "
             f"per evaluation; metric: {r['metric']}"]
    if r.get("agent_config"):
        lines.append("- agent settings (all, as run): " + ", ".join(f"`{k}={v}`" for k, v in r["agent_config"].items()))
    lines.append("")
    if r.get("warning"):
        lines += [f"> warning: {r['warning']}", ""]
    stl = r.get("stl_satisfied_last") is not None
    head = "| agent | last (mean ± std over seeds) | best (mean ± std over seeds) |" + (" STL satisfied, last (%) |"
                                                                                     if stl else "")
    ours = f"| {r['agent']} (ours) | {_pm(r['last'])} | {_pm(r['best'])} |" + (
        f" {_pm(r['stl_satisfied_last'], 100)} |" if stl else "")
    lines += [head + " source |", "|---|---|---|" + ("---|" if stl else "") + "---|",
              ours + f" this run, {len(r['seeds'])} seeds |"]
    for name, value in r.get("anchors", {}).items():
        lines.append(f"| {name} | {value:.1f} | |" + (" |" if stl else "") + " CORL, published \"last\" |")
    lines.append("")
    if r.get("stl_satisfied_last") is not None:
        lines += [f"STL rule satisfaction at the last evaluation (all rules, robustness ≥ 0): "
                  f"{_pm(r['stl_satisfied_last'], 100)} % of episodes; goal reached at the last step: "
                  f"{_pm(r['success_last'], 100)} %.", ""]
    lines += [f"Cost: {_pm(r['ms_per_update'], digits=2)} ms per update, {r['ms_per_action']:.3f} ms per action "
              "(batch 1), one torch thread per seed.", ""]
    return "\n".join(lines)


def write_report(out: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``report.json`` and ``report.md`` in ``out`` atomically; returns their paths."""
    paths = {"json": out / "report.json", "md": out / "report.md"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(paths["md"], markdown(report))
    return paths
