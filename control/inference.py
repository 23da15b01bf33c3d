"""Inference off the control loop's thread: a worker runs the controller on the newest observation only and
publishes plans stamped with the observation they were computed from.

::

    loop thread:    submit(o3)  submit(o4)  submit(o5)           latest() -> newest plan, never waits
    worker thread:  [---- act(o3) ----][---- act(o5) ----]       o4 was replaced by o5 before the worker was free
    published:                          plan(o3)          plan(o5)

A plan (:class:`Plan`) holds the actions the controller planned from its observation: ``actions[j]`` is for ``j``
ticks after it. An RTI controller (``act(obs, elapsed=..., t=...)`` and ``plan()``,
:class:`stlflow.policy.rti.RTIController`) gives its whole chunk from the executed index on, and is told how many
ticks passed between the observations it saw (``elapsed``: its warm start shifts by that much). Any other
controller (``act(obs) -> action``: the scripted expert, the chunk controllers) gives a one-action plan, which the
loop holds until a newer plan arrives.

An exception in the controller ends the worker; it is kept with its traceback (:attr:`InferenceWorker.failure`)
and the loop latches its e-stop on it.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from stlflow.control.robot import Observation

__all__ = ["InferenceFailure", "InferenceWorker", "Plan"]


@dataclass(frozen=True)
class Plan:
    """Actions planned from one observation.

    ``actions`` (n, Da) float64, read-only: ``actions[j]`` is the action for ``j`` ticks after the observation;
    ``obs_seq`` / ``obs_t``: that observation's sequence number and time (on the loop's clock); ``hold_last``: the
    last action stays valid after the end (a controller that returns one action per call); ``nfe``: network
    evaluations; ``infer_s``: wall time of the controller call; ``index``: plans published before this one since
    the episode began (0: the first plan); ``cold``: planned from noise (None when the controller does not say).
    """

    actions: np.ndarray
    obs_seq: int
    obs_t: float
    hold_last: bool
    nfe: int
    infer_s: float
    index: int
    cold: bool | None = None

    def action_at(self, elapsed: int) -> np.ndarray | None:
        """The action for ``elapsed`` ticks after the observation; None when the plan has none."""
        if elapsed < 0:
            return None
        if elapsed < len(self.actions):
            return self.actions[elapsed]
        return self.actions[-1] if self.hold_last else None


@dataclass(frozen=True)
class InferenceFailure:
    """An exception raised by the controller on the worker: the exception, its formatted ``traceback`` and the
    sequence number of the observation it was working on (-1: in ``reset``)."""

    error: BaseException
    traceback: str
    obs_seq: int

    @property
    def summary(self) -> str:
        return f"{type(self.error).__name__}: {self.error} (observation {self.obs_seq})"


def _normal_priority() -> None:
    """Run the calling thread at the normal (SCHED_OTHER) policy: a thread started by a real-time loop thread
    inherits its SCHED_FIFO priority, and a busy inference thread at that priority starves every other thread."""
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: nothing to undo then
        pass


def _takes_elapsed(controller: Any) -> bool:
    """Does ``controller`` give chunks: ``act(obs, elapsed=..., t=...)`` and ``plan()``?"""
    if not callable(getattr(controller, "plan", None)):
        return False
    try:
        params = inspect.signature(controller.act).parameters
    except (TypeError, ValueError):
        return False
    return "elapsed" in params and "t" in params


class InferenceWorker:
    """Runs ``controller`` on its own thread (see the module docstring).

    Use: :meth:`start`, :meth:`begin` (reset the controller and plan on the episode's first observation),
    then :meth:`submit` every new observation and read :meth:`latest`; :meth:`stop` at the end.

    Args:
        controller: see the module docstring.
        period: seconds per control tick on the clock of the observations' ``t`` (the elapsed ticks between two
            observations are their time difference over ``period``, rounded).
        name: the thread's name.
    """

    def __init__(self, controller: Any, period: float, *, name: str = "stlflow-inference") -> None:
        if not period > 0:
            raise ValueError(f"period must be > 0 seconds, got {period}")
        self.controller, self.period, self.name = controller, float(period), name
        self.chunks = _takes_elapsed(controller)
        self._cv = threading.Condition()
        self._pending: Observation | None = None
        self._begin: tuple[int | None, Observation] | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._plan: Plan | None = None
        self._prev: Observation | None = None  # the observation of the controller's previous call
        self.failure: InferenceFailure | None = None
        self.plans = 0  # plans published this episode
        self.dropped = 0  # observations replaced by a newer one before the worker took them
        self.nfe_total = 0

    # -------------------------------------------------------------------------------------------- the loop's side
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the inference worker is started already")
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def begin(self, seed: int | None, obs: Observation) -> None:
        """Start an episode: on the worker, ``controller.reset(seed=seed, obs=obs.values)``, then a plan from
        ``obs`` (wait for it with :meth:`wait_for`)."""
        with self._cv:
            self._begin, self._pending, self._plan = (seed, obs), None, None
            self.plans = 0
            self._cv.notify_all()

    def submit(self, obs: Observation) -> None:
        """Plan from ``obs`` when the worker is next free (replacing an observation it has not taken yet)."""
        with self._cv:
            if self._pending is not None:
                self.dropped += 1
            self._pending = obs
            self._cv.notify_all()

    def latest(self) -> Plan | None:
        """The newest plan (no waiting)."""
        return self._plan

    def wait_for(self, seq: int, timeout: float) -> Plan | None:
        """Wait up to ``timeout`` seconds for a plan from observation ``seq`` or a newer one; None on a timeout or
        when the worker failed."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.failure is None and (self._plan is None or self._plan.obs_seq < seq):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None or not self._thread.is_alive():
                    return None
                self._cv.wait(remaining)
            return self._plan if self.failure is None else None

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to end and wait up to ``timeout`` s for it (a controller call in progress finishes)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -------------------------------------------------------------------------------------------- the worker
    def _main(self) -> None:
        seq = -1
        _normal_priority()
        try:
            while True:
                with self._cv:
                    while not self._stop and self._pending is None and self._begin is None:
                        self._cv.wait()
                    if self._stop:
                        return
                    begin, self._begin = self._begin, None
                    if begin is not None:  # observations submitted since stay pending for the next plan
                        obs = begin[1]
                    else:
                        obs, self._pending = self._pending, None
                if begin is not None:
                    seq = -1
                    self.controller.reset(seed=None if begin[0] is None else int(begin[0]), obs=obs.values)
                    self._prev = None
                seq = obs.seq
                plan = self._plan_from(obs)
                with self._cv:
                    if self._begin is not None:  # a new episode began meanwhile: this plan is of the old one
                        continue
                    self._plan = plan
                    self.plans += 1
                    self.nfe_total += plan.nfe
                    self._cv.notify_all()
        except BaseException as err:  # noqa: BLE001 -- anything the controller raises goes to the loop
            with self._cv:
                self.failure = InferenceFailure(err, traceback.format_exc(), seq)
                self._cv.notify_all()

    def _plan_from(self, obs: Observation) -> Plan:
        ctrl = self.controller
        elapsed = 0 if self._prev is None else max(0, round((obs.t - self._prev.t) / self.period))
        t0 = time.perf_counter()
        if self.chunks:
            ctrl.act(obs.values, elapsed=elapsed, t=obs.t)
            chunk = ctrl.plan()
            actions, hold_last, cold = np.array(chunk.actions, np.float64), False, bool(chunk.cold)
        else:
            actions = np.asarray(ctrl.act(obs.values), np.float64).reshape(1, -1).copy()
            hold_last, cold = True, None
        infer_s = time.perf_counter() - t0
        actions.setflags(write=False)
        self._prev = obs
        return Plan(actions, int(obs.seq), float(obs.t), hold_last, int(getattr(ctrl, "last_nfe", 0) or 0),
                    infer_s, self.plans, cold)
