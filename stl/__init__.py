"""stlflow.stl: Signal Temporal Logic rules — parser, batched exact and smooth robustness, calibration, monitor.

>>> from stlflow.stl import parse
>>> spec = parse("G(speed <= {v_max}) & F[0,{T}](dist_goal <= {eps})")
>>> sorted(spec.params), sorted(spec.signals)
(['T', 'eps', 'v_max'], ['dist_goal', 'speed'])

The semantics are stated in :mod:`stlflow.stl.semantics`; the grammar in :mod:`stlflow.stl.syntax`.
Depends only on torch and numpy.
"""

from .calibrate import Calibration, calibrate
from .monitor import Monitor, MonitorOutput
from .semantics import STLInputError, first_violation, horizon, robustness, robustness_trace, smooth_error_bound
from .syntax import Formula, STLSyntaxError, parse

__all__ = [
    "parse", "STLSyntaxError", "STLInputError", "Formula", "robustness", "robustness_trace", "horizon",
    "smooth_error_bound", "first_violation", "calibrate", "Calibration", "Monitor", "MonitorOutput",
]
