"""Policy controllers compared in closed loop.

All have ``reset(seed=None, obs=None)``, ``act(obs) -> action`` and ``last_nfe``.

Symbols: To = ``policy.n_obs_steps``, Tp = ``policy.horizon``, Ta = actions executed per plan, k = solver steps.

============  =============================================================  ==========================
name          what it does                                                   network evals per action
============  =============================================================  ==========================
receding      Diffusion Policy's standard: cold full schedule (e.g. DDIM-16  nfe(full) / Ta
              or DDPM-100 via ``steps``), execute Ta = 8 actions, replan
full          cold full schedule every tick (Ta = 1)                         nfe(full)
cold          cold k-step sampling; Ta = 1 by default (set                   nfe(k) / Ta
              ``n_action_steps`` for few-step receding horizon)
onestep       cold one-step sampling (a one-step flow head), Ta = 1 default  nfe(1) / Ta
rti           :class:`stlflow.policy.rti.RTIController`, warm start, k       nfe(k) (+ cold ticks)
============  =============================================================  ==========================

A controller is described by a typed :class:`ControllerSpec` (name and options, checked where it is made, so a
wrong option fails in the caller's process, not in an evaluation worker) and built per episode with
:meth:`ControllerSpec.build`.

Every chunk controller executes ``chunk[To-1 : To-1+Ta]`` (the chunk starts at the oldest observation in the
history, Diffusion Policy's convention), so ``Ta <= Tp - To + 1``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stlflow.control.async_exec import ASYNC_MODES, AsyncExecutor, ChunkPlanner, RTCPlanner, RTIPlanner
from stlflow.policy.rti import DEFAULT_K, ObservationHistory, RTIController, exec_offset_of

CONTROLLERS = ("receding", "full", "cold", "onestep", "rti", "sync", "async", "ensemble", "rtc")
EXPERT = "expert"  # the task's scripted expert (no policy): the reference row of every table

# the options each controller takes besides ``guidance`` (RTI's own options are read from its signature)
_OPTIONS = {"receding": ("steps", "n_action_steps"), "full": ("steps", "n_action_steps"),
            "cold": ("k", "n_action_steps"), "onestep": ("n_action_steps",), EXPERT: (),
            "sync": ("steps", "n_action_steps"), "async": ("steps", "n_action_steps"),
            "ensemble": ("steps", "ensemble_m"), "rtc": ("steps", "interval", "beta")}
_RTI_NOT_OPTIONS = ("self", "policy", "stl_params", "seed", "guidance", "shift", "frozen")
LOCKSTEP_ONLY = ("sync", "async", "ensemble", "rtc")  # always an AsyncExecutor: lock-step evaluation only
# RTI options of the asynchronous executor (stlflow.control.async_exec): plan every ``interval`` ticks, keep
# ``commit`` actions fixed beyond the ones an inference delay commits; ``nfe_per_tick``: size each plan by a per-tick
# budget (k = nfe_per_tick x the ticks between plans) instead of a fixed k
RTI_ASYNC_OPTIONS = ("interval", "commit", "pin", "nfe_per_tick", "ddpm_nfe_per_tick", "one_step_cold")
# RTI options that depend on the policy's head, resolved by ControllerSpec.for_policy: a one-step head's cold plans,
# and a DDPM head's own per-tick budget
HEAD_OPTIONS = ("one_step_cold", "ddpm_nfe_per_tick")


def rti_options() -> tuple[str, ...]:
    """The keyword options of :class:`RTIController` a spec may set (``k``, ``t_start``, ``renoise``, ...), and the
    executor's ``interval`` / ``commit``."""
    names = inspect.signature(RTIController.__init__).parameters
    return tuple(n for n in names if n not in _RTI_NOT_OPTIONS) + RTI_ASYNC_OPTIONS


def _head_kind(policy: Any) -> str | None:
    """``"ddpm"``, ``"flow"``, ``"meanflow"``: the kind of ``policy``'s generative head (None if it has none)."""
    return getattr(getattr(policy, "head", None), "kind", None)


@dataclass(frozen=True)
class ControllerSpec:
    """Which controller to run and its options, validated at construction.

    Build one with :meth:`create` (``ControllerSpec.create("rti", k=2, t_start=0.3)``); ``options`` holds the
    options as sorted (name, value) pairs; ``guidance`` is an optional STL guidance object for any policy
    controller. ``k`` (solver steps per warm tick of ``rti`` and per plan of ``cold``) defaults to
    :data:`stlflow.policy.rti.DEFAULT_K`.
    """

    name: str = "receding"
    options: tuple[tuple[str, Any], ...] = ()
    guidance: Any = None

    def __post_init__(self) -> None:
        if self.name not in (*CONTROLLERS, EXPERT):
            raise ValueError(f"unknown controller {self.name!r}; choose one of {(*CONTROLLERS, EXPERT)}")
        known = rti_options() if self.name == "rti" else _OPTIONS[self.name]
        unknown = sorted(k for k, _ in self.options if k not in known)
        if unknown:
            raise ValueError(f"controller {self.name!r} takes no option(s) {unknown}; its options: {sorted(known)}")
        if self.name == EXPERT and self.guidance is not None:
            raise ValueError("the expert controller takes no guidance")
        k = self.get("k")
        if k is not None and int(k) < 1:
            raise ValueError(f"k (solver steps per tick) must be >= 1, got {k}")
        for key in ("nfe_per_tick", "ddpm_nfe_per_tick"):
            per_tick = self.get(key)
            if per_tick is not None and not float(per_tick) > 0:
                raise ValueError(f"{key} (network evaluations per tick) must be > 0, got {per_tick}")

    @classmethod
    def create(cls, name: str = "receding", *, guidance: Any = None, **options: Any) -> ControllerSpec:
        """A spec from keyword options; options set to None are left at the controller's default."""
        return cls(name, tuple(sorted((k, v) for k, v in options.items() if v is not None)), guidance)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], guidance: Any = None) -> ControllerSpec:
        """A spec from a config block ``{name: ..., option: value, ...}`` (e.g. ``conf/control/rti.yaml``)."""
        opts = dict(options)
        return cls.create(str(opts.pop("name", "receding")), guidance=guidance, **opts)

    def get(self, option: str, default: Any = None) -> Any:
        return dict(self.options).get(option, default)

    @property
    def k(self) -> int:
        """Solver steps per tick (``rti``) or per plan (``cold``)."""
        return int(self.get("k", DEFAULT_K))

    def label(self) -> str:
        """A short row label: name and options (``rti k=2``, ``receding n_action_steps=8``, ``+guidance``)."""
        parts = [self.name] + [f"{k}={v}" for k, v in self.options]
        return " ".join(parts + (["+guidance"] if self.guidance is not None else []))

    def as_dict(self) -> dict[str, Any]:
        """JSON-able description (reports)."""
        return {"name": self.name, **dict(self.options), "guidance": None if self.guidance is None
                else repr(self.guidance)}

    @property
    def asynchronous(self) -> bool:
        """Whether :meth:`build` returns an :class:`~stlflow.control.async_exec.AsyncExecutor` at delay 0 too."""
        return self.name in ASYNC_MODES and (self.name != "rti" or any(k in dict(self.options)
                                                                        for k in RTI_ASYNC_OPTIONS))

    def for_policy(self, policy: Any) -> ControllerSpec:
        """This spec resolved for ``policy``'s head (RTI's :data:`HEAD_OPTIONS`; any other spec is returned as is):

        - ``one_step_cold`` and a one-step head (its default schedule costs one network evaluation, e.g. MeanFlow):
          the plans are cold one-step chunks every max(interval, Ta) ticks (k = 1 from t_start 1.0, no per-tick
          budget), the delayed actions still pinned. Measured on a Crossing MeanFlow policy (100 seeds,
          d = 0..3): 98% at every delay against 85-91% for the multi-step heads' warm settings;
        - ``ddpm_nfe_per_tick`` and a DDPM head: that per-tick budget replaces ``nfe_per_tick`` (the DDPM
          policies did as well or better on half the evaluations of the flow policies' budget:
          ``benchmarks/realtime.py``, conf/control/rti.yaml).

        The resolved spec holds neither option."""
        options = dict(self.options)
        if self.name != "rti" or policy is None or not any(k in options for k in HEAD_OPTIONS):
            return self
        cold = options.pop("one_step_cold", False)
        ddpm_budget = options.pop("ddpm_nfe_per_tick", None)
        if cold and int(policy.nfe()) == 1:
            options.pop("nfe_per_tick", None)
            options.update(k=1, t_start=1.0,
                           interval=max(int(options.get("interval") or 1), int(policy.n_action_steps)))
        elif ddpm_budget is not None and "nfe_per_tick" in options and _head_kind(policy) == "ddpm":
            options["nfe_per_tick"] = float(ddpm_budget)
        return ControllerSpec(self.name, tuple(sorted(options.items())), self.guidance)

    def per_tick(self, delay: int = 1) -> ControllerSpec:
        """This spec without the lock-step executor's schedule options (``interval``, ``commit``, ...): the RTI
        controller as the wall-clock loop's inference worker runs it on :meth:`worker_schedule`'s schedule for
        ``delay``. A per-tick budget (``nfe_per_tick``) becomes the k of a plan on that schedule."""
        options = dict(self.options)
        per_tick = options.get("nfe_per_tick")
        kept = {k: v for k, v in options.items() if k not in RTI_ASYNC_OPTIONS}
        if self.name == "rti" and per_tick is not None:
            kept["k"] = max(1, round(float(per_tick) * self.worker_schedule(delay)[0]))
        return ControllerSpec(self.name, tuple(sorted(kept.items())), self.guidance)

    def worker_schedule(self, delay: int) -> tuple[int, int]:
        """``(interval, frozen)`` of the :meth:`per_tick` controller on the wall-clock loop's inference worker, when
        its plans act ``delay`` ticks after their observation (1 on the wall clock: a plan is used from the tick
        after its observation): the lock-step executor's schedule for that delay (``rti`` with ``interval`` /
        ``commit`` or ``delay`` > 0: a plan every ``interval`` ticks, raised to at least max(1, 2 * delay), and
        ``delay + commit`` actions pinned, ``commit`` only with ``pin=false``), else ``(1, 0)``: a plan whenever the
        worker is free."""
        if self.name != "rti" or not (self.asynchronous or delay > 0):
            return 1, 0
        o = dict(self.options)
        interval = max(1, int(delay), 2 * int(delay), int(o.get("interval") or 1))
        return interval, (int(delay) if o.get("pin", True) else 0) + int(o.get("commit", 0) or 0)

    def build(self, policy: Any, *, seed: int = 0, stl_params: Mapping[str, float] | None = None,
              expert: Any = None, delay: int = 0) -> Any:
        """The controller for one episode: ``policy`` (a Policy), noise ``seed``, θ ``stl_params`` requested of
        a conditioned policy; ``expert``: the env's scripted expert, returned as is for ``name == "expert"``.

        ``delay``: the inference delay in ticks the controller runs under. ``sync``, ``async``, ``ensemble``,
        ``rtc`` (and ``rti`` when ``delay`` > 0 or with ``interval`` / ``commit``) model it themselves (an
        :class:`~stlflow.control.async_exec.AsyncExecutor`, ``handles_delay``); the control loop delays the
        actions of the others.
        """
        if self.name == EXPERT:
            if expert is None:
                raise ValueError("the expert controller needs the env's scripted expert")
            return expert
        if policy is None:
            raise ValueError(f"controller {self.name!r} needs a policy or a checkpoint directory")
        if self.name == "rti" and any(k in dict(self.options) for k in HEAD_OPTIONS):
            return self.for_policy(policy).build(policy, seed=seed, stl_params=stl_params, delay=delay)
        o, g = dict(self.options), self.guidance
        if self.name in ASYNC_MODES and (self.asynchronous or delay > 0):
            return self._build_async(policy, seed, stl_params, int(delay))
        if self.name == "rti":
            if o.pop("n_action_steps", None) not in (None, 1):
                raise ValueError("the rti controller executes one action per tick; n_action_steps must be 1")
            o["k"] = self.k
            return RTIController(policy, stl_params=stl_params, seed=seed, guidance=g, **o)
        ta = o.get("n_action_steps")
        if self.name == "receding":
            return ChunkController(policy, ta or policy.n_action_steps, o.get("steps"), stl_params, seed, g)
        steps = {"full": o.get("steps"), "cold": self.k, "onestep": 1}[self.name]
        return ChunkController(policy, ta or 1, steps, stl_params, seed, g)

    def _build_async(self, policy: Any, seed: int, stl_params: Mapping[str, float] | None, delay: int) -> Any:
        o, g = dict(self.options), self.guidance
        if self.name == "rti":
            if o.pop("n_action_steps", None) not in (None, 1):
                raise ValueError("the rti controller executes one action per tick; n_action_steps must be 1")
            o.pop("plan_at_reset", None)  # the executor always plans the first chunk in reset
            if o.pop("lookahead", 0):
                raise ValueError("under a delay the rti controller reads its plans by the ticks elapsed since their "
                                 "observation (the executor models the delay): lookahead does not apply, leave it 0")
            interval, commit = o.pop("interval", None), int(o.pop("commit", 0) or 0)
            pin = bool(o.pop("pin", True))
            per_tick = o.pop("nfe_per_tick", None)
            o["k"] = self.k
            planner = RTIPlanner(policy, delay if pin else 0, commit, stl_params=stl_params, seed=seed, guidance=g,
                                 **o)
            executor = AsyncExecutor(planner, "rti", delay, interval=interval)
            if per_tick is not None:  # a plan every executor.interval ticks gets that many ticks' budget
                planner.ctrl.k = max(1, round(float(per_tick) * executor.interval))
            return executor
        if self.name == "rtc":
            if g is not None:
                raise ValueError("the rtc controller takes no STL guidance (its inpainting is its guidance)")
            planner = RTCPlanner(policy, delay, o.get("steps"), float(o.get("beta", 5.0)), stl_params, seed)
            return AsyncExecutor(planner, "rtc", delay, interval=o.get("interval"))
        planner = ChunkPlanner(policy, o.get("steps"), stl_params, seed, g)
        return AsyncExecutor(planner, self.name, delay, n_action_steps=int(o.get("n_action_steps")
                                                                          or policy.n_action_steps),
                             ensemble_m=float(o.get("ensemble_m", 0.01)))


class ChunkController:
    """Cold sampling with a receding horizon: every Ta ticks plan a chunk from noise, then play Ta actions of it.

    Args:
        policy: a ``stlflow.policy.Policy``.
        n_action_steps: Ta, actions executed per plan (1 = replan every tick).
        steps: solver steps per plan (None: the head's default schedule, e.g. DDIM-16).
        stl_params: θ requested of a conditioned policy (its tensor is built once, here).
        seed: seed of the noise generator (``reset(seed=...)`` reseeds it).
        guidance: optional inference-time guidance (``stlflow.policy.guidance.STLGuidance``); None = off.
    """

    def __init__(self, policy: Any, n_action_steps: int = 1, steps: int | None = None,
                 stl_params: Mapping[str, float] | None = None, seed: int = 0, guidance: Any = None) -> None:
        self.policy, self.steps, self.stl_params = policy, steps, stl_params
        self.theta = policy.theta_tensor(stl_params)
        self.guidance = guidance
        self.exec_offset = exec_offset_of(policy)
        max_ta = policy.horizon - self.exec_offset
        if not 1 <= int(n_action_steps) <= max_ta:
            raise ValueError(f"n_action_steps must be in [1, horizon - n_obs_steps + 1 = {max_ta}], "
                             f"got {n_action_steps}")
        self.n_action_steps = int(n_action_steps)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.history = ObservationHistory(policy.n_obs_steps, policy.obs_dim)
        self._queue: list[np.ndarray] = []
        self.last_nfe = 0

    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        self._queue = []
        self.history.reset()
        if seed is not None:
            self.generator.manual_seed(int(seed))

    @torch.no_grad()
    def act(self, obs: Any) -> np.ndarray:
        """Observation (Do,) physical -> action (Da,) physical (discrete channels thresholded)."""
        history = self.history.push(obs)
        self.last_nfe = 0
        if not self._queue:
            cond = self.policy.condition(history, self.theta)
            gfn = None if self.guidance is None else self.guidance.bind(self.policy, history, self.stl_params)
            chunk = self.policy.sample_normalized(cond, steps=self.steps, generator=self.generator, guidance_fn=gfn)
            self.last_nfe = self.policy.nfe(self.steps)
            actions = self.policy.unnormalize_action(chunk[0, self.exec_offset:self.exec_offset + self.n_action_steps])
            if np.asarray(self.policy.discrete_action_mask).any():
                actions = self.policy.threshold_discrete(actions)
            actions = actions.detach().cpu().numpy() if torch.is_tensor(actions) else np.asarray(actions)
            self._queue = list(actions.astype(np.float32))
        return self._queue.pop(0)

    def __repr__(self) -> str:
        return f"ChunkController(Ta={self.n_action_steps}, steps={self.steps})"
