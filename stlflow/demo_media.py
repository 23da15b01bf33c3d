"""The demo's pictures: the trajectory plot (one panel per requested θ) and the labelled video grid.

``trajectories.png`` (:func:`trajectory_figure`): per requested θ, the closed-loop sample paths without guidance
(dashed) and with it (solid) over the scene of their start states (walls, goal or target zones, the pedestrians' or
the cube's path faded, an arrow at its end), a red cross where a collision started and a marker per rule where a
violation of it started (:func:`stlflow.demo_scene.rule_violations`).

``videos/grid.mp4`` (:func:`write_video_grid`): one row per requested θ, one column per chosen episode (a success
first, then a failure), each tile labelled with its seed, θ, guidance and outcome; the robot's trail and the chunk
the policy is planning at that tick (rolled through the task's robot model, :func:`~stlflow.demo_scene.planned_path`)
are projected into the rendered frame with the camera's own projection (:func:`project_points`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.tasks import Task, get_task
from stlflow.demo_scene import end_reason, planned_path, run_scene_episode, scene_of

__all__ = ["trajectory_figure", "project_points", "Clip", "render_clip", "render_clips", "choose_video_seeds",
           "write_video_grid", "theta_groups"]

MARKERS = ("v", "s", "D", "*", "P", "^")  # one per rule, in the task's rule order
RULE_COLOURS = ("gold", "magenta", "cyan", "white", "lime", "pink")
OUTCOME_COLOURS = {"success": (40, 170, 60), "collision": (220, 40, 40)}  # anything else: orange


def theta_groups(rows: Sequence[Any]) -> list[tuple[dict[str, float], list[Any]]]:
    """Rows grouped by requested θ, in order of first appearance: [(θ, [rows...])] (unguided and guided rows)."""
    groups: dict[tuple, tuple[dict[str, float], list[Any]]] = {}
    for r in rows:
        key = tuple(sorted(r.theta.items()))
        groups.setdefault(key, (dict(r.theta), []))[1].append(r)
    return list(groups.values())


def theta_label(theta: Mapping[str, float], swept: str = "v_max") -> str:
    """``v_max=1.25`` (the swept θ), or every θ when it is not there."""
    if swept in theta:
        return f"{swept}={theta[swept]:.2f}"
    return ", ".join(f"{k}={v:g}" for k, v in theta.items())


# ============================================================================================ the plot
def trajectory_figure(task: str | Task, rows: Sequence[Any]) -> Any:
    """A matplotlib figure with one axes per requested θ (rows grouped by θ; each row's ``samples`` need ``obs``,
    ``collision_steps`` and ``violations``, as :func:`stlflow.demo_scene.scene_samples` records them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = get_task(task)
    groups = theta_groups(rows)
    if not groups:
        raise ValueError("trajectory_figure needs at least one evaluated row")
    first = scene_of(t, groups[0][1][0].samples[0]["obs"]) if groups[0][1][0].samples else None
    wide = first is not None and first.area is not None and \
        (first.area[1] - first.area[0]) > 1.5 * (first.area[3] - first.area[2])
    n = len(groups)
    nrows, ncols = (n, 1) if wide else (1, n)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5, 4.4 * n + 0.8) if wide else (4.6 * n, 5.2),
                             squeeze=False)
    for ax, (theta, group) in zip(axes.ravel(), groups):
        _draw_panel(ax, t, theta, group)
    handles, labels = _legend_entries(axes.ravel())
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3 if wide else 5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / fig.get_figheight(), 1, 1))
    return fig


def _draw_panel(ax: Any, t: Task, theta: Mapping[str, float], group: Sequence[Any]) -> None:
    drawn_seeds: set[int] = set()
    rules = list(t.info.rule_list)
    counts = []
    for row in group:
        style = {"ls": "-", "color": "tab:orange"} if row.guided else {"ls": "--", "color": "tab:blue"}
        for s in row.samples:
            scene = scene_of(t, s["obs"])
            if s["seed"] not in drawn_seeds:
                drawn_seeds.add(s["seed"])
                _draw_scene(ax, scene)
            xy = scene.path[:, :2]
            ax.plot(xy[:, 0], xy[:, 1], lw=1.2, alpha=0.85, label="with STL guidance" if row.guided
                    else "without guidance", **style)
            for step in s["collision_steps"]:
                ax.plot(*xy[min(step, len(xy) - 1)], "x", color="red", ms=9, mew=2.5, label="collision")
            for rule, steps in s["violations"].items():
                i = rules.index(rule) if rule in rules else len(rules)
                for step in steps:
                    ax.plot(*xy[min(step, len(xy) - 1)], MARKERS[i % len(MARKERS)], ms=7, mec="k", mew=0.8,
                            color=RULE_COLOURS[i % len(RULE_COLOURS)], label=f"rule '{rule}' violated here")
        ok = sum(bool(s["success"]) for s in row.samples)
        counts.append(f"{'guided' if row.guided else 'unguided'} {ok}/{len(row.samples)} succeeded")
    area = scene.area if group and group[0].samples else None
    if area is not None:
        ax.set_xlim(area[0], area[1])
        ax.set_ylim(area[2], area[3])
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(f"requested {theta_label(theta)}\n" + ", ".join(counts), fontsize=9)


def _draw_scene(ax: Any, scene: Any) -> None:
    from matplotlib.patches import Circle

    for (x0, y0), (x1, y1) in scene.walls:
        ax.plot([x0, x1], [y0, y1], color="k", lw=2, label="walls / table edge")
    for _name, centre, radius in scene.targets:
        ax.add_patch(Circle(centre, radius, color="tab:green", alpha=0.35, lw=0, label="goal / target zones"))
    for track in scene.tracks.values():
        ax.plot(track[:, 0], track[:, 1], color="0.45", lw=3, alpha=0.25,
                label="pedestrians / cube (faded; o: start, arrow: end)")
        ax.plot(*track[0], "o", color="0.45", alpha=0.35, ms=6)
        if len(track) > 1 and np.linalg.norm(track[-1] - track[-2]) > 1e-9:
            ax.annotate("", xy=track[-1], xytext=track[-2], arrowprops={"arrowstyle": "->", "color": "0.45",
                                                                          "alpha": 0.5})


def _legend_entries(axes: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """Each label once, over every panel."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    return list(seen.values()), list(seen)


# ============================================================================================ projection
def project_points(model: Any, data: Any, camera: str | int, points: np.ndarray, width: int, height: int
                   ) -> np.ndarray:
    """Pixel coordinates (N, 2) (column, row) of world points (N, 3) in the frame ``camera`` renders.

    MuJoCo cameras look along their local -z with +y up; a perspective camera has vertical field of view
    ``cam_fovy`` degrees, an orthographic one shows ``cam_fovy`` metres vertically. Needs the camera's pose in
    ``data`` (after ``mj_forward`` or ``mj_kinematics``). Points behind a perspective camera come back as NaN.
    """
    import mujoco

    cam = model.camera(camera) if isinstance(camera, str) else model.camera(int(camera))
    i = cam.id
    rot = data.cam_xmat[i].reshape(3, 3)
    local = (np.asarray(points, dtype=np.float64) - data.cam_xpos[i]) @ rot  # columns: right, up, backward
    fovy = float(model.cam_fovy[i])
    ortho = int(model.cam_projection[i]) == int(mujoco.mjtProjection.mjPROJ_ORTHOGRAPHIC)
    if ortho:
        scale = np.full(len(local), height / fovy)
    else:
        depth = -local[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(depth > 1e-9, (height / 2) / math.tan(math.radians(fovy) / 2) / depth, np.nan)
    return np.stack([width / 2 + local[:, 0] * scale, height / 2 - local[:, 1] * scale], axis=1)


# ============================================================================================ videos
@dataclass
class Clip:
    """One rendered episode with its overlays drawn: ``frames`` (T+1, H, W, 3) uint8 and what it showed."""

    seed: int
    theta: dict[str, float]
    guided: bool
    outcome: str
    frames: list[np.ndarray] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"seed {self.seed}  {theta_label(self.theta)}  {'guided' if self.guided else 'unguided'}"


def render_clip(task: str | Task, policy: Any, spec: Any, seed: int, theta: Mapping[str, float], guided: bool, *,
                max_steps: int | None = None, size: tuple[int, int] = (320, 240)) -> Clip:
    """Run and render episode ``seed`` (same controller, same outcome as in the evaluation) and draw on every frame
    the title, the outcome, the robot's trail (yellow) and the planned chunk (magenta)."""
    t = get_task(task)
    width, height = int(size[0]), int(size[1])
    rec = run_scene_episode(t, policy, spec, seed, theta, max_steps=max_steps, render=(width, height), plans=True)
    outcome = end_reason(rec["success"], rec["collision"], rec["length"], max_steps, t.info.max_steps)
    env = t.make_env()
    try:
        u = env.unwrapped
        env.reset(seed=int(seed))
        camera = getattr(u, "camera", 0)  # the camera the env renders from (Crossing has one)

        def pixels(path: np.ndarray) -> np.ndarray:
            pts = np.concatenate([path, np.zeros((len(path), max(0, 3 - path.shape[1])))], axis=1)[:, :3]
            return project_points(u.model, u.data, camera, pts, width, height)

        trail = pixels(t.path_of(rec["obs"]))
        frames = []
        for i, frame in enumerate(rec["frames"]):
            plan = rec["plans"][i] if i < len(rec["plans"]) else None
            path = planned_path(t, rec["obs"][i], plan) if plan is not None else None
            broke = any(s <= i for s in rec["collision_steps"])
            frames.append(_annotate(frame, trail[: i + 1], None if path is None else pixels(path),
                                    f"seed {seed}  {theta_label(theta)}  {'guided' if guided else 'unguided'}",
                                    outcome, red_border=broke))
    finally:
        env.close()
    return Clip(int(seed), dict(theta), bool(guided), outcome, frames)


def _annotate(frame: np.ndarray, trail: np.ndarray, plan: np.ndarray | None, title: str, outcome: str,
              red_border: bool = False) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.asarray(frame, dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, img.width // 27))
    bar = 2 * max(8, img.width // 27) + 8
    if len(trail) > 1:
        draw.line([tuple(p) for p in trail], fill=(255, 220, 0), width=2)
    if plan is not None and np.isfinite(plan).all():
        draw.line([tuple(p) for p in plan], fill=(230, 0, 230), width=2)
        for x, y in plan[1:]:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(230, 0, 230))
    colour = OUTCOME_COLOURS.get(outcome, (240, 140, 0))
    draw.rectangle([0, 0, img.width, bar], fill=(0, 0, 0))
    draw.text((4, 2), title, fill=(255, 255, 255), font=font)
    draw.text((4, bar // 2 + 1), outcome.upper(), fill=colour, font=font)
    if red_border:
        draw.rectangle([0, 0, img.width - 1, img.height - 1], outline=(220, 40, 40), width=4)
    return np.asarray(img)


def _clip_of(job: tuple) -> Clip:
    """:func:`render_clip` of one job (task, policy or checkpoint directory, spec, seed, θ, guided, max_steps,
    size); module level so that worker processes can run it."""
    from stlflow.control.evaluate import load_policy

    task, ref, spec, seed, theta, guided, max_steps, size = job
    policy = None if ref is None else load_policy(ref)
    return render_clip(task, policy, spec, seed, theta, guided, max_steps=max_steps, size=size)


def render_clips(jobs: Sequence[tuple], workers: int = 1) -> list[Clip]:
    """The clips of ``jobs`` (see :func:`_clip_of`) in order, in ``workers`` processes (1: in this process; more:
    each job's policy must be a checkpoint directory, which each worker loads once)."""
    from stlflow.control.workers import parallel_map

    return list(parallel_map(_clip_of, list(jobs), workers=max(1, min(int(workers), len(jobs) or 1)),
                             desc="videos", unit="clip", progress=False))


def choose_video_seeds(episodes: Sequence[Mapping[str, Any]], n: int, search: Any = None, search_seeds: int = 0
                       ) -> tuple[list[int], str]:
    """Up to ``n`` seeds to film from evaluated ``episodes`` (records with ``seed``, ``success``): the first success,
    then the first failure, then the rest in seed order. Without a success, ``search(k) -> (seed, success)`` is called
    for k = 0 .. ``search_seeds`` - 1 until one succeeds (bounded). Returns the seeds and a note saying what was
    missing ("" when nothing was)."""
    wins = [int(e["seed"]) for e in episodes if e["success"]]
    losses = [int(e["seed"]) for e in episodes if not e["success"]]
    note = ""
    if not wins and search is not None:
        for k in range(int(search_seeds)):
            seed, ok = search(k)
            if ok:
                wins.append(int(seed))
                break
        if not wins:
            note = f"no success in {len(episodes)} evaluated + {int(search_seeds)} more seeds"
    elif not wins:
        note = f"no success in {len(episodes)} evaluated seeds"
    order = wins[:1] + losses[:1] + wins[1:] + losses[1:]
    return order[: max(int(n), 0)], note


def write_video_grid(path: Path, clips: Sequence[Sequence[Clip]], fps: int = 10) -> tuple[int, int, int]:
    """One MP4: a row per list in ``clips``, a tile per clip, every clip held on its last frame until the longest
    ends; a missing tile is black. Returns (frames, height, width) of the written video."""
    import imageio.v2 as imageio

    tiles = [c for row in clips for c in row]
    if not tiles:
        raise ValueError("write_video_grid needs at least one clip")
    h, w = tiles[0].frames[0].shape[:2]
    cols = max(len(row) for row in clips)
    length = max(len(c.frames) for c in tiles)
    blank = np.zeros((h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    with imageio.get_writer(tmp, fps=fps, macro_block_size=1) as writer:
        for i in range(length):
            rows = [np.concatenate([row[j].frames[min(i, len(row[j].frames) - 1)] if j < len(row) else blank
                                    for j in range(cols)], axis=1) for row in clips]
            writer.append_data(np.concatenate(rows, axis=0))
    tmp.replace(path)
    return length, h * len(clips), w * cols


def write_clip(path: Path, clip: Clip, fps: int = 10) -> Path:
    """One clip as its own MP4 (written to a temporary name, then moved into place)."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    with imageio.get_writer(tmp, fps=fps, macro_block_size=1) as writer:
        for frame in clip.frames:
            writer.append_data(frame)
    tmp.replace(path)
    return path
