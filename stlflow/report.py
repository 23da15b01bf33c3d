"""The demo's outputs: the results table, ``results.md``, ``report.json``, the plots and the videos.

``results.md`` opens with one sentence saying what was run and what the table shows, explains every column, then
gives the table; success, STL satisfaction and collision carry a 95% Wilson interval (:mod:`stlflow.control.intervals`)
over the row's episodes. ``report.json`` holds the configuration, the versions of Python, torch, MuJoCo, numpy and
stlflow (and the git commit when the package runs from a checkout), every row's metrics with their intervals, the
diversity samples, and one record per evaluated episode (:func:`episode_record`), so that two runs can be compared
episode by episode.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.evaluate import json_default, plot_latency_hist
from stlflow.control.intervals import format_rate, wilson_interval
from stlflow.control.tasks import Task, get_task

RATES = ("success_rate", "stl_satisfaction_rate", "collision_rate")  # the rates that carry an interval


@dataclass
class EvalRow:
    """One evaluated setting: the requested θ and whether STL guidance was on.

    ``episodes``: one :func:`episode_record` per evaluated episode; ``samples``: the diversity samples (records of
    :func:`stlflow.demo_scene.scene_samples`); ``controller``: the ControllerSpec the row ran (videos re-run it).
    """

    label: str
    theta: dict[str, float]
    guided: bool
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    guidance_ms_per_tick: float = float("nan")
    episodes: list[dict[str, Any]] = field(default_factory=list)
    controller: Any = None

    def intervals(self) -> dict[str, list[float]]:
        """95% Wilson interval [low, high] of each rate in :data:`RATES` over the row's episodes."""
        n = int(self.metrics.get("episodes", 0))
        return {k: list(wilson_interval(round(self.metrics[k] * n), n)) for k in RATES if n and k in self.metrics}


def episode_record(task: str | Task, ep: Mapping[str, Any], theta: Mapping[str, float], guided: bool,
                   max_steps: int | None = None) -> dict[str, Any]:
    """The report's record of one evaluated episode (a record of :func:`stlflow.control.evaluate.evaluate`).

    ``max_speed`` (the task's speed signal, e.g. m/s) is read from the speed rule's exact robustness at the requested
    θ: ρ(G(speed <= v_max)) = v_max - max speed. ``end_reason``: :func:`stlflow.demo_scene.end_reason`.
    """
    from stlflow.demo_scene import end_reason

    t = get_task(task)
    rules = dict(ep["rule_robustness"])
    max_speed = float("nan")
    if t.speed_rule in rules and "v_max" in theta:
        max_speed = float(theta["v_max"]) - float(rules[t.speed_rule])
    return {"seed": int(ep["seed"]), "theta": dict(theta), "guided": bool(guided), "success": bool(ep["success"]),
            "collision": bool(ep["collision"]), "stl_satisfied": bool(ep["robustness"] >= 0),
            "rule_satisfied": {k: bool(v >= 0) for k, v in rules.items()}, "robustness": float(ep["robustness"]),
            "rule_robustness": {k: float(v) for k, v in rules.items()}, "max_speed": max_speed,
            "steps": int(ep["length"]), "return": float(ep.get("return", float("nan"))),
            "end_reason": end_reason(ep["success"], ep["collision"], int(ep["length"]), max_steps,
                                     t.info.max_steps),
            **{k: float(ep[k]) for k in ("action_change_mean", "action_change_max") if k in ep}}


# ============================================================================================ the table
COLUMNS = (
    ("requested θ", "the speed limit v_max asked of the policy (its other rule parameters: the values calibrated on "
                    "the demonstrations)"),
    ("guidance", "STL guidance at inference (on: each plan is nudged toward the rules through the task's robot "
                 "model)"),
    ("success", "episodes that reached the goal (Crossing) or placed the cube (PickPlace) without a collision"),
    ("STL sat.", "episodes that kept every rule at the requested θ (exact robustness >= 0 over the whole episode)"),
    ("collision", "episodes with a contact: a pedestrian or a wall (Crossing), the gripper on the table (PickPlace)"),
    ("max speed", "the highest speed reached, mean over the diversity samples (m/s; it should follow v_max)"),
    ("meets v_max", "diversity samples whose max speed stayed within the requested v_max"),
    ("diversity (m)", "mean pairwise distance between the paths sampled from one start state"),
    ("modes/start", "distinct behaviour modes (pass left/right/front/behind, yield; PickPlace: the zone) per start "
                    "state; valid: counting only samples that keep the rules without colliding"),
    ("p50 / p99 ms", "per-tick latency of the controller's act() (median, 99th percentile) in this process"),
    ("guidance ms/tick", "the part of a tick spent in STL guidance"),
)


def results_table(rows: Sequence[EvalRow]) -> str:
    """Markdown table of the evaluated rows; success, STL sat. and collision as ``rate (95% interval)``."""
    head = ("| requested θ | guidance | success | STL sat. | collision | max speed | meets v_max | "
            "diversity (m) | modes/start | valid modes/start | p50 ms | p99 ms | guidance ms/tick |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        m = r.metrics
        n = int(m["episodes"])
        g = "-" if math.isnan(r.guidance_ms_per_tick) else f"{r.guidance_ms_per_tick:.2f}"
        out.append(
            f"| v_max={r.theta.get('v_max', float('nan')):.2f} | {'on' if r.guided else 'off'} | "
            f"{format_rate(m['success_rate'], n)} | {format_rate(m['stl_satisfaction_rate'], n)} | "
            f"{format_rate(m['collision_rate'], n)} | "
            f"{m['max_speed_mean']:.2f} | {m['meets_v_max']:.0%} | {m['diversity_m']:.2f} | "
            f"{m['modes_per_start']:.1f} | {m['valid_modes_per_start']:.1f} | {m['latency_p50_ms']:.1f} | "
            f"{m['latency_p99_ms']:.1f} | {g} |")
    if rows:
        n_starts = len({s["seed"] for s in rows[0].samples})
        out.append(f"\nsuccess, STL sat., collision: rate over {int(rows[0].metrics['episodes'])} episodes per row "
                   f"(95% Wilson interval, percent); max speed, meets v_max, diversity, modes: {n_starts} start "
                   f"states x {len(rows[0].samples) // max(n_starts, 1)} samples.")
    return "\n".join(out) + "\n"


HEAD_NAMES = {"flow": "flow", "ddpm": "diffusion (DDPM)", "meanflow": "one-step MeanFlow"}  # demo heads, in words


def summary_sentence(task: Task, rows: Sequence[EvalRow], summary: Mapping[str, Any]) -> str:
    """The one sentence ``results.md`` opens with: what was run, and what the table shows."""
    st = summary.get("stages", {})
    demos = st.get("collect", {}).get("episodes", "?")
    aug = st.get("augment", {}).get("n_accepted", "?")
    steps = st.get("train", {}).get("steps", "?")
    head = HEAD_NAMES.get(st.get("train", {}).get("head", "flow"), "flow")
    vmax = ", ".join(f"{v:g}" for v in dict.fromkeys(r.theta.get("v_max", float("nan")) for r in rows))
    n = int(rows[0].metrics["episodes"]) if rows else 0
    guided = " each without and with STL guidance," if any(r.guided for r in rows) else ""
    per_row = f"{n} episode{'s' if n != 1 else ''} per row"
    return (f"We recorded {demos} scripted-expert demonstrations of {task.env_id}, added {aug} rule-satisfying "
            f"augmented episodes, trained a θ-conditioned {head} policy for {steps} steps and ran it in closed loop "
            f"with the RTI controller ({summary.get('controller_text', '?')}) at the requested speed limits v_max = "
            f"{vmax} m/s,"
            f"{guided} {per_row}; the table shows how often the robot succeeded, kept every rule and collided (with "
            f"95% intervals), how fast it went, how varied its behaviour was and how long a control tick took.")


def results_markdown(task: Task, rows: Sequence[EvalRow], summary: Mapping[str, Any], notes: Sequence[str] = ()
                     ) -> str:
    """The text of ``results.md``."""
    cols = "\n".join(f"- **{name}**: {text}." for name, text in COLUMNS)
    extra = "".join(f"- {n}\n" for n in notes)
    return (f"# stlflow demo: {task.env_id}\n\n{summary_sentence(task, rows, summary)}\n\n## Columns\n\n{cols}\n\n"
            f"## Results\n\n{results_table(rows)}\n## Files\n\n"
            "- `trajectories.png`: one panel per requested θ; dashed paths without guidance, solid with it; the "
            "scene of each start state (walls, goal or zones, pedestrians' or cube's path faded); a red cross "
            "where a collision started, a black marker where a rule violation started.\n"
            "- `videos/grid.mp4`: a row per requested θ; each tile labelled with seed, θ, guidance and outcome; "
            "yellow: the path so far, magenta: the chunk the policy is planning at that tick.\n"
            "- `report.json`: configuration, versions, metrics with intervals, one record per episode.\n"
            f"{extra}")


# ============================================================================================ versions
def versions() -> dict[str, Any]:
    """Python, torch, mujoco, numpy and stlflow versions, and the git commit of the package when it is a checkout
    (None otherwise; ``git_dirty``: uncommitted changes)."""
    import mujoco
    import torch

    import stlflow

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "mujoco": mujoco.__version__, "numpy": np.__version__,
                           "stlflow": getattr(stlflow, "__version__", "unknown"), "platform": platform.platform(),
                           "git_commit": None, "git_dirty": None}
    root = Path(stlflow.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass  # no git: the versions above still identify the run
    return out


# ============================================================================================ the files
def row_json(r: EvalRow) -> dict[str, Any]:
    """A row of ``report.json``: its metrics, the intervals and the samples (without arrays); its episodes are in the
    report's flat ``episodes`` list (each names its row)."""
    arrays = ("xy", "obs", "plans", "frames")
    return {"label": r.label, "theta": r.theta, "guided": r.guided, "metrics": r.metrics,
            "intervals": r.intervals(), "guidance_ms_per_tick": r.guidance_ms_per_tick,
            "samples": [{k: v for k, v in s.items() if k not in arrays} for s in r.samples]}


def write_json(path: Path, data: Any) -> Path:
    """``data`` as JSON at ``path``, written to a temporary name first (never half a file)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, default=json_default))
    tmp.replace(path)
    return path


def write_demo_outputs(out: Path, rows: Sequence[EvalRow], summary: Mapping[str, Any], policy: Any = None,
                       video_episodes: int = 0, video_max_steps: int | None = None, task: str = "crossing",
                       video_search_seeds: int = 0, video_size: Sequence[int] = (320, 240),
                       log: Any = print, workers: int = 1, policy_dir: str | Path | None = None) -> dict[str, Path]:
    """``report.json``, ``results.md``, ``trajectories.png``, ``satisfaction_diversity.png``, ``latency_hist.png``
    and, with ``video_episodes`` > 0, ``videos/grid.mp4`` plus one MP4 per tile (see :mod:`stlflow.demo_media`;
    rendered in ``workers`` processes from the checkpoint ``policy_dir`` when both are given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stlflow.demo_media import trajectory_figure

    t = get_task(task)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "results.md", "trajectories": out / "trajectories.png",
             "bars": out / "satisfaction_diversity.png", "latency": out / "latency_hist.png"}
    notes: list[str] = []
    if video_episodes > 0 and policy is not None and rows:
        paths.update(write_demo_videos(out / "videos", t, policy, rows, int(video_episodes), video_max_steps,
                                       int(video_search_seeds), tuple(video_size), notes, log, workers, policy_dir))
    paths["markdown"].write_text(results_markdown(t, rows, summary, notes))
    episodes = [{"row": r.label, **e} for r in rows for e in r.episodes]
    write_json(paths["json"], {"env_id": t.env_id, "task": t.name, **dict(summary), "versions": versions(),
                               "rows": [row_json(r) for r in rows], "episodes": episodes, "notes": notes})
    if rows and all(s.get("obs") is not None for r in rows for s in r.samples):
        fig = trajectory_figure(t, rows)
        fig.savefig(paths["trajectories"], dpi=110)
        plt.close(fig)
    write_bars(paths["bars"], rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_latency_hist(ax, [(r.label, r.latency_ms) for r in rows], "per-tick latency of act() (ms), RTI controller")
    fig.tight_layout()
    fig.savefig(paths["latency"], dpi=110)
    plt.close(fig)
    return paths


def write_bars(path: Path, rows: Sequence[EvalRow]) -> None:
    """Bars per row: STL satisfaction (with its interval), diversity, modes, valid modes."""
    import matplotlib.pyplot as plt

    vmax = sorted({r.theta.get("v_max", 0.0) for r in rows})
    cmap = plt.get_cmap("viridis")
    colour = {v: cmap(i / max(len(vmax) - 1, 1)) for i, v in enumerate(vmax)}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    x = np.arange(len(rows))
    for ax, key, name in zip(axes, ("stl_satisfaction_rate", "diversity_m", "modes_per_start",
                                    "valid_modes_per_start"),
                             ("STL satisfaction at requested θ (95% interval)", "diversity: mean pairwise distance (m)",
                              "distinct modes per start state", "modes among rule-keeping samples")):
        values = np.asarray([r.metrics[key] for r in rows])
        err = None
        if key in RATES:
            ci = np.asarray([r.intervals()[key] for r in rows]).reshape(-1, 2)
            err = np.clip(np.stack([values - ci[:, 0], ci[:, 1] - values]), 0, None)
        ax.bar(x, values, yerr=err, capsize=3, color=[colour[r.theta.get("v_max", 0.0)] for r in rows],
               edgecolor=["k" if r.guided else "none" for r in rows])
        ax.set_xticks(x, [r.label for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_demo_videos(out: Path, task: Task, policy: Any, rows: Sequence[EvalRow], per_theta: int,
                      max_steps: int | None, search_seeds: int, size: tuple[int, int], notes: list[str],
                      log: Any = print, workers: int = 1, policy_dir: str | Path | None = None) -> dict[str, Path]:
    """The video grid: per requested θ (its guided row when there is one) up to ``per_theta`` episodes, a success
    first (searching up to ``search_seeds`` seeds past the evaluated ones when none succeeded), then a failure.

    With ``workers`` > 1 and the policy's checkpoint ``policy_dir`` the clips render in worker processes."""
    from stlflow.demo_media import choose_video_seeds, render_clips, theta_groups, write_clip, write_video_grid
    from stlflow.demo_scene import run_scene_episode

    fps = max(1, round(1.0 / task.info.dt))
    ref = str(policy_dir) if (workers > 1 and policy_dir is not None) else policy
    jobs, counts = [], []
    for theta, group in theta_groups(rows):
        row = next((r for r in group if r.guided), group[0])
        first_new = max(e["seed"] for e in row.episodes) + 1 if row.episodes else 0

        def search(k: int, row: EvalRow = row, first_new: int = first_new) -> tuple[int, bool]:
            rec = run_scene_episode(task, policy, row.controller, first_new + k, row.theta, max_steps=max_steps)
            return first_new + k, bool(rec["success"])

        seeds, note = choose_video_seeds(row.episodes, per_theta, search, search_seeds)
        if note:
            notes.append(f"videos, {row.label}: {note}")
            log(f"  videos, {row.label}: {note}")
        jobs += [(task.name, ref, row.controller, s, theta, row.guided, max_steps, size) for s in seeds]
        counts.append(len(seeds))
    clips = render_clips(jobs, workers=workers if ref is not policy else 1)
    grid, paths = [], {}
    for n in counts:
        grid.append(clips[:n])
        clips = clips[n:]
    for c in (c for row in grid for c in row):
        name = f"{task.name}_{theta_label_file(c.theta)}_{'guided' if c.guided else 'unguided'}_seed{c.seed}_" \
               f"{c.outcome.replace(' ', '_')}.mp4"
        paths[f"video_{len(paths)}"] = write_clip(out / name, c, fps)
    if any(grid):
        paths["video_grid"] = out / "grid.mp4"
        write_video_grid(paths["video_grid"], [row for row in grid if row], fps)
    return paths


def theta_label_file(theta: Mapping[str, float]) -> str:
    """``vmax1.25``: the requested speed limit as a file-name part."""
    return f"vmax{theta.get('v_max', float('nan')):.2f}"
