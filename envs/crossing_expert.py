"""The scripted expert of the Crossing task (:class:`CrossingExpert`): five behaviour modes, a per-episode style.

It reads the env's pedestrian scripts (privileged information, as a demonstrator would have); the env builds it
with :meth:`stlflow.envs.crossing.CrossingEnv.make_expert`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stlflow.envs.crossing import ACCEL_V, CONTACT_DISTANCE, DT, I_COS, I_SIN, I_V, I_X, I_Y, W_BOUNDS, CrossingEnv

MODES = ("yield", "front", "behind", "left", "right")
# Per-mode style ranges: cruise speed (m/s), clearance kept to pedestrians (m), lateral lane offset (m, +y = left).
STYLE_RANGES = {
    "yield": {"v_cruise": (0.7, 1.1), "clearance": (0.6, 1.0), "lane": (-0.3, 0.3)},
    "front": {"v_cruise": (1.3, 1.45), "clearance": (0.45, 0.8), "lane": (-0.3, 0.3)},
    "behind": {"v_cruise": (0.7, 1.1), "clearance": (0.45, 0.8), "lane": (-0.3, 0.3)},
    "left": {"v_cruise": (0.8, 1.2), "clearance": (0.5, 0.9), "lane": (0.8, 1.2)},
    "right": {"v_cruise": (0.8, 1.2), "clearance": (0.5, 0.9), "lane": (-1.2, -0.8)},
}


class CrossingExpert:
    """Scripted expert with five behaviour modes; reads the env's pedestrian scripts (privileged).

    Modes (drawn uniformly from ``seed``): ``yield`` (stop before the first pedestrian's path and wait
    until it has passed), ``front`` (drive fast and pass before it), ``behind`` (slow down early so as to
    cross its path just after it, without stopping), ``left`` / ``right`` (swerve to a large lateral offset
    on that side, +y = left, and pass there). ``style`` (also from ``seed``): cruise speed ``v_cruise`` (m/s),
    the clearance it keeps to pedestrians ``clearance`` (m), lateral offset ``lane`` (m) and steering gain.

    How it drives: it follows a lateral reference path y_ref(x) with a heading controller, and picks its
    speed each step as the fastest of a grid of constant speeds whose predicted path keeps ``clearance``
    from every pedestrian over the next 6 s (and, in ``behind``/``yield``, does not cross the first
    pedestrian's path before it has gone by).
    """

    def __init__(self, env: CrossingEnv, seed: int) -> None:
        self.env = env.unwrapped if hasattr(env, "unwrapped") else env
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self.mode = str(MODES[rng.integers(len(MODES))])
        ranges = STYLE_RANGES[self.mode]
        self.style: dict[str, Any] = {k: float(rng.uniform(*ranges[k])) for k in ("v_cruise", "clearance", "lane")}
        self.style["k_lat"] = float(rng.uniform(1.0, 2.0))
        self._plan_episode = -1

    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        """Start a new episode (the expert's plan depends on its construction seed alone; ``seed``/``obs`` are
        accepted for the controller contract)."""
        self._plan_episode = -1

    # ------------------------------------------------------------------ plan
    def _plan(self) -> None:
        """Per-episode quantities from the env's scenario: the gate (x limit until a time) in yield/behind."""
        env, st = self.env, self.style
        peds = env.peds
        self._plan_episode = env.episode_id
        self._x0, self._y0 = float(env.data.qpos[0]), float(env.data.qpos[1])
        # Where pedestrian 0's path crosses the robot's lane, and when it is clear of it.
        d, a = peds.direction[0], peds.start[0]
        s_lane = (st["lane"] - a[1]) / d[1]
        self._x_cross = float(a[0] + s_lane * d[0])
        self._x_gate = self._x_cross - (CONTACT_DISTANCE + st["clearance"] + 0.1)
        s_clear = s_lane + (CONTACT_DISTANCE + st["clearance"] + 0.15) / abs(d[1])
        self._t_open = float(peds.t0[0] + s_clear / peds.speed[0])
        self._x_lane_in = self._x_cross - 2.5
        self._x_lane_out = self._x_cross + 1.5

    def _y_ref(self, x: np.ndarray) -> np.ndarray:
        """Reference lateral position (m) at corridor positions ``x`` (m): start -> lane -> goal, smoothstep blends."""
        st, gy = self.style, self.env.goal[1]
        x = np.asarray(x, dtype=float)

        def blend(x, xa, xb):
            u = np.clip((x - xa) / max(xb - xa, 1e-6), 0.0, 1.0)
            return u * u * (3 - 2 * u)

        into = blend(x, max(self._x_lane_in - 2.5, self._x0 + 0.3), max(self._x_lane_in, self._x0 + 2.8))
        out = blend(x, self._x_lane_out, 8.3)
        return (1 - out) * ((1 - into) * self._y0 + into * st["lane"]) + out * gy

    def _speed(self, x: float, y: float, v: float) -> float:
        """The fastest safe constant speed (m/s) from a grid, by forward prediction along y_ref."""
        env, st = self.env, self.style
        t_now = env.time
        cands = np.linspace(0.0, st["v_cruise"], 12)
        times = DT * np.arange(1, 61)  # 6 s ahead
        # Speed ramps from v to each candidate at the acceleration limit.
        gap_v = cands[:, None] - v
        vel = v + np.sign(gap_v) * np.minimum(np.abs(gap_v), ACCEL_V * times)  # (C, T)
        xs = x + np.cumsum(vel, axis=1) * DT  # (C, T)
        err0 = y - float(self._y_ref(x))
        ys = self._y_ref(xs) + err0 * np.exp(-times * st["k_lat"])
        ped = env.peds.position(t_now + times)  # (T, P, 2)
        gap = np.hypot(xs[..., None] - ped[None, :, :, 0], ys[..., None] - ped[None, :, :, 1]) - CONTACT_DISTANCE
        gap = np.where(env.peds.present, gap, np.inf).min(axis=(1, 2))  # (C,)
        ok = gap >= st["clearance"]
        if self.mode == "behind" and t_now < self._t_open:
            # Time the approach so as to reach the first pedestrian's path only once it has gone by.
            ok &= np.all((xs <= self._x_gate) | (t_now + times >= self._t_open), axis=1)
        if self.mode == "yield" and t_now < self._t_open:
            # Brake to a standstill at the gate and wait there until the pedestrian has passed.
            cap = math.sqrt(max(2 * 0.8 * ACCEL_V * (self._x_gate - x), 0.0))
            ok &= cands <= cap + 1e-9
        if ok.any():
            return float(cands[ok].max())
        return float(cands[np.argmax(gap)])

    # ------------------------------------------------------------------ act
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Action (v m/s, omega rad/s) float32 (2,) for observation ``obs`` (OBS_DIM,)."""
        env, st = self.env, self.style
        if self._plan_episode != env.episode_id:
            self._plan()
        x, y = float(obs[I_X]), float(obs[I_Y])
        yaw = math.atan2(obs[I_SIN], obs[I_COS])
        v = float(obs[I_V])
        if x > 8.3:  # final approach: head for the goal
            heading = math.atan2(env.goal[1] - y, env.goal[0] - x)
        else:
            slope = (float(self._y_ref(x + 0.05)) - float(self._y_ref(x - 0.05))) / 0.1
            heading = math.atan(slope) + math.atan(st["k_lat"] * (float(self._y_ref(x)) - y))
        err = (heading - yaw + math.pi) % (2 * math.pi) - math.pi
        omega = float(np.clip(3.0 * err, *W_BOUNDS))
        speed = self._speed(x, y, v) * max(math.cos(err), 0.0)
        return np.array([speed, omega], dtype=np.float32)
