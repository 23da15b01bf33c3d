"""Generative heads: DDPM/DDIM and rectified flow, and the registry of every head kind.

The noise-level convention, the ``steps`` / :meth:`Head.nfe` accounting and the training-noise dicts that all
heads share are described in :mod:`stlflow.policy.head_base`.

- :class:`DDPMHead`: ε-prediction on a K-step squared-cosine schedule (K = 100); sampled with deterministic
  DDIM (η = 0) at any step count. t maps to the training step k = round(t (K - 1)). The schedule
  (``alphas_cumprod``) is a persistent buffer, so a checkpoint samples with the schedule it was trained with.
- :class:`FlowHead`: linear path x_t = (1 - t) x0 + t ε, velocity v = ε - x0 (flow matching / rectified flow);
  Euler or midpoint integration from t_start down to 0; uniform or logit-normal training times.
- :class:`MeanFlowHead` (:mod:`stlflow.policy.meanflow`): learns the average velocity u(z_t, r, t) over an
  interval r < t; one jump z_r = z_t - (t - r) u gives a chunk with one network evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stlflow.policy.head_base import Head, randn_from, sample_times
from stlflow.policy.meanflow import MeanFlowHead

__all__ = ["Head", "DDPMHead", "FlowHead", "MeanFlowHead", "build_head", "HEADS", "squared_cosine_alphas_cumprod"]


def squared_cosine_alphas_cumprod(num_steps: int, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    """ᾱ_k of the squared-cosine schedule (Nichol & Dhariwal 2021), k = 0..K-1, as float64 ``(K,)``.

    β_k = min(1 - ᾱ(k+1)/ᾱ(k), max_beta) with ᾱ(τ) = cos²((τ/K + s)/(1 + s) · π/2); ᾱ_k = Π_{j<=k}(1 - β_j).
    """

    def abar(tau: float) -> float:
        return math.cos((tau / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - abar(k + 1) / abar(k), max_beta) for k in range(num_steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


class DDPMHead(Head):
    """DDPM with ε-prediction, trained on K steps of the squared-cosine schedule, sampled with DDIM (η = 0).

    Args:
        num_train_steps: K (100 as in Diffusion Policy).
        clip_sample: clip the predicted clean chunk to [-clip_sample, clip_sample] while sampling (1.0 suits
            min-max normalised actions; None or 0 disables it).
        default_steps: DDIM steps when ``steps`` is None (16, DP's real-robot setting).
        snr_gamma: Min-SNR-γ loss weighting (Hang et al., 2023): each sample's ε-loss is weighted by
            min(SNR, γ) / SNR, SNR = ᾱ / (1 - ᾱ), so the nearly clean levels (SNR ≫ γ), which the plain ε-loss
            weights by SNR in x0 terms, stop dominating the coarse levels that decide a chunk's shape.
            None (default) keeps the plain ε-MSE of Diffusion Policy.
    """

    kind = "ddpm"

    def __init__(
        self,
        net: nn.Module,
        horizon: int,
        action_dim: int,
        num_train_steps: int = 100,
        clip_sample: float | None = 1.0,
        default_steps: int = 16,
        snr_gamma: float | None = None,
    ):
        super().__init__(net, horizon, action_dim, default_steps)
        if num_train_steps < 2:
            raise ValueError(f"num_train_steps must be >= 2, got {num_train_steps}")
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 or None, got {snr_gamma}")
        self.snr_gamma = float(snr_gamma) if snr_gamma is not None else None
        self.num_train_steps = int(num_train_steps)
        self.clip_sample = float(clip_sample) if clip_sample else None
        # Persistent: saved with the weights, so sampling uses the trained schedule after loading.
        self.register_buffer("alphas_cumprod", squared_cosine_alphas_cumprod(self.num_train_steps).float())

    def level_to_step(self, t: float) -> int:
        """Training step k = round(t (K - 1)) for noise level t."""
        return int(round(float(t) * (self.num_train_steps - 1)))

    def _times(self, k: Tensor) -> Tensor:
        return (k.float() / (self.num_train_steps - 1))[:, None]

    def draw_noise(self, batch, generator=None, device=None):
        dev = generator.device if generator is not None else device
        k = torch.randint(0, self.num_train_steps, (batch,), generator=generator, device=dev)
        eps = torch.randn((batch, self.horizon, self.action_dim), generator=generator, device=dev)
        return {"k": k, "eps": eps}

    def loss(self, actions, cond, noise=None):
        self._check_chunk(actions, "actions")
        noise = noise if noise is not None else self.draw_noise(actions.shape[0], device=actions.device)
        k, eps = noise["k"].to(actions.device), noise["eps"].to(actions)
        ab = self.alphas_cumprod[k].to(actions)[:, None, None]
        x_k = ab.sqrt() * actions + (1 - ab).sqrt() * eps
        pred = self.net(x_k, self._times(k).to(actions), cond)
        if self.snr_gamma is None:
            return F.mse_loss(pred, eps)
        snr = ab / (1 - ab)
        weight = snr.clamp(max=self.snr_gamma) / snr
        return (weight * (pred - eps).pow(2)).mean()

    def noise_to(self, x0, t, generator=None):
        self._check_chunk(x0, "x0")
        if t <= 0:
            return x0.clone()
        a, s = self._roots(self.level_to_step(t))
        return a * x0 + s * randn_from(x0.shape, generator, x0)

    def _grid(self, steps: int | None, t_start: float) -> list[int]:
        """Decreasing training steps visited by DDIM; each is followed by the next one (the last by 'clean')."""
        if t_start <= 0:
            return []
        k_start = self.level_to_step(t_start)
        n = min(self._steps(steps), k_start + 1)
        if n == 1:
            return [k_start]
        return [int(k) for k in np.round(np.linspace(k_start, 0, n))]

    def nfe(self, steps=None, t_start=1.0):
        return len(self._grid(steps, t_start))

    @torch.no_grad()
    def sample(self, cond, x_init=None, t_start=1.0, steps=None, generator=None, guidance_fn=None, uncond=None,
               guidance_scale=1.0):
        x = self._start(cond, x_init, t_start, generator)
        grid = self._grid(steps, t_start)
        # the schedule's square roots as Python floats: a control tick runs one or two of these steps, and a dozen
        # 0-d tensor operations per step cost as much as the step's arithmetic on the chunk
        roots = [self._roots(k) for k in grid] + [(1.0, 0.0)]
        for i, k in enumerate(grid):
            (a, s), (a_prev, s_prev) = roots[i], roots[i + 1]
            times = torch.full((x.shape[0], 1), k / (self.num_train_steps - 1), dtype=x.dtype, device=x.device)
            eps = self._model(x, times, cond, uncond, guidance_scale)
            x0 = (x - s * eps) / a
            if guidance_fn is not None:
                x0 = x0 + guidance_fn(x0, k / (self.num_train_steps - 1))
            if self.clip_sample:
                x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            if s_prev == 0.0:  # the last step lands on the clean chunk: x0 itself (a tick's only step)
                x = x0
                continue
            eps = (x - a * x0) / s  # consistent with the corrected x0
            x = a_prev * x0 + s_prev * eps
        return x

    def _roots(self, k: int) -> tuple[float, float]:
        """(sqrt(ᾱ_k), sqrt(1 - ᾱ_k)) as Python floats (kept per step until the schedule buffer is written)."""
        buf = self.alphas_cumprod
        memo = self.__dict__.get("_roots_memo")
        if memo is None or memo[0] is not buf or memo[1] != buf._version:
            memo = self.__dict__["_roots_memo"] = (buf, buf._version, {})
        if k not in memo[2]:
            ab = float(buf[k])
            memo[2][k] = (math.sqrt(ab), math.sqrt(1.0 - ab))
        return memo[2][k]


class FlowHead(Head):
    """Rectified flow / flow matching on the linear path x_t = (1 - t) x0 + t ε, predicting v = ε - x0.

    The loss is ``|| net(x_t, t, cond) - (ε - x0) ||²``. Sampling integrates dx/dt = v from t_start down to 0.

    Args:
        solver: "euler" (1 evaluation per step) or "midpoint" (2 per step).
        time_sampling: "uniform" or "logit_normal" (t = sigmoid(N(logit_mean, logit_std²)), SD3's choice).
        default_steps: solver steps when ``steps`` is None (10).
    """

    kind = "flow"

    def __init__(
        self,
        net: nn.Module,
        horizon: int,
        action_dim: int,
        solver: str = "euler",
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        default_steps: int = 10,
    ):
        super().__init__(net, horizon, action_dim, default_steps)
        if solver not in ("euler", "midpoint"):
            raise ValueError(f"solver must be 'euler' or 'midpoint', got {solver!r}")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
        self.solver, self.time_sampling = solver, time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def draw_noise(self, batch, generator=None, device=None):
        dev = generator.device if generator is not None else device
        t = sample_times(batch, self.time_sampling, self.logit_mean, self.logit_std, generator, dev)
        return {"t": t, "eps": torch.randn((batch, self.horizon, self.action_dim), generator=generator, device=dev)}

    def loss(self, actions, cond, noise=None):
        self._check_chunk(actions, "actions")
        noise = noise if noise is not None else self.draw_noise(actions.shape[0], device=actions.device)
        t, eps = noise["t"].to(actions), noise["eps"].to(actions)
        x_t = (1 - t)[:, None, None] * actions + t[:, None, None] * eps
        return F.mse_loss(self.net(x_t, t[:, None], cond), eps - actions)

    def noise_to(self, x0, t, generator=None):
        self._check_chunk(x0, "x0")
        if t <= 0:
            return x0.clone()
        return (1 - t) * x0 + t * randn_from(x0.shape, generator, x0)

    def nfe(self, steps=None, t_start=1.0):
        if t_start <= 0:
            return 0
        return self._steps(steps) * (2 if self.solver == "midpoint" else 1)

    def _velocity(self, x, t: float, cond, uncond, scale, guidance_fn):
        times = torch.full((x.shape[0], 1), t, dtype=x.dtype, device=x.device)
        v = self._model(x, times, cond, uncond, scale)
        if guidance_fn is not None and t > 0:
            x0 = x - t * v
            v = (x - (x0 + guidance_fn(x0, t))) / t
        return v

    @torch.no_grad()
    def trajectory(self, cond: Tensor, eps: Tensor, steps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The sampler's path from ``eps`` (B, Tp, Da) at t = 1 to t = 0, as :meth:`sample` takes it.

        Returns ``states`` (K+1, B, Tp, Da) at the grid ``times`` (K+1,) = linspace(1, 0, K+1) (K = ``steps``;
        ``states[-1]`` is exactly what ``sample`` returns for this noise) and ``velocities`` (K, B, Tp, Da), the
        network's velocity at each state but the last. A one-step student learns from it (flow-map distillation).
        """
        self._check_chunk(eps, "eps")
        ts = np.linspace(1.0, 0.0, self._steps(steps) + 1)
        x, states, vels = eps.to(cond), [], []
        for t, t_next in zip(ts[:-1], ts[1:]):
            states.append(x)
            x, v0 = self._step(x, float(t), float(t - t_next), cond, None, 1.0, None)
            vels.append(v0)
        states.append(x)
        return torch.stack(states), torch.stack(vels), torch.as_tensor(ts, dtype=eps.dtype, device=x.device)

    def _step(self, x, t: float, h: float, cond, uncond, scale, guidance_fn) -> tuple[Tensor, Tensor]:
        """One solver step from time t to t - h: (next state, the velocity at (x, t))."""
        v0 = v = self._velocity(x, t, cond, uncond, scale, guidance_fn)
        if self.solver == "midpoint":
            v = self._velocity(x - 0.5 * h * v, t - 0.5 * h, cond, uncond, scale, guidance_fn)
        return x - h * v, v0

    @torch.no_grad()
    def sample(self, cond, x_init=None, t_start=1.0, steps=None, generator=None, guidance_fn=None, uncond=None,
               guidance_scale=1.0):
        x = self._start(cond, x_init, t_start, generator)
        if t_start <= 0:
            return x
        ts = np.linspace(t_start, 0.0, self._steps(steps) + 1)
        for t, t_next in zip(ts[:-1], ts[1:]):
            x, _ = self._step(x, float(t), float(t - t_next), cond, uncond, guidance_scale, guidance_fn)
        return x


HEADS: dict[str, type[Head]] = {"ddpm": DDPMHead, "flow": FlowHead, "meanflow": MeanFlowHead}


def build_head(cfg: dict, net: nn.Module, horizon: int, action_dim: int) -> Head:
    """Build a head from ``{"kind": "ddpm"|"flow"|"meanflow", **kwargs}`` around ``net``."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](net, horizon=horizon, action_dim=action_dim, **cfg)
