"""Real-time-iteration (RTI) controller: a warm-started diffusion / flow policy that replans every tick.

Symbols (Diffusion Policy's names): To = ``policy.n_obs_steps``, Tp = ``policy.horizon`` (chunk length),
Da = ``policy.action_dim``, k = solver steps per warm tick (``RTIController(k=...)``, default :data:`DEFAULT_K`),
θ = ``stl_params``, the rule values a conditioned policy is asked for. Noise level t in [0, 1] (t = 1 pure noise,
t = 0 clean), as in the policy contract for every head.

What one tick does (one observation in, one action out, in physical units)::

    tick 0 after reset():   x ~ N(0, I) --[full schedule, policy.nfe() evaluations]--> chunk_0 (clean, Tp x Da)
    tick n >= 1:            guess = shift(chunk_{n-1}, by=1) with the last action repeated
                            guess[discrete] = +-1/factor                      (discrete_mode="clip")
                            x_init = guess            (renoise=False: fed as if it were the state at t_start)
                                   | noise_to(guess, t_start)   (renoise=True: re-noised to t_start first)
                            chunk_n = k solver steps from t_start down to 0, conditioned on the fresh history
    every tick:             execute chunk_n[To - 1 + lookahead]  (the chunk starts at the oldest observation)

θ is turned into the policy's condition tensor once (``policy.theta_tensor``, at construction and whenever
``stl_params`` is assigned), not on every tick.

Timing (lock-step, one action executed per tick)::

    obs_t --act--> a_t = chunk_t[To-1]  --env.step--> obs_{t+1} --act--> a_{t+1} = chunk_{t+1}[To-1] ...
    chunk_t[To-1+j] plans time t+j, so chunk_{t+1}'s guess is chunk_t shifted left by one.

Elapsed ticks (a controller off the control loop's thread, :mod:`stlflow.control.inference`): the worker plans
on the newest observation only, so two consecutive calls may be n ticks apart. ``act(obs, elapsed=n)`` shifts the
previous chunk by n ticks (``n * shift`` actions) instead of one; ``elapsed=None`` (the default) is the lock-step
case, one tick per call (none right after a plan made in ``reset``). When the shift runs past the end of the
previous chunk (``n * shift >= horizon``: nothing of it is left) the tick is cold (reason ``"expired"``).
:meth:`RTIController.plan` returns the newest chunk's actions from the executed index on, in physical units, with
the tick and the caller's timestamp of the observation it was planned from::

    act(obs_s, t=t_s) --> plan(): actions[j] = the action planned for tick s + j  (j = 0 .. Tp - 1 - exec_offset)
    act(obs_{s+3}, elapsed=3): warm start = that chunk shifted by 3, the last action repeated 3 times

With ``plan_at_reset=True`` and the episode's first observation given to ``reset(obs=...)``, the cold denoise runs
inside ``reset`` (before the control loop's first deadline, as a robot plans while it stands still) and tick 0
is a warm tick from that plan, unshifted: every tick then costs k evaluations. The plan's wall time and network
evaluations are logged apart from the ticks' (``stats["reset"]``), so they are reported, not hidden.

Fallback to a cold start (full schedule) happens on ``reset()`` (unless planned there), when the observation
jumps by more than ``obs_jump`` (max-abs difference of consecutive observations, physical units), and when the
update residual (RMS of chunk_n - guess, normalised action units) exceeds ``residual_max``; in the last case the
tick is redone cold and its network evaluations count both attempts. Residuals are logged every warm tick: contraction
of the warm start is measured here, not assumed (the RTI-DP contraction bound is not a usable guarantee).

Defaults, chosen by measurement (``benchmarks/rti.py``, Crossing, a DDPM/DDIM policy, 50 seeds, k = 2): re-noising
the shifted chunk to t_start = 0.2 succeeded in 80% of episodes; the clean warm start of the RTI-DP paper in 8-32%
(t_start 0.1-0.6: it locks onto stale plans); re-noised t_start = 0.1 / 0.4 / 0.6 gave 70 / 70 / 52%.

Discrete action channels (``policy.discrete_action_mask``, e.g. a binary gripper in {-1, +1}):

- ``"clip"``: the warm start's discrete channels are snapped to their discrete values before denoising, and
  shrunk toward the channel's zero by ``clip_factor`` (1 = the clean values, 10 = RTI-DP's image setting);
- ``"scale"``: for a policy trained with ``discrete_scale`` > 1 (``policy.discrete_scale``: the discrete channels'
  normalised values are divided by that factor, so a flip is a small move for the solver); the warm start is left
  as it is;
- in every mode the executed action's discrete channels are thresholded at 0 to {-1, +1}.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from stlflow.policy.inpaint import pin_guidance

__all__ = ["DEFAULT_K", "DISCRETE_MODES", "ChunkPlan", "ObservationHistory", "RTIController", "exec_offset_of",
           "latency_summary"]

DEFAULT_K = 2  # solver steps per warm tick (k) when none is given
DISCRETE_MODES = ("clip", "scale")


class ObservationHistory:
    """The last To observations of an episode, padded at the start by repeating the first one.

    The padding replicates the edge frame, as Diffusion Policy's SequenceSampler does at an episode start.
    """

    def __init__(self, n_obs_steps: int, obs_dim: int) -> None:
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        self.n_obs_steps, self.obs_dim = int(n_obs_steps), int(obs_dim)
        self._frames: deque[np.ndarray] = deque(maxlen=self.n_obs_steps)

    def reset(self) -> None:
        self._frames.clear()

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def last(self) -> np.ndarray | None:
        return self._frames[-1] if self._frames else None

    def push(self, obs: Any) -> np.ndarray:
        """Append one observation (Do,) and return the history (1, To, Do) float32."""
        frame = np.asarray(obs, dtype=np.float32).reshape(-1)
        if frame.shape[0] != self.obs_dim:
            raise ValueError(f"observation has {frame.shape[0]} values, the policy expects obs_dim={self.obs_dim}")
        if not self._frames:
            self._frames.extend([frame] * self.n_obs_steps)
        else:
            self._frames.append(frame)
        return np.stack(self._frames)[None]


@dataclass(frozen=True)
class ChunkPlan:
    """The newest chunk of an :class:`RTIController`, as the control loop reads it.

    ``actions`` (n, Da) float32, physical units, discrete channels thresholded: ``actions[j]`` = ``chunk[exec_offset
    + j]``, the action to execute ``j`` ticks after the observation the chunk was planned from (``actions[0]`` is
    what ``act`` returned; with ``lookahead`` L it was planned for L + j ticks after that observation);
    ``tick``: that observation's tick since ``reset`` (the sum of the elapsed ticks); ``t``: the timestamp the caller
    gave ``act`` (None when none); ``cold``: planned from noise; ``nfe``: network evaluations of that tick.
    """

    actions: np.ndarray
    tick: int
    t: float | None
    cold: bool
    nfe: int


def exec_offset_of(policy: Any) -> int:
    """Index in a predicted chunk of the action for the newest observation (Diffusion Policy: To - 1)."""
    executed = getattr(policy, "executed_slice", None)
    return int(executed.start) if executed is not None else int(policy.n_obs_steps - 1)


def latency_summary(latencies_s: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p95/p99/max/mean of per-tick latencies, in milliseconds (NaN when there are none)."""
    lat = np.asarray(latencies_s, dtype=np.float64) * 1e3
    if lat.size == 0:
        return {k: float("nan") for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms")}
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "max_ms": float(lat.max()),
            "mean_ms": float(lat.mean())}


class RTIController:
    """Warm-started receding-horizon controller: a cold full denoise on the first tick, k steps afterwards.

    Args:
        policy: a ``stlflow.policy.Policy`` (or anything with the same names; see the policy contract).
        k: solver steps on every warm tick (network evaluations ``policy.nfe(k, t_start)``).
        t_start: noise level the warm start is treated as (DDPM/DDIM: timestep round(t (K-1)); flow: time).
        renoise: re-noise the shifted clean chunk to ``t_start`` before integrating (False: RTI-DP's clean start).
        cold_steps: solver steps of a cold start (None: the head's default schedule).
        discrete_mode: ``"clip"`` or ``"scale"`` (see the module docstring); ignored without discrete channels.
        clip_factor: the warm start's discrete channels go to +-1/clip_factor (in the channel's normalised units
            measured from the channel's zero) in ``"clip"`` mode.
        obs_jump: cold start when max|obs_t - obs_{t-1}| exceeds this (physical units); None disables.
        residual_max: redo a warm tick cold when RMS(chunk - guess) exceeds this (normalised units); None disables.
        stl_params: θ, the rule values a conditioned policy is asked for (``{name: value}`` naming exactly
            ``policy.param_names``; None for an unconditioned policy). Turned into ``policy.theta_tensor`` once;
            assign ``ctrl.stl_params`` to ask for other values (the mapping is kept read-only).
        seed: seed of the controller's noise generator (``reset(seed=...)`` reseeds it).
        shift: actions executed per tick (the chunk is shifted by this much between ticks).
        guidance: optional inference-time guidance (e.g. :class:`stlflow.policy.guidance.STLGuidance`): its
            ``bind(policy, obs_history, stl_params)`` gives the head's ``guidance_fn`` for the tick. None = off.
        lookahead: execute the chunk's action planned ``lookahead`` ticks after the newest observation; set it to a
            known observation-to-action delay in ticks (the action then lands when it was planned for).
        plan_at_reset: when ``reset`` is given the first observation, run the cold denoise there (see the module
            docstring); without an observation, or when False, the first tick is cold.
        frozen: actions from the executed index on that a warm tick keeps exactly as the warm start has them (the
            committed prefix: the actions that execute while this tick's chunk is being computed, d under an
            inference delay of d ticks); the chunk's earlier positions (past actions) are kept too. The rest is
            denoised given them (:func:`stlflow.policy.inpaint.pin_guidance`). 0: nothing is kept (plain RTI).
    """

    def __init__(
        self,
        policy: Any,
        k: int = DEFAULT_K,
        t_start: float = 0.2,
        renoise: bool = True,
        cold_steps: int | None = None,
        discrete_mode: str = "clip",
        clip_factor: float = 1.0,
        obs_jump: float | None = None,
        residual_max: float | None = None,
        stl_params: Mapping[str, float] | None = None,
        seed: int = 0,
        shift: int = 1,
        guidance: Any = None,
        lookahead: int = 0,
        plan_at_reset: bool = False,
        frozen: int = 0,
    ) -> None:
        if int(k) < 1:
            raise ValueError(f"k (solver steps per warm tick) must be >= 1, got {k}")
        if not 0.0 < float(t_start) <= 1.0:
            raise ValueError(f"t_start is a noise level in (0, 1], got {t_start}")
        if discrete_mode not in DISCRETE_MODES:
            raise ValueError(f"discrete_mode must be one of {DISCRETE_MODES}, got {discrete_mode!r}")
        if clip_factor <= 0:
            raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
        if int(frozen) < 0:
            raise ValueError(f"frozen (actions kept from the warm start) must be >= 0, got {frozen}")
        if not 1 <= int(shift) < policy.horizon:
            raise ValueError(f"shift must be in [1, horizon={policy.horizon}), got {shift}")
        self.policy = policy
        self.k, self.t_start, self.renoise = int(k), float(t_start), bool(renoise)
        self.cold_steps = cold_steps
        self.discrete_mode, self.clip_factor = discrete_mode, float(clip_factor)
        self.obs_jump, self.residual_max = obs_jump, residual_max
        self.stl_params = stl_params  # builds self.theta (the property below)
        self.seed, self.shift = int(seed), int(shift)
        self.guidance = guidance
        self.plan_at_reset = bool(plan_at_reset)
        self.frozen = int(frozen)
        self.exec_offset = exec_offset_of(policy) + int(lookahead)
        if int(lookahead) < 0 or not 0 <= self.exec_offset < policy.horizon:
            raise ValueError(f"lookahead={lookahead} puts the executed index {self.exec_offset} outside the chunk "
                             f"(horizon {policy.horizon}); it must be in [0, horizon - n_obs_steps]")
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history = ObservationHistory(policy.n_obs_steps, policy.obs_dim)
        mask = np.asarray(getattr(policy, "discrete_action_mask", np.zeros(policy.action_dim, bool)), dtype=bool)
        self.discrete_mask = torch.as_tensor(mask.reshape(policy.action_dim))
        self._has_discrete = bool(mask.any())  # asked on every tick: a Python bool, not a tensor reduction
        if discrete_mode == "scale" and mask.any() and float(getattr(policy, "discrete_scale", 1.0)) == 1.0:
            raise ValueError("discrete_mode='scale' needs a policy trained with discrete_scale > 1 "
                             "(policy.discrete_scale=4 in stlflow train); this one has discrete_scale=1")
        with torch.no_grad():  # normalised images of the physical discrete values -1, 0, +1
            levels = torch.tensor([-1.0, 0.0, 1.0]).repeat_interleave(policy.action_dim).reshape(3, -1)
            self._discrete_levels = policy.normalize_action(levels).float()
        self._chunk: torch.Tensor | None = None  # last clean chunk, normalised, (1, Tp, Da)
        self._unshifted = False  # the chunk was planned at reset for the next tick's own time: no shift
        self._tick, self._t = 0, None  # the chunk's observation: tick since reset, the caller's timestamp
        self.last_nfe = 0
        self.last_reset_nfe, self.last_reset_latency_s = 0, 0.0  # the plan made in reset (0 when none)
        self.last_residual = float("nan")
        self.last_cold = False
        self.log: dict[str, list] = {}
        self.clear_stats()

    # ------------------------------------------------------------------ θ
    @property
    def stl_params(self) -> Mapping[str, float] | None:
        """θ asked of the policy (read-only); assigning it rebuilds :attr:`theta`, the tensor every tick uses."""
        return self._stl_params

    @stl_params.setter
    def stl_params(self, value: Mapping[str, float] | None) -> None:
        theta = self.policy.theta_tensor(value)  # validates the names before anything is kept
        self._stl_params = MappingProxyType(dict(value)) if isinstance(value, Mapping) else value
        self.theta = theta

    # ------------------------------------------------------------------ episode bookkeeping
    @torch.no_grad()
    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        """Start a new episode: forget the warm start and the history; reseed if asked.

        The next tick is cold, unless ``plan_at_reset`` is set and ``obs`` (the episode's first observation) is
        given: then the cold plan is made here, timed and counted in ``stats["reset"]``, and tick 0 is warm.
        """
        self._chunk, self._unshifted = None, False
        self._tick, self._t = 0, None
        self.history.reset()
        if seed is not None:
            self.seed = int(seed)
            self.generator.manual_seed(self.seed)
        self.last_reset_nfe, self.last_reset_latency_s = 0, 0.0
        if obs is None or not self.plan_at_reset:
            return
        t0 = time.perf_counter()
        history = self.history.push(obs)
        gfn = None if self.guidance is None else self.guidance.bind(self.policy, history, self.stl_params)
        self._chunk = self._cold_plan(self.policy.condition(history, self.theta), gfn).detach()
        self._unshifted = True
        self.last_reset_nfe = self.policy.nfe(self.cold_steps)
        self.last_reset_latency_s = time.perf_counter() - t0
        self.log["reset_latency_s"].append(self.last_reset_latency_s)
        self.log["reset_nfe"].append(self.last_reset_nfe)

    def clear_stats(self) -> None:
        """Empty the per-tick logs behind :attr:`stats`."""
        self.log = {"latency_s": [], "nfe": [], "residual": [], "cold": [], "reason": [], "reset_latency_s": [],
                    "reset_nfe": []}
        self.fallbacks = {"obs_jump": 0, "residual": 0}

    def _cold_plan(self, cond: torch.Tensor, guidance_fn: Any) -> torch.Tensor:
        """A chunk from noise with the full (``cold_steps``) schedule: first tick, reset plan and fallbacks."""
        return self.policy.sample_normalized(cond, steps=self.cold_steps, generator=self.generator,
                                             guidance_fn=guidance_fn)

    # ------------------------------------------------------------------ the warm start
    def warm_start(self, chunk: torch.Tensor, shift: int | None = None) -> torch.Tensor:
        """The initial guess for the next tick from a clean chunk (B, Tp, Da) normalised.

        Drop the ``shift`` executed actions (default ``self.shift``), repeat the last action to refill the end,
        and in ``"clip"`` mode snap the discrete channels to their discrete values (divided by ``clip_factor``).
        """
        s = self.shift if shift is None else int(shift)
        guess = torch.cat([chunk[:, s:], chunk[:, -1:].expand(-1, s, -1)], dim=1) if s else chunk
        if self.discrete_mode == "clip" and self._has_discrete:
            lo, zero, hi = self._discrete_levels
            snapped = torch.where(guess > zero, hi, lo)
            snapped = zero + (snapped - zero) / self.clip_factor
            guess = torch.where(self.discrete_mask, snapped, guess)
        return guess

    # ------------------------------------------------------------------ one tick
    def observe(self, obs: Any) -> None:
        """Add an observation to the history without planning (a tick on which an asynchronous caller does not
        call :meth:`act`, so that the next plan still sees the last To consecutive observations)."""
        self.history.push(obs)

    @torch.no_grad()
    def act(self, obs: Any, elapsed: int | None = None, *, t: float | None = None) -> np.ndarray:
        """One control tick: observation (Do,) physical -> action (Da,) physical, discrete channels thresholded.

        ``elapsed``: ticks since the observation of the previous chunk (the warm start is shifted by
        ``elapsed * shift``); None: one tick, or none right after a plan made in ``reset`` (lock-step). ``t``: a
        timestamp of ``obs`` kept with the chunk (:meth:`plan`).
        """
        t0 = time.perf_counter()
        frame = np.asarray(obs, dtype=np.float32).reshape(-1)
        if elapsed is None:
            ticks = 0 if self._unshifted else 1
        elif int(elapsed) != elapsed or int(elapsed) < 0:
            raise ValueError(f"elapsed must be a whole number of ticks >= 0, got {elapsed!r}")
        else:
            ticks = int(elapsed)
        shift = ticks * self.shift
        reason = ""
        if self._chunk is None:
            reason = "reset"
        elif shift >= self.policy.horizon:
            reason = "expired"  # nothing of the previous chunk is left to warm-start from
        elif self.obs_jump is not None and self.history.last is not None:
            jump = float(np.max(np.abs(frame - self.history.last)))
            if jump > self.obs_jump:
                reason = "obs_jump"
                self.fallbacks["obs_jump"] += 1
        history = self.history.push(frame)
        cond = self.policy.condition(history, self.theta)
        gfn = None if self.guidance is None else self.guidance.bind(self.policy, history, self.stl_params)
        nfe, residual = 0, float("nan")
        if not reason:
            guess = self.warm_start(self._chunk, shift=shift)
            x_init = self.policy.head.noise_to(guess, self.t_start, generator=self.generator) if self.renoise \
                else guess
            n_kept = min(self.exec_offset + self.frozen, self.policy.horizon) if self.frozen else 0
            if n_kept:
                gfn = pin_guidance(guess, n_kept, gfn)
            chunk = self.policy.sample_normalized(cond, x_init=x_init, t_start=self.t_start,
                                                  steps=self.k, generator=self.generator,
                                                  guidance_fn=gfn)
            if n_kept:  # exactly the committed actions (the pin leaves float rounding behind)
                chunk = torch.cat([guess[:, :n_kept], chunk[:, n_kept:]], dim=1)
            nfe += self.policy.nfe(self.k, self.t_start)
            residual = float(torch.dist(chunk, guess)) / math.sqrt(chunk.numel())  # RMS, in one operation
            if self.residual_max is not None and residual > self.residual_max:
                reason = "residual"
                self.fallbacks["residual"] += 1
        if reason:
            chunk = self._cold_plan(cond, gfn)
            nfe += self.policy.nfe(self.cold_steps)
        self._chunk, self._unshifted = chunk.detach(), False
        self._tick, self._t = (0 if reason == "reset" else self._tick + ticks), t
        action = self.policy.unnormalize_action(chunk[0, self.exec_offset])
        if self._has_discrete:
            action = self.policy.threshold_discrete(action)
        action = np.asarray(action.detach().cpu().numpy() if torch.is_tensor(action) else action, dtype=np.float32)
        self.last_nfe, self.last_residual, self.last_cold = nfe, residual, bool(reason)
        self.log["latency_s"].append(time.perf_counter() - t0)
        self.log["nfe"].append(nfe)
        self.log["residual"].append(residual)
        self.log["cold"].append(bool(reason))
        self.log["reason"].append(reason)
        return action

    @torch.no_grad()
    def plan(self) -> ChunkPlan | None:
        """The newest chunk from the executed index on (see :class:`ChunkPlan`); None before the first plan."""
        if self._chunk is None:
            return None
        actions = self.policy.unnormalize_action(self._chunk[0, self.exec_offset:])
        if self._has_discrete:
            actions = self.policy.threshold_discrete(actions)
        actions = np.asarray(actions.detach().cpu().numpy() if torch.is_tensor(actions) else actions,
                             dtype=np.float32)
        actions.setflags(write=False)
        cold = bool(self.log["cold"][-1]) if self.log["cold"] and not self._unshifted else True
        return ChunkPlan(actions, self._tick, self._t, cold, self.last_nfe if not self._unshifted
                         else self.last_reset_nfe)

    # ------------------------------------------------------------------ telemetry
    @property
    def stats(self) -> dict[str, Any]:
        """Per-tick telemetry since construction or :meth:`clear_stats`.

        ``latency`` (p50/p95/p99/max/mean in ms, wall time of ``act``), ``nfe_per_tick`` (mean network
        evaluations per ``act``), ``nfe_per_action`` (the same divided by the actions executed per tick, here 1),
        ``cold_ticks``, ``fallbacks`` (by reason), ``expired_ticks`` (cold because the elapsed ticks ran past the end
        of the previous chunk), ``residual_mean`` / ``residual_max`` over warm ticks and the raw
        per-tick ``residuals`` (NaN on cold ticks); ``reset``: the plans made in ``reset`` (count, latency
        summary, network evaluations), which ``nfe_per_action`` includes.
        """
        nfe = np.asarray(self.log["nfe"], dtype=np.float64)
        res = np.asarray(self.log["residual"], dtype=np.float64)
        warm = res[~np.isnan(res)]
        return {
            "ticks": len(nfe),
            "latency": latency_summary(self.log["latency_s"]),
            "nfe_per_tick": float(nfe.mean()) if nfe.size else float("nan"),
            "nfe_per_action": float((nfe.sum() + sum(self.log["reset_nfe"])) / nfe.size) if nfe.size
            else float("nan"),
            "cold_ticks": int(np.sum(self.log["cold"])),
            "expired_ticks": int(sum(r == "expired" for r in self.log["reason"])),
            "fallbacks": dict(self.fallbacks),
            "residual_mean": float(warm.mean()) if warm.size else float("nan"),
            "residual_max": float(warm.max()) if warm.size else float("nan"),
            "residuals": res.tolist(),
            "reset": {"plans": len(self.log["reset_nfe"]), "latency": latency_summary(self.log["reset_latency_s"]),
                      "nfe": int(sum(self.log["reset_nfe"]))},
        }

    def __repr__(self) -> str:
        return (f"RTIController(k={self.k}, t_start={self.t_start}, renoise={self.renoise}, "
                f"discrete_mode={self.discrete_mode!r}, obs_jump={self.obs_jump}, residual_max={self.residual_max}, "
                f"plan_at_reset={self.plan_at_reset}, frozen={self.frozen})")
