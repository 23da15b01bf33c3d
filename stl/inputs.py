"""Input checking for STL evaluation: options, interval bounds in samples, signal and parameter tensors.

Everything here validates or converts what a caller passes to an evaluation (:mod:`stlflow.stl.semantics`,
:mod:`stlflow.stl.monitor`, :mod:`stlflow.stl.calibrate`) and raises :class:`STLInputError` (a ``ValueError``)
with a message that names the offending signal, parameter, interval, ``dt`` or ``smooth``: never another
exception, and never a NaN for bad input. Numbers may be Python, numpy or 0-d torch scalars (not strings, None
or bools); integer and bool signals are computed in float64. The conventions these checks enforce
(interval bounds in the unit of ``dt`` and integer multiples of it, the ``until``/``end`` options) are stated
in the docstring of :mod:`stlflow.stl.semantics`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .syntax import Expr, Formula, Interval, Num, Param

__all__ = [
    "STLInputError", "UNTIL_MODES", "END_MODES", "check_options", "check_inputs", "check_dt", "check_smooth",
    "check_smooth_dtype", "as_number", "as_param", "interval_steps", "as_tensor", "prepare_batch", "interval_groups",
]

UNTIL_MODES = ("strict", "inclusive")
END_MODES = ("truncate", "violate")


class STLInputError(ValueError):
    """Signals, parameters or ``dt`` given to an evaluation do not fit the formula."""


def _show(v: Any) -> str:
    """``v`` for an error message: its repr (shortened) and its type."""
    r = repr(v)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{r} (of type {type(v).__name__})"


def as_number(v: Any, what: str) -> float:
    """``v`` as a Python float: an int, float, numpy scalar, or 0-d numpy array or torch tensor of a real dtype.

    Raises :class:`STLInputError` naming ``what`` for anything else: a string (even one that spells a number),
    None, a bool, a complex number, an array or tensor with more than one element, a number too large for a float.
    """
    if type(v) is float:  # the common case first
        return v
    try:
        if isinstance(v, torch.Tensor):
            if v.ndim == 0 and (v.is_floating_point() or not (v.is_complex() or v.dtype == torch.bool)):
                return float(v.detach().cpu().item())
        elif isinstance(v, np.ndarray | np.generic):
            a = np.asarray(v)
            if a.ndim == 0 and a.dtype.kind in "iuf":
                return float(a)
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            return float(v)
    except OverflowError:
        raise STLInputError(f"{what} must be a number within the range of a float, got {_show(v)}") from None
    raise STLInputError(f"{what} must be a single number (int, float, numpy or 0-d torch scalar), got {_show(v)}")


def check_dt(dt: Any) -> float:
    """``dt`` as a float, checked: a positive, finite number of seconds (see :func:`as_number` for the types)."""
    if type(dt) is float and 0 < dt < math.inf:  # the common case first
        return dt
    v = as_number(dt, "dt (the sample period in seconds)")
    if not (math.isfinite(v) and v > 0):
        raise STLInputError(f"dt must be a positive, finite number of seconds (the sample period), got {dt!r}")
    return v


def check_smooth(smooth: Any) -> float | None:
    """``smooth`` as a float (or None, exact min/max), checked: a positive, finite log-sum-exp temperature."""
    if smooth is None:
        return None
    v = as_number(smooth, "smooth (the log-sum-exp temperature)")
    if not (math.isfinite(v) and v > 0):
        raise STLInputError(f"smooth must be a finite temperature > 0, or None for exact min/max; got {smooth!r}")
    return v


def check_smooth_dtype(smooth: float | None, dtype: torch.dtype) -> None:
    """Raise :class:`STLInputError` when the temperature ``smooth`` is outside the normal range of ``dtype``, the
    dtype the robustness is computed in (rounded to 0, the log-sum-exp would divide 0 by 0 and return NaN; to inf,
    multiply 0 by inf)."""
    if smooth is None:
        return
    info = torch.finfo(dtype)
    if not info.smallest_normal <= float(torch.tensor(smooth, dtype=dtype)) <= info.max:
        raise STLInputError(
            f"smooth={smooth!r} is outside the range of {dtype} ({info.smallest_normal:g} to {info.max:g}), the dtype "
            f"of the signals: pass float64 signals, or a temperature within that range")


def check_options(until: str, end: str) -> None:
    """Raise :class:`STLInputError` unless ``until`` is one of :data:`UNTIL_MODES` and ``end`` one of
    :data:`END_MODES`."""
    if until not in UNTIL_MODES:
        raise STLInputError(f"until={until!r}: expected one of {UNTIL_MODES}")
    if end not in END_MODES:
        raise STLInputError(f"end={end!r}: expected one of {END_MODES}")


def _real_array(v: Any, what: str, dtype: Any = np.float64) -> np.ndarray:
    """A list, tuple or numpy array of real numbers as an array of ``dtype`` (None: as numpy reads it);
    :class:`STLInputError` naming ``what`` for strings, None, complex numbers, ragged lists."""
    try:
        a = np.asarray(v)
    except (ValueError, TypeError) as err:  # ragged lists
        raise STLInputError(f"{what} must be an array of numbers, got {_show(v)} ({err})") from None
    if a.dtype.kind not in "biuf":
        raise STLInputError(f"{what} must be an array of numbers, got {_show(v)} (numpy dtype {a.dtype})")
    return a if dtype is None else np.asarray(a, dtype=dtype)


def as_param(v: Any, name: str) -> Any:
    """A parameter's value, checked: a number (float), a tensor (kept as is, gradients flow), or a list, tuple or
    numpy array of numbers (a float64 array). Raises :class:`STLInputError` naming the parameter otherwise."""
    if type(v) is float:  # the common case first
        return v
    what = f"parameter {name!r}"
    if isinstance(v, torch.Tensor):
        if v.is_complex() or v.dtype == torch.bool:
            raise STLInputError(f"{what} must hold real numbers, got a tensor of dtype {v.dtype}")
        return v
    if isinstance(v, list | tuple) or (isinstance(v, np.ndarray) and v.ndim > 0):
        return _real_array(v, what)
    if isinstance(v, np.ndarray):  # 0-d
        return as_number(v, what)
    if isinstance(v, float | np.floating) or (isinstance(v, int | np.integer) and not isinstance(v, bool)
                                              and math.isfinite(as_number(v, what))):
        return v  # unchanged: a number is used as given (an int too large for a float raises above)
    return as_number(v, what)  # numbers.Real (e.g. Fraction) as a float, anything else raises


def check_inputs(signals: Mapping[str, Any], params: Mapping[str, Any] | None, smooth: float | None,
                 until: str, end: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate the options and turn list/tuple signals and parameters into arrays (inputs are not mutated).

    Raises :class:`STLInputError` when ``signals`` or ``params`` is not a mapping of names, a parameter is not a
    number or an array of numbers (:func:`as_param`), ``smooth`` is not a temperature > 0 or None, or an option
    is unknown.
    """
    check_options(until, end)
    check_smooth(smooth)
    if not isinstance(signals, Mapping):
        raise STLInputError(f"signals must be a mapping signal name -> array, got {_show(signals)}")
    if params is not None and not isinstance(params, Mapping):
        raise STLInputError(f"params must be a mapping parameter name -> value, or None; got {_show(params)}")
    signals = {k: _real_array(v, f"signal {k!r}", None) if isinstance(v, list | tuple) else v
               for k, v in signals.items()}
    params = {k: as_param(v, k) for k, v in (params or {}).items()}
    return signals, params


def _steps(bound: Expr, dt: float, params: Mapping[str, Any], where: Formula) -> int:
    """Interval bound (seconds) -> whole number of samples, with a clear error when it is not a multiple of dt."""
    if isinstance(bound, Num):
        v = bound.value
    else:
        assert isinstance(bound, Param)
        if bound.name not in params:
            raise STLInputError(f"missing parameter {{{bound.name}}}, an interval bound of {where}")
        v = as_param(params[bound.name], bound.name)
        if isinstance(v, torch.Tensor | np.ndarray):
            flat = np.unique(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64))
            if flat.size != 1:
                raise STLInputError(f"interval parameter {{{bound.name}}} must have one value per evaluation group")
            v = float(flat[0])
        v = float(v)
    if not math.isfinite(v) or v < 0:
        raise STLInputError(f"interval bound {v!r} of {where} must be a finite number >= 0")
    q = v / dt
    if not math.isfinite(q):
        raise STLInputError(
            f"interval bound {v:g} of {where} is too large for dt={dt:g}: {v:g}/{dt:g} is not a finite number of "
            "samples; use a smaller bound or a larger dt")
    k = round(q)
    if abs(q - k) > 1e-6 * max(1.0, abs(k)):
        raise STLInputError(
            f"interval bound {v:g} of {where} is not an integer multiple of dt={dt:g} ({v:g}/{dt:g} = {v / dt:.6g}); "
            "use bounds that are whole numbers of samples")
    return int(k)


def interval_steps(iv: Interval, dt: float, params: Mapping[str, Any], where: Formula) -> tuple[int, int | None]:
    """The bounds of ``iv`` in samples: ``(a, b)``, ``b`` None when unbounded.

    ``where`` is the node that holds the interval (named in errors). Raises :class:`STLInputError` when a bound is
    negative, not finite, not an integer multiple of ``dt``, a per-trajectory parameter with several values, or
    when ``b < a``, and when ``dt`` is not a positive number (:func:`check_dt`).
    """
    dt = check_dt(dt)
    a = _steps(iv.lo, dt, params, where)
    b = None if iv.hi is None else _steps(iv.hi, dt, params, where)
    if b is not None and b < a:
        raise STLInputError(f"empty interval in {where}: lower bound {a * dt:g} > upper bound {b * dt:g}")
    return a, b


def as_tensor(v: Any, name: str) -> torch.Tensor:
    """``v`` (tensor, array, list or number) as a floating-point tensor; integers and bools become float64.

    A tensor is returned as is (same device, no copy) when it is already floating point; an integer or bool tensor
    becomes float64 on its device (float64 keeps every integer up to 2**53 and any smooth temperature a float can
    hold). ``name`` is used in the :class:`STLInputError` raised for anything that is not real numbers: strings,
    None, complex numbers, ragged lists.
    """
    if isinstance(v, torch.Tensor):
        t = v
    else:
        a = _real_array(v, name, None)
        if a.dtype.kind in "biu" or a.dtype.itemsize > 8:  # integers, bools, long double: float64
            a = np.asarray(a, dtype=np.float64)
        t = torch.as_tensor(a)
    if t.is_complex():
        raise STLInputError(f"{name}: unsupported dtype {t.dtype}; expected real numbers")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise STLInputError(f"{name}: unsupported dtype {t.dtype}")
    return t


def prepare_batch(formula: Formula, signals: Mapping[str, Any], params: Mapping[str, Any] | None, dt: float,
                  smooth: float | None = None):
    """Check names and shapes; return (signal tensors (B, T), params, B, T, dtype, device).

    Signals are broadcast to one batch size and promoted to one dtype on the first signal's device. Threshold
    parameters become floats, (1, 1) tensors or (B, 1) tensors; interval parameters are passed through for
    :func:`interval_steps`. ``dt`` is checked (:func:`check_dt`), and ``smooth``, when given, against the dtype
    (:func:`check_smooth_dtype`).
    """
    check_dt(dt)
    params = {k: as_param(v, k) for k, v in (params or {}).items()}
    missing = sorted(formula.signals - set(signals))
    if missing:
        raise STLInputError(f"missing signal(s) {missing} for {formula}; given signals: {sorted(signals)}")
    missing = sorted(formula.params - set(params))
    if missing:
        raise STLInputError(f"missing parameter(s) {missing} for {formula}; given parameters: {sorted(params)}")
    if not formula.signals:
        raise STLInputError(f"{formula} reads no signal, so the trace length is undefined")
    xs = {}
    for name in sorted(formula.signals):
        t = as_tensor(signals[name], f"signal {name!r}")
        if t.ndim == 1:
            t = t.unsqueeze(0)
        if t.ndim != 2 or t.shape[1] == 0:
            raise STLInputError(f"signal {name!r} must have shape (T,) or (B, T) with T >= 1, got {tuple(t.shape)}")
        xs[name] = t
    dtype = xs[next(iter(xs))].dtype
    for t in xs.values():
        dtype = torch.promote_types(dtype, t.dtype)
    check_smooth_dtype(check_smooth(smooth), dtype)
    device = next(iter(xs.values())).device
    lengths = {n: t.shape[1] for n, t in xs.items()}
    if len(set(lengths.values())) != 1:
        raise STLInputError(f"signals have different lengths: {lengths}")
    T = next(iter(lengths.values()))
    batch = {n: t.shape[0] for n, t in xs.items() if t.shape[0] != 1}
    real_params: dict[str, Any] = {}
    for name in formula.params:
        v = params[name]
        if name in formula.interval_params:
            real_params[name] = v  # resolved by interval_steps
            continue
        if isinstance(v, torch.Tensor | np.ndarray) and np.ndim(v) > 0:
            t = as_tensor(v, f"parameter {name!r}").to(device=device, dtype=dtype)
            if t.ndim != 1:
                raise STLInputError(f"parameter {name!r} must be a number or shape (B,), got {tuple(t.shape)}")
            if t.shape[0] != 1:
                batch[f"{{{name}}}"] = t.shape[0]
            real_params[name] = t.unsqueeze(1)
        elif isinstance(v, torch.Tensor):
            real_params[name] = v.to(device=device, dtype=dtype).reshape(1, 1)
        else:
            real_params[name] = as_number(v, f"parameter {name!r}")
    if len(set(batch.values())) > 1:
        raise STLInputError(f"batch sizes differ: {batch}")
    B = next(iter(batch.values()), 1)
    xs = {n: t.to(device=device, dtype=dtype).expand(B, T) for n, t in xs.items()}
    return xs, real_params, B, T, dtype, device


def interval_groups(formula: Formula, params: Mapping[str, Any]) -> list[tuple[torch.Tensor | None, dict]] | None:
    """Split the batch where interval parameters take several values per trajectory (one evaluation per group).

    Returns None when every interval parameter has one value; else a list of (row indices, params with the
    group's interval values as floats).
    """
    per_row = {}
    for name in formula.interval_params:
        v = params.get(name)
        if v is not None:
            v = as_param(v, name)
        if isinstance(v, torch.Tensor | np.ndarray) and np.ndim(v) > 0:
            arr = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).reshape(-1)
            if np.unique(arr).size > 1:
                per_row[name] = arr
    if not per_row:
        return None
    names = sorted(per_row)
    table = np.stack([per_row[n] for n in names], 1)
    uniq, inverse = np.unique(table, axis=0, return_inverse=True)
    out = []
    for g, row in enumerate(uniq):
        idx = torch.as_tensor(np.nonzero(inverse.reshape(-1) == g)[0])
        p = dict(params)
        p.update({n: float(x) for n, x in zip(names, row)})
        out.append((idx, p))
    return out
