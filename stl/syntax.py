"""Abstract syntax of STL: arithmetic expressions, time intervals and formula nodes.

Every node is an immutable (frozen, hashable) dataclass: expressions derive from :class:`Expr`, formulas from
:class:`Formula`. ``str(node)`` prints text that :func:`stlflow.stl.parse` reads back to an equal tree (the
grammar is in :mod:`stlflow.stl.parser`). This module is pure data and imports nothing else of the package;
the evaluation methods of :class:`Formula` are attached by :mod:`stlflow.stl.formula`. What the nodes mean
(interval bounds in the unit of ``dt``, windows truncated at the end of the signal, the smooth error bound)
is stated in :mod:`stlflow.stl.semantics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

__all__ = [
    "Formula", "Expr", "Num", "Signal", "Param", "Neg", "BinOp", "Abs",
    "Interval", "Predicate", "Not", "And", "Or", "Implies", "Temporal", "BinaryTemporal", "UNBOUNDED",
]


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
    value: float

    def __str__(self) -> str:
        return repr(float(self.value))


@dataclass(frozen=True)
class Signal(Expr):
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Param(Expr):
    name: str

    def __str__(self) -> str:
        return "{" + self.name + "}"


@dataclass(frozen=True)
class Neg(Expr):
    arg: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.arg,)

    def __str__(self) -> str:
        return "-" + _paren(self.arg, 3)


@dataclass(frozen=True)
class Abs(Expr):
    arg: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.arg,)

    def __str__(self) -> str:
        return f"abs({self.arg})"


@dataclass(frozen=True)
class BinOp(Expr):
    op: str  # '+', '-', '*'
    left: Expr
    right: Expr

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

    Each bound is a :class:`Num` or a :class:`Param`.
    """

    lo: Expr
    hi: Expr | None

    def __str__(self) -> str:
        return f"[{self.lo},{'inf' if self.hi is None else self.hi}]"


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

    def exprs(self) -> tuple[Expr, ...]:
        return (self.left, self.right)

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class Not(Formula):
    arg: Formula

    def children(self) -> tuple[Formula, ...]:
        return (self.arg,)

    def __str__(self) -> str:
        return f"!({self.arg})" if not isinstance(self.arg, Not) else f"!{self.arg}"


@dataclass(frozen=True)
class And(Formula):
    args: tuple[Formula, ...]
    prec = 2

    def children(self) -> tuple[Formula, ...]:
        return self.args

    def __str__(self) -> str:
        return " & ".join(_paren(a, 3) for a in self.args)


@dataclass(frozen=True)
class Or(Formula):
    args: tuple[Formula, ...]
    prec = 1

    def children(self) -> tuple[Formula, ...]:
        return self.args

    def __str__(self) -> str:
        return " | ".join(_paren(a, 2) for a in self.args)


@dataclass(frozen=True)
class Implies(Formula):
    left: Formula
    right: Formula
    prec = 0

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

    def children(self) -> tuple[Formula, ...]:
        return (self.left, self.right)

    def intervals(self) -> tuple[Interval, ...]:
        return (self.interval,)

    def __str__(self) -> str:
        iv = "" if _is_unbounded(self.interval) else str(self.interval)
        return f"({self.left}) {self.op}{iv} ({self.right})"


def _is_unbounded(iv: Interval) -> bool:
    return iv.hi is None and isinstance(iv.lo, Num) and iv.lo.value == 0


UNBOUNDED = Interval(Num(0.0), None)  # [0, inf]: the interval of a temporal operator written without one
