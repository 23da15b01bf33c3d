"""``stlflow/PickPlace-v0``: tabletop pick and place with a Cartesian end-effector and a binary gripper.

A cube starts at a random position and yaw on the table; two circular target zones (``left`` at
y > 0, ``right`` at y < 0, centres jittered per episode) accept it, so demonstrations are bimodal.
Units are metres, seconds, radians; the table top is the plane z = 0. The MJCF model is
``envs/assets/pickplace.xml`` (its header documents the mechanism).

Control
    ``dt = 0.1`` s per env step (10 Hz policy) = ``frame_skip = 25`` MuJoCo sub-steps of 4 ms
    (implicit-fast integrator, elliptic friction cones). ``max_steps`` (default 120, i.e. 12 s)
    is enforced inside the env: the step that reaches it returns ``truncated=True``.

Action, shape (4,), float32
    ``[x, y, z, grip]``: ``x, y, z`` is the ABSOLUTE target position (m, world frame) of the tool
    centre point (TCP: midway between the finger pads), bounded by :data:`WORKSPACE_LOW` /
    :data:`WORKSPACE_HIGH` (targets outside are clipped). Within the step the servo set-point moves
    linearly from the previous target to this one (so the TCP moves smoothly, at about
    ``|target - previous target| / dt``); three slide joints with position servos (kp 800 N/m,
    damping 45 N s/m, force limit 40 N) track it. A large jump in the target is therefore followed
    at high speed, which is what the speed rule limits. ``grip`` is BINARY:
    ``+1`` closes, ``-1`` opens; any real value is thresholded at 0 (``grip > 0`` closes).
    ``discrete_action_mask = [False, False, False, True]``.

Observation, shape (22,), float32 (slices in :data:`OBS_INDEX`)
    - ``[0:3]`` ``ee_pos``: TCP position (m);
    - ``[3:6]`` ``ee_vel``: TCP velocity (m/s);
    - ``[6]`` ``grip``: gripper opening, the distance between the pad faces (m): 0.09 open, 0 closed
      on nothing, 0.04 .. 0.057 closed on the cube (face-on .. corner-to-corner);
    - ``[7:10]`` ``cube_pos``: cube centre (m); the cube is 0.04 m wide, so z = 0.02 when resting;
    - ``[10:14]`` ``cube_quat``: cube orientation quaternion (w, x, y, z), sign fixed so that w >= 0;
    - ``[14:16]`` ``zone_left``, ``[16:18]`` ``zone_right``: zone centres (x, y) (m);
    - ``[18:21]`` ``ee_target``: the servo set-point, i.e. the last commanded TCP target after clipping (m; the
      TCP's start position after ``reset``). Real arms report their commanded set-point; without it a policy has
      to infer the servo's lag from the velocity, and a closed-loop policy that under-estimates the lag stalls;
    - ``[21]`` ``grip_cmd``: the last gripper command, +1 closed / -1 open (-1 after ``reset``).

STL signals (``signals(obs)``; pure functions of the observation)
    - ``ee_speed``: ``|ee_vel|`` (m/s).
    - ``ee_height_clear``: TCP height above the table plus a bonus of ``NEAR_BONUS = 1 m`` times
      ``max(0, 1 - d / NEAR_RADIUS)``, where ``d`` is the horizontal TCP-cube distance and
      ``NEAR_RADIUS = 0.06`` m. Within ~1 cm of the cube's vertical axis the bonus (>= 0.83 m) makes
      any reasonable ``h_min`` hold, so ``G(ee_height_clear >= {h_min})`` only constrains the
      height *away from the cube* (travelling, approaching); grasping, carrying and placing, where
      the TCP is over the cube, are free. The signal is continuous in the observation.
    - ``in_target``: signed distance, positive inside: ``min(ZONE_RADIUS - min_k |cube_xy - zone_k|,
      ON_TABLE_TOL - (cube_z - CUBE_HALF))`` with ``ZONE_RADIUS = 0.06`` m, ``ON_TABLE_TOL = 0.01`` m.
      It is >= 0 exactly when the cube's centre is over a zone and its bottom within 1 cm of the table.
    - ``in_left``, ``in_right``: the same for one zone only (``in_target = max(in_left, in_right)``); the
      behaviour modes' formulas (``F[0,{T}](in_left >= 0)``, conf/stl/pickplace.yaml) use them.

Rules (``rules``; the ``stlflow.stl`` syntax)::

    G(ee_speed <= {v_max}) & G(ee_height_clear >= {h_min}) & F[0,{T}](in_target >= 0)

with ``rule_defaults = {"v_max": 0.5, "h_min": 0.04, "T": 10.0}`` (m/s, m, s) and the three
conjuncts in ``rule_list`` as ``speed_limit``, ``clearance`` and ``place``.

Success, termination, collision, reward
    ``info["success"]`` is True when the cube rests in a zone and is released: ``in_target >= 0``,
    the last gripper command was *open*, no gripper geom touches the cube and the cube's speed is
    below 0.05 m/s. The episode terminates on success. ``info["collision"]`` is True when a gripper
    geom (pads, palm, wrist) touched the table during any sub-step of this step (checked by a MuJoCo
    contact sensor); collisions do not end the episode; ``info["n_collisions"]`` counts the steps with
    one so far. Reward is sparse: 1.0 on the step that succeeds, else 0.0. ``info`` also holds
    ``signals`` (``{name: float}`` for the returned observation, reset included) and ``step``.

State (for rollouts from stored states)
    ``get_state()`` returns ``[mj_getState(mjSTATE_INTEGRATION), step_count, n_collisions, grip_cmd]``
    (float64); the MuJoCo part holds qpos, qvel, actuator controls, mocap (zone) poses, warm-start and
    time. ``set_state`` restores it exactly: stepping from a restored state reproduces the original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from stlflow.envs.base import OffscreenRenderer

MODEL_PATH = Path(__file__).resolve().parent / "assets" / "pickplace.xml"

OBS_INDEX: dict[str, slice] = {
    "ee_pos": slice(0, 3),
    "ee_vel": slice(3, 6),
    "grip": slice(6, 7),
    "cube_pos": slice(7, 10),
    "cube_quat": slice(10, 14),
    "zone_left": slice(14, 16),
    "zone_right": slice(16, 18),
    "ee_target": slice(18, 21),
    "grip_cmd": slice(21, 22),
}
OBS_DIM = 22

WORKSPACE_LOW = np.array([-0.30, -0.40, 0.0])  # TCP target bounds (m)
WORKSPACE_HIGH = np.array([0.30, 0.40, 0.35])
GRIP_OPEN, GRIP_CLOSED = 0.045, -0.01  # finger servo targets (m from the TCP); closed squeezes past the cube

CUBE_HALF = 0.02  # m
PLACE_PRESS = 0.004  # m: the expert's lowering target puts the cube's bottom this far below the table top
RELEASE_HEIGHT = 0.004  # m: the expert opens once the cube's bottom is this close to the table
ZONE_RADIUS = 0.06  # m
ON_TABLE_TOL = 0.01  # m: cube bottom at most this high counts as "on the table"
NEAR_RADIUS = 0.06  # m: horizontal radius around the cube where the clearance rule relaxes
NEAR_BONUS = 1.0  # m added to the height right over the cube
REST_SPEED = 0.05  # m/s: the cube "rests" below this speed

RULE_LIST: dict[str, str] = {
    "speed_limit": "G(ee_speed <= {v_max})",
    "clearance": "G(ee_height_clear >= {h_min})",
    "place": "F[0,{T}](in_target >= 0)",
}
RULES = " & ".join(RULE_LIST.values())
RULE_DEFAULTS: dict[str, float] = {"v_max": 0.5, "h_min": 0.04, "T": 10.0}


def pickplace_signals(obs: np.ndarray) -> dict[str, np.ndarray]:
    """The STL signals of observations ``obs`` (T, 22) or (B, T, 22) -> ``{name: (T,) or (B, T)}`` (float64).

    See the module docstring for the definitions of ``ee_speed``, ``ee_height_clear`` and ``in_target``.
    """
    obs = np.asarray(obs, dtype=np.float64)
    if obs.ndim not in (2, 3) or obs.shape[-1] != OBS_DIM:
        raise ValueError(f"signals() expects observations shaped (T, {OBS_DIM}) or (B, T, {OBS_DIM}); got {obs.shape}")
    ee_pos, ee_vel = obs[..., OBS_INDEX["ee_pos"]], obs[..., OBS_INDEX["ee_vel"]]
    cube_pos = obs[..., OBS_INDEX["cube_pos"]]
    d_cube = np.linalg.norm(ee_pos[..., :2] - cube_pos[..., :2], axis=-1)
    near = np.clip(1.0 - d_cube / NEAR_RADIUS, 0.0, 1.0)
    on_table = ON_TABLE_TOL - (cube_pos[..., 2] - CUBE_HALF)
    in_zone = {
        side: np.minimum(ZONE_RADIUS - np.linalg.norm(cube_pos[..., :2] - obs[..., OBS_INDEX[f"zone_{side}"]], axis=-1),
                         on_table)
        for side in ("left", "right")
    }
    return {
        "ee_speed": np.linalg.norm(ee_vel, axis=-1),
        "ee_height_clear": ee_pos[..., 2] + NEAR_BONUS * near,
        "in_target": np.maximum(in_zone["left"], in_zone["right"]),
        "in_left": in_zone["left"],
        "in_right": in_zone["right"],
    }


class PickPlaceEnv(gym.Env):
    """Pick the cube and place it in either target zone (see the module docstring for every convention).

    Args:
        render_mode: ``None`` or ``"rgb_array"`` (needs an OpenGL back-end, e.g. ``MUJOCO_GL=egl``).
        max_steps: time limit in env steps (``max_steps * dt`` seconds).
        width, height: rendered frame size in pixels (at most 960 x 720).
        camera: MJCF camera to render from: ``"front"`` (table, gripper, cube, zones) or ``"top"``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    frame_skip = 25  # MuJoCo sub-steps per env step

    def __init__(
        self,
        render_mode: str | None = None,
        max_steps: int = 120,
        width: int = 480,
        height: int = 360,
        camera: str = "front",
    ) -> None:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array'; got {render_mode!r}")
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1; got {max_steps}")
        self.render_mode, self.max_steps, self.camera = render_mode, int(max_steps), camera
        self.model = mujoco.MjModel.from_xml_path(str(MODEL_PATH))
        self.data = mujoco.MjData(self.model)
        self.dt = round(float(self.model.opt.timestep) * self.frame_skip, 9)  # 0.1 s
        if camera not in ("front", "top"):
            raise ValueError(f"camera must be 'front' or 'top'; got {camera!r}")
        self._renderer = OffscreenRenderer(self.model, width=width, height=height) if render_mode else None

        m = self.model
        self._ee_qadr = [m.jnt_qposadr[m.joint(n).id] for n in ("ee_x", "ee_y", "ee_z")]
        self._ee_vadr = [m.jnt_dofadr[m.joint(n).id] for n in ("ee_x", "ee_y", "ee_z")]
        self._finger_qadr = [m.jnt_qposadr[m.joint(n).id] for n in ("finger_left", "finger_right")]
        self._cube_qadr = m.jnt_qposadr[m.joint("cube").id]
        self._cube_vadr = m.jnt_dofadr[m.joint("cube").id]
        self._sens_table = m.sensor_adr[m.sensor("gripper_table").id]
        self._sens_cube = m.sensor_adr[m.sensor("gripper_cube").id]
        self._zone_mocap = [m.body_mocapid[m.body(n).id] for n in ("zone_left", "zone_right")]
        self._nstate = mujoco.mj_stateSize(m, mujoco.mjtState.mjSTATE_INTEGRATION)

        self.action_space = spaces.Box(
            low=np.append(WORKSPACE_LOW, -1.0).astype(np.float32),
            high=np.append(WORKSPACE_HIGH, 1.0).astype(np.float32),
            dtype=np.float32,
        )
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
        self.discrete_action_mask = np.array([False, False, False, True])
        self.rules, self.rule_defaults, self.rule_list = RULES, dict(RULE_DEFAULTS), dict(RULE_LIST)
        self.obs_index = dict(OBS_INDEX)

        self._step_count, self._n_collisions, self._grip_closed = 0, 0, False

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Random cube pose, zone centres and TCP start, drawn from ``self.np_random`` (seeded by ``seed``)."""
        super().reset(seed=seed)
        rng, m, d = self.np_random, self.model, self.data
        mujoco.mj_resetData(m, d)
        ee = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.25, 0.25), rng.uniform(0.12, 0.22)])
        cube_xy = np.array([rng.uniform(-0.12, 0.12), rng.uniform(-0.08, 0.08)])
        yaw = rng.uniform(-np.pi / 4, np.pi / 4)  # a cube is symmetric under 90 degree turns
        zones = [(rng.uniform(-0.1, 0.1), sign * rng.uniform(0.2, 0.26)) for sign in (1.0, -1.0)]

        d.qpos[self._ee_qadr] = ee
        d.qpos[self._finger_qadr] = GRIP_OPEN
        c = self._cube_qadr
        d.qpos[c : c + 3] = [cube_xy[0], cube_xy[1], CUBE_HALF]
        d.qpos[c + 3 : c + 7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        for mocap, (zx, zy) in zip(self._zone_mocap, zones):
            d.mocap_pos[mocap] = [zx, zy, 0.0]
        d.ctrl[:3] = ee
        d.ctrl[3:5] = GRIP_OPEN
        mujoco.mj_forward(m, d)
        self._step_count, self._n_collisions, self._grip_closed = 0, 0, False
        obs = self._obs()
        return obs, self._info(obs, collision=False, success=False)

    def step(self, action):
        """Apply ``action`` = [x, y, z target (m), grip (+1 close / -1 open)] for ``dt`` seconds."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (4,) or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be 4 finite numbers [x, y, z, grip]; got {action!r}")
        m, d = self.model, self.data
        self._grip_closed = bool(a[3] > 0.0)
        start, goal = d.ctrl[:3].copy(), np.clip(a[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        d.ctrl[3:5] = GRIP_CLOSED if self._grip_closed else GRIP_OPEN
        collision = False
        for i in range(1, self.frame_skip + 1):
            # the servo set-point moves linearly from the previous target to the new one over the step
            d.ctrl[:3] = start + (i / self.frame_skip) * (goal - start)
            mujoco.mj_step(m, d)
            collision = collision or d.sensordata[self._sens_table] > 0
        self._step_count += 1
        self._n_collisions += int(collision)
        obs = self._obs()
        success = self._is_success(obs)
        truncated = self._step_count >= self.max_steps and not success
        return obs, float(success), success, truncated, self._info(obs, collision=collision, success=success)

    def render(self) -> np.ndarray | None:
        """An (height, width, 3) uint8 frame from ``camera`` when ``render_mode == "rgb_array"``, else None."""
        if self._renderer is None:
            return None
        return self._renderer.render(self.data, camera=self.camera)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()

    # ------------------------------------------------------------------ task interface
    def signals(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        """STL signals of observations (T, 22) or (B, T, 22) -> {name: (T,) or (B, T)} (:func:`pickplace_signals`)."""
        return pickplace_signals(obs)

    def make_expert(self, seed: int) -> PickPlaceExpert:
        """The scripted expert for episode ``seed`` (mode and style drawn from ``seed`` alone)."""
        return PickPlaceExpert(self, seed)

    def get_state(self) -> np.ndarray:
        """The full simulation state, float64 (n,): MuJoCo integration state + [step_count, n_collisions, grip_cmd]."""
        phys = np.empty(self._nstate)
        mujoco.mj_getState(self.model, self.data, phys, mujoco.mjtState.mjSTATE_INTEGRATION)
        return np.concatenate([phys, [self._step_count, self._n_collisions, float(self._grip_closed)]])

    def set_state(self, state: np.ndarray) -> None:
        """Restore a state from :meth:`get_state` (the episode then continues exactly as it would have)."""
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        if state.shape != (self._nstate + 3,):
            raise ValueError(f"state must have {self._nstate + 3} entries (from get_state()); got {state.shape}")
        mujoco.mj_setState(self.model, self.data, state[: self._nstate], mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(self.model, self.data)
        self._step_count, self._n_collisions = int(state[-3]), int(state[-2])
        self._grip_closed = bool(state[-1] > 0.5)

    @property
    def cube_velocity(self) -> np.ndarray:
        """Linear velocity (3,) of the cube in m/s (privileged: not in the observation)."""
        v = self._cube_vadr
        return self.data.qvel[v : v + 3].copy()

    # ------------------------------------------------------------------ internals
    def _obs(self) -> np.ndarray:
        d, c = self.data, self._cube_qadr
        quat = d.qpos[c + 3 : c + 7]
        quat = quat if quat[0] >= 0 else -quat
        obs = np.concatenate(
            [
                d.qpos[self._ee_qadr],
                d.qvel[self._ee_vadr],
                [d.qpos[self._finger_qadr].sum()],
                d.qpos[c : c + 3],
                quat,
                d.mocap_pos[self._zone_mocap[0], :2],
                d.mocap_pos[self._zone_mocap[1], :2],
                d.ctrl[:3],
                [1.0 if self._grip_closed else -1.0],
            ]
        )
        return obs.astype(np.float32)

    def _is_success(self, obs: np.ndarray) -> bool:
        in_target = pickplace_signals(obs[None])["in_target"][0]
        released = not self._grip_closed and self.data.sensordata[self._sens_cube] == 0
        resting = np.linalg.norm(self.cube_velocity) < REST_SPEED
        return bool(in_target >= 0 and released and resting)

    def _info(self, obs: np.ndarray, collision: bool, success: bool) -> dict[str, Any]:
        sig = pickplace_signals(obs[None])
        return {
            "signals": {k: float(v[0]) for k, v in sig.items()},
            "success": bool(success),
            "collision": bool(collision),
            "n_collisions": self._n_collisions,
            "step": self._step_count,
        }


class PickPlaceExpert:
    """Scripted pick-and-place expert: level, reach over the cube, descend, close, lift, carry, lower, open.

    Phases: ``level`` (move vertically to the approach height), ``reach`` (travel horizontally to
    above the cube), ``descend``, ``grasp`` (close and wait), ``lift`` (to the carry height),
    ``carry`` (over the drop point), ``lower`` (until the cube's bottom is within ``RELEASE_HEIGHT`` of the
    table), ``release`` (open and wait), ``retreat`` (up to the approach height; the env usually ends the episode on
    success before this).

    ``mode`` is the target zone (``"left"`` or ``"right"``, equally likely). ``style`` holds the
    per-episode randomised parameters, all drawn from ``seed`` alone:

    - ``speed`` (m/s): cruise speed of the commanded TCP target, U[0.12, 0.32];
    - ``descend_ratio``: vertical approach speed as a fraction of ``speed``, U[0.4, 0.8];
    - ``approach_height`` (m): TCP height when travelling to the cube, U[0.07, 0.16] (the pads clear the cube top);
    - ``carry_height`` (m): TCP height when carrying the cube, U[0.08, 0.18];
    - ``grasp_offset`` (m): TCP height relative to the cube centre at the grasp, U[-0.004, 0.006];
    - ``place_dx``, ``place_dy`` (m): drop point relative to the zone centre, uniform in a 2.5 cm disc;
    - ``close_steps``, ``release_steps``: steps to wait with the gripper closed / opened, 2..4.

    The commanded target moves toward each waypoint at most ``speed * dt`` per step (the servo's lag
    keeps the real speed below the commanded one). The expert re-reads the cube from each observation
    and starts over from the reach phase if the cube slips out of the gripper.
    """

    MODES = ("left", "right")

    def __init__(self, env: PickPlaceEnv, seed: int) -> None:
        self.env = env
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9C4]))
        self.mode = self.MODES[int(rng.integers(2))]
        r, ang = 0.025 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        self.style: dict[str, Any] = {
            "speed": float(rng.uniform(0.12, 0.32)),
            "descend_ratio": float(rng.uniform(0.4, 0.8)),
            "approach_height": float(rng.uniform(0.07, 0.16)),
            "carry_height": float(rng.uniform(0.08, 0.18)),
            "grasp_offset": float(rng.uniform(-0.004, 0.006)),
            "place_dx": float(r * np.cos(ang)),
            "place_dy": float(r * np.sin(ang)),
            "close_steps": int(rng.integers(2, 5)),
            "release_steps": int(rng.integers(2, 5)),
        }
        self.reset()

    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        """Start a new episode (call after ``env.reset``; ``seed``/``obs`` are accepted for the controller
        contract, the expert's style depends on its construction seed alone)."""
        self.phase, self._target, self._start, self._wait = "level", None, None, 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The action (4,) float32 for observation ``obs`` (22,)."""
        obs = np.asarray(obs, dtype=np.float64)
        s, dt = self.style, self.env.dt
        ee, cube = obs[OBS_INDEX["ee_pos"]], obs[OBS_INDEX["cube_pos"]]
        zone = obs[OBS_INDEX[f"zone_{self.mode}"]] + [s["place_dx"], s["place_dy"]]
        if self._target is None:
            self._target, self._start = ee.copy(), ee.copy()
        held = self.phase in ("lift", "carry", "lower") and np.linalg.norm(cube - ee) > 0.03
        if held:  # the cube slipped: open and start over
            self.phase = "reach"

        grip, speed = -1.0, s["speed"]
        if self.phase == "level":  # go straight up or down to the approach height first
            goal = np.array([self._start[0], self._start[1], s["approach_height"]])
            if self._arrived(goal, ee, tol=0.01):
                self.phase = "reach"
        if self.phase == "reach":
            goal = np.array([cube[0], cube[1], s["approach_height"]])
            if self._arrived(goal, ee, tol=0.008):
                self.phase = "descend"
        if self.phase == "descend":
            goal, speed = np.array([cube[0], cube[1], cube[2] + s["grasp_offset"]]), speed * s["descend_ratio"]
            if self._arrived(goal, ee, tol=0.004):
                self.phase, self._wait = "grasp", 0
        if self.phase == "grasp":
            goal, grip = self._target.copy(), 1.0
            self._wait += 1
            if self._wait > s["close_steps"]:
                self.phase = "lift"
        if self.phase == "lift":
            goal, grip = np.array([self._target[0], self._target[1], s["carry_height"]]), 1.0
            if self._arrived(goal, ee, tol=0.01):
                self.phase = "carry"
        if self.phase == "carry":
            goal, grip = np.array([zone[0], zone[1], s["carry_height"]]), 1.0
            if self._arrived(goal, ee, tol=0.008):
                self.phase = "lower"
        if self.phase == "lower":
            # Aim the cube's bottom PLACE_PRESS below the table top (the table stops it; the servo then presses
            # it down with kp * PLACE_PRESS, far below the grip's friction) and open as soon as the cube's bottom
            # is within RELEASE_HEIGHT of the table. The release is gated by a coarse, observable condition that
            # any policy which keeps lowering reaches, not by the servo settling to within millimetres of a goal:
            # a learned policy that is a few millimetres imprecise would otherwise hover above that goal,
            # re-planning "open a few steps later" forever when it re-plans every tick.
            z = CUBE_HALF - PLACE_PRESS + (ee[2] - cube[2])
            goal, grip, speed = np.array([zone[0], zone[1], z]), 1.0, speed * s["descend_ratio"]
            over_zone = np.linalg.norm(self._target[:2] - goal[:2]) < 1e-3
            if over_zone and cube[2] - CUBE_HALF <= RELEASE_HEIGHT:
                self.phase, self._wait = "release", 0
                # stop where the TCP is (not at the pressing target): the open pads must not slide to the table
                self._target[2] = max(self._target[2], ee[2])
        if self.phase == "release":
            goal = self._target.copy()  # the gripper opens from the next step, once the TCP has been stopped
            self._wait += 1
            if self._wait > s["release_steps"]:
                self.phase = "retreat"
        if self.phase == "retreat":
            goal = np.array([self._target[0], self._target[1], s["approach_height"]])

        step = goal - self._target
        dist = np.linalg.norm(step)
        max_step = speed * dt
        self._target = goal.copy() if dist <= max_step else self._target + step * (max_step / dist)
        return np.append(self._target, grip).astype(np.float32)

    def _arrived(self, goal: np.ndarray, ee: np.ndarray, tol: float) -> bool:
        """The commanded target has reached ``goal`` and the TCP is within ``tol`` metres of it."""
        return bool(np.linalg.norm(self._target - goal) < 1e-3 and np.linalg.norm(ee - goal) < tol)
