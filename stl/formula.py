"""The evaluation methods of every STL formula node: ``spec.robustness(...)``, ``spec.monitor(...)`` and the rest.

The syntax tree (:mod:`stlflow.stl.syntax`) is pure data and imports nothing of the evaluation. This module
imports both the tree and the evaluation (:mod:`stlflow.stl.semantics`, :mod:`stlflow.stl.monitor`) and adds
the methods below to :class:`Formula`, so every node, parsed or built by hand, carries them; importing
:mod:`stlflow.stl` imports this module. Each method is the public function of the same name with the formula
as its first argument, so its documentation is that function's. The conventions (interval bounds in the unit
of ``dt``, windows truncated at the end of the signal, the smooth error bound) are stated in
:mod:`stlflow.stl.semantics`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .monitor import Monitor
from .semantics import horizon, robustness, robustness_trace, smooth_error_bound
from .syntax import Formula

__all__ = ["Formula", "monitor"]


def monitor(formula: Formula, dt: float, params: Mapping[str, Any] | None = None, **options: Any) -> Monitor:
    """An online monitor of ``formula`` (see :class:`stlflow.stl.monitor.Monitor` for the arguments)."""
    return Monitor(formula, dt, params, **options)


Formula.horizon = horizon  # type: ignore[attr-defined]
Formula.robustness = robustness  # type: ignore[attr-defined]
Formula.robustness_trace = robustness_trace  # type: ignore[attr-defined]
Formula.smooth_error_bound = smooth_error_bound  # type: ignore[attr-defined]
Formula.monitor = monitor  # type: ignore[attr-defined]
