"""Differentiable, batched torch model of the Crossing robot and its STL signals.

The model is the env's drive equations (:mod:`stlflow.envs.crossing`), written in torch so that STL
augmentation can optimise controls through it. State (B, 5): ``x, y`` (m), ``yaw`` (rad, unwrapped),
``v`` forward speed (m/s), ``omega`` yaw rate (rad/s). Control (B, 2): ``v_cmd`` (m/s), ``omega_cmd``
(rad/s). One control step of ``dt`` = 0.1 s:

    dv = ACCEL_V dt tanh((v_cmd - v) / (ACCEL_V dt))        (smooth, |dv| <= ACCEL_V dt; likewise omega)
    for k = 1..K (K = SUBSTEPS, h = dt / K):  v_k = v + dv k/K,  omega_k = omega + domega k/K,
        yaw_k = yaw_{k-1} + h omega_k,  (x, y)_k = (x, y)_{k-1} + h v_k (cos yaw_k, sin yaw_k)

which is exactly what the MuJoCo robot does (its internal controller makes the joint velocities hit
these targets at every Euler sub-step). The sub-step sums are vectorised (cumulative sums), so a
rollout costs H sequential updates of (v, omega) plus a few tensor ops.

Tracking (tested in tests/test_crossing.py): over 50 steps of random controls away from the walls,
the float32 model stays within ``TRACKING_TOL_POS`` = 5 mm and ``TRACKING_TOL_YAW`` = 5 mrad of MuJoCo
(measured errors are below 1e-6: float32 round-off). Wall contact is not modelled.
Cost on one CPU thread (B = 256, H = 50): forward ~10 ms, forward + backward through the signals ~40 ms.

Signals (``signals(states, context)``) are the env's STL signals of those states; the pedestrians'
future positions come from a :class:`CrossingContext`, either privileged (``env.pedestrian_context(H)``)
or read from recorded observations (:meth:`CrossingDynamics.context_from_obs`) -- pedestrians do not
react to the robot, so their recorded positions hold for any robot trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stlflow.envs.crossing import (
    ACCEL_V,
    ACCEL_W,
    CLEARANCE_CAP,
    CONTACT_DISTANCE,
    DT,
    I_COS,
    I_PEDS,
    I_SIN,
    I_V,
    I_W,
    I_X,
    I_Y,
    N_PEDS,
    OBS_DIM,
    PED_STRIDE,
    SUBSTEPS,
    V_BOUNDS,
    W_BOUNDS,
)

STATE_DIM = 5
TRACKING_TOL_POS = 5e-3  # m, over 50 steps
TRACKING_TOL_YAW = 5e-3  # rad, over 50 steps


@dataclass
class CrossingContext:
    """What the signals need besides the robot state, for H future steps.

    ped_pos: (B or 1, H, P, 2) pedestrian positions (m) at the times of the H states.
    ped_present: (B or 1, P) 1.0 where the pedestrian exists, 0.0 where the slot is empty.
    goal: (B or 1, 2) goal position (m).
    """

    ped_pos: torch.Tensor
    ped_present: torch.Tensor
    goal: torch.Tensor

    def to(self, *args, **kwargs) -> CrossingContext:
        return CrossingContext(*(t.to(*args, **kwargs) for t in (self.ped_pos, self.ped_present, self.goal)))


class CrossingDynamics:
    """Batched differentiable robot model (see the module docstring). Stateless; any dtype/device."""

    dt = DT
    state_dim = STATE_DIM
    control_dim = 2
    # float64 so that clipping float64 controls uses the exact bounds (cast down for float32 inputs)
    control_low = torch.tensor([V_BOUNDS[0], W_BOUNDS[0]], dtype=torch.float64)
    control_high = torch.tensor([V_BOUNDS[1], W_BOUNDS[1]], dtype=torch.float64)

    def __init__(self, substeps: int = SUBSTEPS) -> None:
        self.substeps = int(substeps)

    # ------------------------------------------------------------ observations -> model inputs
    @staticmethod
    def state_from_obs(obs: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Observations (..., OBS_DIM) -> states (..., 5): x, y, yaw, v, omega."""
        obs = torch.as_tensor(obs)
        if obs.shape[-1] != OBS_DIM:
            raise ValueError(f"obs must end in {OBS_DIM} features; got shape {tuple(obs.shape)}")
        yaw = torch.atan2(obs[..., I_SIN], obs[..., I_COS])
        return torch.stack([obs[..., I_X], obs[..., I_Y], yaw, obs[..., I_V], obs[..., I_W]], dim=-1)

    @staticmethod
    def context_from_obs(obs: torch.Tensor | np.ndarray) -> CrossingContext:
        """Context from recorded observations (B, H, OBS_DIM) at the times of the H states to evaluate.

        For a rollout from ``obs[:, t]``, pass ``obs[:, t+1 : t+1+H]``.
        """
        obs = torch.as_tensor(obs)
        if obs.ndim != 3 or obs.shape[-1] != OBS_DIM:
            raise ValueError(f"obs must be shaped (B, H, {OBS_DIM}); got {tuple(obs.shape)}")
        robot = obs[..., None, I_X : I_Y + 1]  # (B, H, 1, 2)
        peds = obs[..., I_PEDS:].reshape(*obs.shape[:-1], N_PEDS, PED_STRIDE)
        return CrossingContext(
            ped_pos=robot + peds[..., 1:3],
            ped_present=peds[:, 0, :, 0],
            goal=obs[:, 0, I_X : I_Y + 1] + obs[:, 0, 6:8],
        )

    # ------------------------------------------------------------ dynamics
    def _velocity_updates(self, v: torch.Tensor, w: torch.Tensor, controls: torch.Tensor):
        """Sequential acceleration-limited updates -> (v_prev, w_prev, dv, dw), each (B, H)."""
        cv, cw = ACCEL_V * DT, ACCEL_W * DT
        lo = self.control_low.to(controls)
        hi = self.control_high.to(controls)
        u = torch.minimum(torch.maximum(controls, lo), hi)
        vs, ws, dvs, dws = [], [], [], []
        for k in range(controls.shape[1]):
            dv = cv * torch.tanh((u[:, k, 0] - v) / cv)
            dw = cw * torch.tanh((u[:, k, 1] - w) / cw)
            vs.append(v), ws.append(w), dvs.append(dv), dws.append(dw)
            v, w = v + dv, w + dw
        return torch.stack(vs, 1), torch.stack(ws, 1), torch.stack(dvs, 1), torch.stack(dws, 1)

    def rollout(self, state0: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
        """States after each control: state0 (B, 5), controls (B, H, 2) -> (B, H, 5).

        Controls are clipped to [control_low, control_high] like the env does (the clip passes no
        gradient outside the bounds; penalise out-of-bound controls in the optimiser if needed).
        """
        if state0.ndim != 2 or state0.shape[-1] != STATE_DIM:
            raise ValueError(f"state0 must be shaped (B, {STATE_DIM}); got {tuple(state0.shape)}")
        if controls.ndim != 3 or controls.shape[-1] != 2 or controls.shape[0] != state0.shape[0]:
            raise ValueError(f"controls must be shaped (B={state0.shape[0]}, H, 2); got {tuple(controls.shape)}")
        B, H = controls.shape[:2]
        K, h = self.substeps, DT / self.substeps
        x, y, yaw, v, w = state0.unbind(-1)
        v_prev, w_prev, dv, dw = self._velocity_updates(v, w, controls)
        frac = torch.arange(1, K + 1, dtype=controls.dtype, device=controls.device) / K  # (K,)
        v_k = (v_prev[..., None] + dv[..., None] * frac).reshape(B, H * K)
        w_k = (w_prev[..., None] + dw[..., None] * frac).reshape(B, H * K)
        yaw_k = yaw[:, None] + h * torch.cumsum(w_k, dim=1)
        x_k = x[:, None] + h * torch.cumsum(v_k * torch.cos(yaw_k), dim=1)
        y_k = y[:, None] + h * torch.cumsum(v_k * torch.sin(yaw_k), dim=1)
        end = slice(K - 1, None, K)  # the last sub-step of each control step
        return torch.stack([x_k[:, end], y_k[:, end], yaw_k[:, end], v_k[:, end], w_k[:, end]], dim=-1)

    def step(self, state: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        """One control step: state (B, 5), control (B, 2) -> next state (B, 5)."""
        return self.rollout(state, control[:, None, :])[:, 0]

    # ------------------------------------------------------------ signals
    @staticmethod
    def signals(states: torch.Tensor, context: CrossingContext) -> dict[str, torch.Tensor]:
        """The env's STL signals of model states (B, H, 5) -> {name: (B, H)}, differentiable.

        ``context`` tensors have batch B or 1 (broadcast) and the same H as ``states``.
        """
        if states.ndim != 3 or states.shape[-1] != STATE_DIM:
            raise ValueError(f"states must be shaped (B, H, {STATE_DIM}); got {tuple(states.shape)}")
        if context.ped_pos.shape[1] != states.shape[1]:
            raise ValueError(f"context covers {context.ped_pos.shape[1]} steps but states have {states.shape[1]}")
        ctx = context.to(states)
        pos = states[..., :2]
        rel = ctx.ped_pos - pos[..., None, :]  # (B, H, P, 2)
        gap = torch.sqrt((rel * rel).sum(-1) + 1e-12) - CONTACT_DISTANCE
        present = ctx.ped_present[:, None, :] > 0.5
        gap = torch.where(present, gap, torch.full_like(gap, CLEARANCE_CAP))
        to_goal = ctx.goal[:, None, :] - pos
        return {
            "speed": states[..., 3].abs(),
            "clearance": gap.min(dim=-1).values.clamp(max=CLEARANCE_CAP),
            "lateral": states[..., 1],
            "dist_goal": torch.sqrt((to_goal * to_goal).sum(-1) + 1e-12),
        }
