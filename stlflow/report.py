"""The demo's outputs: the results table, ``report.json``, ``results.md``, the plots and the videos."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.controllers import ControllerSpec
from stlflow.control.evaluate import json_default, plot_latency_hist
from stlflow.control.jobs import EvalJob
from stlflow.control.tasks import get_task
from stlflow.policy.rti import DEFAULT_K


@dataclass
class EvalRow:
    """One evaluated setting: the requested θ and whether STL guidance was on."""

    label: str
    theta: dict[str, float]
    guided: bool
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    guidance_ms_per_tick: float = float("nan")



def results_table(rows: Sequence[EvalRow]) -> str:
    """Markdown table of the evaluated rows."""
    head = ("| requested θ | guidance | success | STL sat. | collision | max speed (m/s) | meets v_max | "
            "diversity (m) | modes/start | valid modes/start | p50 ms | p99 ms | guidance ms/tick |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        m = r.metrics
        g = "-" if math.isnan(r.guidance_ms_per_tick) else f"{r.guidance_ms_per_tick:.2f}"
        out.append(
            f"| v_max={r.theta.get('v_max', float('nan')):.2f} | {'on' if r.guided else 'off'} | "
            f"{m['success_rate']:.0%} | {m['stl_satisfaction_rate']:.0%} | {m['collision_rate']:.0%} | "
            f"{m['max_speed_mean']:.2f} | {m['meets_v_max']:.0%} | {m['diversity_m']:.2f} | "
            f"{m['modes_per_start']:.1f} | {m['valid_modes_per_start']:.1f} | {m['latency_p50_ms']:.1f} | "
            f"{m['latency_p99_ms']:.1f} | {g} |")
    if rows:
        n_starts = len({s["seed"] for s in rows[0].samples})
        out.append(f"\nsuccess, STL sat. (all rules at the requested θ), collision, latency: "
                   f"{int(rows[0].metrics['episodes'])} episodes per row; max speed, meets v_max (max speed <= v_max), "
                   f"diversity (mean pairwise distance of xy paths), modes (valid: among the samples that keep the "
                   f"rules without colliding): {n_starts} start states x "
                   f"{len(rows[0].samples) // max(n_starts, 1)} samples. guidance ms/tick: in this process.")
    return "\n".join(out) + "\n"


def write_demo_outputs(out: Path, rows: Sequence[EvalRow], summary: Mapping[str, Any], policy: Any = None,
                       video_episodes: int = 0, video_max_steps: int | None = None, k: int = DEFAULT_K,
                       guidance: Mapping[str, Any] | None = None, task: str = "crossing") -> dict[str, Path]:
    """``report.json``, ``results.md``, ``trajectories.png``, ``satisfaction_diversity.png``, ``latency_hist.png``
    and ``videos/*.mp4`` (the first requested θ; guided when guidance is enabled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "results.md", "trajectories": out / "trajectories.png",
             "bars": out / "satisfaction_diversity.png", "latency": out / "latency_hist.png"}
    table = results_table(rows)
    task = get_task(task)
    paths["markdown"].write_text(f"# stlflow demo: {task.env_id}\n\n{table}")
    report = {"env_id": task.env_id, **dict(summary),
              "rows": [{"label": r.label, "theta": r.theta, "guided": r.guided, "metrics": r.metrics,
                        "guidance_ms_per_tick": r.guidance_ms_per_tick,
                        "samples": [{k_: v for k_, v in s.items() if k_ != "xy"} for s in r.samples]} for r in rows]}
    paths["json"].write_text(json.dumps(report, indent=1, default=json_default))

    vmax = sorted({r.theta.get("v_max", 0.0) for r in rows})
    cmap = plt.get_cmap("viridis")
    colour = {v: cmap(i / max(len(vmax) - 1, 1)) for i, v in enumerate(vmax)}
    guided_cols = sorted({r.guided for r in rows})
    fig, axes = plt.subplots(1, len(guided_cols), figsize=(7 * len(guided_cols), 3.6), squeeze=False)
    for ax, g in zip(axes[0], guided_cols):
        for r in rows:
            if r.guided != g:
                continue
            for i, s in enumerate(r.samples):
                ax.plot(s["xy"][:, 0], s["xy"][:, 1], color=colour[r.theta.get("v_max", 0.0)], lw=1, alpha=0.8,
                        label=f"v_max={r.theta.get('v_max', 0.0):.2f}" if i == 0 else None)
        ax.axhline(2.0, color="k", lw=1)
        ax.axhline(-2.0, color="k", lw=1)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax.set_title(f"closed-loop trajectories by requested θ (guidance {'on' if g else 'off'})")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    fig.savefig(paths["trajectories"], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    labels = [r.label for r in rows]
    x = np.arange(len(rows))
    for ax, key, name in zip(axes, ("stl_satisfaction_rate", "diversity_m", "modes_per_start",
                                    "valid_modes_per_start"),
                             ("STL satisfaction at requested θ", "diversity: mean pairwise distance (m)",
                              "distinct modes per start state", "modes among rule-keeping samples")):
        ax.bar(x, [r.metrics[key] for r in rows], color=[colour[r.theta.get("v_max", 0.0)] for r in rows],
               hatch=None, edgecolor=["k" if r.guided else "none" for r in rows])
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["bars"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_latency_hist(ax, [(r.label, r.latency_ms) for r in rows], "per-tick latency of act() (ms), RTI controller")
    fig.tight_layout()
    fig.savefig(paths["latency"], dpi=110)
    plt.close(fig)

    if video_episodes > 0 and policy is not None and rows:
        from stlflow.control.evaluate import write_videos

        first = rows[-1] if rows[-1].guided else rows[0]
        g = None
        if first.guided:
            g = task.guidance(first.theta, **{k_: v for k_, v in dict(guidance or {}).items() if k_ != "enabled"})
        job = EvalJob(task.name, policy, ControllerSpec.create("rti", k=int(k), guidance=g),
                      max_steps=video_max_steps, stl_params=first.theta)
        seeds = [int(summary.get("eval_seed", 1000)) + i for i in range(int(video_episodes))]
        for i, p in enumerate(write_videos(job, seeds, out / "videos")):
            paths[f"video{i}"] = p
    return paths
