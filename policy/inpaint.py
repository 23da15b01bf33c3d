"""Inpainting a chunk toward actions already committed: a hard prefix pin and real-time chunking's soft mask.

Symbols: Tp = ``policy.horizon``, Da = action dim, To - 1 = the executed index (Diffusion Policy's chunk starts at
the oldest observation), d = ticks between an observation and the moment its chunk can act (the inference delay),
s = ticks between two plans (the execution horizon). Chunks are normalised, ``(B, Tp, Da)``; noise level t in
[0, 1] (t = 1 noise, t = 0 clean), as in the head contract.

Two ways to make a new chunk agree with the previous one, ``target`` = the previous chunk shifted by s ticks:

- **Pin** (:func:`pin_guidance`, used by the RTI controller): positions ``[0, n)`` are set to the target in the
  predicted clean chunk at every solver step, so the rest of the chunk is denoised *given* them (replacement
  inpainting on x0); the returned chunk is overwritten there exactly. Free: no extra network evaluation.
- **Real-time chunking** (:func:`rtc_sample`; Black, Galliker & Levine, "Real-Time Execution of Action Chunking
  Flow Policies", arXiv 2506.07339): cold sampling whose every step adds a guidance term pulling the predicted
  clean chunk toward the target through the network's Jacobian (a vector-Jacobian product), weighted by a soft mask
  (:func:`rtc_weights`): 1 on the d actions that execute while the chunk is computed, an exponential decay over the
  rest of the overlap with the previous chunk, 0 after it. In this package's time convention (t = 1 noise) the
  guided update of one step is::

      x0_hat(x) = the head's clean-chunk prediction at x (differentiable)
      g   = (d/dx) 0.5 * || sqrt(W) * (target - x0_hat(x)) ||^2 , negated   (= J^T W (target - x0_hat))
      w   = min(beta, t / ((1 - t) * r2)),  r2 = t^2 / (t^2 + (1 - t)^2)     (the paper's guidance weight)
      x0  <- x0_hat + t * w * g                                               (= the paper's v + w g, our v = -v_paper)
      x   <- the head's own update from (x, x0, t -> t_next)

  For a DDPM head, t is the flow time with the same signal-to-noise ratio (t / (1 - t) = sqrt(1 - a_bar) /
  sqrt(a_bar)). With ``weights == 0`` everywhere the update is the head's plain sampler (tests/test_inpaint.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["pin_guidance", "rtc_sample", "rtc_weights"]


def pin_guidance(target: Tensor, n: int, inner: Callable[[Tensor, float], Tensor] | None = None
                 ) -> Callable[[Tensor, float], Tensor]:
    """A head ``guidance_fn`` that pins positions ``[0, n)`` of the predicted clean chunk to ``target`` (B, Tp, Da).

    ``inner``: another guidance (e.g. STL guidance) applied first; the pin has the last word on the prefix.
    """
    mask = torch.zeros(target.shape[1], 1, dtype=target.dtype)
    mask[: int(n)] = 1.0

    def guide(x0: Tensor, t: float) -> Tensor:
        corr = inner(x0, t) if inner is not None else torch.zeros_like(x0)
        return corr + mask * (target - (x0 + corr))

    return guide


def rtc_weights(horizon: int, start: int, frozen: int, overlap: int) -> Tensor:
    """Real-time chunking's soft mask over chunk positions (Tp,).

    ``start``: the executed index (To - 1; earlier positions are past actions and get weight 1); ``frozen``: d, the
    actions from ``start`` that execute while the chunk is computed (weight 1); ``overlap``: positions from ``start``
    still covered by the previous chunk (Tp - To + 1 - s); between ``frozen`` and ``overlap`` the weight decays as
    ``c (e^c - 1) / (e - 1)`` with c going linearly from 1 toward 0; 0 from ``overlap`` on.
    """
    w = np.zeros(horizon, dtype=np.float32)
    w[: start + frozen] = 1.0
    span = overlap - frozen
    for i in range(frozen, max(overlap, frozen)):
        c = (overlap - i) / (span + 1)
        w[start + i] = c * math.expm1(c) / math.expm1(1.0) if start + i < horizon else 0.0
    return torch.as_tensor(w)


def _flow_time(head: Any, t: float) -> float:
    """The rectified-flow time with the noise-to-signal ratio of the head's level ``t``."""
    if head.kind != "ddpm":
        return t
    ab = float(head.alphas_cumprod[head.level_to_step(t)])
    s, n = math.sqrt(ab), math.sqrt(1.0 - ab)
    return n / (s + n)


def _steps_of(head: Any, steps: int | None) -> list[tuple[float, float | None]]:
    """(t, t_next) pairs of the head's cold schedule (levels in [0, 1]; t_next None: the clean chunk)."""
    if head.kind == "ddpm":  # DDIM visits training steps down to k = 0, then steps to the clean chunk
        levels = [k / (head.num_train_steps - 1) for k in head._grid(steps, 1.0)]
        return list(zip(levels, levels[1:] + [None]))
    ts = np.linspace(1.0, 0.0, head._steps(steps) + 1)
    return [(float(a), float(b)) for a, b in zip(ts[:-1], ts[1:])]


def _x0_of(head: Any, x: Tensor, t: float, cond: Tensor) -> Tensor:
    """The head's prediction of the clean chunk at ``x`` (noise level ``t``), differentiable in ``x``."""
    times = torch.full((x.shape[0], 1), t, dtype=x.dtype)
    if head.kind == "ddpm":
        k = head.level_to_step(t)
        ab = head.alphas_cumprod[k].to(x)
        times = torch.full((x.shape[0], 1), k / (head.num_train_steps - 1), dtype=x.dtype)
        return (x - (1 - ab).sqrt() * head.net(x, times, cond)) / ab.sqrt()  # unclipped (see rtc_sample)
    if head.kind == "meanflow":
        times = torch.cat([times, times], dim=-1)  # (t, t - r) with r = 0: the average velocity down to clean
    return x - t * head.net(x, times, cond)


def _update(head: Any, x: Tensor, x0: Tensor, t: float, t_next: float | None) -> Tensor:
    """The head's step from ``x`` at ``t`` to ``t_next`` (None: clean) given the (corrected) clean prediction."""
    if head.kind == "ddpm":
        ab = head.alphas_cumprod[head.level_to_step(t)].to(x)
        ab_prev = torch.ones((), dtype=x.dtype) if t_next is None else \
            head.alphas_cumprod[head.level_to_step(t_next)].to(x)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    v = (x - x0) / t  # flow / meanflow: the (average) velocity that carries x to x0
    return x - (t - (t_next or 0.0)) * v


def rtc_sample(policy: Any, cond: Tensor, target: Tensor, weights: Tensor, steps: int | None = None,
               generator: torch.Generator | None = None, beta: float = 5.0) -> Tensor:
    """A cold chunk (B, Tp, Da) normalised, inpainted toward ``target`` with the soft mask ``weights`` (Tp,).

    One network evaluation and one vector-Jacobian product per solver step (``steps``: the head's cold schedule
    when None); see the module docstring. DDPM (DDIM updates), flow (Euler) and one-step MeanFlow heads.
    """
    head = policy.head
    if head.kind == "flow" and head.solver != "euler":
        raise ValueError("rtc_sample integrates flow heads with Euler steps; this head uses "
                         f"solver={head.solver!r}")
    x = torch.randn((cond.shape[0], head.horizon, head.action_dim), generator=generator, dtype=cond.dtype)
    w = weights.to(x).reshape(1, -1, 1)
    guided = bool((w > 0).any())
    for t, t_next in _steps_of(head, steps):
        if guided:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                x0 = _x0_of(head, xg, t, cond)
                err = 0.5 * (w * (target - x0) ** 2).sum()
                (grad,) = torch.autograd.grad(err, xg)
            tf = _flow_time(head, t)
            r2 = tf * tf / (tf * tf + (1 - tf) ** 2)
            gain = min(beta, tf / max((1 - tf) * r2, 1e-12))
            x0 = x0.detach() - tf * gain * grad
        else:
            with torch.no_grad():
                x0 = _x0_of(head, x, t, cond)
        if head.kind == "ddpm" and head.clip_sample:  # the DDPM head's clip, after the correction (its gradient
            x0 = x0.clamp(-head.clip_sample, head.clip_sample)  # is taken on the unclipped prediction)
        with torch.no_grad():
            x = _update(head, x, x0, t, t_next)
    return x.detach()
