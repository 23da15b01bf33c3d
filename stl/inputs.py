"""Input checking for STL evaluation: options, interval bounds in samples, signal and parameter tensors.

Everything here validates or converts what a caller passes to an evaluation (:mod:`stlflow.stl.semantics`,
:mod:`stlflow.stl.monitor`, :mod:`stlflow.stl.calibrate`) and raises :class:`STLInputError` or ``ValueError``
with a message that names the offending signal, parameter or interval. The conventions these checks enforce
(interval bounds in the unit of ``dt`` and integer multiples of it, the ``until``/``end`` options) are stated
in the docstring of :mod:`stlflow.stl.semantics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .syntax import Expr, Formula, Interval, Num, Param

__all__ = [
    "STLInputError", "UNTIL_MODES", "END_MODES", "check_options", "check_inputs", "interval_steps", "as_tensor",
    "prepare_batch", "interval_groups",
]

UNTIL_MODES = ("strict", "inclusive")
END_MODES = ("truncate", "violate")


class STLInputError(ValueError):
    """Signals, parameters or ``dt`` given to an evaluation do not fit the formula."""


def check_options(until: str, end: str) -> None:
    """Raise ``ValueError`` unless ``until`` is one of :data:`UNTIL_MODES` and ``end`` one of :data:`END_MODES`."""
    if until not in UNTIL_MODES:
        raise ValueError(f"until={until!r}: expected one of {UNTIL_MODES}")
    if end not in END_MODES:
        raise ValueError(f"end={end!r}: expected one of {END_MODES}")


def check_inputs(signals: Mapping[str, Any], params: Mapping[str, Any] | None, smooth: float | None,
                 until: str, end: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate the options and turn list/tuple signals and parameters into arrays (inputs are not mutated)."""
    check_options(until, end)
    if smooth is not None and not (smooth > 0):
        raise ValueError(f"smooth must be a temperature > 0 or None, got {smooth!r}")
    signals = {k: np.asarray(v) if isinstance(v, list | tuple) else v for k, v in signals.items()}
    params = {k: np.asarray(v, dtype=np.float64) if isinstance(v, list | tuple) else v
              for k, v in (params or {}).items()}
    return signals, params


def _steps(bound: Expr, dt: float, params: Mapping[str, Any], where: Formula) -> int:
    """Interval bound (seconds) -> whole number of samples, with a clear error when it is not a multiple of dt."""
    if isinstance(bound, Num):
        v = bound.value
    else:
        assert isinstance(bound, Param)
        v = params[bound.name]
        if isinstance(v, torch.Tensor | np.ndarray):
            flat = np.unique(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64))
            if flat.size != 1:
                raise STLInputError(f"interval parameter {{{bound.name}}} must have one value per evaluation group")
            v = float(flat[0])
        v = float(v)
    if not math.isfinite(v) or v < 0:
        raise STLInputError(f"interval bound {v!r} of {where} must be a finite number >= 0")
    k = round(v / dt)
    if abs(v / dt - k) > 1e-6 * max(1.0, abs(k)):
        raise STLInputError(
            f"interval bound {v:g} of {where} is not an integer multiple of dt={dt:g} ({v:g}/{dt:g} = {v / dt:.6g}); "
            "use bounds that are whole numbers of samples")
    return int(k)


def interval_steps(iv: Interval, dt: float, params: Mapping[str, Any], where: Formula) -> tuple[int, int | None]:
    """The bounds of ``iv`` in samples: ``(a, b)``, ``b`` None when unbounded.

    ``where`` is the node that holds the interval (named in errors). Raises :class:`STLInputError` when a bound is
    negative, not finite, not an integer multiple of ``dt``, a per-trajectory parameter with several values, or
    when ``b < a``.
    """
    a = _steps(iv.lo, dt, params, where)
    b = None if iv.hi is None else _steps(iv.hi, dt, params, where)
    if b is not None and b < a:
        raise STLInputError(f"empty interval in {where}: lower bound {a * dt:g} > upper bound {b * dt:g}")
    return a, b


def as_tensor(v: Any, name: str) -> torch.Tensor:
    """``v`` (tensor, array, list or number) as a floating-point tensor; integers become the default float dtype.

    A tensor is returned as is (same device, no copy) when it is already floating point. ``name`` is used in the
    :class:`STLInputError` raised for an unsupported dtype.
    """
    if isinstance(v, torch.Tensor):
        t = v
    else:
        t = torch.as_tensor(np.asarray(v))
    if not (t.is_floating_point()):
        t = t.to(torch.get_default_dtype())
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise STLInputError(f"{name}: unsupported dtype {t.dtype}")
    return t


def prepare_batch(formula: Formula, signals: Mapping[str, Any], params: Mapping[str, Any] | None, dt: float):
    """Check names and shapes; return (signal tensors (B, T), params, B, T, dtype, device).

    Signals are broadcast to one batch size and promoted to one dtype on the first signal's device. Threshold
    parameters become floats, (1, 1) tensors or (B, 1) tensors; interval parameters are passed through for
    :func:`interval_steps`.
    """
    if not isinstance(dt, int | float) or not math.isfinite(dt) or dt <= 0:
        raise STLInputError(f"dt must be a positive number of seconds, got {dt!r}")
    params = dict(params or {})
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
    device = next(iter(xs.values())).device
    lengths = {n: t.shape[1] for n, t in xs.items()}
    if len(set(lengths.values())) != 1:
        raise STLInputError(f"signals have different lengths: {lengths}")
    T = next(iter(lengths.values()))
    batch = {n: t.shape[0] for n, t in xs.items() if t.shape[0] != 1}
    real_params: dict[str, Any] = {}
    for name in formula.params:
        v = params[name]
        if isinstance(v, list | tuple):
            v = np.asarray(v, dtype=np.float64)
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
            real_params[name] = float(v)
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
        if isinstance(v, list | tuple):
            v = np.asarray(v, dtype=np.float64)
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
