"""The head contract shared by every generative head, and the random draws the heads share.

All heads share one noise-level convention (the policy <-> controller contract): ``t`` in [0, 1] is a noise
level, t = 1 is pure Gaussian noise (a cold start), t = 0 is a clean chunk. Chunks are normalised action
chunks ``(B, Tp, Da)`` (Tp = ``horizon``, Da = action dim); ``cond`` is ``(B, Dc)``.

``steps`` is always the number of solver steps from ``t_start`` down to 0, and :meth:`Head.nfe` says how many
network evaluations :meth:`Head.sample` costs (classifier-free guidance doubles the batch, not the count
reported here; the Policy accounts for it).

Training randomness (noise, times) can be passed in as a dict (``draw_noise``) so that the trainer can draw
it for the global batch from a per-step generator: runs are then bit-reproducible on resume and a
distributed run sees exactly the noise of the single-process run.

The heads themselves live in :mod:`stlflow.policy.heads` (DDPM/DDIM, rectified flow, the registry) and
:mod:`stlflow.policy.meanflow` (the one-step MeanFlow head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["GuidanceFn", "Head", "randn_from", "sample_times"]

GuidanceFn = Callable[[Tensor, float], Tensor]


def randn_from(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved next to ``like``."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def sample_times(batch: int, mode: str, mean: float, std: float, generator, device) -> Tensor:
    """``batch`` training times in [0, 1]: ``"uniform"`` or ``"logit_normal"`` (sigmoid(N(mean, std²)))."""
    if mode == "uniform":
        return torch.rand((batch,), generator=generator, device=device)
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn((batch,), generator=generator, device=device))
    raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {mode!r}")


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
            return randn_from((cond.shape[0], self.horizon, self.action_dim), generator, cond)
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
