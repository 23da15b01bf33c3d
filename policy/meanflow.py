"""The one-step MeanFlow head: average velocities over intervals, trained through a Jacobian-vector product.

:class:`MeanFlowHead` learns the average velocity u(z_t, r, t) = 1/(t - r) ∫_r^t v(z_s, s) ds over an interval
r < t, trained with the MeanFlow identity u = v - (t - r) du/dt, where du/dt is the total derivative along the
path (a Jacobian-vector product: a network's hand-written ``forward_jvp`` or ``torch.func.jvp``). One jump
z_r = z_t - (t - r) u gives a chunk with one network evaluation (Geng et al. 2025, "Mean Flows"; used by
One-Step Flow Q-Learning). It follows the head contract of :mod:`stlflow.policy.head_base`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from stlflow.policy.head_base import Head, randn_from, sample_times

__all__ = ["MeanFlowHead"]


class MeanFlowHead(Head):
    """One-step flow: average velocity u(z_t, r, t) over [r, t] on the linear path (MeanFlow identity).

    Training (t = 1 noise, t = 0 data, r <= t): z_t = (1 - t) x0 + t ε, v = ε - x0, and
    ``u_tgt = v - (t - r) · du/dt`` with du/dt = v · ∂_z u + ∂_t u (a JVP with tangents (v, 1, 0) in (z, t, r)),
    loss ``|| u_θ(z_t, r, t) - stopgrad(u_tgt) ||²``. The network sees the times ``(t, t - r)``.
    Sampling: z_r = z_t - (t - r) u(z_t, r, t); ``steps`` equal jumps from t_start to 0 (1 by default).

    Args:
        ratio_r_neq_t: fraction of training pairs with r < t (the rest has r = t, plain flow matching).
        time_sampling: ``"logit_normal"`` (MeanFlow's choice) or ``"uniform"``: (t, r) are the max and min of two
            such draws. One-step sampling asks for (r, t) = (0, 1), a corner logit-normal(-0.4, 1) rarely visits.
        logit_mean, logit_std: parameters of the logit-normal draws.
        adaptive_p: MeanFlow's adaptive loss weight w = 1 / (|Δ|² + c)^p per sample (0 = plain MSE).
        fm_times: time of the r = t (flow matching) rows: ``"max"`` of the two draws (MeanFlow's recipe), or a
            ``"single"`` draw, which visits t near 0 (near the data) as often as a flow head does.
        jvp: how du/dt is computed: ``"auto"`` uses the network's hand-written ``forward_jvp`` where it has one
            (the residual MLP; 2.4-3.2x cheaper than forward-mode AD on CPU) and ``torch.func.jvp`` otherwise;
            ``"func"`` always uses ``torch.func.jvp``. Both compute the same derivative.

    Distillation (``loss(..., velocity=teacher)``): the identity holds for the *marginal* velocity field, of which
    the per-sample ``ε - x0`` is a noisy unbiased stand-in. Given a trained flow policy's velocity ``v_T(z_t, t)``,
    the same loss with v = v_T (as the target of the r = t rows, and as the JVP's tangent and in the target of the
    r < t rows) has the same minimiser but no sampling noise in its target (Eulerian flow-map distillation). The
    teacher is used only at training time; the checkpoint is an ordinary MeanFlow policy.
    """

    kind = "meanflow"
    n_times = 2
    # On PickPlace (MLP, 200 demos, 16k-27k steps within 20 min) 1e-3 gave 95-100% one-step success; 3e-4 stalled
    # at 59-66% (README, benchmarks/policies.py).
    default_lr = 1e-3
    # du/dt flows through the time embedding: high frequencies (scale 1000) make the JVP target explode.
    time_scale = 10.0

    def __init__(
        self,
        net: nn.Module,
        horizon: int,
        action_dim: int,
        ratio_r_neq_t: float = 0.25,
        time_sampling: str = "logit_normal",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
        adaptive_p: float = 1.0,
        fm_times: str = "max",
        jvp: str = "auto",
        default_steps: int = 1,
    ):
        super().__init__(net, horizon, action_dim, default_steps)
        if jvp not in ("auto", "func"):
            raise ValueError(f"jvp must be 'auto' or 'func', got {jvp!r}")
        self.jvp = jvp
        if fm_times not in ("max", "single"):
            raise ValueError(f"fm_times must be 'max' or 'single', got {fm_times!r}")
        self.fm_times = fm_times
        if not 0.0 <= ratio_r_neq_t <= 1.0:
            raise ValueError(f"ratio_r_neq_t must be in [0, 1], got {ratio_r_neq_t}")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
        self.ratio_r_neq_t, self.adaptive_p = float(ratio_r_neq_t), float(adaptive_p)
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def u(self, z: Tensor, r: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Average velocity u(z_t, r, t): ``z`` (B,Tp,Da), ``r``/``t`` (B,), ``cond`` (B,Dc) -> (B,Tp,Da)."""
        return self.net(z, torch.stack([t, t - r], dim=-1), cond)

    def u_and_total_derivative(self, z: Tensor, v: Tensor, r: Tensor, t: Tensor, cond: Tensor):
        """(u, du/dt) with du/dt = v·∂u/∂z + ∂u/∂t along the path: a Jacobian-vector product, tangents (v, 0, 1).

        Networks with a hand-written ``forward_jvp`` (the residual MLP: 2.4-3.2x cheaper on CPU) use it; any other
        network goes through forward-mode AD (``torch.func.jvp``). Both give the same pair (tests/test_nets.py).
        """
        if self.jvp == "auto" and hasattr(self.net, "forward_jvp"):
            times = torch.stack([t, t - r], dim=-1)
            return self.net.forward_jvp(z, times, cond, v, torch.ones_like(times))  # d(t, t - r)/dt = (1, 1)
        return torch.func.jvp(
            lambda z_, r_, t_: self.u(z_, r_, t_, cond), (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t))
        )

    def draw_noise(self, batch, generator=None, device=None):
        dev = generator.device if generator is not None else device
        a = sample_times(batch, self.time_sampling, self.logit_mean, self.logit_std, generator, dev)
        b = sample_times(batch, self.time_sampling, self.logit_mean, self.logit_std, generator, dev)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        mf = torch.rand((batch,), generator=generator, device=dev) < self.ratio_r_neq_t
        if self.fm_times == "single":  # r = t rows: one draw, as a flow head has (the max of two avoids t ~ 0)
            t = torch.where(mf, t, a)
        r = torch.where(mf, r, t)
        return {"t": t, "r": r, "eps": torch.randn((batch, self.horizon, self.action_dim), generator=generator,
                                                   device=dev)}

    def loss(self, actions, cond, noise=None, velocity=None):
        """MeanFlow loss; ``velocity(z_t (B,Tp,Da), t (B,)) -> v`` (a teacher's marginal velocity) replaces ε - x0."""
        self._check_chunk(actions, "actions")
        noise = noise if noise is not None else self.draw_noise(actions.shape[0], device=actions.device)
        t, r, eps = noise["t"].to(actions), noise["r"].to(actions), noise["eps"].to(actions)
        z = (1 - t)[:, None, None] * actions + t[:, None, None] * eps
        if velocity is None:
            v = eps - actions
        else:
            with torch.no_grad():
                v = velocity(z, t).detach()
            if v.shape != z.shape:
                raise ValueError(f"teacher velocity has shape {tuple(v.shape)}, expected {tuple(z.shape)}")
        # Pairs with r = t are plain flow matching (target v, the JVP term vanishes): they skip the forward-mode
        # pass, which costs about as much again as the forward itself. Same loss, fewer FLOPs.
        jvp_rows = (r < t).nonzero().squeeze(1)
        fm_rows = (r >= t).nonzero().squeeze(1)
        err = torch.empty(actions.shape[0], dtype=actions.dtype, device=actions.device)
        if jvp_rows.numel():
            i = jvp_rows
            u, dudt = self.u_and_total_derivative(z[i], v[i], r[i], t[i], cond[i])
            target = (v[i] - (t[i] - r[i])[:, None, None] * dudt).detach()
            err = err.index_put((i,), (u - target).pow(2).flatten(1).mean(1))
        if fm_rows.numel():
            i = fm_rows
            u = self.u(z[i], r[i], t[i], cond[i])
            err = err.index_put((i,), (u - v[i]).pow(2).flatten(1).mean(1))
        if self.adaptive_p > 0:
            err = err / (err.detach() + 1e-3).pow(self.adaptive_p)
        return err.mean()

    def flow_map_loss(self, z: Tensor, r: Tensor, t: Tensor, u_target: Tensor, cond: Tensor) -> Tensor:
        """Regression of u(z_t, r, t) on given average velocities ``u_target`` (B, Tp, Da): flow-map distillation.

        On a teacher's sampling path z_s (s from 1 to 0), the average velocity over [r, t] is by definition
        (z_t - z_r) / (t - r), and the instantaneous velocity when r = t; regressing on it needs no JVP, and the
        (r, t) = (0, 1) rows train exactly the jump one-step sampling takes.
        """
        self._check_chunk(z, "z")
        if u_target.shape != z.shape:
            raise ValueError(f"u_target has shape {tuple(u_target.shape)}, expected {tuple(z.shape)}")
        err = (self.u(z, r.to(z), t.to(z), cond) - u_target.detach()).pow(2).flatten(1).mean(1)
        if self.adaptive_p > 0:
            err = err / (err.detach() + 1e-3).pow(self.adaptive_p)
        return err.mean()

    def noise_to(self, x0, t, generator=None):
        self._check_chunk(x0, "x0")
        if t <= 0:
            return x0.clone()
        return (1 - t) * x0 + t * randn_from(x0.shape, generator, x0)

    def nfe(self, steps=None, t_start=1.0):
        return 0 if t_start <= 0 else self._steps(steps)

    @torch.no_grad()
    def sample(self, cond, x_init=None, t_start=1.0, steps=None, generator=None, guidance_fn=None, uncond=None,
               guidance_scale=1.0):
        z = self._start(cond, x_init, t_start, generator)
        if t_start <= 0:
            return z
        ts = np.linspace(t_start, 0.0, self._steps(steps) + 1)
        for t, r in zip(ts[:-1], ts[1:]):
            times = torch.tensor([[t, t - r]], dtype=z.dtype, device=z.device).expand(z.shape[0], 2)
            u = self._model(z, times, cond, uncond, guidance_scale)
            if guidance_fn is not None:
                x0 = z - float(t) * u
                u = (z - (x0 + guidance_fn(x0, float(t)))) / float(t)
            z = z - float(t - r) * u
        return z
