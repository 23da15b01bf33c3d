"""Lock-step simulation of a robot's inference worker: chunks land ``delay`` ticks after their observation.

On a robot the policy runs beside the control loop (:mod:`stlflow.control.inference`): a plan computed from the
observation of tick s can act from tick s + d on, and one worker computes one plan at a time. This module replays
that in lock-step (the env waits, so runs are deterministic under a seed) for a family of chunk controllers:

=========  ====================================================================================================
mode       when a plan starts, and what the robot executes
=========  ====================================================================================================
sync       Diffusion Policy's synchronous receding horizon: when Ta actions of the current chunk have run, the
           robot holds its last action for the d ticks the next chunk takes, then runs Ta actions of it
async      naive asynchronous receding horizon: the next chunk starts d ticks before the current one has run Ta
           actions, and the robot switches to it the tick it arrives
ensemble   temporal ensembling (ACT): a chunk whenever the worker is free; each tick executes the weighted mean of
           every arrived chunk's action for that tick, weights exp(-m i), i = 0 for the oldest chunk
rtc        real-time chunking: a chunk every ``interval`` ticks (at least 2 d), inpainted toward the previous one
           (the d actions that run while it is computed frozen, a soft mask over the rest of the overlap;
           :func:`stlflow.policy.inpaint.rtc_sample`); switch on arrival
rti        the warm-started RTI controller (:class:`stlflow.policy.rti.RTIController`, k solver steps) every
           ``interval`` ticks (at least 2 d), the previous chunk shifted by the elapsed ticks as its warm start, the
           d actions that run while it is computed (plus ``commit`` more) kept fixed; switch on arrival
=========  ====================================================================================================

Timing, with the first chunk planned in ``reset`` from the first observation (the robot plans standing still,
before its first deadline; its cost is reported apart, as ``reset``)::

    tick:         0     1     2     3     4     5     6     7     8     9     10     (d = 2, rti, interval 4)
    plan starts:  R                       P4                      P8                R = reset plan from obs_0
    executes:     R[0]  R[1]  R[2]  R[3]  R[4]  R[5]  P4[2] P4[3] P4[4] P4[5] P8[2]  P4 acts from 4 + d on
    P4 keeps R[4], R[5] (the actions that run while P4 is computed) and is refined after them.

The controller never sees an observation before its tick; a plan reads the last To observations up to its own.
A plan whose actions run out before a newer one arrives leaves the robot holding its last action (counted as
``hold`` ticks). The work of a plan is charged to the tick it starts on (``last_nfe`` and the tick's latency in the
control loop), as the worker would spend it then.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stlflow.policy.inpaint import rtc_sample, rtc_weights
from stlflow.policy.rti import ObservationHistory, RTIController, exec_offset_of

__all__ = ["ASYNC_MODES", "AsyncExecutor", "ChunkPlanner", "RTCPlanner", "RTIPlanner"]

ASYNC_MODES = ("sync", "async", "ensemble", "rtc", "rti")


def _physical(policy: Any, chunk: torch.Tensor, start: int) -> np.ndarray:
    """Actions ``chunk[0, start:]`` in physical units, discrete channels thresholded, (n, Da) float32."""
    actions = policy.unnormalize_action(chunk[0, start:])
    if np.asarray(policy.discrete_action_mask).any():
        actions = policy.threshold_discrete(actions)
    return np.asarray(actions.detach().cpu().numpy() if torch.is_tensor(actions) else actions, dtype=np.float32)


class ChunkPlanner:
    """Cold chunks from noise with the head's full schedule (``steps``), as Diffusion Policy samples them."""

    def __init__(self, policy: Any, steps: int | None = None, stl_params: Mapping[str, float] | None = None,
                 seed: int = 0, guidance: Any = None) -> None:
        self.policy, self.steps, self.stl_params, self.guidance = policy, steps, stl_params, guidance
        self.theta = policy.theta_tensor(stl_params)
        self.exec_offset = exec_offset_of(policy)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.history = ObservationHistory(policy.n_obs_steps, policy.obs_dim)

    def reset(self, seed: int | None = None) -> None:
        self.history.reset()
        if seed is not None:
            self.generator.manual_seed(int(seed))

    def observe(self, obs: Any) -> None:
        self.history.push(obs)

    @torch.no_grad()
    def plan(self, obs: Any, elapsed: int | None) -> tuple[np.ndarray, int]:
        """Actions for the observation's tick on, (n, Da) physical, and the network evaluations spent."""
        history = self.history.push(obs)
        cond = self.policy.condition(history, self.theta)
        gfn = None if self.guidance is None else self.guidance.bind(self.policy, history, self.stl_params)
        chunk = self.policy.sample_normalized(cond, steps=self.steps, generator=self.generator, guidance_fn=gfn)
        return _physical(self.policy, chunk, self.exec_offset), self.policy.nfe(self.steps)


class RTCPlanner(ChunkPlanner):
    """Real-time chunking: a cold chunk inpainted toward the previous one (:func:`rtc_sample`).

    ``delay``: d, the actions frozen (weight 1); ``beta``: the paper's cap on the guidance weight (5). The first
    chunk of an episode has nothing to agree with and is plain sampling.
    """

    def __init__(self, policy: Any, delay: int, steps: int | None = None, beta: float = 5.0,
                 stl_params: Mapping[str, float] | None = None, seed: int = 0) -> None:
        super().__init__(policy, steps, stl_params, seed)
        self.delay, self.beta = int(delay), float(beta)
        self._chunk: torch.Tensor | None = None

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self._chunk = None

    @torch.no_grad()
    def plan(self, obs: Any, elapsed: int | None) -> tuple[np.ndarray, int]:
        history = self.history.push(obs)
        cond = self.policy.condition(history, self.theta)
        horizon = self.policy.horizon
        n_after = horizon - self.exec_offset  # actions from the executed index on
        if self._chunk is None or not elapsed or elapsed >= n_after:
            chunk = self.policy.sample_normalized(cond, steps=self.steps, generator=self.generator)
            vjps = 0
        else:
            s = int(elapsed)
            target = torch.cat([self._chunk[:, s:], self._chunk[:, -1:].expand(-1, s, -1)], dim=1)
            weights = rtc_weights(horizon, self.exec_offset, min(self.delay, n_after), n_after - s)
            chunk = rtc_sample(self.policy, cond, target, weights, steps=self.steps, generator=self.generator,
                               beta=self.beta)
            vjps = self.policy.nfe(self.steps)
        self._chunk = chunk
        # a vector-Jacobian product costs about one more network evaluation (reverse pass): counted as one
        return _physical(self.policy, chunk, self.exec_offset), self.policy.nfe(self.steps) + vjps


class RTIPlanner:
    """The RTI controller as a planner: ``act(obs, elapsed=...)`` then its plan from the executed index on.

    ``delay`` + ``commit`` actions from the executed index are kept as the warm start has them (``frozen``); pass
    ``delay=0`` to let every plan re-denoise the actions that run while it is computed (they still run from the
    previous plan: the executor reads a plan only from its arrival on).
    """

    def __init__(self, policy: Any, delay: int, commit: int = 0, stl_params: Mapping[str, float] | None = None,
                 seed: int = 0, guidance: Any = None, **options: Any) -> None:
        self.ctrl = RTIController(policy, stl_params=stl_params, seed=seed, guidance=guidance,
                                  frozen=int(delay) + int(commit), **options)

    def reset(self, seed: int | None = None) -> None:
        self.ctrl.reset(seed=seed)

    def observe(self, obs: Any) -> None:
        self.ctrl.observe(obs)

    def plan(self, obs: Any, elapsed: int | None) -> tuple[np.ndarray, int]:
        self.ctrl.act(obs, elapsed=elapsed)
        return np.asarray(self.ctrl.plan().actions), int(self.ctrl.last_nfe)


@dataclass
class _Plan:
    start: int  # tick of the observation it was planned from
    ready: int  # first tick it can act on (start + delay)
    actions: np.ndarray  # (n, Da) physical; actions[j] is for tick start + j

    def at(self, tick: int) -> np.ndarray | None:
        j = tick - self.start
        return self.actions[j] if 0 <= j < len(self.actions) else None


class AsyncExecutor:
    """A planner run as one inference worker with delay ``d``, in lock-step (see the module docstring).

    Args:
        planner: :class:`ChunkPlanner`, :class:`RTCPlanner` or :class:`RTIPlanner` (``reset``, ``observe``,
            ``plan(obs, elapsed) -> (actions, nfe)``).
        mode: one of :data:`ASYNC_MODES` (``rtc`` and ``rti`` schedule alike; the planner makes the difference).
        delay: d, ticks from an observation to the first tick its plan can act on (>= 0).
        n_action_steps: Ta of ``sync`` / ``async``.
        interval: ticks between plan starts of ``rtc`` / ``rti`` (None: 1), raised to at least max(1, 2 d): one worker
            takes max(d, 1) ticks a plan, and a plan should run at least as many actions of its own as the d it
            inherits (measured on Crossing at d = 3: replanning every 4 ticks fell to 41-54% success with jerky
            actions for both rti and rtc, every 6 ticks held 72-86%; ``benchmarks/realtime.py``).
        ensemble_m: the decay m of ``ensemble`` (ACT: 0.01).
    """

    handles_delay = True  # the control loop must not delay this controller's actions again

    def __init__(self, planner: Any, mode: str, delay: int = 0, n_action_steps: int = 8, interval: int | None = None,
                 ensemble_m: float = 0.01) -> None:
        if mode not in ASYNC_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {ASYNC_MODES}")
        if int(delay) < 0:
            raise ValueError(f"delay must be >= 0 ticks, got {delay}")
        self.planner, self.mode, self.delay = planner, mode, int(delay)
        self.busy = max(self.delay, 1)  # ticks the worker spends on one plan
        self.n_action_steps = int(n_action_steps)
        if mode in ("sync", "async") and self.n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1, got {n_action_steps}")
        if interval is not None and int(interval) < 1:
            raise ValueError(f"interval must be >= 1 tick, got {interval}")
        self.interval = max(self.busy, 2 * self.delay, int(interval or 1))
        self.ensemble_m = float(ensemble_m)
        self.last_nfe = 0
        self.last_reset_nfe, self.last_reset_latency_s = 0, 0.0
        self.log: dict[str, list] = {"nfe": [], "source": []}
        self._reset_state()

    def _reset_state(self) -> None:
        self.tick = 0
        self.plans: list[_Plan] = []  # started, in start order (arrived or in flight)
        self.active: _Plan | None = None  # the plan the robot runs (sync / async / rtc / rti)
        self.active_since = 0  # first tick the active plan acted on
        self.last_action: np.ndarray | None = None

    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        """New episode; with ``obs`` (the first observation) the first plan is made here, ready at tick 0."""
        self._reset_state()
        self.planner.reset(seed=seed)
        self.last_reset_nfe, self.last_reset_latency_s = 0, 0.0
        if obs is not None:
            t0 = time.perf_counter()
            actions, nfe = self.planner.plan(obs, None)
            self.plans.append(_Plan(0, 0, actions))
            self.last_reset_nfe, self.last_reset_latency_s = nfe, time.perf_counter() - t0

    # ------------------------------------------------------------------ scheduling
    def _worker_free(self, t: int) -> bool:
        return not self.plans or t >= self.plans[-1].start + self.busy

    def _wants_plan(self, t: int) -> bool:
        if not self._worker_free(t):
            return False
        if not self.plans:
            return True
        last = self.plans[-1]
        if self.mode == "sync":  # the robot is not waiting for a plan, and the active one has run Ta actions
            return last.ready <= t and self.active is last and t - self.active_since >= self.n_action_steps
        if self.mode == "async":  # arrive just as the active plan has run Ta actions
            return t >= last.ready + self.n_action_steps - self.delay
        if self.mode == "ensemble":
            return True
        return t - last.start >= self.interval

    def act(self, obs: Any) -> np.ndarray:
        """Observation of this tick (Do,) physical -> the action executed this tick (Da,) physical."""
        t = self.tick
        self.last_nfe = 0
        if self._wants_plan(t):
            elapsed = t - self.plans[-1].start if self.plans else None
            actions, nfe = self.planner.plan(obs, elapsed)
            self.plans.append(_Plan(t, t + self.delay, actions))
            self.last_nfe = nfe
        else:
            self.planner.observe(obs)
        action, source = self._select(t)
        self.last_action = action
        self.log["nfe"].append(self.last_nfe)
        self.log["source"].append(source)
        self.tick += 1
        return action

    def _select(self, t: int) -> tuple[np.ndarray, str]:
        arrived = [p for p in self.plans if p.ready <= t]
        if self.mode == "ensemble":
            own = [(i, p.at(t)) for i, p in enumerate(arrived) if p.at(t) is not None]
            if own:
                w = np.asarray([math.exp(-self.ensemble_m * i) for i in range(len(own))])
                a = (w[:, None] * np.stack([x for _, x in own])).sum(0) / w.sum()
                policy = getattr(self.planner, "policy", None)
                if policy is not None and np.asarray(policy.discrete_action_mask).any():
                    a = policy.threshold_discrete(a)
                return np.asarray(a, dtype=np.float32), "plan"
            return self._hold()
        newest = arrived[-1] if arrived else None
        if newest is not None and newest is not self.active:
            self.active, self.active_since = newest, t
        if self.active is None:
            return self._hold()
        if self.mode == "sync" and t - self.active_since >= self.n_action_steps:
            return self._hold()  # Ta actions run, the robot waits for the next chunk
        a = self.active.at(t)
        return (a, "plan") if a is not None else self._hold()

    def _hold(self) -> tuple[np.ndarray, str]:
        if self.last_action is None:
            raise RuntimeError("no plan has arrived and there is no previous action to hold: call reset(obs=...) "
                               "with the first observation so that the first plan is made before tick 0")
        return self.last_action, "hold"

    @property
    def stats(self) -> dict[str, Any]:
        """Plans started, hold ticks and network evaluations per tick (reset plans apart)."""
        nfe = np.asarray(self.log["nfe"], dtype=np.float64)
        return {"ticks": len(nfe), "plans": int(np.count_nonzero(nfe)), "hold_ticks": self.log["source"].count("hold"),
                "nfe_per_tick": float(nfe.mean()) if nfe.size else float("nan")}

    def __repr__(self) -> str:
        return f"AsyncExecutor(mode={self.mode!r}, delay={self.delay}, interval={self.interval})"
