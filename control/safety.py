"""The safety layer between a controller's actions and the robot, and the e-stop latch.

Every tick of :class:`stlflow.control.realtime.RealtimeLoop` goes through it:

1. **e-stop latch** (:meth:`SafetyLayer.latch`): set by SIGINT / SIGTERM (handlers installed only when asked,
   :meth:`SafetyLayer.signal_handlers`, and restored afterwards), by a failed inference worker, by a lost robot
   (:class:`~stlflow.control.robot.RobotError`), by a stale observation past its grace period and by too many
   fallbacks in a row. Once set, the loop holds the robot and ends; it stays set (a new run refuses to start) until
   :meth:`SafetyLayer.reset_estop`. The robot's ``hold()`` runs on every way out of the loop.
2. **watchdog** (:meth:`SafetyLayer.watchdog`): an observation older than ``stale_after`` holds the robot; older
   than ``stale_after + estop_after`` latches the e-stop.
3. **rules** (optional, :meth:`SafetyLayer.check_signals`): the online STL monitor of :mod:`stlflow.stl` on each new
   observation's signals; a violated rule holds the robot for that tick (``hold_on_violation``).
4. **action filter** (:meth:`SafetyLayer.filter`): a non-finite action holds the robot (counted); the action is
   clamped to the robot's bounds (counted) and, when ``rate_limit`` is set, each continuous channel moves at most
   that much per tick from the previous action sent (counted).
5. **fallbacks** (:meth:`SafetyLayer.fallback`): ``max_fallbacks`` held ticks in a row latch the e-stop.

Monitoring: each top-level conjunct of the rules is watched on its own. An invariant ``G(φ)`` (no interval) is
violated at the first sample where φ's robustness is negative, so its body φ is monitored (the online monitor's
``delayed`` value, exact, after φ's own horizon: at once for a predicate). A conjunct with a finite horizon h is
decided h samples after the start (its ``delayed`` value at sample 0). A conjunct with an unbounded future operator
that is not an invariant cannot be decided online and is left out (``unmonitored``). The monitor samples at the
robot's ``dt`` (one sample per new observation).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stlflow.control.robot import RobotSpec

__all__ = ["RuleWatch", "SafetyConfig", "SafetyLayer"]


@dataclass(frozen=True)
class SafetyConfig:
    """Settings of a :class:`SafetyLayer` (times in seconds on the loop's clock).

    Args:
        rate_limit: the most each continuous action channel may change per tick (physical units; one number or one
            per channel); None: no limit.
        stale_after: an observation older than this holds the robot (None: 3 periods).
        estop_after: stale for this much longer latches the e-stop (None: 10 periods).
        max_fallbacks: held ticks in a row that latch the e-stop (None: never).
        monitor: run the online STL monitor on each new observation's signals.
        monitor_rules: the rules to monitor (None: the robot's ``spec().rules``).
        monitor_params: rule parameters, over the robot's ``rule_defaults``.
        hold_on_violation: a tick whose observation violates a monitored rule holds the robot.
    """

    rate_limit: float | Sequence[float] | None = None
    stale_after: float | None = None
    estop_after: float | None = None
    max_fallbacks: int | None = 25
    monitor: bool = False
    monitor_rules: str | None = None
    monitor_params: Mapping[str, float] | None = None
    hold_on_violation: bool = True

    def __post_init__(self) -> None:
        for name in ("stale_after", "estop_after"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds or None, got {value}")
        if self.max_fallbacks is not None and int(self.max_fallbacks) < 1:
            raise ValueError(f"max_fallbacks must be >= 1 or None, got {self.max_fallbacks}")
        if self.rate_limit is not None and not np.all(np.asarray(self.rate_limit, np.float64) > 0):
            raise ValueError(f"rate_limit must be > 0 (per tick, physical units), got {self.rate_limit}")


class RuleWatch:
    """The online STL monitor of ``rules`` at ``params``, one conjunct at a time (see the module docstring).

    :meth:`update` takes one sample (signal name -> value) and returns the conjuncts decided violated by it, as
    ``(rule text, robustness, sample index it refers to)``.
    """

    def __init__(self, rules: str, dt: float, params: Mapping[str, float]) -> None:
        from stlflow.stl import parse
        from stlflow.stl.syntax import UNBOUNDED, And, Temporal

        formula = parse(rules)
        self.parts: list[tuple[str, Any, bool]] = []  # (text, monitor, invariant)
        self.unmonitored: list[str] = []
        for part in formula.args if isinstance(formula, And) else (formula,):
            if isinstance(part, Temporal) and part.op == "G" and part.interval == UNBOUNDED:
                self.parts.append((str(part), part.arg.monitor(dt=dt, params=dict(params)), True))
                continue
            mon = part.monitor(dt=dt, params=dict(params))
            if mon.h == float("inf"):
                self.unmonitored.append(str(part))
            else:
                self.parts.append((str(part), mon, False))
        self.signals = sorted({s for _, m, _ in self.parts for s in m.formula.signals})

    def reset(self) -> None:
        for _, mon, _ in self.parts:
            mon.reset()

    def update(self, sample: Mapping[str, float]) -> list[tuple[str, float, int]]:
        out = []
        for text, mon, invariant in self.parts:
            r = mon.update(sample)
            if r.delayed is None or (not invariant and r.delayed_t != 0):
                continue
            if r.delayed < 0:
                out.append((text, float(r.delayed), int(r.delayed_t)))
        return out


class SafetyLayer:
    """The checks of the module docstring, with their counters (:attr:`counters`) and the e-stop latch.

    ``SafetyLayer(config)`` or ``SafetyLayer(rate_limit=0.1, ...)`` (keywords override ``config``'s fields).
    :meth:`begin` readies it for one run of a robot (bounds, period, monitor, counters); the latch survives it.
    """

    def __init__(self, config: SafetyConfig | None = None, **overrides: Any) -> None:
        base = config or SafetyConfig()
        self.config = SafetyConfig(**{**base.__dict__, **overrides}) if overrides else base
        self._reason: str | None = None
        self.low = self.high = None
        self.continuous: np.ndarray | None = None
        self.rate: np.ndarray | None = None
        self.stale_after = self.estop_after = float("inf")
        self.rules: RuleWatch | None = None
        self.violations: list[dict[str, Any]] = []
        self._last: np.ndarray | None = None
        self._in_row = 0
        self._samples = 0
        self.counters: dict[str, int] = {}
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.counters = {"nonfinite": 0, "clamped": 0, "clamped_channels": 0, "rate_limited": 0, "stale": 0,
                         "violations": 0, "fallbacks": 0, "max_fallbacks_in_row": 0, "estops": 0}

    # -------------------------------------------------------------------------------------------- a run
    def begin(self, spec: RobotSpec, period: float) -> None:
        """Ready the layer for a run of a robot with ``spec`` at ``period`` seconds per tick (bounds, rate limit,
        watchdog times, monitor; counters zeroed; the e-stop latch is left as it is)."""
        c = self.config
        self.low = np.asarray(spec.action_low, np.float64)
        self.high = np.asarray(spec.action_high, np.float64)
        mask = np.asarray(spec.discrete_action_mask or [False] * spec.action_dim, bool).reshape(-1)
        self.continuous = ~mask
        if c.rate_limit is None:
            self.rate = None
        else:
            rate = np.broadcast_to(np.asarray(c.rate_limit, np.float64), (spec.action_dim,))
            self.rate = rate.copy()
        self.stale_after = 3.0 * period if c.stale_after is None else float(c.stale_after)
        self.estop_after = 10.0 * period if c.estop_after is None else float(c.estop_after)
        self.rules = None
        if c.monitor:
            text = c.monitor_rules or spec.rules
            if not text:
                raise ValueError("monitor=True needs rules: the robot's spec has none; give monitor_rules")
            params = {**dict(spec.rule_defaults), **dict(c.monitor_params or {})}
            self.rules = RuleWatch(text, spec.dt, params)
        self.violations = []
        self._last, self._in_row, self._samples = None, 0, 0
        self._reset_counters()

    # -------------------------------------------------------------------------------------------- e-stop latch
    @property
    def latched(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why the e-stop latched (the first reason), None when it is clear."""
        return self._reason

    def latch(self, reason: str) -> None:
        """Set the e-stop (the first reason is kept). Safe to call from a signal handler: it takes no lock."""
        if self._reason is None:
            self._reason = str(reason)
            self.counters["estops"] = self.counters.get("estops", 0) + 1

    def reset_estop(self) -> None:
        """Clear the e-stop latch: the only way to clear it."""
        self._reason = None
        self._in_row = 0

    @contextlib.contextmanager
    def signal_handlers(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
        """While inside, each of ``signals`` latches the e-stop (instead of, e.g., KeyboardInterrupt); the previous
        handlers are restored on the way out. Needs the main thread (Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread; run the loop there or "
                               "pass handle_signals=False")

        def on_signal(signum: int, frame: Any) -> None:
            self.latch(signal.Signals(signum).name)

        previous = {s: signal.getsignal(s) for s in signals}
        try:
            for s in signals:
                signal.signal(s, on_signal)
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    # -------------------------------------------------------------------------------------------- per tick
    def watchdog(self, age: float) -> str:
        """``"ok"``, ``"hold"`` (the observation is older than ``stale_after``) or ``"estop"`` (older than
        ``stale_after + estop_after``: the e-stop latches)."""
        if age <= self.stale_after:
            return "ok"
        self.counters["stale"] += 1
        if age > self.stale_after + self.estop_after:
            self.latch(f"stale observation: {age:.3f} s old (hold after {self.stale_after:.3f} s, e-stop after "
                       f"{self.estop_after:.3f} s more)")
            return "estop"
        return "hold"

    def check_signals(self, signals: Mapping[str, float]) -> bool:
        """Feed one new observation's signals to the monitor (when on); True when a rule is violated at it."""
        if self.rules is None:
            return False
        index = self._samples
        self._samples += 1
        if not all(name in signals for name in self.rules.signals):
            missing = sorted(set(self.rules.signals) - set(signals))
            raise ValueError(f"the observation lacks the signal(s) {missing} the monitored rules need")
        found = self.rules.update(signals)
        for rule, rho, at in found:
            self.violations.append({"rule": rule, "robustness": rho, "sample": at, "observed_at": index})
        self.counters["violations"] += len(found)
        return bool(found)

    def filter(self, action: Any) -> tuple[np.ndarray | None, int, int, bool]:
        """``(action to send or None to hold, channels clamped, channels rate-limited, non-finite)``."""
        a = np.array(action, dtype=np.float64).reshape(-1)
        if a.shape != self.low.shape:
            raise ValueError(f"the controller's action has {a.size} channels; the robot takes {self.low.size}")
        if not np.all(np.isfinite(a)):
            self.counters["nonfinite"] += 1
            return None, 0, 0, True
        clipped = np.clip(a, self.low, self.high)
        clamped = int(np.count_nonzero(clipped != a))
        if clamped:
            self.counters["clamped"] += 1
            self.counters["clamped_channels"] += clamped
        limited = 0
        if self.rate is not None and self._last is not None:
            lo, hi = self._last - self.rate, self._last + self.rate
            bounded = np.where(self.continuous, np.clip(clipped, lo, hi), clipped)
            limited = int(np.count_nonzero(bounded != clipped))
            clipped = bounded
            if limited:
                self.counters["rate_limited"] += 1
        self._last = clipped
        return clipped, clamped, limited, False

    def fallback(self, held: bool) -> bool:
        """Count a held tick (``held``) or reset the count; True when ``max_fallbacks`` in a row latched the
        e-stop."""
        if not held:
            self._in_row = 0
            return False
        self.counters["fallbacks"] += 1
        self._in_row += 1
        self.counters["max_fallbacks_in_row"] = max(self.counters["max_fallbacks_in_row"], self._in_row)
        limit = self.config.max_fallbacks
        if limit is not None and self._in_row >= int(limit):
            self.latch(f"{self._in_row} ticks in a row without a usable action (max_fallbacks={limit})")
            return True
        return False
