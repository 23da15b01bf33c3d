"""The demo's readable outputs, piece by piece on real MuJoCo episodes: the Wilson interval, the scene records
(collisions, rule violations, planned paths), the camera projection, the trajectory figure and the video grid."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
from test_rti import tiny_policy

from stlflow.control.controllers import ControllerSpec
from stlflow.control.intervals import format_rate, wilson_interval
from stlflow.control.tasks import get_task
from stlflow.demo_media import (
    Clip,
    choose_video_seeds,
    project_points,
    render_clip,
    trajectory_figure,
    write_video_grid,
)
from stlflow.demo_scene import (
    SceneRenderer,
    end_reason,
    planned_path,
    rule_violations,
    run_scene_episode,
    scene_samples,
)
from stlflow.report import EvalRow, episode_record

EXPERT = ControllerSpec.create("expert")


# ============================================================================================ the interval
def test_wilson_interval_known_binomial_cases():
    """8 of 10 at 95%: (0.4902, 0.9433), the textbook Wilson interval; 0 of 10: (0, 0.2775); symmetric in k."""
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_interval(10, 10)[0] == pytest.approx(1 - 0.27753, abs=1e-4)
    for k in range(0, 17):
        lo, hi = wilson_interval(k, 16)
        mirror = wilson_interval(16 - k, 16)
        assert lo == pytest.approx(1 - mirror[1]) and 0 <= lo <= k / 16 <= hi <= 1
    assert wilson_interval(50, 100, 0.99)[1] - wilson_interval(50, 100, 0.99)[0] > \
        wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0]  # a higher confidence widens it
    assert format_rate(0.875, 16) == "88% (64-97)"
    assert format_rate(float("nan"), 16) == "-"
    for bad in ((11, 10), (-1, 10), (2.5, 10), (1, 0)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)


# ============================================================================================ scene records
class Spin:
    """Full speed with a hard turn: the Crossing robot drives into a wall (a real collision in MuJoCo)."""

    def reset(self, seed=None, obs=None):
        pass

    def act(self, obs):
        return np.array([1.6, 2.0], dtype=np.float32)


def test_collision_steps_and_end_reason_of_a_wall_crash(monkeypatch):
    spec = ControllerSpec.create("expert")
    monkeypatch.setattr(ControllerSpec, "build", lambda self, policy, **kw: Spin())  # the crash is real MuJoCo
    rec = run_scene_episode("crossing", None, spec, 3, {}, max_steps=80)
    assert rec["collision"] and not rec["success"]
    assert rec["collision_steps"] == [rec["length"]]  # the contact ended the episode on that step
    assert end_reason(rec["success"], rec["collision"], rec["length"], 80, 300) == "collision"
    assert end_reason(False, False, 80, 80, 300) == "cut at max_steps"
    assert end_reason(False, False, 300, None, 300) == "time limit"
    assert end_reason(True, False, 40, 80, 300) == "success"


def test_rule_violations_start_where_the_signal_breaks_the_rule():
    """The expert drives faster than 0.6 m/s: each run of samples above it is reported by its first index; rules it
    keeps are absent; the reach rule, unmet in 30 steps, is reported at the last sample."""
    theta = {"v_max": 0.6}
    rec = run_scene_episode("crossing", None, EXPERT, 4, theta, max_steps=30)
    speed = np.abs(rec["obs"][:, 4])
    above = speed > 0.6
    starts = [i for i in range(len(above)) if above[i] and (i == 0 or not above[i - 1])]
    assert starts and rec["violations"]["speed"] == starts
    assert rec["violations"]["reach"] == [len(rec["obs"]) - 1]
    assert "corridor" not in rec["violations"] and "clearance" not in rec["violations"]
    assert rule_violations("crossing", rec["obs"], get_task("crossing").resolve_theta(theta)) == rec["violations"]


def test_planned_path_follows_the_executed_motion():
    """The chunk rolled through the task's robot model lands where MuJoCo took the robot (Crossing's model is the
    env's own equations), and PickPlace's path is its set-points."""
    rec = run_scene_episode("crossing", None, EXPERT, 2, {}, max_steps=20)
    env = get_task("crossing").make_env()
    env.reset(seed=2)
    expert = env.unwrapped.make_expert(2)
    actions = []
    obs = env.reset(seed=2)[0]
    for _ in range(8):
        a = expert.act(obs)
        actions.append(a)
        obs = env.step(a)[0]
    env.close()
    path = planned_path("crossing", rec["obs"][0], np.asarray(actions))
    assert path.shape == (9, 2)
    np.testing.assert_allclose(path, rec["obs"][:9, :2], atol=1e-4)
    targets = np.array([[0.1, 0.0, 0.2, -1.0], [0.12, 0.01, 0.2, -1.0]])
    pp = run_scene_episode("pickplace", None, EXPERT, 0, {}, max_steps=2)
    np.testing.assert_allclose(planned_path("pickplace", pp["obs"][0], targets)[1:], targets[:, :3])


def test_projection_lands_on_the_rendered_objects():
    """The robot's and the goal's world positions project onto their own colours in the rendered top view, the
    cube onto red in PickPlace's perspective front view."""
    for name, size in (("crossing", (320, 240)), ("pickplace", (320, 240))):
        env = get_task(name).make_env()
        env.reset(seed=1)
        u = env.unwrapped
        frame = SceneRenderer(u, *size).render()
        assert frame.shape == (size[1], size[0], 3)
        camera = getattr(u, "camera", 0)
        if name == "crossing":
            points = np.array([[*u.data.qpos[:2], 0.27], [*u.goal, 0.0]])
            colours = [(0.15, 0.35, 0.85), (0.1, 0.75, 0.2)]  # robot blue, goal green (crossing.xml)
        else:
            points = np.array([u.data.qpos[u._cube_qadr:u._cube_qadr + 3]])
            colours = [(0.85, 0.15, 0.12)]
        px = project_points(u.model, u.data, camera, points, *size)
        for (c, r), rgb in zip(np.round(px).astype(int), colours):
            pixel = frame[r, c].astype(float) / 255
            assert int(np.argmax(pixel)) == int(np.argmax(rgb)), (name, pixel, rgb)
        env.close()


# ============================================================================================ the figure
def _rows(task: str, thetas: list[float], max_steps: int) -> list[EvalRow]:
    rows = []
    for v in thetas:
        for guided in (False, True):
            theta = {"v_max": v}
            samples = scene_samples(None, [7], 1 + guided, theta, controller=EXPERT, max_steps=max_steps, task=task)
            rows.append(EvalRow(f"v_max={v:.2f}" + (" +guidance" if guided else ""), theta, guided, samples=samples))
    return rows


@pytest.mark.parametrize("task", ["crossing", "pickplace"])
def test_trajectory_figure_one_panel_per_requested_theta(task):
    import matplotlib.pyplot as plt

    vmax = [0.05, 0.3, 5.0] if task == "pickplace" else [0.5, 1.0, 5.0]
    rows = _rows(task, vmax, 40)
    speed_rule = get_task(task).speed_rule
    fig = trajectory_figure(task, rows)
    try:
        assert len(fig.axes) == 3
        for ax, v, (off, on) in zip(fig.axes, vmax, zip(rows[::2], rows[1::2])):
            title = ax.get_title()
            ok_off, ok_on = (sum(s["success"] for s in r.samples) for r in (off, on))
            assert f"v_max={v:.2f}" in title and f"unguided {ok_off}/1" in title and f"guided {ok_on}/2" in title
            labels = {line.get_label() for line in ax.get_lines()}
            assert {"without guidance", "with STL guidance", "walls / table edge"} <= labels
            broke = any(speed_rule in s["violations"] for s in off.samples + on.samples)
            assert (f"rule '{speed_rule}' violated here" in labels) == broke
            assert len(ax.patches) >= 1  # goal / target zones
        assert any(speed_rule in s["violations"] for s in rows[0].samples)  # the lowest limit is broken
        assert not any(speed_rule in s["violations"] for s in rows[-1].samples)  # 5 m/s is not
        if task == "crossing":  # the pedestrians' faded paths
            assert any("pedestrians" in line.get_label() for line in fig.axes[0].get_lines())
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "with STL guidance" in legend and "without guidance" in legend
    finally:
        plt.close(fig)


# ============================================================================================ videos
def test_choose_video_seeds_success_first_and_bounded_search():
    eps = [{"seed": 10, "success": False}, {"seed": 11, "success": True}, {"seed": 12, "success": False},
           {"seed": 13, "success": True}]
    assert choose_video_seeds(eps, 3) == ([11, 10, 13], "")
    calls = []

    def search(k):
        calls.append(k)
        return 100 + k, k == 2

    fails = [e for e in eps if not e["success"]]
    assert choose_video_seeds(fails, 2, search, 5) == ([102, 10], "")
    assert calls == [0, 1, 2]
    calls.clear()
    seeds, note = choose_video_seeds(fails, 2, lambda k: (calls.append(k) or (100 + k, False)), 4)
    assert seeds == [10, 12] and calls == [0, 1, 2, 3] and "no success in 2 evaluated + 4 more seeds" in note


def test_render_clip_and_grid_have_the_frames_and_labels(tmp_path):
    import imageio.v2 as imageio

    clip = render_clip("crossing", None, EXPERT, 5, {"v_max": 1.5}, True, max_steps=10, size=(160, 120))
    assert clip.outcome == "cut at max_steps" and len(clip.frames) == 11  # reset frame + 10 steps
    bar = np.asarray(clip.frames[0][:24]).astype(int)  # the black label bar: 2 lines of an 8-pixel font at 160 px
    assert (bar.min(axis=-1) > 180).sum() > 20  # the white title
    assert ((bar[..., 0] > 150) & (bar[..., 0] - bar[..., 2] > 90)).sum() > 10  # the orange outcome
    short = Clip(6, {"v_max": 1.0}, False, "success", clip.frames[:4])
    n, h, w = write_video_grid(tmp_path / "grid.mp4", [[clip, short], [clip]])
    assert (n, h, w) == (11, 240, 320)
    frames = imageio.mimread(tmp_path / "grid.mp4")
    assert len(frames) == 11 and frames[0].shape == (240, 320, 3)
    assert frames[-1][120:, 160:].max() < 20  # the missing tile is black
    assert not list(tmp_path.glob("*.partial*"))


@pytest.mark.slow  # ~20 s: two spawned workers import torch and MuJoCo; the other tests render in this process
def test_clips_render_the_same_in_worker_processes():
    """Two worker processes give the clips one process gives, frame for frame, in job order."""
    from stlflow.demo_media import render_clips

    jobs = [("crossing", None, EXPERT, s, {"v_max": 1.5}, False, 4, (96, 72)) for s in (3, 4)]
    here, there = render_clips(jobs, workers=1), render_clips(jobs, workers=2)
    assert [c.seed for c in there] == [3, 4]
    for a, b in zip(here, there):
        assert a.outcome == b.outcome and len(a.frames) == len(b.frames) == 5
        assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))


def test_episode_record_reads_max_speed_from_the_speed_rule():
    from stlflow.control.evaluate import evaluate_episode
    from stlflow.control.jobs import EvalJob

    theta = get_task("crossing").resolve_theta({"v_max": 1.2})
    ep = evaluate_episode(EvalJob("crossing", None, EXPERT, 1, stl_params=theta, max_steps=40), 9)
    rec = episode_record("crossing", ep, theta, False, 40)
    scene = run_scene_episode("crossing", None, EXPERT, 9, theta, max_steps=40)
    assert rec["max_speed"] == pytest.approx(scene["max_speed"], abs=1e-5)
    assert rec["steps"] == 40 and rec["end_reason"] == "cut at max_steps" and rec["guided"] is False
    assert set(rec["rule_satisfied"]) == {"speed", "clearance", "corridor", "reach"}
    assert rec["stl_satisfied"] == all(rec["rule_satisfied"].values())


def test_demo_settings_per_task_and_overrides():
    """``env=`` picks the task's block of conf/demo.yaml; a top-level value that is not null wins; the task's tiny
    budget overrides only its own keys; a task without settings is refused by name."""
    from omegaconf import OmegaConf

    from stlflow.config import compose
    from stlflow.pipeline import demo_settings

    def settings(*overrides):
        return demo_settings(OmegaConf.to_container(compose("demo", list(overrides)), resolve=True))

    cross = settings("budget=tiny")
    assert cross["task"] == "crossing" and cross["sweep"] == [1.0, 1.25, 1.5]
    assert cross["guidance"]["rules"] == ["speed", "clearance", "corridor"] and cross["guidance"]["enabled"]
    pick = settings("env=pickplace", "budget=tiny", "guidance.scale=0.02", "v_max_sweep=[0.3]")
    assert pick["task"] == "pickplace" and pick["cond_params"] == ["v_max", "h_min", "T"] and pick["sweep"] == [0.3]
    assert pick["guidance"] == {"enabled": True, "rules": ["speed_limit"], "iters": 2, "t_max": 0.25,
                                "particles": 1, "scale": 0.02}
    assert pick["budget"]["augment_modes"] == ["left"] and pick["budget"]["train_steps"] == 30
    assert "augment_stl_opt" not in settings("env=pickplace")["budget"]  # the default budget keeps the task's CEM
    cfg = OmegaConf.to_container(compose("demo", []), resolve=True)
    del cfg["tasks"]["crossing"]
    with pytest.raises(ValueError, match="no settings for task 'crossing'"):
        demo_settings(cfg)
    assert cross["head"] == "flow" and settings("head=meanflow")["head"] == "meanflow"
    with pytest.raises(ValueError, match="head='unet' is not one of"):
        settings("head=unet")


def test_the_demo_describes_the_rti_schedule_it_ran():
    """The sentence results.md opens with names the schedule: the per-tick budget of a multi-step head, the cold
    one-step plans a one-step head gets (``ControllerSpec.for_policy``), or a fixed k."""
    from stlflow.pipeline import describe_rti, rti_options

    opts = rti_options("crossing")
    assert describe_rti(opts) == "a plan every 4 ticks, 1 network evaluation per tick"
    assert describe_rti(rti_options("crossing", k=3)) == "a plan every 4 ticks, k=3 solver steps a plan"

    one_step = tiny_policy("meanflow")
    cold = dict(ControllerSpec.create("rti", **opts).for_policy(one_step).options)
    every = max(4, one_step.n_action_steps)
    assert describe_rti(cold) == f"a plan every {every} ticks, each a one-step plan from noise"
