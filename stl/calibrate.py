"""Parametric STL: fit free parameters to demonstrations.

``mode="tightest"`` gives every demonstration its own tightest values (the pSTL diffusion-policy recipe:
each demo then satisfies its own specification, loosened by an optional ``margin``). ``mode="dataset"``
gives one value per parameter, the tightest satisfied by all demos (``q=1``) or by a fraction ``q`` of them.

How: the direction in which each parameter loosens the rule is read from the formula (ρ is monotone in a
threshold that enters predicates linearly with one sign, and in interval bounds: a larger upper bound of
``F``/``O``/``U``/``S`` and a larger lower bound of ``G``/``H`` loosen the rule, everything flips under ``!``
and on the left of ``->``); a parameter used with both polarities, or non-linearly, is reported as not monotone.
Real thresholds are found by bisection to a relative tolerance, then snapped onto the nearest per-sample root
of the predicates that contain the parameter, so the result is the data value itself (``max(speed)`` for
``G(speed <= {v_max})``): the exact ρ is a min/max of those affine predicate values, so its root is one of them.
Interval bounds are scanned over every multiple of ``dt``. All demos are evaluated together in one batch.
Several parameters are calibrated one after the other in the order given, each with the earlier ones at their
calibrated values and the later ones at their loosest, so every satisfiable demo satisfies the final
specification in ``"tightest"`` mode. Satisfaction means ρ(0) ≥ 0, with the semantics (interval bounds, end of
signal) stated in :mod:`stlflow.stl.semantics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .inputs import STLInputError, as_tensor
from .semantics import robustness, robustness_trace
from .syntax import (
    Abs,
    BinaryTemporal,
    BinOp,
    Expr,
    Formula,
    Implies,
    Neg,
    Not,
    Num,
    Param,
    Predicate,
    Signal,
    Temporal,
)

__all__ = ["calibrate", "Calibration", "parameter_direction"]


@dataclass
class Calibration:
    """Result of :func:`calibrate`; arrays have one entry per demonstration (B,).

    Attributes:
        values: parameter name -> values to use, per demo (in ``"dataset"`` mode the one value, repeated).
        satisfied: ρ(0) ≥ 0 with ``values`` (and ``fixed``).
        robustness: ρ(0) with ``values``.
        tightest: parameter name -> each demo's own tightest value before the margin (NaN: no value satisfies it;
            ∓inf: every value satisfies it).
        direction: +1 if larger values loosen the rule (ρ non-decreasing), −1 if smaller values do.
        dataset: parameter name -> the single dataset value (``"dataset"`` mode only).
    """

    values: dict[str, np.ndarray]
    satisfied: np.ndarray
    robustness: np.ndarray
    tightest: dict[str, np.ndarray]
    direction: dict[str, int]
    mode: str
    q: float
    margin: dict[str, float]
    dataset: dict[str, float] = field(default_factory=dict)

    def params(self, i: int) -> dict[str, float]:
        """Parameter values of demo ``i`` as a plain dict (for ``spec.robustness(..., params=...)``)."""
        return {k: float(v[i]) for k, v in self.values.items()}


# --------------------------------------------------------------------------- monotonicity


def _dsign(e: Expr, name: str) -> int | None:
    """Sign of d e / d {name}: 0, +1, −1, or None when it is not of one sign."""
    if isinstance(e, Num | Signal):
        return 0
    if isinstance(e, Param):
        return int(e.name == name)
    if isinstance(e, Neg):
        d = _dsign(e.arg, name)
        return None if d is None else -d
    if isinstance(e, Abs):
        d = _dsign(e.arg, name)
        return 0 if d == 0 else None
    assert isinstance(e, BinOp)
    dl, dr = _dsign(e.left, name), _dsign(e.right, name)
    if e.op == "*":
        if dl == 0 and dr == 0:
            return 0
        for d, other in ((dl, e.right), (dr, e.left)):
            if d and _constant(other) is not None:
                c = _constant(other)
                return 0 if c == 0 else d * (1 if c > 0 else -1)
        return None
    return _combine(dl, dr if e.op == "+" else (None if dr is None else -dr))


def _combine(a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return None
    if a == 0 or b == 0 or a == b:
        return a or b
    return None


def _constant(e: Expr) -> float | None:
    if isinstance(e, Num):
        return e.value
    if isinstance(e, Neg):
        c = _constant(e.arg)
        return None if c is None else -c
    if isinstance(e, BinOp):
        a, b = _constant(e.left), _constant(e.right)
        if a is None or b is None:
            return None
        return a + b if e.op == "+" else a - b if e.op == "-" else a * b
    return None


_BOUND_SIGN = {  # sign of dρ / d(bound) for (operator, which bound)
    ("G", "lo"): 1, ("G", "hi"): -1, ("H", "lo"): 1, ("H", "hi"): -1,
    ("F", "lo"): -1, ("F", "hi"): 1, ("O", "lo"): -1, ("O", "hi"): 1,
    ("U", "lo"): -1, ("U", "hi"): 1, ("S", "lo"): -1, ("S", "hi"): 1,
}


def parameter_direction(formula: Formula, name: str) -> int:
    """+1 if ρ is non-decreasing in parameter ``name``, −1 if non-increasing; ValueError if not monotone."""
    found: list[tuple[int | None, str]] = []

    def visit(node: Formula, pol: int) -> None:
        if isinstance(node, Predicate):
            d = _combine(_dsign(node.right, name), None if (x := _dsign(node.left, name)) is None else -x)
            if d != 0:
                found.append((None if d is None else d * pol * (1 if node.op in ("<", "<=") else -1), str(node)))
            return
        if isinstance(node, Temporal | BinaryTemporal):
            for which, b in (("lo", node.interval.lo), ("hi", node.interval.hi)):
                if isinstance(b, Param) and b.name == name:
                    found.append((_BOUND_SIGN[(node.op, which)] * pol, str(node)))
        if isinstance(node, Not):
            visit(node.arg, -pol)
        elif isinstance(node, Implies):
            visit(node.left, -pol)
            visit(node.right, pol)
        else:
            for c in node.children():
                visit(c, pol)

    visit(formula, 1)
    if not found:
        raise ValueError(f"parameter {{{name}}} does not occur in {formula}")
    signs = {s for s, _ in found}
    if None in signs or len(signs) > 1:
        where = "; ".join(f"{'non-linear' if s is None else '+' if s > 0 else '-'} in {w}" for s, w in found)
        raise ValueError(f"robustness is not monotone in {{{name}}} ({where}); calibrate needs a monotone parameter")
    return signs.pop()  # type: ignore[return-value]


# --------------------------------------------------------------------------- search


def calibrate(spec: Formula, signals: Mapping[str, Any], dt: float, params: Sequence[str] | None = None,
              mode: str = "tightest", q: float = 1.0, margin: float | Mapping[str, float] = 0.0,
              fixed: Mapping[str, Any] | None = None, tol: float = 1e-12, **options: Any) -> Calibration:
    """Fit the free parameters ``params`` of ``spec`` to demonstrations.

    Args:
        spec: parametric formula.
        signals: name -> (B, T) or (T,) demonstrations (all of one length; one row per demo).
        dt: sample period in seconds.
        params: parameters to calibrate, in order (default: all free parameters not in ``fixed``, sorted).
        mode: "tightest" (per demo) or "dataset" (one value; "quantile" is an alias).
        q: fraction of demos that the dataset value must satisfy, per parameter (``"dataset"`` mode).
        margin: loosening added to the tightest value (units of the parameter; seconds for interval bounds).
        fixed: values of the parameters not calibrated (floats or (B,) arrays).
        tol: relative tolerance of the threshold bisection before snapping onto a data value.
        options: ``until``/``end`` of :func:`stlflow.stl.semantics.robustness_trace`.
    """
    mode = _checked_mode(mode, q)
    fixed = dict(fixed or {})
    names = _calibrated_names(spec, params, fixed)
    margins = {n: float(margin.get(n, 0.0)) if isinstance(margin, Mapping) else float(margin) for n in names}
    problem = _Problem.build(spec, signals, dt, names, options)
    scale = _threshold_scale(spec, problem.sig)
    current: dict[str, Any] = {**fixed, **{n: problem.loosest(n) for n in names}}
    tightest: dict[str, np.ndarray] = {}
    dataset: dict[str, float] = {}
    for n in names:
        d = problem.direction[n]
        t = _tightest(problem, n, current, scale, tol)
        tightest[n] = t
        if mode == "tightest":
            val = np.where(np.isfinite(t), t + d * margins[n], t)
            current[n] = np.where(np.isnan(val), problem.loosest(n), val)
        else:
            dataset[n] = current[n] = _dataset_value(spec, n, t, d, q, margins[n])
        if n in problem.interval_params:
            current[n] = np.maximum(np.round(np.asarray(current[n], dtype=np.float64) / dt), 0.0) * dt
            if mode == "dataset":
                dataset[n] = float(current[n])
    values = {n: np.broadcast_to(np.asarray(current[n], dtype=np.float64), (problem.B,)).copy() for n in names}
    with torch.no_grad():
        final = problem.rho(dict(current)).numpy()
    return Calibration(values=values, satisfied=final >= 0, robustness=final, tightest=tightest,
                       direction=problem.direction, mode=mode, q=q, margin=margins, dataset=dataset)


def _checked_mode(mode: str, q: float) -> str:
    """The calibration mode with its alias resolved, after checking it and ``q``."""
    if mode == "quantile":  # an earlier name of "dataset", still accepted
        mode = "dataset"
    if mode not in ("tightest", "dataset"):
        raise ValueError(f"mode={mode!r}: expected 'tightest' or 'dataset' (alias 'quantile')")
    if not 0 < q <= 1:
        raise ValueError(f"q={q!r}: expected 0 < q <= 1")
    return mode


def _calibrated_names(spec: Formula, params: Sequence[str] | None, fixed: dict[str, Any]) -> list[str]:
    """The parameters to calibrate, in order, checked: each is one of ``spec``'s, and every other one is fixed."""
    names = list(params) if params is not None else sorted(spec.params - set(fixed))
    unknown = [n for n in names if n not in spec.params]
    if unknown:
        raise STLInputError(f"{unknown} are not parameters of {spec}; its parameters: {sorted(spec.params)}")
    missing = sorted(spec.params - set(names) - set(fixed))
    if missing:
        raise STLInputError(f"parameter(s) {missing} are neither calibrated nor given in `fixed`")
    return names


def _threshold_scale(spec: Formula, sig: dict[str, torch.Tensor]) -> float:
    """Initial bisection half-width: 1 + the largest finite signal magnitude + the largest constant in ``spec``."""
    scale = 1.0 + max(float(x[torch.isfinite(x)].abs().max()) if torch.isfinite(x).any() else 0.0 for x in sig.values())
    scale += max([abs(n.value) for node in spec.walk() for e in node.exprs() for n in _nums(e)] + [0.0])
    return scale


@dataclass
class _Problem:
    """The demonstrations (B rows of T samples) and the formula whose robustness is searched over."""

    spec: Formula
    sig: dict[str, torch.Tensor]
    dt: float
    T: int
    B: int
    direction: dict[str, int]
    interval_params: set[str]
    options: dict[str, Any]

    @classmethod
    def build(cls, spec: Formula, signals: Mapping[str, Any], dt: float, names: list[str],
              options: dict[str, Any]) -> _Problem:
        """The signals as float64 tensors, their length and batch size, and each parameter's loosening direction."""
        sig = {k: as_tensor(v, f"signal {k!r}").detach().to(torch.float64) for k, v in signals.items()}
        T = max(x.shape[-1] for x in sig.values())
        B = max((x.shape[0] for x in sig.values() if x.ndim == 2), default=1)
        direction = {n: parameter_direction(spec, n) for n in names}
        return cls(spec, sig, dt, T, B, direction, spec.interval_params, options)

    def loosest(self, n: str) -> float:
        """The value of parameter ``n`` that loosens the rule most (the whole signal for an interval bound)."""
        if n in self.interval_params:
            return self.T * self.dt if self.direction[n] > 0 else 0.0
        return self.direction[n] * math.inf

    def rho(self, values: dict[str, Any]) -> torch.Tensor:
        """(B,) robustness at parameter ``values`` (−inf for every demo where an interval is empty)."""
        p = {}
        for k, v in values.items():
            if isinstance(v, np.ndarray | torch.Tensor):
                p[k] = torch.as_tensor(v, dtype=torch.float64)
            elif k in self.interval_params or math.isfinite(v):
                p[k] = v
            else:  # ±inf threshold: the largest finite value keeps products with 0 finite
                p[k] = math.copysign(1e300, v)
        try:
            return robustness(self.spec, self.sig, self.dt, p, **self.options).cpu()
        except STLInputError as err:
            if "empty interval" in str(err):
                return torch.full((self.B,), -math.inf, dtype=torch.float64)
            raise


def _tightest(problem: _Problem, n: str, current: dict[str, Any], scale: float, tol: float) -> np.ndarray:
    """Each demo's tightest value of parameter ``n``, the others at ``current``: scanned for an interval bound,
    bisected and snapped onto a data value for a threshold."""
    d = problem.direction[n]

    def rho_at(v):
        return problem.rho({**current, n: v})

    if n in problem.interval_params:
        return _scan_bound(rho_at, d, problem.T, problem.dt, problem.B)
    cands = _root_candidates(problem.spec, n, problem.sig, problem.dt, _finite(current), problem.B, problem.options)
    return _bisect_threshold(rho_at, d, problem.B, scale, tol, cands)


def _dataset_value(spec: Formula, n: str, t: np.ndarray, d: int, q: float, margin: float) -> float:
    """The dataset value of parameter ``n``: the tightest value that a fraction ``q`` of the demos satisfy, loosened."""
    ok = t[~np.isnan(t)]
    if ok.size == 0:
        raise ValueError(f"no value of {{{n}}} satisfies any demonstration of {spec}")
    order = np.sort(ok) if d > 0 else -np.sort(-ok)  # from tightest to loosest
    v = float(order[max(math.ceil(q * ok.size) - 1, 0)])
    return v + d * margin if math.isfinite(v) else v


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, np.ndarray | torch.Tensor) or math.isfinite(v) else math.copysign(1e300, v)
            for k, v in values.items()}


def _nums(e: Expr):
    if isinstance(e, Num):
        yield e
    for c in e.children():
        yield from _nums(c)


def _scan_bound(rho_at, d: int, T: int, dt: float, B: int) -> np.ndarray:
    """Tightest multiple of dt (0 .. T·dt) at which each demo satisfies; NaN if none."""
    with torch.no_grad():
        table = torch.stack([rho_at(k * dt) for k in range(T + 1)]).numpy()  # (T+1, B)
    ok = table >= 0
    ks = np.arange(T + 1) if d > 0 else np.arange(T, -1, -1)  # tightest first
    out = np.full(B, np.nan)
    for b in range(B):
        hits = ks[ok[ks, b]]
        if hits.size:
            out[b] = hits[0] * dt
    return out


def _bisect_threshold(rho_at, d: int, B: int, scale: float, tol: float, cands: np.ndarray) -> np.ndarray:
    """Tightest real threshold per demo: ρ ≥ 0 on the loose side. NaN: never satisfied; −d·inf: always."""
    with torch.no_grad():
        span = np.full(B, 4.0 * scale)
        loose, tight = d * span, -d * span
        r_loose, r_tight = rho_at(torch.as_tensor(loose)).numpy(), rho_at(torch.as_tensor(tight)).numpy()
        for _ in range(12):  # widen the bracket where needed (×16 each time)
            grow = ~(r_loose >= 0) | (r_tight >= 0)
            if not grow.any():
                break
            span = np.where(grow, span * 16, span)
            loose, tight = np.where(~(r_loose >= 0), d * span, loose), np.where(r_tight >= 0, -d * span, tight)
            r_loose, r_tight = rho_at(torch.as_tensor(loose)).numpy(), rho_at(torch.as_tensor(tight)).numpy()
        never, always = ~(r_loose >= 0), r_tight >= 0
        active = ~never & ~always
        for _ in range(200):
            width = np.abs(loose - tight)
            todo = active & (width > tol * np.maximum(1.0, np.abs(loose)))
            if not todo.any():
                break
            mid = np.where(todo, 0.5 * (loose + tight), loose)
            sat = rho_at(torch.as_tensor(mid)).numpy() >= 0
            loose = np.where(todo & sat, mid, loose)
            tight = np.where(todo & ~sat, mid, tight)
    snapped = _snap(rho_at, loose, tight, d, cands)
    out = np.where(active, snapped, loose)
    out = np.where(always, -d * np.inf, out)
    return np.where(never, np.nan, out)


def _snap(rho_at, loose: np.ndarray, tight: np.ndarray, d: int, cands: np.ndarray) -> np.ndarray:
    """Replace each bisection result by the data value it converged to: the candidate root nearest to the loose end,
    within the bracket (a few widths wide), kept only where ρ ≥ 0 there (nudged by ulps towards the loose side)."""
    width = np.abs(loose - tight)[:, None]
    near = np.abs(cands - loose[:, None]) <= 4 * width + 1e-300
    dist = np.where(near, np.abs(cands - loose[:, None]), np.inf)
    has = np.isfinite(dist).any(1)
    pick = np.where(has, cands[np.arange(len(loose)), np.argmin(dist, 1)] if cands.shape[1] else loose, loose)
    with torch.no_grad():
        for _ in range(4):
            sat = rho_at(torch.as_tensor(pick)).numpy() >= 0
            if sat.all():
                break
            pick = np.where(sat, pick, np.nextafter(pick, d * np.inf))
        sat = rho_at(torch.as_tensor(pick)).numpy() >= 0
    return np.where(sat, pick, loose)


def _coef(e: Expr, name: str) -> float:
    """Coefficient of {name} in an expression that is affine in it with a constant coefficient."""
    if isinstance(e, Param):
        return float(e.name == name)
    if isinstance(e, Num | Signal | Abs):
        return 0.0
    if isinstance(e, Neg):
        return -_coef(e.arg, name)
    assert isinstance(e, BinOp)
    if e.op == "*":
        c = _constant(e.left)
        return c * _coef(e.right, name) if c is not None else (_constant(e.right) or 0.0) * _coef(e.left, name)
    return _coef(e.left, name) + (1.0 if e.op == "+" else -1.0) * _coef(e.right, name)


def _root_candidates(spec: Formula, name: str, sig: dict, dt: float, values: dict, B: int, options) -> np.ndarray:
    """Per-sample roots of every predicate that contains {name}: (B, K). The exact tightest threshold is one of them."""
    out = []
    for node in spec.walk():
        if isinstance(node, Predicate) and name in node.params and node.signals:
            k = _coef(node.right, name) - _coef(node.left, name)
            k = k if node.op in ("<", "<=") else -k
            if k == 0:
                continue
            p = {n: v for n, v in values.items() if n in node.params}
            p[name] = 0.0
            with torch.no_grad():
                r0 = robustness_trace(node, sig, dt, p, **options).expand(B, -1).cpu().numpy()
            out.append(-r0 / k)
    return np.concatenate(out, 1) if out else np.zeros((B, 0))
