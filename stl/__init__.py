"""stlflow.stl: Signal Temporal Logic rules — parser, batched exact and smooth robustness, calibration, monitor.

>>> from stlflow.stl import parse
>>> spec = parse("G(speed <= {v_max}) & F[0,{T}](dist_goal <= {eps})")
>>> sorted(spec.params), sorted(spec.signals)
(['T', 'eps', 'v_max'], ['dist_goal', 'speed'])

Modules, from the bottom up (each imports only the ones before it):
:mod:`~stlflow.stl.syntax` (the formula tree), :mod:`~stlflow.stl.parser` (text -> tree, the grammar),
:mod:`~stlflow.stl.inputs` (checking signals, parameters, ``dt``), :mod:`~stlflow.stl.kernels` (sliding-window
kernels), :mod:`~stlflow.stl.semantics` (robustness; the semantics and conventions are stated there),
:mod:`~stlflow.stl.online` and :mod:`~stlflow.stl.monitor` (online monitor), :mod:`~stlflow.stl.calibrate`
(parameter fitting), :mod:`~stlflow.stl.formula` (the evaluation methods of every formula node).
Depends only on torch and numpy. Bad input raises :class:`STLSyntaxError` (formula text, with a caret under the
offending column) or :class:`STLInputError` (signals, parameters, ``dt``, ``smooth``), both ``ValueError``
subclasses whose message names the input; ``stlflow stl check`` turns them into exit status 2.
"""

from .calibrate import Calibration, calibrate
from .formula import Formula
from .inputs import STLInputError
from .monitor import Monitor, MonitorOutput
from .parser import STLSyntaxError, parse
from .semantics import first_violation, horizon, robustness, robustness_trace, smooth_error_bound

__all__ = [
    "parse", "STLSyntaxError", "STLInputError", "Formula", "robustness", "robustness_trace", "horizon",
    "smooth_error_bound", "first_violation", "calibrate", "Calibration", "Monitor", "MonitorOutput",
]
