"""Many Crossing replays at once in MuJoCo: :func:`replay_batch`, the parallel counterpart of
:func:`stlflow.control.tasks.replay.replay_controls` (same :class:`~stlflow.datasets.augment.ReplayResult` s).

The env's drive (``CrossingEnv.step``) sets the motor forces of each 0.01 s sub-step from the measured joint
velocities, ``M (target - qvel) / h``, so that the velocities hit the acceleration-limited targets exactly. When
they do, the measured velocities ARE the previous targets, so the forces of a whole episode follow from the
controls alone: this module computes them (the env's equations, float64), integrates every episode with
``mujoco.rollout`` (MuJoCo's native multi-threaded rollout; the same model, integrator and sub-steps), and then
**verifies** each episode: the joint velocities of every sub-step must equal the targets (to ``TRACK_TOL``) and the
robot must stay ``WALL_TOL`` clear of every wall (wall contact is the one force the targets do not include). An
episode that fails the check is replayed through the env itself (``replay_controls``), so every result is the
env's. Observations, signals, pedestrian contact and termination are then read from the MuJoCo states exactly as
the env computes them (``tests/test_augment_batched.py`` compares every field with the env's own replay).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mujoco
import numpy as np
from mujoco import rollout as mj_rollout

from stlflow.control.tasks.replay import replay_controls
from stlflow.envs.crossing import (
    ACCEL_V,
    ACCEL_W,
    CONTACT_DISTANCE,
    DT,
    GOAL_RADIUS,
    HALF_WIDTH,
    I_PEDS,
    N_PEDS,
    OBS_DIM,
    PED_STRIDE,
    ROBOT_RADIUS,
    SUBSTEPS,
    signals_from_obs,
)

__all__ = ["TRACK_TOL", "WALL_TOL", "replay_batch"]

TRACK_TOL = 1e-6  # m/s, rad/s: sub-step joint velocities must equal the targets this closely
WALL_TOL = 1e-3  # m: closer than this to a wall, the episode is replayed through the env instead
WALL_X = (-1.0, 10.5)  # m: inner faces of the back and end walls (assets/crossing.xml)


def replay_batch(items: Sequence[tuple[tuple[Any, int, float], np.ndarray]], threads: int = 1,
                 stats: dict[str, int] | None = None) -> list[Any]:
    """Replay ``items`` = ``[((env, seed, dir_y), controls (H, 2)), ...]`` from ``env.reset(seed)`` each; returns
    one ReplayResult per item (with the mode signals ``ped_dx``, ``ped_ahead``), as
    ``CrossingAugmentation.window(...).replay`` would. ``threads``: MuJoCo rollout threads. ``stats`` (optional)
    counts ``rollout`` and ``fallback`` episodes."""
    if not items:
        return []
    scenes = [_scene(env, seed) for (env, seed, _), _ in items]
    actions = [np.asarray(c, dtype=np.float32) for _, c in items]  # what the control loop's Playback sends
    env0 = items[0][0][0].unwrapped
    model = env0.model
    horizon = max(len(a) for a in actions)
    u = np.stack([np.concatenate([a, np.repeat(a[-1:], horizon - len(a), 0)]) for a in actions]).astype(np.float64)
    u = np.clip(u, env0.action_space.low, env0.action_space.high)
    ctrl, targets = _open_loop_forces(np.stack([s["qpos"] for s in scenes]), u, env0._mass, float(model.opt.timestep))
    state0 = np.stack([s["state"] for s in scenes])
    datas = [mujoco.MjData(model) for _ in range(max(1, int(threads)))]
    state, _ = mj_rollout.rollout(model, datas, state0, ctrl, nstep=ctrl.shape[1])
    nq, nv = model.nq, model.nv
    qpos, qvel = state[..., 1 : 1 + nq], state[..., 1 + nq : 1 + nq + nv]  # (N, H*K, .)
    out = []
    for n, ((env, seed, dir_y), controls) in enumerate(items):
        result = _episode(scenes[n], actions[n], qpos[n], qvel[n], targets[n], dir_y, env.unwrapped.max_steps)
        if result is None:  # not verified: the env itself decides
            result, ep = replay_controls(env, seed, controls)
            from stlflow.control.tasks.crossing import CrossingAugmentation

            result.signals.update(CrossingAugmentation.mode_signals_from_obs(ep.obs[1:], dir_y))
        if stats is not None:
            key = "rollout" if result.attrs.get("replayed_by") == "rollout" else "fallback"
            stats[key] = stats.get(key, 0) + 1
        result.attrs.pop("replayed_by", None)
        out.append(result)
    return out


def _scene(env: Any, seed: int) -> dict[str, Any]:
    """The env reset to ``seed``: MuJoCo's full physics state, qpos, the pedestrians' script, the goal, obs0."""
    obs0, _ = env.reset(seed=int(seed))
    u = env.unwrapped
    state = np.empty(mujoco.mj_stateSize(u.model, mujoco.mjtState.mjSTATE_FULLPHYSICS))
    mujoco.mj_getState(u.model, u.data, state, mujoco.mjtState.mjSTATE_FULLPHYSICS)
    return {"state": state, "qpos": u.data.qpos.copy(), "peds": u.peds, "goal": u.goal.copy(), "obs0": obs0}


def _open_loop_forces(qpos0: np.ndarray, u: np.ndarray, mass: np.ndarray, h: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Motor forces (N, H*K, 3) and joint-velocity targets (N, H*K, 3) of the env's drive for clipped controls
    ``u (N, H, 2)`` from rest at ``qpos0 (N, 3)``, assuming the velocities track their targets (verified later)."""
    n, horizon = u.shape[:2]
    frac = np.arange(1, SUBSTEPS + 1) / SUBSTEPS
    cv, cw = ACCEL_V * DT, ACCEL_W * DT
    v, w, yaw = np.zeros(n), np.zeros(n), qpos0[:, 2].copy()
    targets = np.empty((n, horizon, SUBSTEPS, 3))
    for k in range(horizon):
        v_k = v[:, None] + cv * np.tanh((u[:, k, 0] - v) / cv)[:, None] * frac
        w_k = w[:, None] + cw * np.tanh((u[:, k, 1] - w) / cw)[:, None] * frac
        yaw_k = yaw[:, None] + h * np.cumsum(w_k, axis=1)
        targets[:, k] = np.stack([v_k * np.cos(yaw_k), v_k * np.sin(yaw_k), w_k], axis=-1)
        v, w, yaw = v_k[:, -1], w_k[:, -1], yaw_k[:, -1]
    targets = targets.reshape(n, horizon * SUBSTEPS, 3)
    before = np.concatenate([np.zeros((n, 1, 3)), targets[:, :-1]], axis=1)  # velocities at the start of a sub-step
    return mass * (targets - before) / h, targets


def _episode(scene: dict[str, Any], actions: np.ndarray, qpos: np.ndarray, qvel: np.ndarray, targets: np.ndarray,
             dir_y: float, max_steps: int) -> Any:
    """The ReplayResult of one rolled-out episode, or None when the rollout is not the env's (see the module doc).

    ``qpos``/``qvel``/``targets``: (H*K, .) after each sub-step. The episode ends where the env's would: on a
    pedestrian contact or on reaching the goal, else after the controls (or the env's ``max_steps``)."""
    from stlflow.control.tasks.crossing import CrossingAugmentation
    from stlflow.datasets.augment import ReplayResult

    peds, goal = scene["peds"], scene["goal"]
    h = DT / SUBSTEPS
    limit = min(len(actions), int(max_steps))
    sub_t = h * np.arange(1, limit * SUBSTEPS + 1)  # (L*K,) time after each sub-step
    robot = qpos[: limit * SUBSTEPS, :2]
    ped_xy = peds.position(sub_t)[:, peds.present]  # (L*K, P', 2)
    touch = (np.hypot(*(ped_xy - robot[:, None]).transpose(2, 0, 1)) <= CONTACT_DISTANCE).any(axis=1)
    touch = touch.reshape(limit, SUBSTEPS).any(axis=1)  # (L,) pedestrian contact during step k
    obs = _observations(qpos[SUBSTEPS - 1 :: SUBSTEPS][:limit], qvel[SUBSTEPS - 1 :: SUBSTEPS][:limit], peds, goal)
    sig = signals_from_obs(obs)
    collided = np.cumsum(touch) > 0
    reached = (sig["dist_goal"] <= GOAL_RADIUS) & ~collided
    ends = np.flatnonzero(collided | reached)
    length = int(ends[0]) + 1 if len(ends) else limit
    n_sub = length * SUBSTEPS
    wall_gap = np.minimum(HALF_WIDTH - np.abs(qpos[:n_sub, 1]),
                          np.minimum(qpos[:n_sub, 0] - WALL_X[0], WALL_X[1] - qpos[:n_sub, 0])) - ROBOT_RADIUS
    if np.abs(qvel[:n_sub] - targets[:n_sub]).max() > TRACK_TOL or wall_gap.min() <= WALL_TOL:
        return None
    all_obs = np.concatenate([scene["obs0"][None], obs[:length]])
    signals = {k: v[:length].astype(np.float64) for k, v in sig.items()}
    signals.update(CrossingAugmentation.mode_signals_from_obs(all_obs[1:], dir_y))
    success = bool(reached[length - 1])
    return ReplayResult(obs=all_obs[:-1].astype(np.float32), action=actions[:length].copy(), signals=signals,
                        collision=bool(collided[length - 1]),
                        attrs={"success": success, "length": length, "replayed_by": "rollout"})


def _observations(qpos: np.ndarray, qvel: np.ndarray, peds: Any, goal: np.ndarray) -> np.ndarray:
    """The env's observations (L, OBS_DIM) float32 after steps 1..L from the joint states at the end of each step
    (the layout of ``stlflow.envs.crossing``'s module docstring)."""
    n = len(qpos)
    t = DT * np.arange(1, n + 1)
    x, y, yaw = qpos[:, 0], qpos[:, 1], qpos[:, 2]
    obs = np.zeros((n, OBS_DIM))
    obs[:, 0], obs[:, 1], obs[:, 2], obs[:, 3] = x, y, np.cos(yaw), np.sin(yaw)
    obs[:, 4] = qvel[:, 0] * np.cos(yaw) + qvel[:, 1] * np.sin(yaw)
    obs[:, 5] = qvel[:, 2]
    obs[:, 6], obs[:, 7] = goal[0] - x, goal[1] - y
    obs[:, 8], obs[:, 9] = HALF_WIDTH - y, HALF_WIDTH + y
    pos, vel = peds.position(t), peds.velocity(t)  # (L, P, 2)
    for i in range(N_PEDS):
        if peds.present[i]:
            j = I_PEDS + i * PED_STRIDE
            obs[:, j] = 1.0
            obs[:, j + 1], obs[:, j + 2] = pos[:, i, 0] - x, pos[:, i, 1] - y
            obs[:, j + 3], obs[:, j + 4] = vel[:, i, 0], vel[:, i, 1]
    return obs.astype(np.float32)
