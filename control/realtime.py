"""The wall-clock control loop: a :class:`~stlflow.control.robot.Robot` driven at fixed deadlines, its controller
on an inference worker (a thread, or a process of its own), every action through the safety layer.

Pieces (each usable on its own):

- :class:`MonotonicClock` (the wall clock: sleep until shortly before a deadline, then spin) and
  :class:`VirtualClock` (time moves only when the loop sleeps on it: lock-step runs and tests);
- :class:`Ticker`: absolute deadlines ``t0 + k * period`` (no drift); a late tick is counted once and the deadlines
  that passed meanwhile are skipped, never fired back to back (the clocks and the ticker live in
  :mod:`stlflow.control.clock` and are importable from here too);
- :class:`RealtimeLoop`: the loop; :class:`LoopResult`: what one run recorded, one row per tick.

The controller runs on an inference worker (:class:`stlflow.control.inference.InferenceWorker`'s thread, or
:class:`~stlflow.control.inference.InferenceProcess`) on the newest observation only; the loop never waits for it
(except in lock-step, where the clock stands still while it thinks). Each plan is stamped with the observation it
was computed from, and the loop reads the action for a tick from the newest plan by the ticks that have actually
elapsed since that observation::

    clock     t0      t0+P    t0+2P   t0+3P   t0+4P   t0+5P   t0+6P     (P = period = spec.dt / spec.speed)
    deadline  k=0     k=1     k=2     k=3     k=4     k=5     k=6
    robot     o0      o1      o2      o3      o4      o5      o6        one observation per period
    worker  p0]       [---p1----][---p2----][---p3-----][---p5----]     each plan takes 1.4 P; o4 is dropped
    plan      p0      p0      p0      p1      p2      p2      p3        the newest plan ready at the deadline
    elapsed   0       1       2       2       2       3       3         (deadline - its observation's time) / P
    action    p0[0]   p0[1]   p0[2]   p1[2]   p2[2]   p2[3]   p3[3]
    source    fresh   chunk   chunk   chunk   chunk   chunk   chunk

``pN`` is the plan computed from observation ``oN`` and ``p[j]`` its action for j ticks after that observation (o4
arrived while p3 was being computed and was replaced by o5 before the worker was free). A plan is an RTI chunk from
its executed index on (:meth:`stlflow.policy.rti.RTIController.plan`); a controller that returns one action per
call gives a one-action plan, which is held. The first plan (``p0``) is made before the first deadline, while the
robot stands still. A tick with no usable action (no plan, the plan ran out, a stale observation, a rule violation,
a non-finite action) holds the robot (source ``hold``); an e-stop holds it and ends the run (source ``estop``).

Lock-step on a :class:`VirtualClock` with :class:`stlflow.control.sim_robot.SimRobot` (the env steps when the loop
moves the clock to the next deadline) reproduces :func:`stlflow.control.loop.run_episode`; with ``delay=d`` a plan
is used only from d ticks after its observation (the first plan at once), so at tick t >= d the loop executes
``p_{t-d}[d]`` and before that ``p_0[t]``::

    delay 1:   tick      0         1         2         3
               obs       o0        o1        o2        o3
               plans     p0        p1        p2        p3        (computed at once, visible one tick later)
               action    p0[0]     p0[1]     p1[1]     p2[1]     (one-action plans: a0, a0, a1, a2 = run_episode's)

For one-action plans (the scripted expert, the chunk controllers) that is exactly ``run_episode(delay=d)``. An RTI
chunk is read at the ticks that passed, so the action lands at the time it was planned for (what RTI's
``lookahead=d`` does in ``run_episode``), where ``run_episode`` executes the stale ``a_{t-d}``.

Every tick records (:class:`LoopResult.ticks`): deadline index, scheduled and wake time, lateness, whether it was
late, deadlines skipped before it, the observation's seq / time / age, the plan used (the seq of its observation),
elapsed ticks, inference time, source, clamp and rate-limit events, network evaluations of the plans finished since
the previous tick, the loop's own work on the tick (``busy_s``, wall time from waking to the command sent), and the
action sent. Rows go into preallocated numpy arrays: the loop thread does no I/O.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from stlflow.control.clock import (
    Clock,
    MonotonicClock,
    Tick,
    Ticker,
    VirtualClock,
    cpu_affinity,
    frozen_gc,
    realtime_priority,
    switch_interval,
)
from stlflow.control.robot import Observation, RobotError
from stlflow.control.safety import SafetyConfig, SafetyLayer

__all__ = ["Clock", "EStopLatched", "LoopResult", "MonotonicClock", "RealtimeLoop", "SOURCES", "Tick", "TickLog",
           "Ticker", "VirtualClock"]

SOURCES = ("fresh", "chunk", "hold", "estop")
"""Where a tick's action came from: ``fresh`` (a plan's action for its own observation's tick), ``chunk`` (a
plan's action for a later tick, or a one-action plan held), ``hold`` (no usable action: the robot held still),
``estop`` (the e-stop latched on this tick; the robot held and the run ended)."""
FRESH, CHUNK, HOLD, ESTOP = range(4)
OFFSET_WINDOW = 4  # observations over which a robot clock's offset to the loop's clock is estimated (see RealtimeLoop)


# ------------------------------------------------------------------------------------------------ records
_FIELDS: dict[str, Any] = {
    "index": np.int64, "scheduled": np.float64, "wake": np.float64, "lateness": np.float64, "late": np.bool_,
    "missed": np.int32, "obs_seq": np.int64, "obs_t": np.float64, "obs_age": np.float64, "plan_seq": np.int64,
    "elapsed": np.int32, "infer_s": np.float64, "source": np.int8, "clamped": np.int16, "rate_limited": np.int16,
    "nonfinite": np.bool_, "stale": np.bool_, "violation": np.bool_, "nfe": np.int32, "busy_s": np.float64,
}


class TickLog:
    """Per-tick rows in preallocated numpy arrays (grown by doubling when full; no I/O): the fields of
    :data:`_FIELDS`, the action sent ``action`` (n, Da) (NaN when held) and the observation used ``obs`` (n, Do)."""

    def __init__(self, capacity: int, action_dim: int, obs_dim: int) -> None:
        capacity = max(int(capacity), 16)
        self.n = 0
        self.cols = {name: np.zeros(capacity, dtype) for name, dtype in _FIELDS.items()}
        self.action = np.full((capacity, action_dim), np.nan)
        self.obs = np.zeros((capacity, obs_dim), np.float32)

    def _grow(self) -> None:
        for name, col in self.cols.items():
            self.cols[name] = np.concatenate([col, np.zeros_like(col)])
        self.action = np.concatenate([self.action, np.full_like(self.action, np.nan)])
        self.obs = np.concatenate([self.obs, np.zeros_like(self.obs)])

    def append(self, action: np.ndarray | None, obs: np.ndarray, **row: Any) -> None:
        if self.n == len(self.action):
            self._grow()
        i = self.n
        for name, value in row.items():
            self.cols[name][i] = value
        if action is not None:
            self.action[i] = action
        self.obs[i] = obs
        self.n += 1

    def arrays(self) -> dict[str, np.ndarray]:
        """The recorded rows (copies trimmed to the ticks run)."""
        out = {name: col[: self.n].copy() for name, col in self.cols.items()}
        out["action"], out["obs"] = self.action[: self.n].copy(), self.obs[: self.n].copy()
        return out


class EStopLatched(RuntimeError):
    """:meth:`RealtimeLoop.run` refused to start: the e-stop is latched (clear it with ``reset_estop()``)."""


@dataclass
class LoopResult:
    """What one :meth:`RealtimeLoop.run` recorded.

    ``ticks``: name -> (T,) per-tick arrays (see the module docstring; ``source`` indexes :data:`SOURCES`), plus
    ``action`` (T, Da) the actions sent (NaN on held ticks) and ``obs`` (T, Do) the observation each tick used;
    ``final_obs``: the newest observation when the run ended (the one that ended the episode when ``done``);
    ``success`` (``final_obs.info["success"]``), ``done`` (the robot ended the episode), ``estop`` (why the e-stop
    latched, None if it did not), ``failure`` (the inference worker's traceback when it failed), ``counters``
    (loop, worker and safety counts), ``period`` (s), ``t0`` (the clock time of deadline 0).
    """

    ticks: dict[str, np.ndarray]
    final_obs: Observation | None
    success: bool
    done: bool
    estop: str | None
    failure: str | None
    counters: dict[str, Any]
    period: float
    t0: float
    seed: int | None = None
    violations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(len(self.ticks["index"]))

    @property
    def action(self) -> np.ndarray:
        return self.ticks["action"]

    @property
    def obs(self) -> np.ndarray:
        return self.ticks["obs"]

    def sources(self) -> list[str]:
        return [SOURCES[i] for i in self.ticks["source"]]

    def summary(self) -> dict[str, Any]:
        """JSON-able summary: tick counts by source, lateness / observation age / inference time percentiles (ms),
        counters, e-stop and failure."""
        t = self.ticks

        def ms(x: np.ndarray) -> dict[str, float]:
            x = np.asarray(x, np.float64)
            x = x[np.isfinite(x)] * 1e3
            if x.size == 0:
                return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
            p50, p99 = np.percentile(x, [50, 99])
            return {"p50": float(p50), "p99": float(p99), "max": float(x.max())}

        src = np.asarray(t["source"])
        return {
            "ticks": self.length, "period_s": self.period, "seed": self.seed,
            "sources": {name: int(np.sum(src == i)) for i, name in enumerate(SOURCES)},
            "lateness_ms": ms(t["lateness"]), "obs_age_ms": ms(t["obs_age"]),
            "infer_ms": ms(np.where(t["plan_seq"] >= 0, t["infer_s"], np.nan)), "busy_ms": ms(t["busy_s"]),
            "nfe": int(np.sum(t["nfe"])), "success": self.success, "done": self.done, "estop": self.estop,
            "failure": None if self.failure is None else self.failure.strip().splitlines()[-1],
            "counters": dict(self.counters),
        }


# ------------------------------------------------------------------------------------------------ the loop
class RealtimeLoop:
    """Drive ``robot`` with ``controller`` at fixed deadlines (see the module docstring for the timing).

    Args:
        robot: a :class:`~stlflow.control.robot.Robot`, connected (the loop resets it, never connects or closes it).
        controller: ``reset(seed=None, obs=None)`` and ``act(obs) -> action``; an RTI controller (``act(obs,
            elapsed=..., t=...)`` and ``plan()``) gives whole chunks. It runs on an
            :class:`~stlflow.control.inference.InferenceWorker` thread made for each run (None with ``worker``).
        clock: default ``robot.clock`` when the robot has one, else a :class:`MonotonicClock`.
        period: seconds per tick on ``clock`` (default the robot's ``spec().period``).
        safety: a :class:`~stlflow.control.safety.SafetyLayer` (kept across runs: its e-stop latch stays set until
            ``reset_estop()``) or a :class:`~stlflow.control.safety.SafetyConfig`; default ``SafetyConfig()``.
        delay: a plan is used only from ``delay`` ticks after its observation (the first plan at once); injects an
            observation-to-action delay as ``run_episode(delay=...)`` does.
        lockstep: wait for each observation's plan before acting (the clock stands still while the controller
            thinks); default True on a :class:`VirtualClock`, False otherwise.
        obs_wait: seconds each tick waits for an observation newer than the last (0: take what is there). When
            the robot stamps its observations on the loop's clock (``robot.clock``), the deadlines lie on their grid
            (the first observation's time plus whole periods), so a robot that observes every period delivers a
            fresh observation within the time it takes to publish it: set ``obs_wait`` to cover that.
        max_plan_age: the most ticks after its observation a plan's action may be used (None: as long as the plan
            has one); beyond it the tick holds.
        late_tolerance: lateness (s) above which a tick counts as late (default a tenth of the period).
        rt_priority: SCHED_FIFO priority for the loop's thread during :meth:`run` (None: leave it); where the OS
            refuses, a warning is issued once and the loop runs at normal priority.
        handle_signals: during :meth:`run`, SIGINT and SIGTERM latch the e-stop (handlers restored afterwards;
            needs the main thread).
        first_plan_timeout / plan_timeout: seconds to wait for the first plan, and in lock-step for each plan,
            before latching the e-stop.
        switch_interval: ``sys.setswitchinterval`` during the run (how long another thread may keep the GIL when
            the loop wakes; Python's default is 5 ms); None leaves it.
        interval: RTI: ticks between plans of the worker the loop makes (``InferenceWorker(interval=...)``).
        worker: an inference worker to use instead of a thread made per run: an
            :class:`~stlflow.control.inference.InferenceProcess` (the controller in its own process, kept across
            runs; started here if it is not yet; its owner stops it). During a run the loop's thread keeps off the
            worker's core (``worker.loop_cpus``).

    Observation times: on a robot with the loop's clock (``robot.clock``) as they come. Otherwise, in wall-clock
    runs, a robot time ``t`` (robot seconds) is mapped onto the loop's clock as ``offset + t / speed``, the offset
    being the least ``arrival - t / speed`` of the last :data:`OFFSET_WINDOW` observations (the arrival of the least
    delayed one; a window, so that a simulator whose clock falls behind the wall clock is followed), so the ticks
    elapsed since an observation count the robot's ticks, not the transport's delay, and the deadlines lie on the
    robot's grid as on a shared clock. In lock-step runs an observation is stamped when it arrives.
    """

    def __init__(self, robot: Any, controller: Any, *, clock: Clock | None = None, period: float | None = None,
                 safety: SafetyLayer | SafetyConfig | None = None, delay: int = 0, lockstep: bool | None = None,
                 obs_wait: float = 0.0, max_plan_age: int | None = None, late_tolerance: float | None = None,
                 rt_priority: int | None = None, handle_signals: bool = False, first_plan_timeout: float = 120.0,
                 plan_timeout: float = 60.0, switch_interval: float | None = 1e-3, interval: int = 1,
                 worker: Any = None) -> None:
        if int(delay) < 0:
            raise ValueError(f"delay must be >= 0 ticks, got {delay}")
        if controller is None and worker is None:
            raise ValueError("give a controller (run on a thread each run) or a worker (e.g. an InferenceProcess)")
        if period is not None and not period > 0:
            raise ValueError(f"period must be > 0 seconds, got {period}")
        if max_plan_age is not None and int(max_plan_age) < 0:
            raise ValueError(f"max_plan_age must be >= 0 ticks or None, got {max_plan_age}")
        self.robot, self.controller = robot, controller
        self.clock: Clock = clock if clock is not None else (getattr(robot, "clock", None) or MonotonicClock())
        self.period = None if period is None else float(period)
        self.safety = safety if isinstance(safety, SafetyLayer) else SafetyLayer(safety)
        self.delay = int(delay)
        self.lockstep = isinstance(self.clock, VirtualClock) if lockstep is None else bool(lockstep)
        self.obs_wait, self.max_plan_age = float(obs_wait), max_plan_age
        self.late_tolerance, self.rt_priority = late_tolerance, rt_priority
        self.handle_signals = bool(handle_signals)
        self.first_plan_timeout, self.plan_timeout = float(first_plan_timeout), float(plan_timeout)
        self.switch_interval = switch_interval
        self.interval, self.worker = int(interval), worker

    # -------------------------------------------------------------------------------------------- e-stop
    @property
    def estopped(self) -> bool:
        return self.safety.latched

    def reset_estop(self) -> None:
        """Clear the e-stop latch (the only way to clear it)."""
        self.safety.reset_estop()

    # -------------------------------------------------------------------------------------------- one run
    def run(self, seed: int | None = None, *, max_ticks: int | None = None,
            duration: float | None = None) -> LoopResult:
        """Reset the robot (``seed``), plan on its first observation, then tick until the episode ends, ``max_ticks``
        actions were taken, ``duration`` seconds (on the loop's clock) passed, or the e-stop latched. The robot is
        held on every way out. Raises :class:`EStopLatched` when the e-stop is latched before the start."""
        from stlflow.control.inference import InferenceWorker

        if self.safety.latched:
            raise EStopLatched(f"the e-stop is latched ({self.safety.reason}); call reset_estop() to clear it")
        spec = self.robot.spec()
        period = self.period or spec.period
        self.safety.begin(spec, period)
        log = TickLog(max_ticks + 1 if max_ticks is not None else
                      (int(duration / period) + 2 if duration is not None else 1024), spec.action_dim, spec.obs_dim)
        worker = self.worker or InferenceWorker(self.controller, period=period, interval=self.interval)
        if not worker.started:
            worker.start()  # before the priority goes up: nothing the worker starts inherits SCHED_FIFO
        shared_clock = getattr(self.robot, "clock", None) is self.clock
        state = _RunState(speed=float(spec.speed))
        with contextlib.ExitStack() as stack:
            if self.handle_signals:
                stack.enter_context(self.safety.signal_handlers())
            stack.enter_context(switch_interval(self.switch_interval))
            stack.enter_context(frozen_gc(not self.lockstep))
            stack.enter_context(cpu_affinity(worker.loop_cpus))
            state.rt_granted = stack.enter_context(realtime_priority(self.rt_priority))
            try:
                self._run(seed, max_ticks, duration, spec, period, worker, shared_clock, log, state)
            except RobotError as err:
                self.safety.latch(f"robot lost: {err}")
            except BaseException as err:  # the robot is held below; the e-stop says why; the error goes on up
                self.safety.latch(f"loop failed: {type(err).__name__}: {err}")
                raise
            finally:
                try:
                    self.robot.hold()
                    state.holds += 1
                except Exception as err:  # the robot may be gone; the e-stop says so
                    self.safety.latch(f"robot lost: hold failed ({err})")
                if self.worker is None:
                    worker.stop()
        failure = worker.failure
        ticks = log.arrays()
        counters = {"late": int(ticks["late"].sum()), "missed": int(ticks["missed"].sum()),
                    "plans": worker.plans, "dropped_obs": worker.dropped, "observations": state.observations,
                    "rt_priority": bool(state.rt_granted), "holds_on_exit": state.holds,
                    **self.safety.counters}
        final = state.obs
        return LoopResult(
            ticks=ticks, final_obs=final,
            success=bool(final is not None and final.info.get("success", False)),
            done=bool(final is not None and final.done), estop=self.safety.reason,
            failure=None if failure is None else failure.traceback, counters=counters, period=period,
            t0=state.ticker.t0 if state.ticker else float("nan"), seed=seed,
            violations=list(self.safety.violations))

    def _run(self, seed: int | None, max_ticks: int | None, duration: float | None, spec: Any, period: float,
             worker: Any, shared_clock: bool, log: TickLog, state: _RunState) -> None:
        """Start (:meth:`_start`), then one tick per deadline until the episode ends, ``max_ticks`` / ``duration``
        is reached or the e-stop latches."""
        robot, clock, safety = self.robot, self.clock, self.safety

        mapped = not shared_clock and not self.lockstep

        def stamp(o: Observation) -> Observation:  # observation times on the loop's clock (see the class docstring)
            if shared_clock:
                return o
            now = clock.now()
            if not mapped:
                return replace(o, t=now, info={**o.info, "robot_t": o.t})
            state.offsets.append(now - o.t / state.speed)
            offset = min(state.offsets)
            return replace(o, t=offset + o.t / state.speed, info={**o.info, "robot_t": o.t, "arrived": now})

        started, violation = self._start(seed, worker, stamp, state)
        if not started:
            return
        obs = state.obs
        pending: deque = deque()
        current = None
        nfe_seen = 0
        ticker = state.ticker = self._ticker(obs, period, shared_clock or mapped)
        acted = 0
        while True:
            tick = ticker.wait()
            woke = time.perf_counter()
            new = robot.observe(self.obs_wait)
            last = (max_ticks is not None and acted >= max_ticks) or \
                (duration is not None and tick.scheduled - ticker.t0 >= duration - 1e-9)
            if new is not None and new.seq != obs.seq:
                obs = state.obs = stamp(new)
                state.observations += 1
                violation = safety.check_signals(obs.signals)
                if not obs.done and not last:
                    self._submit(worker, obs)
            if obs.done or last:
                return
            current = self._visible_plan(worker, pending, current, tick, period)
            if worker.failure is not None and not safety.latched:
                safety.latch(f"inference failed: {worker.failure.summary}")
            nfe_total = worker.nfe_total
            nfe, nfe_seen = nfe_total - nfe_seen, nfe_total
            age = tick.wake - obs.t
            watch = safety.watchdog(age)
            elapsed = -1 if current is None else max(0, round((tick.scheduled - current.obs_t) / period))
            action, source, clamped, limited, nonfinite = self._act(current, elapsed, watch, violation)
            log.append(action, obs.values, index=tick.index, scheduled=tick.scheduled, wake=tick.wake,
                       lateness=tick.lateness, late=tick.late, missed=tick.missed, obs_seq=obs.seq, obs_t=obs.t,
                       obs_age=age, plan_seq=-1 if current is None else current.obs_seq, elapsed=elapsed,
                       infer_s=np.nan if current is None else current.infer_s, source=source, clamped=clamped,
                       rate_limited=limited, nonfinite=nonfinite, stale=watch != "ok", violation=violation,
                       nfe=nfe, busy_s=time.perf_counter() - woke)
            if source == ESTOP:
                return
            acted += 1

    # -------------------------------------------------------------------------------------------- the run's steps
    def _start(self, seed: int | None, worker: Any, stamp: Callable[[Observation], Observation],
               state: _RunState) -> tuple[bool, bool]:
        """Reset the robot (``seed``), start the worker on the first observation and wait for the first plan (the
        e-stop latches when none comes). Returns ``(started, the first observation's rule verdict)``."""
        obs = stamp(self.robot.reset(seed))
        state.obs = obs
        state.observations = 1
        violation = self.safety.check_signals(obs.signals)  # the newest observation's verdict, until a newer one
        worker.begin(seed, obs)
        if worker.wait_for(obs.seq, self.first_plan_timeout) is None:
            self.safety.latch(self._no_plan_reason(worker, "the first plan"))
            return False, violation
        return True, violation

    def _ticker(self, obs: Observation, period: float, on_grid: bool) -> Ticker:
        """The run's deadlines: from now, or on the robot's observation grid (the first observation's time on the
        loop's clock + whole periods)."""
        now = self.clock.now()
        t0 = now
        if on_grid:
            t0 = obs.t + max(0, math.ceil((now - obs.t) / period - 1e-9)) * period
        return Ticker(self.clock, period, t0=t0, late_tolerance=self.late_tolerance)

    def _submit(self, worker: Any, obs: Observation) -> None:
        """Hand ``obs`` to the worker; in lock-step wait for its plan (the e-stop latches when none comes)."""
        worker.submit(obs)
        if self.lockstep and worker.wait_for(obs.seq, self.plan_timeout) is None:
            self.safety.latch(self._no_plan_reason(worker, f"the plan of observation {obs.seq}"))

    def _visible_plan(self, worker: Any, pending: deque, current: Any, tick: Tick, period: float) -> Any:
        """The newest plan visible at ``tick`` (``delay`` ticks after its observation; the first plan at once):
        the worker's newest plan joins ``pending``, and the plans due by the tick's deadline leave it in order."""
        latest = worker.latest()
        if latest is not None and (current is None or latest.index > current.index) and \
                (not pending or latest.index > pending[-1].index):
            pending.append(latest)
        while pending and (pending[0].index == 0 or
                           pending[0].obs_t + self.delay * period <= tick.scheduled + 1e-9 * period):
            current = pending.popleft()
        return current

    def _act(self, current: Any, elapsed: int, watch: str, violation: bool) -> tuple[Any, int, int, int, bool]:
        """Choose the tick's action (plan, hold or e-stop, through the safety layer) and command the robot.
        Returns ``(action sent or None, source, clamped, rate-limited, non-finite)``."""
        safety = self.safety
        raw = None
        if current is not None and (self.max_plan_age is None or elapsed <= self.max_plan_age):
            raw = current.action_at(elapsed)
        action, clamped, limited, nonfinite = None, 0, 0, False
        if safety.latched or watch == "estop":
            source = ESTOP
        elif watch == "hold" or (violation and safety.config.hold_on_violation) or raw is None:
            source = HOLD
        else:
            action, clamped, limited, nonfinite = safety.filter(raw)
            source = HOLD if action is None else (FRESH if elapsed == 0 else CHUNK)
        if source == HOLD and safety.fallback(True):
            source = ESTOP
        elif source in (FRESH, CHUNK):
            safety.fallback(False)
        if source == ESTOP:
            self.robot.hold()
        elif source == HOLD:
            self.robot.hold()
        else:
            self.robot.send(action, current.obs_seq)
        return action, source, clamped, limited, nonfinite

    @staticmethod
    def _no_plan_reason(worker: Any, what: str) -> str:
        if worker.failure is not None:
            return f"inference failed: {worker.failure.summary}"
        return f"inference timed out: no plan for {what}"


@dataclass
class _RunState:
    obs: Observation | None = None
    ticker: Ticker | None = None
    observations: int = 0
    holds: int = 0
    rt_granted: bool = False
    speed: float = 1.0  # the robot's seconds per wall second (mapping its times onto the loop's clock)
    # loop clock time of the robot's t = 0 as each recent observation says (arrival - t / speed); the least is used
    offsets: deque = field(default_factory=lambda: deque(maxlen=OFFSET_WINDOW))
