"""What ``stlflow control`` writes about a run (:func:`stlflow.control.robot_run.run`): one ``report.json`` entry and
the stored arrays per episode, the aggregate over episodes, ``report.md`` and ``lateness_hist.png``.

The stored keys of an episode are listed in :mod:`stlflow.control.robot_run`'s docstring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stlflow.control.realtime import SOURCES
from stlflow.control.robot import hold_action

if TYPE_CHECKING:
    from stlflow.control.robot_run import RobotJob

__all__ = ["aggregate", "episode_arrays", "episode_record", "markdown", "write_outputs"]


# ------------------------------------------------------------------------------------------------ episodes
def _summary(x: np.ndarray, scale: float = 1e3) -> dict[str, float]:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)] * scale
    if x.size == 0:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    p50, p99 = np.percentile(x, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "max": float(x.max())}


def _end_reason(res: Any, max_ticks: int | None) -> str:
    if res.estop is not None:
        return f"estop: {res.estop}"
    if res.done:
        info = res.final_obs.info if res.final_obs is not None else {}
        if info.get("success"):
            return "success"
        return "terminated" if info.get("terminated") else ("truncated" if info.get("truncated") else "done")
    return "max_ticks" if max_ticks is not None and res.length >= max_ticks else "stopped"


def episode_record(res: Any, job: RobotJob, seed: int, twin_stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """One episode's entry of ``report.json``."""
    t = res.ticks
    src = np.asarray(t["source"])
    used = np.isin(src, (0, 1))
    elapsed = np.asarray(t["elapsed"], np.float64)[used]
    reason = _end_reason(res, job.max_ticks)
    rec = {
        "seed": int(seed), "success": bool(res.success), "complete": res.estop is None,
        "end_reason": reason, "estop": res.estop, "ticks": int(res.length), "period_s": float(res.period),
        "lateness_ms": _summary(t["lateness"]), "overruns": int(np.sum(t["late"])), "missed": int(np.sum(t["missed"])),
        "obs_age_ms": _summary(t["obs_age"]),
        "command_age_ticks": {"p50": float(np.percentile(elapsed, 50)) if elapsed.size else float("nan"),
                              "max": float(elapsed.max()) if elapsed.size else float("nan")},
        "infer_ms": _summary(np.where(t["plan_seq"] >= 0, t["infer_s"], np.nan)),
        "busy_ms": _summary(t["busy_s"]),
        "sources": {name: int(np.sum(src == i)) for i, name in enumerate(SOURCES)},
        "safety": {k: (bool(v) if isinstance(v, bool) else int(v)) for k, v in res.counters.items()},
        "violations": list(res.violations),
        "failure": res.failure,
    }
    if twin_stats is not None:
        rec["twin"] = {k: twin_stats.get(k) for k in ("ticks", "holds", "holds_timeout", "holds_no_command",
                                                       "command_age", "applied_age", "overruns", "dropped")}
    return rec


def episode_arrays(res: Any, task: Any) -> dict[str, np.ndarray]:
    """One episode's stored arrays (see the module docstring)."""
    t = res.ticks
    obs = np.asarray(t["obs"], np.float32)
    action = np.array(t["action"], np.float64)
    for i in np.flatnonzero(~np.all(np.isfinite(action), axis=1)):
        action[i] = hold_action(task, obs[i])
    return {
        "obs": obs, "action": action.astype(np.float32),
        "tick_index": t["index"].astype(np.int64), "tick_lateness_s": t["lateness"].astype(np.float64),
        "tick_missed": t["missed"].astype(np.int32), "tick_late": t["late"].astype(bool),
        "obs_age_s": t["obs_age"].astype(np.float64), "obs_seq": t["obs_seq"].astype(np.int64),
        "plan_seq": t["plan_seq"].astype(np.int64), "elapsed": t["elapsed"].astype(np.int32),
        "infer_s": t["infer_s"].astype(np.float64), "nfe": t["nfe"].astype(np.int32),
        "busy_s": t["busy_s"].astype(np.float64), "source": t["source"].astype(np.int8),
        "clamped": t["clamped"].astype(np.int16), "rate_limited": t["rate_limited"].astype(np.int16),
        "nonfinite": t["nonfinite"].astype(bool), "stale": t["stale"].astype(bool),
    }


def aggregate(records: list[dict[str, Any]], lateness: np.ndarray, elapsed: np.ndarray,
              obs_age: np.ndarray | None = None) -> dict[str, Any]:
    """The aggregate over episodes (``report.json["aggregate"]``)."""
    n = len(records)
    estops = [r["estop"] for r in records if r["estop"] is not None]
    return {
        "episodes": n, "success_rate": (sum(r["success"] for r in records) / n) if n else float("nan"),
        "complete": sum(r["complete"] for r in records), "estops": len(estops),
        "estop": estops[0] if estops else None, "ticks": int(sum(r["ticks"] for r in records)),
        "lateness_ms": _summary(lateness), "obs_age_ms": _summary(np.zeros(0) if obs_age is None else obs_age),
        "overruns": int(sum(r["overruns"] for r in records)),
        "missed": int(sum(r["missed"] for r in records)),
        "command_age_ticks_p50": float(np.percentile(elapsed, 50)) if elapsed.size else float("nan"),
        "sources": {s: int(sum(r["sources"][s] for r in records)) for s in SOURCES},
        "safety": {k: int(sum(int(r["safety"].get(k, 0)) for r in records))
                   for k in ("nonfinite", "clamped", "rate_limited", "stale", "violations", "fallbacks", "estops")},
    }


# ------------------------------------------------------------------------------------------------ outputs
def markdown(report: dict[str, Any]) -> str:
    """``report.md``: one row per episode and the aggregate."""
    head = ("| seed | success | complete | end | ticks | lateness p50 ms | p99 ms | max ms | overruns | "
            "obs age p50 ms | cmd age p50 | fresh | chunk | hold | estop | nonfinite | clamped |")
    rows = [f"# stlflow control: {report['task']} on robot={report['robot']} ({report['mode']}, "
            f"{report['rate_hz']:g} Hz, {report['label']})", "", head, "|" + "---|" * 17]

    def row(name: str, r: dict[str, Any], age: float) -> str:
        lat, s, c = r["lateness_ms"], r["sources"], r["safety"]
        return (f"| {name} | {r['success'] if 'success' in r else r['success_rate']} | {r['complete']} | "
                f"{r.get('end_reason', '-')} | {r['ticks']} | {lat['p50']:.3f} | {lat['p99']:.3f} | "
                f"{lat['max']:.3f} | {r['overruns']} | "
                f"{r['obs_age_ms']['p50'] if 'obs_age_ms' in r else float('nan'):.3f} | {age:.0f} | {s['fresh']} | "
                f"{s['chunk']} | {s['hold']} | {s['estop']} | {c.get('nonfinite', 0)} | {c.get('clamped', 0)} |")

    for r in report["episodes"]:
        rows.append(row(str(r["seed"]), r, r["command_age_ticks"]["p50"]))
    agg = report["aggregate"]
    rows.append(row("all", {**agg, "success": f"{agg['success_rate']:.1%}"}, agg["command_age_ticks_p50"]))
    if agg["estop"]:
        rows += ["", f"e-stop: {agg['estop']}"]
    return "\n".join(rows) + "\n"


def write_outputs(report: dict[str, Any], out: Path, lateness: list[np.ndarray]) -> dict[str, Path]:
    """``report.json``, ``report.md`` and ``lateness_hist.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stlflow.control.evaluate import json_default, plot_latency_hist

    paths = {"json": out / "report.json", "markdown": out / "report.md", "lateness_hist": out / "lateness_hist.png"}
    paths["json"].write_text(json.dumps(report, indent=1, default=json_default))
    paths["markdown"].write_text(markdown(report))
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_latency_hist(ax, [(f"seed {r['seed']}", np.asarray(x) * 1e3) for r, x in zip(report["episodes"], lateness)],
                      xlabel="tick lateness (ms after the deadline)")
    ax.set_title(f"tick lateness ({report['rate_hz']:g} Hz, robot={report['robot']}, {report['mode']})")
    fig.tight_layout()
    fig.savefig(paths["lateness_hist"], dpi=110)
    plt.close(fig)
    return paths
