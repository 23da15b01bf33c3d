"""Clocks and deadlines of the control loop (:mod:`stlflow.control.realtime`).

- :class:`Clock`: the protocol (``now()``, ``sleep_until(t)``);
- :class:`MonotonicClock` (the wall clock: sleep until shortly before a deadline, then spin) and
  :class:`VirtualClock` (time moves only when the loop sleeps on it: lock-step runs and tests);
- :class:`Ticker`: absolute deadlines ``t0 + k * period`` (no drift); a late tick is counted once and the deadlines
  that passed meanwhile are skipped, never fired back to back; each wake-up is a :class:`Tick`;
- scheduling of the calling thread while a loop runs: :func:`realtime_priority` (SCHED_FIFO), :func:`switch_interval`
  (how long another Python thread may keep the GIL) and :func:`cpu_affinity` (the cores it may run on).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Clock", "MonotonicClock", "Tick", "Ticker", "VirtualClock", "cpu_affinity", "frozen_gc",
           "host_steal_seconds", "normal_priority", "realtime_priority", "split_cpus", "switch_interval"]


# ------------------------------------------------------------------------------------------------ clocks
class Clock(Protocol):
    """A clock in seconds: ``now()`` and ``sleep_until(t)``."""

    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class MonotonicClock:
    """The wall clock (``time.perf_counter``, monotonic). ``sleep_until`` sleeps until ``spin_s`` before the
    deadline, then spins on the clock for the rest (the OS wakes a sleeping thread late by up to a scheduler slice)."""

    def __init__(self, spin_s: float = 5e-4) -> None:
        if spin_s < 0:
            raise ValueError(f"spin_s must be >= 0, got {spin_s}")
        self.spin_s = float(spin_s)

    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, t: float) -> None:
        while True:
            remaining = t - time.perf_counter()
            if remaining <= 0:
                return
            if remaining > self.spin_s:
                time.sleep(remaining - self.spin_s)
            else:
                while time.perf_counter() < t:
                    pass
                return

    def sleep(self, dt: float) -> None:
        self.sleep_until(self.now() + dt)


class VirtualClock:
    """A clock whose time moves only when someone sleeps on it or advances it (lock-step runs, tests).

    ``sleep_until(t)`` sets the time to ``t`` at once (when later) and calls the subscribers, in order, with the
    new time: a lock-step :class:`~stlflow.control.sim_robot.SimRobot` steps its env there. Advances are serialised;
    ``now()`` takes no lock.
    """

    def __init__(self, t0: float = 0.0) -> None:
        self._t = float(t0)
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[float], None]] = []

    def now(self) -> float:
        return self._t

    def sleep_until(self, t: float) -> None:
        with self._lock:
            if t <= self._t:
                return
            self._t = float(t)
            for fn in list(self._subscribers):
                fn(self._t)

    def advance(self, dt: float) -> None:
        """Move the time forward by ``dt`` seconds (>= 0)."""
        if dt < 0:
            raise ValueError(f"a virtual clock does not go back (dt={dt})")
        with self._lock:
            self.sleep_until(self._t + dt)

    sleep = advance

    def subscribe(self, fn: Callable[[float], None]) -> None:
        """Call ``fn(now)`` after every advance."""
        with self._lock:
            self._subscribers.append(fn)

    def unsubscribe(self, fn: Callable[[float], None]) -> None:
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)


# ------------------------------------------------------------------------------------------------ deadlines
@dataclass(frozen=True)
class Tick:
    """One wake-up of a :class:`Ticker`: deadline ``index`` k, ``scheduled`` = t0 + k * period, ``wake`` (clock time
    it woke), ``lateness`` = wake - scheduled, ``late`` (lateness beyond the tolerance, or deadlines skipped),
    ``missed`` (deadlines skipped just before this one)."""

    index: int
    scheduled: float
    wake: float
    lateness: float
    late: bool
    missed: int


class Ticker:
    """Absolute deadlines ``t0 + k * period`` on ``clock``: no drift, however long each tick's work takes.

    :meth:`wait` sleeps until the next deadline. When the work of a tick ran past the following deadline(s), those
    are skipped (``missed``) and the newest one that passed fires at once, late, counted once: the ticker never
    fires twice in a row to catch up. ``late_tolerance`` (s, default a tenth of the period): lateness above it
    counts a tick as late.
    """

    def __init__(self, clock: Clock, period: float, t0: float | None = None,
                 late_tolerance: float | None = None) -> None:
        if not period > 0:
            raise ValueError(f"period must be > 0 seconds, got {period}")
        self.clock, self.period = clock, float(period)
        self.t0 = float(clock.now() if t0 is None else t0)
        self.late_tolerance = 0.1 * self.period if late_tolerance is None else float(late_tolerance)
        self.index = -1  # the last deadline fired
        self.late = 0
        self.missed = 0

    def deadline(self, k: int) -> float:
        return self.t0 + k * self.period

    def wait(self) -> Tick:
        """Sleep until the next deadline (see the class docstring) and return it."""
        k = self.index + 1
        now = self.clock.now()
        skipped = 0
        if now >= self.deadline(k + 1):  # the work ran past at least one more deadline: fire the newest passed one
            j = max(k, int((now - self.t0) // self.period))
            while self.deadline(j + 1) <= now:
                j += 1
            while j > k and self.deadline(j) > now:
                j -= 1
            skipped, k = j - k, j
        scheduled = self.deadline(k)
        self.clock.sleep_until(scheduled)
        wake = self.clock.now()
        lateness = wake - scheduled
        late = skipped > 0 or lateness > self.late_tolerance
        self.index = k
        self.missed += skipped
        self.late += int(late)
        return Tick(k, scheduled, wake, lateness, late, skipped)


# ------------------------------------------------------------------------------------------------ thread scheduling
_RT_WARNED = False


@contextlib.contextmanager
def realtime_priority(priority: int | None) -> Iterator[bool]:
    """SCHED_FIFO at ``priority`` for the calling thread while inside (yields whether it was granted); warn once per
    process and carry on at normal priority where the OS refuses (no CAP_SYS_NICE / rtprio limit, not Linux)."""
    global _RT_WARNED
    if priority is None:
        yield False
        return
    old = None
    try:
        old = (os.sched_getscheduler(0), os.sched_getparam(0))
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(priority)))
        granted = True
    except (AttributeError, OSError) as err:  # no such call on this OS, or not permitted (EPERM)
        granted = False
        if not _RT_WARNED:
            _RT_WARNED = True
            warnings.warn(f"real-time priority SCHED_FIFO {priority} refused ({err}); the loop runs at normal "
                          "priority (grant CAP_SYS_NICE or an rtprio limit to use it)", RuntimeWarning, stacklevel=4)
    try:
        yield granted
    finally:
        if granted and old is not None:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, old[0], old[1])


@contextlib.contextmanager
def frozen_gc(enabled: bool = True) -> Iterator[None]:
    """Collect, then ``gc.freeze()`` while inside: the objects that exist now (torch, numpy, MuJoCo, the policy:
    hundreds of thousands) leave the collector's generations, so a full collection during the run walks only what
    the run allocated instead of pausing a tick for milliseconds. Unfrozen on the way out."""
    if not enabled:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def normal_priority() -> None:
    """Run the calling thread at the normal (SCHED_OTHER) policy: a thread or process started by a real-time loop
    thread inherits its SCHED_FIFO priority, and a busy inference worker at that priority starves everything else."""
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: nothing to undo then
        pass


@contextlib.contextmanager
def switch_interval(seconds: float | None) -> Iterator[None]:
    """``sys.setswitchinterval`` while inside: how long another Python thread may keep the GIL once the loop's thread
    asks for it (Python's default is 5 ms). None leaves it."""
    if seconds is None:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(float(seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@contextlib.contextmanager
def cpu_affinity(cpus: set[int] | None) -> Iterator[set[int] | None]:
    """Run the calling thread on ``cpus`` only while inside (``os.sched_setaffinity`` applies to the calling thread on
    Linux); None, an empty set or an OS without the call leave it. Yields the set in force (None when left)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    old = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:  # a core outside the allowed set (a container's cpuset): leave the affinity
        yield None
        return
    try:
        yield set(cpus)
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, old)


def split_cpus(worker: set[int] | None | str = "auto") -> tuple[set[int] | None, set[int] | None]:
    """``(loop cores, worker cores)`` of the cores this process may use: ``worker="auto"``: with 2+ cores the
    inference worker gets the last one and the loop the others, so a busy worker never runs on the loop's core;
    a set: those cores (of the allowed ones) for the worker, the rest for the loop; None, one core or no affinity
    call: ``(None, None)`` (unpinned)."""
    if worker is None or not hasattr(os, "sched_getaffinity"):
        return None, None
    allowed = os.sched_getaffinity(0)
    mine = {sorted(allowed)[-1]} if worker == "auto" else set(worker) & allowed
    rest = allowed - mine
    return (rest, mine) if mine and rest else (None, None)


def host_steal_seconds() -> float:
    """The time the hypervisor has kept this machine's runnable vCPUs from running, summed over the CPUs, in
    seconds since boot (``/proc/stat``'s steal column; 0.0 where there is none: not Linux, not a VM). The
    difference over a run says how much of it the host took: on a shared VM a thread of any priority stalls for
    milliseconds while its vCPU is descheduled."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = int(fields[8]) if fields and fields[0] == "cpu" and len(fields) > 8 else 0
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return 0.0
