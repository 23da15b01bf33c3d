"""temporary"""
from .monitor import Monitor, MonitorOutput
from .robustness import STLInputError, first_violation, horizon, robustness, robustness_trace, smooth_error_bound
from .syntax import STLSyntaxError, Formula, parse
