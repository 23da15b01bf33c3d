"""Online STL monitor: one sample in, robustness out, with the offline semantics of :mod:`.semantics`.

Timing (h = ``formula.horizon(dt)`` samples; update k receives sample k, counting from 0)::

    update k  ─▶  delayed   = ρ(φ, w, k − h)    once k ≥ h; equal to the offline trace at sample k − h
                  so_far    = ρ(φ, w[0..k], 0)   offline ρ(0) of the prefix (truncated windows)
                  lower ≤ ρ(φ, w, 0) ≤ upper     for every continuation w of the prefix, including none

``delayed`` is computed incrementally in plain Python by the stream operators of :mod:`stlflow.stl.online`
(constant amortised work per update for bounded G/F/H/O, O(b) for bounded U/S). A formula with an unbounded
future operator (``G``, ``F``, ``U`` without interval) has h = inf and no ``delayed`` value.

``so_far``, ``lower`` and ``upper`` are evaluated lazily, when read, by the offline evaluator on the
recorded prefix (:func:`stlflow.stl.semantics.robustness_bounds`): interval arithmetic where samples after k
are unknown (every sub-formula's value at an unknown or possibly missing sample widens to [−inf, +inf]);
monotonicity of every operator in its operands makes the bounds sound. Once k ≥ h (finite h) ρ(0) is final:
it is computed once and the prefix is no longer recorded. With h = inf the prefix grows and each read costs
O(k). The conventions (interval bounds, end of signal) are stated in :mod:`stlflow.stl.semantics`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .inputs import STLInputError, as_number, check_dt, check_options, interval_steps
from .online import build_online, pad_horizon
from .semantics import horizon, robustness_bounds, robustness_trace
from .syntax import BinaryTemporal, Formula

__all__ = ["Monitor", "MonitorOutput", "MAX_SAMPLES"]

MAX_SAMPLES = 10**8
"""The most samples a monitor holds (the look-ahead of its bounds, the window of a bounded ``S``)."""


class MonitorOutput:
    """Result of one :meth:`Monitor.update`.

    Attributes:
        t: index of the sample just received.
        delayed: ρ at sample ``delayed_t = t − h`` (equal to the offline trace there), None while t < h or h = inf.
        so_far, lower, upper: see :mod:`stlflow.stl.monitor`; evaluated when first read.
    """

    __slots__ = ("t", "delayed", "delayed_t", "_mon", "_hist", "_cache")

    def __init__(self, t, delayed, delayed_t, mon, hist):
        self.t, self.delayed, self.delayed_t = t, delayed, delayed_t
        self._mon, self._hist, self._cache = mon, hist, None

    def _values(self) -> tuple[float, float, float]:
        if self._cache is None:
            self._cache = self._mon._rho0(self._hist, self.t + 1)
        return self._cache

    @property
    def so_far(self) -> float:
        return self._values()[0]

    @property
    def lower(self) -> float:
        return self._values()[1]

    @property
    def upper(self) -> float:
        return self._values()[2]

    @property
    def verdict(self) -> str:
        """'satisfied' if lower ≥ 0, 'violated' if upper < 0, else 'undecided' (ρ(0) ≥ 0 means satisfied)."""
        lo, hi = self.lower, self.upper
        return "satisfied" if lo >= 0 else "violated" if hi < 0 else "undecided"

    def __repr__(self) -> str:
        return f"MonitorOutput(t={self.t}, delayed={self.delayed}, delayed_t={self.delayed_t})"


class Monitor:
    """Online monitor of ``formula`` for one trajectory (see the module docstring for the timing).

    Args:
        formula: the specification.
        dt: sample period in seconds.
        params: name -> float for every free parameter.
        until, end: as in :func:`stlflow.stl.semantics.robustness_trace`.
    """

    def __init__(self, formula: Formula, dt: float, params: Mapping[str, Any] | None = None, *,
                 until: str = "strict", end: str = "truncate"):
        check_options(until, end)
        dt = check_dt(dt)
        if params is not None and not isinstance(params, Mapping):
            raise STLInputError(f"params must be a mapping parameter name -> number, or None; got {params!r}")
        params = {k: as_number(v, f"monitor parameter {k!r} (one trajectory: a single number)")
                  for k, v in (params or {}).items()}
        missing = sorted(formula.params - set(params))
        if missing:
            raise STLInputError(f"missing parameter(s) {missing} for {formula}; given parameters: {sorted(params)}")
        self.formula, self.dt, self.params, self.until, self.end = formula, dt, params, until, end
        self.h = horizon(formula, dt, params)
        self._pad = pad_horizon(formula, dt, params) + 1
        held = max([self._pad] + [b if b is not None else a for node in formula.walk()
                                  if isinstance(node, BinaryTemporal) and node.op == "S"
                                  for a, b in [interval_steps(node.interval, dt, params, node)]])
        if held > MAX_SAMPLES:
            raise STLInputError(
                f"{formula} needs {float(held):.4g} samples of memory in the online monitor at dt={dt:g} (at most "
                f"{MAX_SAMPLES} are supported); use shorter intervals or a larger dt, or evaluate the recorded signal "
                "offline")
        self._root = build_online(formula, dt, params, until == "inclusive")
        self._signals = frozenset(formula.signals)
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next update is sample 0."""
        self._root.reset()
        self._t = -1
        self._hist: dict[str, list[float]] = {name: [] for name in self._signals}
        self._final: tuple[float, float, float] | None = None

    def update(self, sample: Mapping[str, float]) -> MonitorOutput:
        """Take the next sample (signal name -> value) and return a :class:`MonitorOutput`.

        Raises :class:`STLInputError` (before changing any state) when ``sample`` is not a mapping, lacks a signal
        of the formula, or holds a value that is not a single number.
        """
        if not isinstance(sample, Mapping):
            raise STLInputError(f"a sample must be a mapping signal name -> number, got {sample!r}")
        if not self._signals <= sample.keys():
            raise STLInputError(f"missing signal(s) {sorted(self._signals - set(sample))} in the sample; "
                                f"given signals: {sorted(sample)}")
        for name in self._signals:
            if type(sample[name]) is not float:
                as_number(sample[name], f"signal {name!r} in the sample")
        self._t = t = self._t + 1
        if t <= self.h:  # samples beyond the horizon never change ρ(0)
            for name, values in self._hist.items():
                values.append(float(sample[name]))
        v = self._root.step(sample)
        return MonitorOutput(t, v, None if v is None else t - self.h, self, self._hist)

    def _rho0(self, hist: dict[str, list[float]], n: int) -> tuple[float, float, float]:
        """(so_far, lower, upper) of ρ(0) given the first n samples of ``hist``."""
        final = n > self.h
        if final and self._final is not None and hist is self._hist:
            return self._final
        n_used = min(n, len(next(iter(hist.values()))))
        prefix = {k: torch.tensor(v[:n_used], dtype=torch.float64) for k, v in hist.items()}
        opts = {"until": self.until, "end": self.end}
        with torch.no_grad():
            so_far = float(robustness_trace(self.formula, prefix, self.dt, self.params, **opts)[0, 0])
            if final:
                out = (so_far, so_far, so_far)
                if hist is self._hist:
                    self._final = out
                return out
            L = n_used + self._pad
            padded = {k: torch.cat([x, torch.zeros(L - n_used, dtype=torch.float64)]) for k, x in prefix.items()}
            lo, hi = (float(r[0, 0]) for r in robustness_bounds(self.formula, padded, self.dt, self.params,
                                                                known=n_used, **opts))
        return so_far, lo, hi
