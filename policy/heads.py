"""Generative heads: DDPM/DDIM, rectified flow, one-step average-velocity flow (MeanFlow).

All heads share one noise-level convention (the policy <-> controller contract): ``t`` in [0, 1] is a noise
level, t = 1 is pure Gaussian noise (a cold start), t = 0 is a clean chunk. Chunks are normalised action
chunks ``(B, Tp, Da)`` (Tp = ``horizon``, Da = action dim); ``cond`` is ``(B, Dc)``.

- :class:`DDPMHead`: ε-prediction on a K-step squared-cosine schedule (K = 100); sampled with deterministic
  DDIM (η = 0) at any step count. t maps to the training step k = round(t (K - 1)). The schedule
  (``alphas_cumprod``) is a persistent buffer, so a checkpoint samples with the schedule it was trained with.
- :class:`FlowHead`: linear path x_t = (1 - t) x0 + t ε, velocity v = ε - x0 (flow matching / rectified flow);
  Euler or midpoint integration from t_start down to 0; uniform or logit-normal training times.
- :class:`MeanFlowHead`: learns the average velocity u(z_t, r, t) = 1/(t - r) ∫_r^t v(z_s, s) ds over an
  interval r < t, trained with the MeanFlow identity u = v - (t - r) du/dt, where du/dt is the total
  derivative along the path (a Jacobian-vector product, ``torch.func.jvp``). One jump z_r = z_t - (t - r) u
  gives a chunk with one network evaluation (Geng et al. 2025, "Mean Flows"; used by One-Step Flow
  Q-Learning).

``steps`` is always the number of solver steps from ``t_start`` down to 0, and :meth:`Head.nfe` says how many
network evaluations :meth:`Head.sample` costs (classifier-free guidance doubles the batch, not the count
reported here; the Policy accounts for it).

Training randomness (noise, times) can be passed in as a dict (``draw_noise``) so that the trainer can draw
it for the global batch from a per-step generator: runs are then bit-reproducible on resume and a
distributed run sees exactly the noise of the single-process run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Head", "DDPMHead", "FlowHead", "MeanFlowHead", "build_head", "HEADS", "squared_cosine_alphas_cumprod"]

GuidanceFn = Callable[[Tensor, float], Tensor]


def squared_cosine_alphas_cumprod(num_steps: int, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    """ᾱ_k of the squared-cosine schedule (Nichol & Dhariwal 2021), k = 0..K-1, as float64 ``(K,)``.

    β_k = min(1 - ᾱ(k+1)/ᾱ(k), max_beta) with ᾱ(τ) = cos²((τ/K + s)/(1 + s) · π/2); ᾱ_k = Π_{j<=k}(1 - β_j).
    """

    def abar(tau: float) -> float:
        return math.cos((tau / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - abar(k + 1) / abar(k), max_beta) for k in range(num_steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def _randn(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved next to ``like``."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _rand(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


class Head(nn.Module):
    """Common interface. Subclasses set ``kind``, ``n_times`` and ``default_steps``.

    Args:
        net: a network ``net(x (B,Tp,Da), times (B,n_times), cond (B,Dc)) -> (B,Tp,Da)`` (see ``nets.py``).
        horizon: Tp.
        action_dim: Da.
    """

    kind: str = ""
    n_times: int = 1
    # Peak learning rate the trainer uses when its ``lr`` is left unset (``train.lr=null``), per head.
    default_lr: float = 3e-4
    # Scale of the network's sinusoidal time embedding the head is trained with (``nets.py`` time_scale).
    time_scale: float = 1000.0

    def __init__(self, net: nn.Module, horizon: int, action_dim: int, default_steps: int):
        super().__init__()
        if getattr(net, "n_times", self.n_times) != self.n_times:
            raise ValueError(f"{type(self).__name__} needs a net built with n_times={self.n_times}")
        self.net, self.horizon, self.action_dim, self.default_steps = net, horizon, action_dim, int(default_steps)

    # -- the network with optional classifier-free guidance --------------------------------------------
    def _model(self, x: Tensor, times: Tensor, cond: Tensor, uncond: Tensor | None, scale: float) -> Tensor:
        if uncond is None or scale == 1.0:
            return self.net(x, times, cond)
        out = self.net(torch.cat([x, x]), torch.cat([times, times]), torch.cat([cond, uncond]))
        c, u = out.chunk(2)
        return u + scale * (c - u)

    def _check_chunk(self, x: Tensor, name: str) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(f"{name} must have shape (B, {self.horizon}, {self.action_dim}), got {tuple(x.shape)}")

    def _start(self, cond: Tensor, x_init: Tensor | None, t_start: float, generator) -> Tensor:
        if not 0.0 <= t_start <= 1.0:
            raise ValueError(f"t_start must be in [0, 1], got {t_start}")
        if x_init is None:
            if t_start < 1.0:
                raise ValueError("x_init is required when t_start < 1 (the chunk at noise level t_start)")
            return _randn((cond.shape[0], self.horizon, self.action_dim), generator, cond)
        self._check_chunk(x_init, "x_init")
        if x_init.shape[0] != cond.shape[0]:
            raise ValueError(f"x_init batch {x_init.shape[0]} != cond batch {cond.shape[0]}")
        return x_init.to(cond)

    def _steps(self, steps: int | None) -> int:
        steps = self.default_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return steps

    # -- interface ------------------------------------------------------------------------------------
    def draw_noise(self, batch: int, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """Training randomness for ``batch`` chunks (a dict of tensors with batch first)."""
        raise NotImplementedError

    def loss(self, actions: Tensor, cond: Tensor, noise: dict[str, Tensor] | None = None) -> Tensor:
        """Training loss (scalar) for normalised ``actions`` (B, Tp, Da) and ``cond`` (B, Dc)."""
        raise NotImplementedError

    def noise_to(self, x0: Tensor, t: float, generator: torch.Generator | None = None) -> Tensor:
        """Re-noise a clean chunk ``x0`` (B, Tp, Da) to noise level ``t`` (t = 0 returns a copy)."""
        raise NotImplementedError

    def nfe(self, steps: int | None = None, t_start: float = 1.0) -> int:
        """Network evaluations one :meth:`sample` call costs (without classifier-free guidance)."""
        raise NotImplementedError

    def sample(
        self,
        cond: Tensor,
        x_init: Tensor | None = None,
        t_start: float = 1.0,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_fn: GuidanceFn | None = None,
        uncond: Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Sample normalised chunks (B, Tp, Da).

        ``x_init`` None: start from N(0, I) at t_start = 1. Otherwise ``x_init`` is the state *at* noise level
        ``t_start`` (re-noise a clean chunk with :meth:`noise_to` first if that is what you want).
        ``guidance_fn(x0_hat, t)`` returns a correction added to the predicted clean chunk at every step.
        ``uncond``/``guidance_scale``: classifier-free guidance, prediction = u + s (c - u).
        """
        raise NotImplementedError


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
        ab = self.alphas_cumprod[self.level_to_step(t)].to(x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * _randn(x0.shape, generator, x0)

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
        ab_all = self.alphas_cumprod.to(x)
        for i, k in enumerate(grid):
            ab = ab_all[k]
            ab_prev = ab_all[grid[i + 1]] if i + 1 < len(grid) else torch.ones((), dtype=x.dtype, device=x.device)
            times = torch.full((x.shape[0], 1), k / (self.num_train_steps - 1), dtype=x.dtype, device=x.device)
            eps = self._model(x, times, cond, uncond, guidance_scale)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            if guidance_fn is not None:
                x0 = x0 + guidance_fn(x0, k / (self.num_train_steps - 1))
            if self.clip_sample:
                x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # consistent with the corrected x0
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return x


def _sample_times(batch: int, mode: str, mean: float, std: float, generator, device) -> Tensor:
    if mode == "uniform":
        return torch.rand((batch,), generator=generator, device=device)
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn((batch,), generator=generator, device=device))
    raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {mode!r}")


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
        t = _sample_times(batch, self.time_sampling, self.logit_mean, self.logit_std, generator, dev)
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
        return (1 - t) * x0 + t * _randn(x0.shape, generator, x0)

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
        a = _sample_times(batch, self.time_sampling, self.logit_mean, self.logit_std, generator, dev)
        b = _sample_times(batch, self.time_sampling, self.logit_mean, self.logit_std, generator, dev)
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
        return (1 - t) * x0 + t * _randn(x0.shape, generator, x0)

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


HEADS: dict[str, type[Head]] = {"ddpm": DDPMHead, "flow": FlowHead, "meanflow": MeanFlowHead}


def build_head(cfg: dict, net: nn.Module, horizon: int, action_dim: int) -> Head:
    """Build a head from ``{"kind": "ddpm"|"flow"|"meanflow", **kwargs}`` around ``net``."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](net, horizon=horizon, action_dim=action_dim, **cfg)
