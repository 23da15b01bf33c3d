"""What a person needs to see why a demo episode succeeded or failed: the scene around the robot, the steps where it
collided or broke a rule, and the chunk the policy was planning at each tick.

:func:`run_scene_episode` runs one closed-loop episode like the evaluation runner does (same env, controller and
seed, so the same outcome) and keeps, besides the figures of :func:`stlflow.control.samples.closed_loop_samples`,
the observations (``obs`` (T+1, Do)), the steps whose ``info["collision"]`` started a contact
(``collision_steps``), the start of every run of samples on which a rule is violated (``violations``, see
:func:`rule_violations`), and on request the plan of every tick (``plans``) and the rendered frames.

A :class:`Scene` reads the task's geometry from the observations alone: Crossing's corridor, goal and pedestrians;
PickPlace's table, target zones and cube. Step indices count observations: index 0 is the reset state, index t
the state after the t-th action.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stlflow.control.controllers import EXPERT, ControllerSpec
from stlflow.control.tasks import Task, get_task

__all__ = ["end_reason", "Scene", "scene_of", "rule_violations", "run_scene_episode", "scene_samples", "planned_path",
           "current_plan", "PlanTap"]


# ============================================================================================ scenes
@dataclass
class Scene:
    """A task's geometry in the world's horizontal plane (m), read from one episode's observations.

    ``path`` (T+1, D): the robot's (or TCP's) path; ``tracks``: label -> (T+1, 2) paths of moving things (pedestrians,
    the cube); ``targets``: (label, centre (2,), radius) discs to reach; ``walls``: ((x0, y0), (x1, y1)) segments;
    ``area``: (x_min, x_max, y_min, y_max) the plot should show.
    """

    path: np.ndarray
    tracks: dict[str, np.ndarray] = field(default_factory=dict)
    targets: list[tuple[str, np.ndarray, float]] = field(default_factory=list)
    walls: list[tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=list)
    area: tuple[float, float, float, float] | None = None


def _crossing_scene(obs: np.ndarray) -> Scene:
    from stlflow.envs.crossing import GOAL_RADIUS, HALF_WIDTH, I_PEDS, N_PEDS, PED_STRIDE

    xy = obs[:, :2].astype(np.float64)
    tracks = {}
    for i in range(N_PEDS):
        j = I_PEDS + i * PED_STRIDE
        if obs[0, j] > 0.5:  # present
            tracks[f"pedestrian {i}"] = xy + obs[:, j + 1:j + 3]
    goal = (obs[0, :2] + obs[0, 6:8]).astype(np.float64)
    w = HALF_WIDTH
    walls = [((-1.0, w), (10.5, w)), ((-1.0, -w), (10.5, -w)), ((-1.0, -w), (-1.0, w)), ((10.5, -w), (10.5, w))]
    # pedestrians start beyond the walls (their walk is extended backwards): show 1.3 m past each wall
    return Scene(xy, tracks, [("goal", goal, GOAL_RADIUS)], walls, (-1.2, 10.7, -w - 1.3, w + 1.3))


def _pickplace_scene(obs: np.ndarray) -> Scene:
    from stlflow.envs.pickplace import OBS_INDEX, WORKSPACE_HIGH, WORKSPACE_LOW, ZONE_RADIUS

    targets = [(f"{side} zone", obs[0, OBS_INDEX[f"zone_{side}"]].astype(np.float64), ZONE_RADIUS)
               for side in ("left", "right")]
    (x0, y0), (x1, y1) = WORKSPACE_LOW[:2], WORKSPACE_HIGH[:2]
    walls = [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))]
    return Scene(obs[:, :3].astype(np.float64), {"cube": obs[:, OBS_INDEX["cube_pos"]][:, :2].astype(np.float64)},
                 targets, walls, (x0 - 0.03, x1 + 0.03, y0 - 0.03, y1 + 0.03))


_SCENES = {"crossing": _crossing_scene, "pickplace": _pickplace_scene}


def scene_of(task: str | Task, obs: np.ndarray) -> Scene:
    """The :class:`Scene` of an episode's observations (T+1, Do); a task without a scene reader gets its path only."""
    t = get_task(task)
    obs = np.asarray(obs)
    reader = _SCENES.get(t.name)
    return reader(obs) if reader is not None else Scene(t.path_of(obs))


# ============================================================================================ rule violations
def rule_violations(task: str | Task, obs: np.ndarray, theta: Mapping[str, float],
                    signals: Mapping[str, np.ndarray] | None = None) -> dict[str, list[int]]:
    """Per rule of the task that the episode breaks at θ, the sample indices where a violation starts.

    ``obs`` (T+1, Do): the episode's observations; ``signals``: their STL signals name -> (T+1,) when the caller has
    them already (else computed with the task's env).

    An ``always`` rule ``G(φ)`` is violated on every sample where φ's robustness is negative; each run of such
    samples is reported by its first index. Any other rule (``F[0,T](...)``: never reached in time) is reported at
    the last sample. Rules kept are left out.
    """
    import torch

    from stlflow.stl import parse
    from stlflow.stl.syntax import Temporal

    t = get_task(task)
    info = t.info
    env_signals = dict(signals) if signals is not None else _signals(t, obs)
    out: dict[str, list[int]] = {}
    for name, text in info.rule_list.items():
        spec = parse(text)
        sig = {k: torch.as_tensor(env_signals[k])[None] for k in spec.signals}
        params = {k: float(theta[k]) for k in spec.params}
        if float(spec.robustness(sig, dt=info.dt, params=params).reshape(-1)[0]) >= 0:
            continue
        if isinstance(spec, Temporal) and spec.op == "G":
            bad = (spec.arg.robustness_trace(sig, dt=info.dt, params=params)[0] < 0).numpy()
            starts = np.flatnonzero(bad & ~np.concatenate([[False], bad[:-1]]))
            out[name] = [int(i) for i in starts]
        else:
            out[name] = [len(obs) - 1]
    return out


def _signals(task: Task, obs: np.ndarray) -> dict[str, np.ndarray]:
    env = task.make_env()
    try:
        return {k: np.asarray(v, dtype=np.float64) for k, v in env.unwrapped.signals(np.asarray(obs)).items()}
    finally:
        env.close()


# ============================================================================================ plans
def current_plan(ctrl: Any, action: np.ndarray | None = None) -> np.ndarray | None:
    """The actions (n, Da, physical) a controller intends from the tick it just acted on: ``[0]`` is ``action``,
    the one it returned. Reads the RTI controller's newest chunk, the lock-step executor's active plan, or a
    receding-horizon controller's queue (after ``action``); None for a controller without a plan (the expert)."""
    ctrl = getattr(ctrl, "inner", ctrl)  # a reseeded sample controller
    active = getattr(ctrl, "active", None)
    if active is not None and hasattr(ctrl, "tick"):  # AsyncExecutor: tick was advanced past the acted tick
        rest = np.asarray(active.actions)[max(int(ctrl.tick) - 1 - int(active.start), 0):]
        return rest if len(rest) else None
    if hasattr(ctrl, "plan") and callable(ctrl.plan) and hasattr(ctrl, "exec_offset"):  # RTIController
        plan = ctrl.plan()
        return None if plan is None else np.asarray(plan.actions)
    queue = getattr(ctrl, "_queue", None)
    if queue is not None and action is not None:
        return np.stack([np.asarray(action), *queue])
    return None


class PlanTap:
    """A controller passed through unchanged, keeping :func:`current_plan` after every tick in ``plans``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.plans: list[np.ndarray | None] = []
        self.last_nfe = 0

    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        self.plans = []
        self.inner.reset(seed=seed, obs=obs)

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = self.inner.act(obs)
        self.last_nfe = getattr(self.inner, "last_nfe", 0)
        self.plans.append(current_plan(self.inner, action))
        return action


def planned_path(task: str | Task, obs: np.ndarray, actions: np.ndarray) -> np.ndarray | None:
    """Where a planned chunk takes the robot: ``actions`` (n, Da) from observation ``obs`` (Do,) rolled through the
    task's robot model (the one STL guidance plans through) -> (n+1, D) positions starting at the current one, D =
    the task's path dimensions; None when the task has no model."""
    import torch

    t = get_task(task)
    try:
        model = t.dynamics()
        state0, _ = t.model_inputs(np.asarray(obs)[None], len(actions))
    except NotImplementedError:
        return None
    with torch.no_grad():
        states = model.rollout(state0.double(), torch.tensor(np.asarray(actions)[None], dtype=torch.float64))
    here = t.path_of(np.asarray(obs)[None])
    dims = here.shape[1]
    return np.concatenate([here, states[0, :, :dims].numpy()], axis=0)


# ============================================================================================ episodes
def end_reason(success: bool, collision: bool, length: int, limit: int | None, env_limit: int | None = None) -> str:
    """Why an episode ended: ``success``; ``collision`` (a contact ended it, or one happened in an episode that then
    ran out of time); ``time limit`` (the env's own limit, ``env_limit`` steps); ``cut at max_steps`` (the
    evaluation's shorter cap ``limit``); ``stopped`` (the env ended it otherwise)."""
    if success:
        return "success"
    if collision:
        return "collision"
    if env_limit is not None and length >= env_limit:
        return "time limit"
    if limit is not None and length >= limit:
        return "cut at max_steps"
    return "stopped"


class _EpisodeLog:
    """Step hook: the observation indices at which an ``info["collision"]`` contact starts, and with ``size`` =
    (width, height) a frame of the env's camera after reset and after every step (``frames``)."""

    def __init__(self, env: Any, size: tuple[int, int] | None = None) -> None:
        self.steps: list[int] = []
        self.frames: list[np.ndarray] = []
        self._t, self._was = 0, False
        self._renderer = SceneRenderer(env.unwrapped, *size) if size is not None else None

    def begin(self, seed: int, obs: np.ndarray, info: dict) -> None:
        self.steps, self._t, self._was = [], 0, False
        self.frames = [self._renderer.render()] if self._renderer is not None else []

    def step(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, info: dict) -> None:
        self._t += 1
        now = bool(info.get("collision", False))
        if now and not self._was:
            self.steps.append(self._t)
        self._was = now
        if self._renderer is not None:
            self.frames.append(self._renderer.render())

    def end(self, result: Any) -> None:
        pass

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()


class SceneRenderer:
    """Off-screen frames of a task env's own camera (``env.camera`` where the env has several, else camera 0)
    without shadows, reflections and multisampling, which a software GL back-end pays for dearly (320 x 240, on 2
    loaded cores: PickPlace 0.157 s a frame as the env renders it, 0.023 s without its 4096-pixel shadow map and
    reflections, 0.008 s also without 4x multisampling; Crossing 0.039 s -> 0.016 s). Sets the env model's
    ``vis.quality.offsamples`` to 0 (drawing only). Needs ``MUJOCO_GL=egl`` (or osmesa)."""

    def __init__(self, env: Any, width: int, height: int) -> None:
        import mujoco

        self.env, self.camera = env, getattr(env, "camera", 0)
        env.model.vis.quality.offsamples = 0
        try:
            self.renderer = mujoco.Renderer(env.model, height=int(height), width=int(width))
        except Exception as err:  # mujoco raises various GL errors; make the remedy obvious
            raise RuntimeError(f"off-screen rendering failed ({err}); set MUJOCO_GL=egl (or osmesa) before "
                               "importing mujoco") from err

    def render(self) -> np.ndarray:
        import mujoco

        m, d = self.env.model, self.env.data
        mujoco.mj_kinematics(m, d)  # geom poses of the current qpos and mocap positions (derived data only)
        mujoco.mj_camlight(m, d)
        self.renderer.update_scene(d, camera=self.camera)
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return self.renderer.render().copy()

    def close(self) -> None:
        self.renderer.close()


def run_scene_episode(task: str | Task, policy: Any, spec: ControllerSpec, seed: int, theta: Mapping[str, float],
                      *, sample: int | None = None, max_steps: int | None = None,
                      render: tuple[int, int] | None = None,
                      env_kwargs: Mapping[str, Any] | None = None, plans: bool = False) -> dict[str, Any]:
    """One closed-loop episode from start state ``seed`` at the requested θ (see the module docstring).

    ``sample``: None runs the controller with noise seed ``seed``, as :func:`stlflow.control.evaluate.evaluate`
    does; an integer j reseeds it ``seed * 1000 + j``, as ``closed_loop_samples`` does. ``plans``: keep every tick's
    plan (``plans[t]``, (n, Da) or None, made from ``obs[t]``). ``render`` = (width, height): keep a frame per
    observation (``frames[t]`` shows ``obs[t]``; :class:`SceneRenderer`).
    """
    from stlflow.control.evaluate import policy_theta, rule_robustness
    from stlflow.control.loop import run_episode
    from stlflow.control.samples import Reseeded

    t = get_task(task)
    resolved = t.resolve_theta(theta)
    env = t.make_env(env_kwargs)
    hook = None
    try:
        u = env.unwrapped
        if spec.name == EXPERT:
            ctrl = spec.build(None, expert=u.make_expert(int(seed)))
        else:
            ctrl = spec.build(policy, seed=int(seed), stl_params=policy_theta(policy, resolved))
        if sample is not None:
            ctrl = Reseeded(ctrl, int(sample))
        tap = PlanTap(ctrl) if plans else ctrl
        hook = _EpisodeLog(env, render)
        res = run_episode(env, tap, int(seed), max_steps=max_steps, hook=hook)
        sig = {k: np.asarray(v, dtype=np.float64) for k, v in u.signals(res.obs).items()}
        rho, _ = rule_robustness(u.rules, None, sig, u.dt, resolved)
    finally:
        if hook is not None:
            hook.close()
        env.close()
    record = {"seed": int(seed), "sample": sample, "xy": t.path_of(res.obs), "mode": t.mode(res.obs),
              "max_speed": float(np.max(sig[t.speed_signal])) if t.speed_signal else float("nan"),
              "success": bool(res.success), "collision": bool(res.collision), "robustness": float(rho),
              "obs": res.obs, "length": res.length, "collision_steps": hook.steps,
              "violations": rule_violations(t, res.obs, resolved, sig)}
    if plans:
        record["plans"] = tap.plans
    if render is not None:
        record["frames"] = hook.frames
    return record


def scene_samples(policy: Any, seeds: Sequence[int], samples: int, theta: Mapping[str, float], *,
                  controller: ControllerSpec, max_steps: int | None = None, task: str = "crossing"
                  ) -> list[dict[str, Any]]:
    """``samples`` episodes from each start state in ``seeds`` (:func:`run_scene_episode` with ``sample=j``): the
    records of ``closed_loop_samples`` (same seeds, same numbers) with the scene fields added."""
    return [run_scene_episode(task, policy, controller, s, theta, sample=j, max_steps=max_steps)
            for s in seeds for j in range(int(samples))]
