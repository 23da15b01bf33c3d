"""Inference off the control loop's thread: a worker runs the controller on the newest observation only and
publishes plans stamped with the observation they were computed from.

::

    loop thread:    submit(o3)  submit(o4)  submit(o5)           latest() -> newest plan, never waits
    worker:         [---- act(o3) ----][---- act(o5) ----]       o4 was replaced by o5 before the worker was free
    published:                          plan(o3)          plan(o5)

Two workers, one interface: :class:`InferenceWorker` runs the controller on a thread of the loop's process,
:class:`InferenceProcess` in a process of its own (reused across episodes, on another core than the loop where there
are two or more), so its Python work never holds the GIL the loop thread needs (a thread that wants the GIL back
waits up to ``sys.getswitchinterval()`` for it, which a real-time loop cannot afford).

A plan (:class:`Plan`) holds the actions the controller planned from its observation: ``actions[j]`` is for ``j``
ticks after it. An RTI controller (``act(obs, elapsed=..., t=...)`` and ``plan()``,
:class:`stlflow.policy.rti.RTIController`) gives its whole chunk from the executed index on, and is told how many
ticks passed between the observations it planned from (``elapsed``: its warm start shifts by that much). Any other
controller (``act(obs) -> action``: the scripted expert, the chunk controllers) gives a one-action plan, which the
loop holds until a newer plan arrives.

The schedule (``interval``, RTI only): a new plan starts when ``interval`` ticks have passed since the observation of
the previous plan, or on the first observation the worker takes after that when it was busy (late); an observation
that is not planned from, or that a newer one replaced while the worker was busy, still goes into the controller's
observation history (``controller.observe``), so every plan conditions on the last To consecutive observations, as
in lock-step (:class:`stlflow.control.async_exec.AsyncExecutor`, whose ``interval`` this follows)::

    interval 4:  obs   o0   o1   o2   o3   o4   o5   o6   o7   o8
                 plan  p0                  p4                  p8          (o1-o3, o5-o7: observe() only)

An exception in the controller ends the worker; it is kept with its traceback (:attr:`InferenceWorker.failure`)
and the loop latches its e-stop on it. A worker process that dies (killed, crashed) is a failure too.
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stlflow.control.clock import normal_priority, split_cpus
from stlflow.control.robot import Observation

__all__ = ["InferenceFailure", "InferenceProcess", "InferenceWorker", "Plan"]


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
    sequence number of the observation it was working on (-1: in ``reset``, or unknown when a process died)."""

    error: BaseException
    traceback: str
    obs_seq: int

    @property
    def summary(self) -> str:
        return f"{type(self.error).__name__}: {self.error} (observation {self.obs_seq})"


class InferenceProcessDied(RuntimeError):
    """The worker process ended without reporting an exception (killed by a signal, crashed, or its pipe broke)."""


def _takes_elapsed(controller: Any) -> bool:
    """Does ``controller`` give chunks: ``act(obs, elapsed=..., t=...)`` and ``plan()``?"""
    if not callable(getattr(controller, "plan", None)):
        return False
    try:
        params = inspect.signature(controller.act).parameters
    except (TypeError, ValueError):
        return False
    return "elapsed" in params and "t" in params


def _check_schedule(period: float, interval: int) -> None:
    if not period > 0:
        raise ValueError(f"period must be > 0 seconds, got {period}")
    if int(interval) < 1:
        raise ValueError(f"interval must be >= 1 tick, got {interval}")


class _Planner:
    """The worker's side of either worker: the controller, its schedule, and the plans it makes.

    ``take(backlog)``: the observations submitted since the last take, oldest first; plans from the newest when due
    (see the module docstring), else adds it to the controller's history. Returns the plan or None."""

    def __init__(self, controller: Any, period: float, interval: int = 1) -> None:
        self.controller, self.period = controller, float(period)
        self.chunks = _takes_elapsed(controller)
        self.interval = max(1, int(interval)) if self.chunks else 1
        self.observes = self.chunks and callable(getattr(controller, "observe", None))
        self.prev: Observation | None = None  # the observation of the previous plan
        self.index = 0

    def begin(self, seed: int | None, obs: Observation) -> Plan:
        """``controller.reset(seed=seed, obs=obs.values)``, then the episode's first plan, from ``obs``."""
        self.controller.reset(seed=None if seed is None else int(seed), obs=obs.values)
        self.prev, self.index = None, 0
        return self._plan(obs)

    def ticks_since_plan(self, obs: Observation) -> int:
        return 0 if self.prev is None else max(0, round((obs.t - self.prev.t) / self.period))

    def take(self, backlog: Sequence[Observation]) -> Plan | None:
        *older, obs = backlog
        if self.observes:
            for o in older:
                self.controller.observe(o.values)
        if self.prev is not None and self.ticks_since_plan(obs) < self.interval:
            self.controller.observe(obs.values)
            return None
        return self._plan(obs)

    def _plan(self, obs: Observation) -> Plan:
        ctrl = self.controller
        elapsed = self.ticks_since_plan(obs)
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
        self.prev = obs
        plan = Plan(actions, int(obs.seq), float(obs.t), hold_last, int(getattr(ctrl, "last_nfe", 0) or 0),
                    infer_s, self.index, cold)
        self.index += 1
        return plan


class InferenceWorker:
    """Runs ``controller`` on its own thread of this process (see the module docstring). Use: :meth:`start`,
    :meth:`begin` (reset the controller, plan on the episode's first observation), :meth:`submit` every new
    observation, read :meth:`latest`; :meth:`stop` at the end.

    Args:
        controller: see the module docstring.
        period: seconds per control tick on the clock of the observations' ``t`` (the elapsed ticks between two
            observations are their time difference over ``period``, rounded).
        interval: RTI: ticks between plans (see the module docstring; 1: plan on every observation taken).
        name: the thread's name.
    """

    loop_cpus: set[int] | None = None  # the worker does not ask the loop to keep off a core

    def __init__(self, controller: Any, period: float, *, interval: int = 1, name: str = "stlflow-inference") -> None:
        _check_schedule(period, interval)
        self.controller, self.period, self.name = controller, float(period), name
        self._planner = _Planner(controller, period, interval)
        self.chunks, self.interval = self._planner.chunks, self._planner.interval
        self._cv = threading.Condition()
        self._pending: list[Observation] = []
        self._begin: tuple[int | None, Observation] | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._plan: Plan | None = None
        self._taken = -1  # seq of the newest observation the worker took (planned from or added to the history)
        self.failure: InferenceFailure | None = None
        self.plans = 0  # plans published this episode
        self.dropped = 0  # observations replaced by a newer one before the worker took them
        self.nfe_total = 0  # network evaluations of this episode's plans

    # -------------------------------------------------------------------------------------------- the loop's side
    started = property(lambda self: self._thread is not None)
    alive = property(lambda self: self._thread is not None and self._thread.is_alive())

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the inference worker is started already")
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def begin(self, seed: int | None, obs: Observation) -> None:
        """Start an episode: on the worker, ``controller.reset(seed=seed, obs=obs.values)``, then a plan from
        ``obs`` (wait for it with :meth:`wait_for`)."""
        with self._cv:
            self._begin, self._pending, self._plan, self._taken = (seed, obs), [], None, -1
            self.plans = self.dropped = self.nfe_total = 0
            self._cv.notify_all()

    def submit(self, obs: Observation) -> None:
        """Plan from ``obs`` when the worker is next free and a plan is due (a newer observation submitted before
        the worker takes this one replaces it as the one to plan from)."""
        with self._cv:
            self._pending.append(obs)
            if len(self._pending) > 16:  # a worker stuck that long plans from scratch anyway: keep the history short
                del self._pending[0]
            self._cv.notify_all()

    def latest(self) -> Plan | None:
        """The newest plan (no waiting)."""
        return self._plan

    def wait_for(self, seq: int, timeout: float) -> Plan | None:
        """Wait up to ``timeout`` seconds until the worker has taken observation ``seq`` (or a newer one): planned
        from it, or added it to the history when no plan was due. Returns the newest plan then; None on a timeout,
        when the worker failed, or before any plan."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.failure is None and (self._plan is None or self._taken < seq):
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

    # -------------------------------------------------------------------------------------------- the worker
    def _main(self) -> None:
        seq = -1
        normal_priority()
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._pending and self._begin is None:
                        self._cv.wait()
                    if self._stop:
                        return
                    begin, self._begin = self._begin, None
                    backlog, self._pending = ([], self._pending) if begin is not None else (self._pending, [])
                    self.dropped += max(0, len(backlog) - 1)
                seq = begin[1].seq if begin is not None else backlog[-1].seq
                plan = self._planner.begin(*begin) if begin is not None else self._planner.take(backlog)
                with self._cv:
                    if self._begin is not None:  # a new episode began meanwhile: this is of the old one
                        continue
                    self._taken = seq
                    if plan is not None:
                        self._plan = plan
                        self.plans += 1
                        self.nfe_total += plan.nfe
                    self._cv.notify_all()
        except BaseException as err:  # noqa: BLE001 -- anything the controller raises goes to the loop
            with self._cv:
                self.failure = InferenceFailure(err, traceback.format_exc(), seq)
                self._cv.notify_all()


# ------------------------------------------------------------------------------------------------ in a process
def _process_main(conn: Any, make_controller: Callable[[int | None], Any], period: float, interval: int,
                  cpus: set[int] | None, priority: int | None) -> None:
    """The worker process: controllers from ``make_controller(seed)`` per episode, plans back through ``conn``. In:
    ``("begin", episode, seed, values, t, seq)``, ``("obs", episode, values, t, seq)``, ``("stop",)``. Out:
    ``("ready",)``, ``("plan", episode, Plan, dropped)``, ``("taken", episode, seq)`` (an observation only added to
    the history), ``("failure", episode, error, traceback, seq)``. Ends on ``stop`` or when the parent is gone (EOF)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the parent's to handle
    normal_priority()
    with contextlib.suppress(AttributeError, OSError):  # refused: unpinned
        os.sched_setaffinity(0, cpus or os.sched_getaffinity(0))
    with contextlib.suppress(AttributeError, OSError, TypeError):  # refused (or None): normal priority
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(priority)))
    import torch

    torch.set_num_threads(1)
    episode, seq, planner, dropped = -1, -1, None, 0
    try:
        warmup = getattr(make_controller, "warmup", None)
        if callable(warmup):  # the first network calls of a fresh process are slow: make them before the robot moves
            warmup()
        conn.send(("ready",))
        while True:
            msgs = [conn.recv()]
            while conn.poll():
                msgs.append(conn.recv())
            if any(m[0] == "stop" for m in msgs):
                _exit(0)
            starts = [i for i, m in enumerate(msgs) if m[0] == "begin"]
            if starts:
                _, episode, seed, values, t, seq = msgs[starts[-1]]
                msgs, dropped = msgs[starts[-1] + 1:], 0
                planner = _Planner(make_controller(seed), period, interval)
                conn.send(("plan", episode, planner.begin(seed, Observation(values, t, seq)), dropped))
            backlog = [Observation(m[2], m[3], m[4]) for m in msgs if m[0] == "obs" and m[1] == episode]
            if not backlog or planner is None:
                continue
            dropped += len(backlog) - 1
            seq = backlog[-1].seq
            plan = planner.take(backlog)
            conn.send(("taken", episode, seq) if plan is None else ("plan", episode, plan, dropped))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent is gone or stopping: nothing to report
        _exit(0)
    except BaseException as err:  # noqa: BLE001 -- anything the controller raises goes to the loop
        tb = traceback.format_exc()
        try:
            pickle.dumps(err)
        except Exception:  # noqa: BLE001 -- an exception that does not pickle travels as its text
            err = RuntimeError(f"{type(err).__name__}: {err}")
        with contextlib.suppress(OSError, EOFError):
            conn.send(("failure", episode, err, tb, seq))
        _exit(1)


def _exit(code: int) -> None:
    """End the worker process now: it has nothing to save, and an orderly shutdown takes seconds on a busy machine."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


class InferenceProcess:
    """Runs the controller in a worker process of its own, with :class:`InferenceWorker`'s interface.

    Started once (:meth:`start`: a fresh ``spawn`` interpreter importing torch and the policy: seconds), it serves
    every episode: :meth:`begin` builds the episode's controller there with ``make_controller(seed)``. Observations
    go down a pipe (values, time, seq); plans come back stamped with their observation and episode (an earlier
    episode's are dropped). It runs at normal priority with one torch thread; with ``cpus="auto"`` and 2+ cores on
    the last core, :attr:`loop_cpus` naming the others. It ignores SIGINT (the loop's process handles it and stops
    it) and ends by itself when the loop's process goes away.

    Args:
        make_controller: ``make_controller(seed) -> controller``, called in the worker process; it and what it
            holds (a policy, or a checkpoint path to load) must pickle. Its ``warmup()``, if it has one, runs in the
            process before :meth:`start` returns.
        period, interval: as :class:`InferenceWorker`'s.
        cpus: ``"auto"`` (above), a set of cores for the worker (:attr:`loop_cpus` the rest), or None (unpinned).
        priority: SCHED_FIFO priority of the process (None: normal), at most the loop's: on its own core, other
            work on the machine then cannot delay a plan (where refused, it runs at normal priority).
        start_timeout: seconds :meth:`start` waits for the process to be ready.
    """

    def __init__(self, make_controller: Callable[[int | None], Any], period: float, *, interval: int = 1,
                 cpus: str | set[int] | None = "auto", priority: int | None = None, start_timeout: float = 120.0,
                 name: str = "stlflow-inference") -> None:
        _check_schedule(period, interval)
        self.loop_cpus, self.cpus = split_cpus(cpus)
        self.priority = priority
        self.make_controller, self.period, self.interval = make_controller, float(period), int(interval)
        self.start_timeout, self.name = float(start_timeout), name
        self._proc: Any = None
        self._conn: Any = None
        self._episode = -1
        self._plan: Plan | None = None
        self._taken = -1
        self.failure: InferenceFailure | None = None
        self.plans = self.dropped = self.nfe_total = 0

    # -------------------------------------------------------------------------------------------- life cycle
    started = property(lambda self: self._proc is not None)
    alive = property(lambda self: self._proc is not None and self._proc.is_alive())
    pid = property(lambda self: None if self._proc is None else self._proc.pid)

    def start(self) -> None:
        """Start the worker process and wait until it is ready (RuntimeError when it is not, with the reason)."""
        if self._proc is not None:
            raise RuntimeError("the inference process is started already")
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_process_main, name=self.name, daemon=True,
                                 args=(child, self.make_controller, self.period, self.interval, self.cpus,
                                       self.priority))
        self._proc.start()
        child.close()
        msg: tuple = ()
        with contextlib.suppress(EOFError, OSError):
            if self._conn in mpc.wait([self._conn, self._proc.sentinel], self.start_timeout):
                msg = self._conn.recv()
        if msg == ("ready",):
            return
        self.stop(timeout=1.0)
        why = msg[3] if msg and msg[0] == "failure" else f"exit code {self._proc.exitcode}"
        raise RuntimeError(f"the inference process did not start within {self.start_timeout:g} s: {why}")

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the process to end; terminate it, then kill it, when it has not within ``timeout`` s. Leaves no
        process behind."""
        if self._proc is None:
            return
        with contextlib.suppress(OSError, EOFError, ValueError):
            self._conn.send(("stop",))
        self._proc.join(timeout)
        for end in (self._proc.terminate, self._proc.kill):
            if self._proc.is_alive():
                end()
                self._proc.join(2.0)
        self._conn.close()

    # -------------------------------------------------------------------------------------------- the loop's side
    def begin(self, seed: int | None, obs: Observation) -> None:
        """Start an episode: the process builds ``make_controller(seed)``, resets it on ``obs`` and plans from it."""
        self._episode += 1
        self._plan, self._taken = None, -1
        self.plans = self.dropped = self.nfe_total = 0
        self._send(("begin", self._episode, seed, np.asarray(obs.values), float(obs.t), int(obs.seq)))

    def submit(self, obs: Observation) -> None:
        """Hand ``obs`` to the process (never blocks on the plan; see :meth:`InferenceWorker.submit`)."""
        self._send(("obs", self._episode, np.asarray(obs.values), float(obs.t), int(obs.seq)))  # ~200 bytes

    def latest(self) -> Plan | None:
        """The newest plan of this episode (reads what the process sent; no waiting)."""
        self._drain()
        return self._plan

    def wait_for(self, seq: int, timeout: float) -> Plan | None:
        """As :meth:`InferenceWorker.wait_for`."""
        deadline = time.monotonic() + timeout
        self._drain()
        while self.failure is None and (self._plan is None or self._taken < seq):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            mpc.wait([self._conn, self._proc.sentinel], remaining)
            self._drain()
        return self._plan if self.failure is None else None

    def _send(self, msg: tuple) -> None:
        try:
            if self.failure is None:
                self._conn.send(msg)
        except (OSError, EOFError, ValueError):
            self._died()

    def _drain(self) -> None:
        if self.failure is not None or self._conn is None:
            return
        try:
            while self._conn.poll():
                self._receive(self._conn.recv())
        except (OSError, EOFError):
            self._died()

    def _receive(self, msg: tuple) -> None:
        kind, episode = msg[0], msg[1] if len(msg) > 1 else None
        if episode != self._episode:
            return  # "ready", or work of an earlier episode
        if kind == "plan":
            plan: Plan = msg[2]
            plan.actions.setflags(write=False)
            self._plan, self._taken, self.dropped = plan, plan.obs_seq, int(msg[3])
            self.plans += 1
            self.nfe_total += plan.nfe
        elif kind == "taken":
            self._taken = int(msg[2])
        elif kind == "failure":
            self.failure = InferenceFailure(msg[2], msg[3], int(msg[4]))

    def _died(self) -> None:
        if self.failure is not None:
            return
        self._proc.join(1.0)
        code = self._proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.failure = InferenceFailure(InferenceProcessDied(f"the inference process {self.pid} died ({how})"), "", -1)
