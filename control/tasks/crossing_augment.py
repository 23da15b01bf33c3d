"""Crossing augmentation in batches: many demonstrations' windows as one tensor program, many replays at once.

- :func:`stack_windows`: the :class:`~stlflow.datasets.augment_optim.WindowBatch` of several Crossing windows
  (each row rolled out from its own demonstration's start state, its signals against its own pedestrians).
- :func:`drive_rollout`: :meth:`stlflow.envs.crossing_dynamics.CrossingDynamics.rollout` with the sequential
  part (the acceleration-limited speed and turn-rate updates) as one autograd function that loops in numpy, forward
  and backward: the same numbers (to float round-off), a fraction of the per-step cost of torch's autograd.
- the batch's ``replay`` runs :func:`stlflow.control.tasks.crossing_replay.replay_batch` (MuJoCo's multi-threaded
  ``rollout``, every result verified against the env's own step).

Imported by :class:`stlflow.control.tasks.crossing.CrossingAugmentation` when it augments (this module imports
torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stlflow.datasets.augment_optim import WindowBatch
from stlflow.envs.crossing import ACCEL_V, ACCEL_W, DT, SUBSTEPS
from stlflow.envs.crossing_dynamics import CrossingContext, CrossingDynamics

__all__ = ["drive_rollout", "stack_windows"]


class _DriveScan(torch.autograd.Function):
    """``s_{k+1} = s_k + c tanh((u_k - s_k) / c)`` over k < H for s = (v, omega), c = (ACCEL_V, ACCEL_W) dt.

    Inputs ``s0 (B, 2)``, ``u (B, H, 2)`` (already clipped), ``c (2,)``; outputs ``prev (B, H, 2)`` = s_k (the
    state before step k) and ``d (B, H, 2)`` = s_{k+1} - s_k. Backward is the adjoint recursion: with
    a = dL/dd_k + λ_{k+1} and g = a (1 - tanh²): dL/du_k = g, λ_k = dL/dprev_k + λ_{k+1} - g.
    """

    @staticmethod
    def forward(ctx: Any, s0: torch.Tensor, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        un = np.ascontiguousarray(u.detach().numpy().transpose(1, 0, 2))  # (H, B, 2), time-major
        cn = c.detach().numpy()
        s = s0.detach().numpy().copy()
        prev, tanh, d = np.empty_like(un), np.empty_like(un), np.empty_like(un)
        for k in range(un.shape[0]):
            prev[k] = s
            np.subtract(un[k], s, out=tanh[k])
            np.divide(tanh[k], cn, out=tanh[k])
            np.tanh(tanh[k], out=tanh[k])
            np.multiply(cn, tanh[k], out=d[k])
            s += d[k]
        ctx.save_for_backward(torch.from_numpy(tanh))
        return torch.from_numpy(prev).permute(1, 0, 2), torch.from_numpy(d).permute(1, 0, 2)

    @staticmethod
    def backward(ctx: Any, g_prev: torch.Tensor, g_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (tanh,) = ctx.saved_tensors
        sech2 = 1.0 - tanh.numpy() ** 2  # (H, B, 2)
        gp = np.ascontiguousarray(g_prev.numpy().transpose(1, 0, 2)) if g_prev is not None else np.zeros_like(sech2)
        gd = np.ascontiguousarray(g_d.numpy().transpose(1, 0, 2)) if g_d is not None else np.zeros_like(sech2)
        gu = np.empty_like(sech2)
        lam = np.zeros_like(sech2[0])
        for k in range(sech2.shape[0] - 1, -1, -1):
            np.add(gd[k], lam, out=gu[k])
            gu[k] *= sech2[k]
            lam += gp[k]
            lam -= gu[k]
        return torch.from_numpy(lam), torch.from_numpy(gu).permute(1, 0, 2), None


class _StepSums(torch.autograd.Function):
    """Per control step, the sums over its K sub-steps ``sx = sum_i v_i cos(yaw_i)`` and ``sy = sum_i v_i sin(yaw_i)``
    with ``v_i = p + d i/K`` and ``yaw_i = Y + h (w i + e i (i + 1) / 2K)``, i = 1..K.

    Inputs (B, H) each: ``Y`` yaw at the step's start, ``p``/``d`` speed before the step and its change, ``w``/``e``
    turn rate before the step and its change. Forward keeps the moments of cos and sin against the K-vectors
    (1, i/K, i, i^2/K, c_i, c_i i/K) with c_i = i (i + 1) / 2K, so that every input's gradient is a (B, H)
    combination of them: backward never touches a (B, H, K) array.
    """

    @staticmethod
    def forward(ctx: Any, Y: torch.Tensor, p: torch.Tensor, d: torch.Tensor, w: torch.Tensor, e: torch.Tensor,
                h: float) -> tuple[torch.Tensor, torch.Tensor]:
        K = SUBSTEPS
        i = torch.arange(1, K + 1, dtype=Y.dtype)
        c = i * (i + 1) / (2 * K)
        weights = torch.stack([torch.ones_like(i), i / K, i, i * i / K, c, c * i / K], dim=1)  # (K, 6)
        yaw = Y[..., None] + h * (w[..., None] * i + e[..., None] * c)  # (B, H, K)
        mc = torch.cos(yaw) @ weights  # (B, H, 6)
        ms = torch.sin(yaw) @ weights
        ctx.save_for_backward(p, d, mc, ms)
        ctx.h = h
        return p * mc[..., 0] + d * mc[..., 1], p * ms[..., 0] + d * ms[..., 1]

    @staticmethod
    def backward(ctx: Any, gx: torch.Tensor, gy: torch.Tensor) -> tuple:
        p, d, mc, ms = ctx.saved_tensors
        gx = torch.zeros_like(p) if gx is None else gx
        gy = torch.zeros_like(p) if gy is None else gy
        # d/dv_i: gx cos + gy sin; d/dyaw_i: v_i (gy cos - gx sin), v_i = p + d i/K
        turn = gy[..., None] * mc - gx[..., None] * ms  # (B, H, 6): moments of (gy cos - gx sin)
        g_p = gx * mc[..., 0] + gy * ms[..., 0]
        g_d = gx * mc[..., 1] + gy * ms[..., 1]
        g_Y = p * turn[..., 0] + d * turn[..., 1]
        g_w = ctx.h * (p * turn[..., 2] + d * turn[..., 3])
        g_e = ctx.h * (p * turn[..., 4] + d * turn[..., 5])
        return g_Y, g_p, g_d, g_w, g_e, None


def drive_rollout(state0: torch.Tensor, controls: torch.Tensor, model: CrossingDynamics) -> torch.Tensor:
    """States after each control (B, H, 5) from ``state0 (B, 5)`` and ``controls (B, H, 2)``, as
    ``model.rollout`` computes them (the same equations, summed in another order; differentiable; controls
    clipped to the model's bounds)."""
    if model.substeps != SUBSTEPS:
        raise ValueError(f"drive_rollout integrates the env's {SUBSTEPS} sub-steps; the model has {model.substeps}")
    lo, hi = model.control_low.to(controls), model.control_high.to(controls)
    u = torch.minimum(torch.maximum(controls, lo), hi)
    c = torch.tensor([ACCEL_V * DT, ACCEL_W * DT], dtype=controls.dtype)
    prev, d = _DriveScan.apply(state0[:, 3:5].contiguous(), u.contiguous(), c)
    K, h = SUBSTEPS, DT / SUBSTEPS
    p, dv, w, dw = prev[..., 0], d[..., 0], prev[..., 1], d[..., 1]
    turn = h * (K * w + dw * (K + 1) / 2)  # (B, H) yaw change over each step: h sum_i (w + dw i/K)
    start = state0[:, 2, None] + torch.cumsum(turn, dim=1) - turn  # (B, H) yaw at the start of each step
    sx, sy = _StepSums.apply(start, p, dv, w, dw, h)
    x = state0[:, 0, None] + h * torch.cumsum(sx, dim=1)
    y = state0[:, 1, None] + h * torch.cumsum(sy, dim=1)
    return torch.stack([x, y, start + turn, p + dv, w + dw], dim=-1)


def stack_windows(windows: Sequence[Any], replay_threads: int = 1) -> WindowBatch:
    """One :class:`WindowBatch` of Crossing windows (``DemoWindow.data`` holds each window's ``state0`` (1, 5),
    ``ctx`` (:class:`CrossingContext`, batch 1), ``ped0`` (1, H, 2), ``dir_y`` and ``replay_scene``)."""
    horizons = sorted({w.horizon for w in windows})
    if len(horizons) != 1:
        raise ValueError(f"Crossing windows of one batch must share their horizon; got {horizons}")
    if SUBSTEPS != CrossingDynamics().substeps:
        raise RuntimeError("the env's and the model's sub-steps differ")
    data = [w.data for w in windows]
    model = CrossingDynamics()
    state0 = torch.cat([x["state0"] for x in data])  # (N, 5)
    ped_pos = torch.cat([x["ctx"].ped_pos for x in data])  # (N, H, P, 2)
    present = torch.cat([x["ctx"].ped_present for x in data])  # (N, P)
    goal = torch.cat([x["ctx"].goal for x in data])  # (N, 2)
    ped0 = torch.cat([x["ped0"] for x in data])  # (N, H, 2)
    dir_y = torch.tensor([x["dir_y"] for x in data], dtype=state0.dtype)  # (N,)
    scenes = [x["replay_scene"] for x in data]

    def rollout(controls: torch.Tensor, demo: torch.Tensor) -> torch.Tensor:
        return drive_rollout(state0[demo], controls, model)

    def signals(states: torch.Tensor, demo: torch.Tensor) -> dict[str, torch.Tensor]:
        sig = model.signals(states, CrossingContext(ped_pos[demo], present[demo], goal[demo]))
        sig["ped_dx"] = states[..., 0] - ped0[demo, :, 0]
        sig["ped_ahead"] = (states[..., 1] - ped0[demo, :, 1]) * dir_y[demo, None]
        return sig

    def replay(items: list[tuple[int, np.ndarray]]) -> list[Any]:
        from stlflow.control.tasks.crossing_replay import replay_batch

        return replay_batch([(scenes[i], c) for i, c in items], threads=replay_threads)

    return WindowBatch(horizons[0], rollout, signals, lambda states: states[..., :2], replay)
