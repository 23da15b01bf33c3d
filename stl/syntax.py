"""Abstract syntax of STL: arithmetic expressions, time intervals and formula nodes.

Every node is an immutable (frozen, hashable) dataclass: expressions derive from :class:`Expr`, formulas from
:class:`Formula`. ``str(node)`` prints text that :func:`stlflow.stl.parse` reads back to an equal tree (the
grammar is in :mod:`stlflow.stl.parser`), for every tree that can be built: each node checks its fields when
built (``TypeError``/``ValueError``: names the grammar can read, finite constants, interval bounds >= 0, known
operators, two or more operands of ``&``/``|``), and a negated constant prints as ``-(c)``. This module is pure
data and imports nothing else of the package; the evaluation methods of :class:`Formula` are attached by
:mod:`stlflow.stl.formula`. What the nodes mean (interval bounds in the unit of ``dt``, windows truncated at the
end of the signal, the smooth error bound) is stated in :mod:`stlflow.stl.semantics`.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

__all__ = [
    "Formula", "Expr", "Num", "Signal", "Param", "Neg", "BinOp", "Abs",
    "Interval", "Predicate", "Not", "And", "Or", "Implies", "Temporal", "BinaryTemporal", "UNBOUNDED",
]


# --------------------------------------------------------------------------- construction checks
# Every node checks its fields when built, so that each tree that can be built prints text that parses back to an
# equal tree: names the grammar can read, finite numbers, non-negative interval bounds, known operators.

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
RESERVED = frozenset({
    "G", "F", "H", "O", "U", "S", "abs", "inf",
    "always", "eventually", "historically", "once", "until", "since", "not", "and", "or", "implies",
})
"""Words the grammar reserves: a signal cannot be called one of these (a ``{parameter}`` can)."""


def _check_type(node: Any, field: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{type(node).__name__}.{field} must be a {kind.__name__}, got {value!r}")


def _check_op(node: Any, op: Any, ops: tuple[str, ...]) -> None:
    if op not in ops:
        raise ValueError(f"{type(node).__name__}.op must be one of {ops}, got {op!r}")


def _check_name(node: Any, name: Any, reserved: bool) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name) or (reserved and name in RESERVED):
        rule = "a letter followed by letters, digits or '_'" + (", not a reserved word" if reserved else "")
        raise ValueError(f"{type(node).__name__} name must be {rule}; got {name!r}")


# --------------------------------------------------------------------------- expressions


class Expr:
    """Arithmetic expression over signals, parameters and numbers (a predicate's side)."""

    prec = 3  # printing precedence: 1 sum, 2 product, 3 atom / unary minus

    def names(self, kind: type) -> set[str]:
        out: set[str] = set()
        for child in self.children():
            out |= child.names(kind)
        if isinstance(self, kind):
            out.add(self.name)  # type: ignore[attr-defined]
        return out

    def children(self) -> tuple[Expr, ...]:
        return ()


@dataclass(frozen=True)
class Num(Expr):
    """A constant: a finite real number, stored as a float (``Num(3).value == 3.0``; an int beyond 2**53 rounds as
    it does in the printed text, so the tree equals the one parsed back)."""

    value: float

    def __post_init__(self) -> None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"Num.value must be a real number, got {v!r}")
        try:
            f = float(v)
        except OverflowError:  # an int beyond the range of a float
            f = math.inf
        if not math.isfinite(f):
            raise ValueError(f"Num.value must be finite (the grammar has no inf or nan constant), got {v!r}")
        if type(v) is not float:
            object.__setattr__(self, "value", f)

    def __str__(self) -> str:
        return repr(float(self.value))


@dataclass(frozen=True)
class Signal(Expr):
    name: str

    def __post_init__(self) -> None:
        _check_name(self, self.name, reserved=True)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Param(Expr):
    name: str

    def __post_init__(self) -> None:
        _check_name(self, self.name, reserved=False)

    def __str__(self) -> str:
        return "{" + self.name + "}"


@dataclass(frozen=True)
class Neg(Expr):
    """Unary minus. A constant operand prints in parentheses, ``-(1.0)``: ``-1.0`` reads back as ``Num(-1.0)``."""

    arg: Expr

    def __post_init__(self) -> None:
        _check_type(self, "arg", self.arg, Expr)

    def children(self) -> tuple[Expr, ...]:
        return (self.arg,)

    def __str__(self) -> str:
        return "-" + (f"({self.arg})" if isinstance(self.arg, Num) else _paren(self.arg, 3))


@dataclass(frozen=True)
class Abs(Expr):
    arg: Expr

    def __post_init__(self) -> None:
        _check_type(self, "arg", self.arg, Expr)

    def children(self) -> tuple[Expr, ...]:
        return (self.arg,)

    def __str__(self) -> str:
        return f"abs({self.arg})"


@dataclass(frozen=True)
class BinOp(Expr):
    op: str  # '+', '-', '*'
    left: Expr
    right: Expr

    def __post_init__(self) -> None:
        _check_op(self, self.op, ("+", "-", "*"))
        _check_type(self, "left", self.left, Expr)
        _check_type(self, "right", self.right, Expr)

    def children(self) -> tuple[Expr, ...]:
        return (self.left, self.right)

    @property
    def prec(self) -> int:  # type: ignore[override]
        return 2 if self.op == "*" else 1

    def __str__(self) -> str:
        p = self.prec
        return f"{_paren(self.left, p)} {self.op} {_paren(self.right, p + 1)}"


def _paren(node: Any, level: int) -> str:
    """Print ``node``, in parentheses when it binds looser than ``level``."""
    s = str(node)
    return s if node.prec >= level else f"({s})"


# --------------------------------------------------------------------------- formulas


@dataclass(frozen=True)
class Interval:
    """Closed time interval ``[lo, hi]`` in the unit of ``dt``; ``hi is None`` means ``inf``.

    Each bound is a :class:`Num` >= 0 or a :class:`Param`; two numbers need ``lo <= hi``.
    """

    lo: Expr
    hi: Expr | None

    def __post_init__(self) -> None:
        for field, b in (("lo", self.lo), ("hi", self.hi)):
            if b is None and field == "hi":
                continue
            if not isinstance(b, Num | Param) or (isinstance(b, Num) and not b.value >= 0):
                raise ValueError(f"Interval.{field} must be a Num >= 0 or a Param, got {b!r}")
        if isinstance(self.lo, Num) and isinstance(self.hi, Num) and self.hi.value < self.lo.value:
            raise ValueError(f"empty Interval: lo={self.lo.value!r} > hi={self.hi.value!r}")

    def __str__(self) -> str:
        return f"[{_bound(self.lo)},{'inf' if self.hi is None else _bound(self.hi)}]"


def _bound(b: Expr) -> str:
    """An interval bound as text; -0.0 prints as 0.0 (the grammar reads no sign in a bound)."""
    return repr(float(b.value) + 0.0) if isinstance(b, Num) else str(b)


class Formula:
    """An STL formula: the base class of every formula node.

    ``params``/``signals``: names used anywhere below this node. The evaluation methods (``horizon``,
    ``robustness``, ``robustness_trace``, ``smooth_error_bound``, ``monitor``) are added by
    :mod:`stlflow.stl.formula`, which sits above this module and the evaluator; importing :mod:`stlflow.stl`
    installs them.
    """

    prec = 4  # printing precedence: 0 implies, 1 or, 2 and, 3 until/since, 4 unary/predicate

    def children(self) -> tuple[Formula, ...]:
        return ()

    def intervals(self) -> tuple[Interval, ...]:
        return ()

    def exprs(self) -> tuple[Expr, ...]:
        return ()

    def walk(self):
        """Yield every node below (and including) this one, parents before children."""
        yield self
        for child in self.children():
            yield from child.walk()

    @cached_property
    def signals(self) -> set[str]:
        """Names of the signals the formula reads."""
        return {n for node in self.walk() for e in node.exprs() for n in e.names(Signal)}

    @cached_property
    def params(self) -> set[str]:
        """Names of the free ``{parameters}``, in thresholds and in interval bounds."""
        out: set[str] = set()
        for node in self.walk():
            for e in node.exprs():
                out |= e.names(Param)
            for iv in node.intervals():
                out |= {b.name for b in (iv.lo, iv.hi) if isinstance(b, Param)}
        return out

    @cached_property
    def interval_params(self) -> set[str]:
        """The parameters that appear in interval bounds (these must be one value per evaluation group)."""
        bounds = (b for node in self.walk() for iv in node.intervals() for b in (iv.lo, iv.hi))
        return {b.name for b in bounds if isinstance(b, Param)}


@dataclass(frozen=True)
class Predicate(Formula):
    """``left op right``; robustness is ``right − left`` for ``<``/``<=`` and ``left − right`` for ``>``/``>=``."""

    left: Expr
    op: str
    right: Expr

    def __post_init__(self) -> None:
        _check_type(self, "left", self.left, Expr)
        _check_op(self, self.op, ("<", "<=", ">", ">="))
        _check_type(self, "right", self.right, Expr)

    def exprs(self) -> tuple[Expr, ...]:
        return (self.left, self.right)

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class Not(Formula):
    arg: Formula

    def __post_init__(self) -> None:
        _check_type(self, "arg", self.arg, Formula)

    def children(self) -> tuple[Formula, ...]:
        return (self.arg,)

    def __str__(self) -> str:
        return f"!({self.arg})" if not isinstance(self.arg, Not) else f"!{self.arg}"


@dataclass(frozen=True)
class And(Formula):
    """Two or more operands (a list is stored as a tuple)."""

    args: tuple[Formula, ...]
    prec = 2

    def __post_init__(self) -> None:
        _check_args(self)

    def children(self) -> tuple[Formula, ...]:
        return self.args

    def __str__(self) -> str:
        return " & ".join(_paren(a, 3) for a in self.args)


@dataclass(frozen=True)
class Or(Formula):
    """Two or more operands (a list is stored as a tuple)."""

    args: tuple[Formula, ...]
    prec = 1

    def __post_init__(self) -> None:
        _check_args(self)

    def children(self) -> tuple[Formula, ...]:
        return self.args

    def __str__(self) -> str:
        return " | ".join(_paren(a, 2) for a in self.args)


@dataclass(frozen=True)
class Implies(Formula):
    left: Formula
    right: Formula
    prec = 0

    def __post_init__(self) -> None:
        _check_type(self, "left", self.left, Formula)
        _check_type(self, "right", self.right, Formula)

    def children(self) -> tuple[Formula, ...]:
        return (self.left, self.right)

    def __str__(self) -> str:
        return f"{_paren(self.left, 1)} -> {_paren(self.right, 0)}"


@dataclass(frozen=True)
class Temporal(Formula):
    """``G`` always, ``F`` eventually (future); ``H`` historically, ``O`` once (past)."""

    op: str
    interval: Interval
    arg: Formula

    def __post_init__(self) -> None:
        _check_op(self, self.op, ("G", "F", "H", "O"))
        _check_type(self, "interval", self.interval, Interval)
        _check_type(self, "arg", self.arg, Formula)

    def children(self) -> tuple[Formula, ...]:
        return (self.arg,)

    def intervals(self) -> tuple[Interval, ...]:
        return (self.interval,)

    def __str__(self) -> str:
        iv = "" if _is_unbounded(self.interval) else str(self.interval)
        return f"{self.op}{iv}({self.arg})"


@dataclass(frozen=True)
class BinaryTemporal(Formula):
    """``left U[a,b] right`` until (future) or ``left S[a,b] right`` since (past)."""

    op: str
    interval: Interval
    left: Formula
    right: Formula
    prec = 3

    def __post_init__(self) -> None:
        _check_op(self, self.op, ("U", "S"))
        _check_type(self, "interval", self.interval, Interval)
        _check_type(self, "left", self.left, Formula)
        _check_type(self, "right", self.right, Formula)

    def children(self) -> tuple[Formula, ...]:
        return (self.left, self.right)

    def intervals(self) -> tuple[Interval, ...]:
        return (self.interval,)

    def __str__(self) -> str:
        iv = "" if _is_unbounded(self.interval) else str(self.interval)
        return f"({self.left}) {self.op}{iv} ({self.right})"


def _check_args(node: And | Or) -> None:
    if isinstance(node.args, list):
        object.__setattr__(node, "args", tuple(node.args))
    if not isinstance(node.args, tuple) or len(node.args) < 2:
        raise ValueError(f"{type(node).__name__}.args must be a tuple of two or more formulas, got {node.args!r}")
    for a in node.args:
        _check_type(node, "args", a, Formula)


def _is_unbounded(iv: Interval) -> bool:
    return iv.hi is None and isinstance(iv.lo, Num) and iv.lo.value == 0


UNBOUNDED = Interval(Num(0.0), None)  # [0, inf]: the interval of a temporal operator written without one
