"""Differentiable, batched torch model of the PickPlace arm's commanded motion and its speed signal.

The env (:mod:`stlflow.envs.pickplace`) moves the servo set-point linearly from the previous TCP target to the new
one within each 0.1 s step, and stiff position servos make the TCP follow it. The model is that set-point path:

    state0 (B, 3)            the current set-point (observation ``ee_target``, the last commanded target)
    sp_k = clip(a_k[:3], WORKSPACE_LOW, WORKSPACE_HIGH)          the env's clip of each target
    v_k  = (sp_k - sp_{k-1}) / dt                                 the set-point velocity during step k
    states (B, H, 6) = [sp_k, v_k]

and its signal ``ee_speed`` = |v_k| stands for the TCP speed the env's speed rule ``G(ee_speed <= {v_max})``
reads. The servo's lag and overshoot are not modelled; ``tests/test_pickplace.py`` measures the gap on replayed
scripted episodes in MuJoCo (the realised top speed is within a few per cent of the commanded one).

Only the speed rule is modelled: the clearance signal depends on where the cube is, which moves once grasped, and
placing is decided far beyond one chunk. This is the model STL guidance uses on PickPlace
(:func:`stlflow.pipeline.pickplace_guidance`); the gripper channel passes through untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stlflow.envs.pickplace import OBS_DIM, OBS_INDEX, WORKSPACE_HIGH, WORKSPACE_LOW

DT = 0.1  # s per env step (the env's frame_skip x timestep; tests check they agree)
STATE_DIM = 6


class PickPlaceKinematics:
    """Batched set-point model (see the module docstring). Stateless; any dtype/device."""

    dt = DT
    state_dim = STATE_DIM
    control_dim = 4
    low = torch.as_tensor(WORKSPACE_LOW, dtype=torch.float64)
    high = torch.as_tensor(WORKSPACE_HIGH, dtype=torch.float64)

    @staticmethod
    def state_from_obs(obs: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Observations (..., 22) -> start states (..., 3): the set-point the next target moves from."""
        obs = torch.as_tensor(obs)
        if obs.shape[-1] != OBS_DIM:
            raise ValueError(f"obs must end in {OBS_DIM} features; got shape {tuple(obs.shape)}")
        return obs[..., OBS_INDEX["ee_target"]]

    def rollout(self, state0: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
        """Set-points and their velocities after each control: state0 (B, 3), controls (B, H, 4) -> (B, H, 6)."""
        if state0.ndim != 2 or state0.shape[-1] != 3:
            raise ValueError(f"state0 must be shaped (B, 3); got {tuple(state0.shape)}")
        if controls.ndim != 3 or controls.shape[-1] != self.control_dim or controls.shape[0] != state0.shape[0]:
            raise ValueError(f"controls must be shaped (B={state0.shape[0]}, H, {self.control_dim}); "
                             f"got {tuple(controls.shape)}")
        sp = torch.clamp(controls[..., :3], self.low.to(controls), self.high.to(controls))
        prev = torch.cat([state0[:, None, :].to(sp), sp[:, :-1]], dim=1)
        return torch.cat([sp, (sp - prev) / self.dt], dim=-1)

    @staticmethod
    def signals(states: torch.Tensor, context: Any = None) -> dict[str, torch.Tensor]:
        """``ee_speed`` (B, H) of model states (B, H, 6), differentiable (smoothed at 0 so its gradient exists)."""
        if states.ndim != 3 or states.shape[-1] != STATE_DIM:
            raise ValueError(f"states must be shaped (B, H, {STATE_DIM}); got {tuple(states.shape)}")
        return {"ee_speed": torch.sqrt(states[..., 3:].pow(2).sum(-1) + 1e-12)}
