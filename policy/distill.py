"""Distillation of a one-step MeanFlow policy (the student) from a trained flow policy (the teacher).

Two modes, chosen with ``mode``:

- ``"velocity"``: the teacher's velocity replaces ε - x0 in the MeanFlow loss (same data batches; see
  :meth:`stlflow.policy.meanflow.MeanFlowHead.loss`).
- ``"trajectory"`` (flow-map distillation): each step runs the teacher's sampler (``steps`` solver steps, default
  its own) from fresh noise for ``batch // pairs`` windows of the batch, and regresses the student's average
  velocity on ``pairs`` grid pairs of each path, the first always the one-step jump (t, r) = (1, 0): the student
  learns the teacher's noise-to-chunk map itself, without a JVP.

A :class:`Distiller` is the training-time loss only: the student is an ordinary :class:`Policy` (its checkpoint
holds no teacher), and the teacher is held outside the module tree (not in ``state_dict``, not saved, not
wrapped by DistributedDataParallel). The trainer uses one when ``TrainConfig.teacher`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stlflow.policy.policy import Policy

__all__ = ["DISTIL_MODES", "Distiller"]

DISTIL_MODES = ("velocity", "trajectory")


class Distiller(nn.Module):
    """The distillation loss of a MeanFlow ``student`` from a flow ``teacher``.

    The student is a registered submodule (its parameters are this module's: an optimiser or DDP sees exactly
    them); the teacher is moved to the student's device, frozen and kept outside the module tree.

    Args:
        student: a meanflow :class:`Policy`.
        teacher: a trained flow :class:`Policy` matching the student: same observation/action sizes, To, Tp, θ
            names, discrete scaling and normaliser (the two flows must share one noise space).
        mode: ``"velocity"`` or ``"trajectory"`` (see the module docstring).
        pairs: trajectory mode: grid pairs per teacher path (``batch // pairs`` paths per batch).
        steps: trajectory mode: teacher solver steps per path (None: the teacher's default).
    """

    def __init__(self, student: Policy, teacher: Policy, mode: str = "velocity", pairs: int = 4,
                 steps: int | None = None) -> None:
        super().__init__()
        if mode not in DISTIL_MODES:
            raise ValueError(f"distillation mode must be 'velocity' or 'trajectory', got {mode!r}")
        if int(pairs) < 1 or (steps is not None and int(steps) < 1):
            raise ValueError(f"need pairs >= 1 and steps >= 1, got pairs={pairs}, steps={steps}")
        if student.head.kind != "meanflow":
            raise ValueError(f"only a meanflow policy is distilled from a teacher; this one is {student.head.kind!r}")
        if teacher.head.kind != "flow":
            raise ValueError(f"the teacher must be a flow policy (velocity prediction), got {teacher.head.kind!r}")
        mine, theirs = student.config(), teacher.config()
        keys = ("obs_dim", "action_dim", "n_obs_steps", "horizon", "param_names", "discrete_scale")
        diff = {k: (mine[k], theirs[k]) for k in keys if mine[k] != theirs[k]}
        sd_a, sd_b = student.normalizer.state_dict(), teacher.normalizer.state_dict()
        if sd_a.keys() != sd_b.keys() or any(not torch.allclose(sd_a[k].double(), sd_b[k].double(), atol=1e-6)
                                             for k in sd_a):
            diff["normalizer"] = ("the student's", "the teacher's")
        if diff:
            raise ValueError(f"the teacher does not match the student (student, teacher): {diff}; build the student "
                             f"with the teacher's normalizer and window")
        self.student = student
        object.__setattr__(self, "teacher", teacher.to(student.device).eval().requires_grad_(False))  # unregistered
        self.mode, self.pairs = mode, int(pairs)
        self.steps = int(steps) if steps is not None else int(teacher.head.default_steps)

    # ------------------------------------------------------------------ training randomness
    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """All training randomness for ``batch`` windows: the student's own draws (velocity mode), or the teacher
        paths and grid pairs (trajectory mode, :meth:`draw_trajectory_noise`)."""
        if self.mode != "trajectory":
            return self.student.draw_noise(batch, generator=generator)
        return self.draw_trajectory_noise(batch, generator)

    def draw_trajectory_noise(self, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Flow-map distillation draws: n = batch // pairs teacher paths (their noise ``traj_eps`` (n, Tp, Da)) and
        ``pairs`` grid pairs (i, j) per path (``traj_i``/``traj_j`` (n, pairs), time t = times[i] >= r = times[j]);
        pair 0 is always (t, r) = (1, 0), the one-step jump. Everything is per path, so DDP's rank slicing keeps
        paths, pairs and θ dropout together."""
        s = self.student
        dev = generator.device if generator is not None else s.device
        k, pairs = self.steps, self.pairs
        n = max(1, batch // pairs)
        eps = torch.randn((n, s.horizon, s.action_dim), generator=generator, device=dev)
        i = torch.floor(torch.rand((n, pairs), generator=generator, device=dev) * k).long().clamp_(0, k - 1)
        span = (k - i + 1).float()  # j uniform in {i, ..., k}; j = i is an r = t row (instantaneous velocity)
        j = (i + torch.floor(torch.rand((n, pairs), generator=generator, device=dev) * span).long()).clamp_(max=k)
        i[:, 0], j[:, 0] = 0, k
        noise = {"traj_eps": eps, "traj_i": i, "traj_j": j}
        if s.param_names:
            noise["cfg_keep"] = (torch.rand((n,), generator=generator, device=dev) >= s.cfg_dropout).float()
        return noise

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, batch: Mapping[str, Tensor], noise: Mapping[str, Tensor] | None = None) -> Tensor:
        """Distillation loss of a batch ``{"obs", "action", ["params"]}`` (physical units, as
        :meth:`Policy.compute_loss`) with the draws of :meth:`draw_noise`."""
        s, teacher = self.student, self.teacher
        obs, act, theta = s.batch_inputs(batch)
        noise = dict(noise) if noise is not None else self.draw_noise(act.shape[0])
        keep = noise.pop("cfg_keep", None)
        if "traj_eps" in noise:
            return self.flow_map_loss(obs, theta, keep, noise)
        cond = s.condition(obs[:, : s.n_obs_steps], theta, keep=keep)
        t_cond = teacher.condition(obs[:, : teacher.n_obs_steps], theta, keep=keep)

        def velocity(z: Tensor, t: Tensor) -> Tensor:  # the teacher's marginal velocity at (z_t, t)
            return teacher.head.net(z, t[:, None], t_cond)

        return s.head.loss(s.normalize_action(act), cond, noise, velocity=velocity)

    def flow_map_loss(self, obs: Tensor, theta: Any, keep: Tensor | None, noise: Mapping[str, Tensor]) -> Tensor:
        """Flow-map distillation: the teacher's sampling paths from ``traj_eps`` for the first n windows of the
        batch, and the student's average velocity regressed on (z_i - z_j) / (t_i - t_j) at the drawn grid pairs
        (the teacher's velocity at z_i where i = j)."""
        s, teacher = self.student, self.teacher
        eps = noise["traj_eps"].to(obs)
        n, pairs = eps.shape[0], noise["traj_i"].shape[1]
        if obs.shape[0] < n:
            raise ValueError(f"flow-map distillation needs {n} windows in the batch, got {obs.shape[0]}")
        obs, theta = obs[:n], (theta[:n] if theta is not None else None)
        cond = s.condition(obs[:, : s.n_obs_steps], theta, keep=keep)
        t_cond = teacher.condition(obs[:, : teacher.n_obs_steps], theta, keep=keep)
        states, vels, times = teacher.head.trajectory(t_cond, eps, steps=self.steps)
        i, j = noise["traj_i"].to(obs.device), noise["traj_j"].to(obs.device)
        rows = torch.arange(n, device=obs.device)[:, None].expand(n, pairs)
        z_t, z_r = states[i, rows], states[j, rows]  # (n, pairs, Tp, Da)
        t, r = times[i], times[j]
        gap = (t - r)[..., None, None]
        v_i = vels[i.clamp(max=vels.shape[0] - 1), rows]
        target = torch.where(gap > 0, (z_t - z_r) / gap.clamp_min(1e-6), v_i)
        return s.head.flow_map_loss(z_t.flatten(0, 1), r.flatten(), t.flatten(), target.flatten(0, 1),
                                    cond.repeat_interleave(pairs, 0))

    def forward(self, batch: Mapping[str, Tensor], noise: Mapping[str, Tensor] | None = None) -> Tensor:
        """The distillation loss (so that DistributedDataParallel can wrap the distiller)."""
        return self.compute_loss(batch, noise)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, pairs={self.pairs}, steps={self.steps}"
