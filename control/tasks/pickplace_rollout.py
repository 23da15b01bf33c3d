"""PickPlace rollouts of many control sequences at once with MuJoCo's native multi-threaded ``mujoco.rollout``.

The cross-entropy augmentation of PickPlace has no model but MuJoCo itself: every candidate is the env stepped
from the demonstration's start state. ``PickPlaceEnv.step`` sets its motor targets open loop (the TCP set-point
moves linearly from the previous target to the new one over the step's 25 sub-steps; the fingers get the open or
closed target), so a whole control sequence is a fixed sub-step control array that ``mujoco.rollout`` integrates
with the same model and integrator, from the same full state and solver warm start, in C threads.
:func:`rollout_states` returns what ``PickPlaceAugmentation``'s step-by-step rollout returns (TCP position, then
the STL signals of each step's observation), and ``tests/test_augment_batched.py`` checks that they are equal.
"""

from __future__ import annotations

from typing import Any

import mujoco
import numpy as np
from mujoco import rollout as mj_rollout

from stlflow.envs.pickplace import (
    GRIP_CLOSED,
    GRIP_OPEN,
    OBS_DIM,
    OBS_INDEX,
    WORKSPACE_HIGH,
    WORKSPACE_LOW,
    pickplace_signals,
)

__all__ = ["rollout_states"]


def _offsets(model: Any) -> dict[str, int]:
    """Where qpos and qvel start in a FULLPHYSICS state vector (what ``mujoco.rollout`` returns)."""
    s = mujoco.mjtState
    return {"qpos": mujoco.mj_stateSize(model, s.mjSTATE_TIME),
            "qvel": mujoco.mj_stateSize(model, s.mjSTATE_TIME | s.mjSTATE_QPOS)}


def rollout_states(env: Any, state0: np.ndarray, controls: np.ndarray, signals: tuple[str, ...], threads: int = 1
                   ) -> np.ndarray:
    """States (B, H, 3 + len(signals)) of ``controls (B, H, 4)`` run from ``env.set_state(state0)`` for H steps
    each (no early stop): the TCP position (m) and the named STL signals of each step's observation, float64.
    ``env`` is left at ``state0``."""
    u = env.unwrapped
    m, frame_skip = u.model, int(u.frame_skip)
    u.set_state(state0)
    full = np.empty(mujoco.mj_stateSize(m, mujoco.mjtState.mjSTATE_FULLPHYSICS))
    mujoco.mj_getState(m, u.data, full, mujoco.mjtState.mjSTATE_FULLPHYSICS)
    warm = u.data.qacc_warmstart.copy()
    a = np.asarray(controls, dtype=np.float64)
    n, horizon = a.shape[:2]
    goal = np.clip(a[..., :3], WORKSPACE_LOW, WORKSPACE_HIGH)  # (B, H, 3) the env clips the targets
    start = np.concatenate([np.broadcast_to(u.data.ctrl[:3], (n, 1, 3)), goal[:, :-1]], axis=1)
    frac = np.arange(1, frame_skip + 1) / frame_skip
    ctrl = np.empty((n, horizon, frame_skip, m.nu))
    ctrl[..., :3] = start[:, :, None] + frac[None, None, :, None] * (goal - start)[:, :, None]
    ctrl[..., 3:5] = np.where(a[..., 3] > 0.0, GRIP_CLOSED, GRIP_OPEN)[..., None, None]
    datas = [mujoco.MjData(m) for _ in range(max(1, int(threads)))]
    state, _ = mj_rollout.rollout(m, datas, np.broadcast_to(full, (n, full.size)).copy(),
                                  ctrl.reshape(n, horizon * frame_skip, m.nu), nstep=horizon * frame_skip,
                                  initial_warmstart=np.broadcast_to(warm, (n, warm.size)).copy())
    end = state[:, frame_skip - 1 :: frame_skip]  # (B, H, nstate) after each env step
    off = _offsets(m)
    qpos, qvel = end[..., off["qpos"] : off["qpos"] + m.nq], end[..., off["qvel"] : off["qvel"] + m.nv]
    mocap = u.data.mocap_pos.copy()  # zones: not part of the physics state (their geoms do not collide)
    c = u._cube_qadr
    obs = np.zeros((n, horizon, OBS_DIM))
    obs[..., OBS_INDEX["ee_pos"]] = qpos[..., u._ee_qadr]
    obs[..., OBS_INDEX["ee_vel"]] = qvel[..., u._ee_vadr]
    obs[..., OBS_INDEX["grip"]] = qpos[..., u._finger_qadr].sum(-1, keepdims=True)
    obs[..., OBS_INDEX["cube_pos"]] = qpos[..., c : c + 3]
    quat = qpos[..., c + 3 : c + 7]
    obs[..., OBS_INDEX["cube_quat"]] = np.where(quat[..., :1] >= 0, quat, -quat)
    obs[..., OBS_INDEX["zone_left"]] = mocap[u._zone_mocap[0], :2]
    obs[..., OBS_INDEX["zone_right"]] = mocap[u._zone_mocap[1], :2]
    obs[..., OBS_INDEX["ee_target"]] = goal
    obs[..., OBS_INDEX["grip_cmd"]] = np.where(a[..., 3:4] > 0.0, 1.0, -1.0)
    obs = obs.astype(np.float32)  # the env's observations are float32, its signals are computed from them
    sig = pickplace_signals(obs)
    return np.concatenate([obs[..., :3].astype(np.float64), np.stack([sig[k] for k in signals], -1)], -1)
