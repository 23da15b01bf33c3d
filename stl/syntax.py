"""STL text -> abstract syntax tree, and back.

Grammar (``parse`` implements it by recursive descent)::

    formula   := implies
    implies   := or ( '->' implies )?                    right associative
    or        := and ( '|' and )*
    and       := binary ( '&' binary )*
    binary    := unary ( ('U'|'S') interval? unary )?    not associative
    unary     := '!' unary | ('G'|'F'|'H'|'O') interval? unary | '(' formula ')' | predicate
    predicate := expr ('<'|'<='|'>'|'>=') expr
    expr      := term (('+'|'-') term)* ;  term := factor ('*' factor)*
    factor    := NUMBER | NAME | PARAM | '-' factor | 'abs' '(' expr ')' | '(' expr ')'
    interval  := '[' bound ',' (bound | 'inf') ']'       also '[' bound ':' bound ']'
    bound     := NUMBER | PARAM ;  PARAM := '{' NAME '}'

Word aliases: ``always eventually until historically once since not and or implies``.
A missing interval means unbounded (``[0, inf]``). Names are a letter followed by letters,
digits or ``_``; the operator letters and the words above are reserved.

Every node is an immutable dataclass; formula nodes derive from :class:`Formula`, which carries
the evaluation API (robustness, traces, monitor; implemented in :mod:`stlflow.stl.semantics`
and :mod:`stlflow.stl.monitor`). ``str(node)`` prints text that parses back to an equal tree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .monitor import Monitor

__all__ = [
    "STLSyntaxError", "parse", "Formula", "Expr", "Num", "Signal", "Param", "Neg", "BinOp", "Abs",
    "Interval", "Predicate", "Not", "And", "Or", "Implies", "Temporal", "BinaryTemporal",
]


class STLSyntaxError(ValueError):
    """A formula's text does not follow the grammar.

    Attributes: ``msg`` (what was expected), ``text`` (the whole input), ``pos`` (0-based offset),
    ``line`` and ``column`` (1-based). ``str(err)`` shows the offending line with a caret under it.
    """

    def __init__(self, msg: str, text: str, pos: int):
        self.msg, self.text, self.pos = msg, text, max(0, min(pos, len(text)))
        self.line = text.count("\n", 0, self.pos) + 1
        line_start = text.rfind("\n", 0, self.pos) + 1
        line_end = text.find("\n", self.pos)
        self.column = self.pos - line_start + 1
        source_line = text[line_start : len(text) if line_end < 0 else line_end]
        caret = " " * (self.column - 1) + "^"
        super().__init__(f"{msg} at line {self.line}, column {self.column}\n  {source_line}\n  {caret}")


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
    """An STL formula (abstract syntax tree node) and its evaluation API.

    ``params``/``signals``: names used anywhere below this node. Evaluation methods are documented
    where they are implemented (:func:`stlflow.stl.semantics.robustness_trace`, :class:`Monitor`).
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

    # The evaluation API lives in robustness.py / monitor.py; these wrappers keep one import point.
    def horizon(self, dt: float, params: dict | None = None) -> float:
        """Future horizon in samples: ρ at sample t reads samples up to t + horizon (``math.inf`` if unbounded)."""
        from .semantics import horizon

        return horizon(self, dt, params)

    def robustness(self, signals: dict, dt: float, params: dict | None = None, smooth: float | None = None,
                   **options: Any) -> torch.Tensor:
        """ρ at sample 0, shape (B,). See :func:`stlflow.stl.semantics.robustness_trace` for arguments."""
        from .semantics import robustness

        return robustness(self, signals, dt, params, smooth, **options)

    def robustness_trace(self, signals: dict, dt: float, params: dict | None = None, smooth: float | None = None,
                         **options: Any) -> torch.Tensor:
        """ρ at every sample, shape (B, T). See :func:`stlflow.stl.semantics.robustness_trace`."""
        from .semantics import robustness_trace

        return robustness_trace(self, signals, dt, params, smooth, **options)

    def smooth_error_bound(self, n: int, dt: float, smooth: float, params: dict | None = None) -> float:
        """Upper bound on |smooth − exact| robustness for signals of ``n`` samples at temperature ``smooth``."""
        from .semantics import smooth_error_bound

        return smooth_error_bound(self, n, dt, smooth, params)

    def monitor(self, dt: float, params: dict | None = None, **options: Any) -> Monitor:
        """An online monitor (see :class:`stlflow.stl.monitor.Monitor`)."""
        from .monitor import Monitor

        return Monitor(self, dt, params, **options)


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


UNBOUNDED = Interval(Num(0.0), None)

# --------------------------------------------------------------------------- tokens

_WORDS = {
    "always": "G", "eventually": "F", "historically": "H", "once": "O", "until": "U", "since": "S",
    "not": "!", "and": "&", "or": "|", "implies": "->",
    "G": "G", "F": "F", "H": "H", "O": "O", "U": "U", "S": "S", "abs": "abs", "inf": "inf",
}
_TOKEN = re.compile(
    r"(?P<ws>\s+)|(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<param>\{\s*[A-Za-z][A-Za-z0-9_]*\s*\})"
    r"|(?P<name>[A-Za-z][A-Za-z0-9_]*)|(?P<op>->|<=|>=|[<>!&|()\[\],:+\-*])"
)


@dataclass
class _Tok:
    kind: str  # 'num', 'param', 'name', 'kw', 'op', 'end'
    text: str  # keyword/operator canonical text, or the name/number/param text
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    toks, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos] == "{":
                raise STLSyntaxError("expected a parameter name like {v_max}", text, pos)
            raise STLSyntaxError(f"unexpected character {text[pos]!r}", text, pos)
        kind = m.lastgroup
        s = m.group()
        if kind == "name" and s in _WORDS:
            word = _WORDS[s]
            toks.append(_Tok("kw" if word in ("G", "F", "H", "O", "U", "S", "abs", "inf") else "op", word, pos))
        elif kind == "param":
            toks.append(_Tok("param", s[1:-1].strip(), pos))
        elif kind != "ws":
            toks.append(_Tok(kind, s, pos))  # type: ignore[arg-type]
        pos = m.end()
    toks.append(_Tok("end", "", len(text)))
    return toks


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    # helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def error(self, msg: str, tok: _Tok | None = None) -> STLSyntaxError:
        tok = tok or self.tok
        found = "end of input" if tok.kind == "end" else repr(self.text[tok.pos : tok.pos + max(1, len(tok.text))])
        return STLSyntaxError(f"{msg}, found {found}", self.text, tok.pos)

    def accept(self, *texts: str) -> _Tok | None:
        if self.tok.kind in ("op", "kw") and self.tok.text in texts:
            t = self.tok
            self.i += 1
            return t
        return None

    def expect(self, text: str, what: str | None = None) -> _Tok:
        t = self.accept(text)
        if t is None:
            raise self.error(f"expected {what or repr(text)}")
        return t

    # formulas
    def formula(self) -> Formula:
        left = self.or_()
        if self.accept("->"):
            return Implies(left, self.formula())
        return left

    def or_(self) -> Formula:
        args = [self.and_()]
        while self.accept("|"):
            args.append(self.and_())
        return args[0] if len(args) == 1 else Or(tuple(args))

    def and_(self) -> Formula:
        args = [self.binary()]
        while self.accept("&"):
            args.append(self.binary())
        return args[0] if len(args) == 1 else And(tuple(args))

    def binary(self) -> Formula:
        left = self.unary()
        t = self.accept("U", "S")
        if t is None:
            return left
        iv = self.interval() if self.tok.text == "[" and self.tok.kind == "op" else UNBOUNDED
        right = self.unary()
        if self.tok.kind == "kw" and self.tok.text in ("U", "S"):
            raise self.error("'U' and 'S' are not associative: add parentheses")
        return BinaryTemporal(t.text, iv, left, right)

    def unary(self) -> Formula:
        if self.accept("!"):
            return Not(self.unary())
        t = self.accept("G", "F", "H", "O")
        if t is not None:
            iv = self.interval() if self.tok.kind == "op" and self.tok.text == "[" else UNBOUNDED
            return Temporal(t.text, iv, self.unary())
        if self.tok.kind == "op" and self.tok.text == "(":
            # '(' opens either a sub-formula or an arithmetic group of a predicate: try the predicate first.
            start = self.i
            try:
                return self.predicate()
            except STLSyntaxError as err_pred:
                self.i = start
                try:
                    self.expect("(")
                    f = self.formula()
                    self.expect(")", "')'")
                    return f
                except STLSyntaxError as err_formula:
                    raise err_pred if err_pred.pos > err_formula.pos else err_formula from None
        return self.predicate()

    def predicate(self) -> Formula:
        left = self.expr()
        t = self.accept("<", "<=", ">", ">=")
        if t is None:
            raise self.error("expected a comparison '<', '<=', '>' or '>='")
        right = self.expr()
        if self.tok.kind == "op" and self.tok.text in ("<", "<=", ">", ">="):
            raise self.error("comparisons do not chain: write 'a < b & b < c'")
        return Predicate(left, t.text, right)

    def interval(self) -> Interval:
        self.expect("[")
        lo = self.bound()
        sep = self.accept(",", ":")
        if sep is None:
            raise self.error("expected ',' or ':' in the interval")
        hi: Expr | None
        if sep.text == "," and self.accept("inf"):
            hi = None
        else:
            hi = self.bound()
        close = self.tok
        self.expect("]", "']'")
        if isinstance(lo, Num) and isinstance(hi, Num) and hi.value < lo.value:
            raise STLSyntaxError(f"empty interval [{lo.value:g},{hi.value:g}]: the lower bound exceeds the upper",
                                 self.text, close.pos)
        return Interval(lo, hi)

    def bound(self) -> Expr:
        t = self.tok
        if t.kind == "num":
            self.i += 1
            return self.number(t)
        if t.kind == "param":
            self.i += 1
            return Param(t.text)
        raise self.error("expected a number or {parameter} as interval bound")

    def number(self, t: _Tok) -> Num:
        v = float(t.text)
        if not math.isfinite(v):
            raise STLSyntaxError(f"number {t.text} is out of range", self.text, t.pos)
        return Num(v)

    # expressions
    def expr(self) -> Expr:
        e = self.term()
        while True:
            t = self.accept("+", "-")
            if t is None:
                return e
            e = BinOp(t.text, e, self.term())

    def term(self) -> Expr:
        e = self.factor()
        while self.accept("*"):
            e = BinOp("*", e, self.factor())
        return e

    def factor(self) -> Expr:
        t = self.tok
        if t.kind == "num":
            self.i += 1
            return self.number(t)
        if t.kind == "name":
            self.i += 1
            return Signal(t.text)
        if t.kind == "param":
            self.i += 1
            return Param(t.text)
        if self.accept("-"):
            if self.tok.kind == "num":  # a negative literal is one number, so printing round-trips
                t = self.tok
                self.i += 1
                return Num(-self.number(t).value)
            return Neg(self.factor())
        if self.accept("abs"):
            self.expect("(", "'(' after abs")
            e = self.expr()
            self.expect(")", "')'")
            return Abs(e)
        if self.accept("("):
            e = self.expr()
            self.expect(")", "')'")
            return e
        raise self.error("expected a number, signal name, {parameter}, '-', 'abs' or '('")


def parse(text: str) -> Formula:
    """Parse STL text (grammar in this module's docstring) into a :class:`Formula`.

    Raises :class:`STLSyntaxError` (with line, column and a caret) on any malformed input.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse() takes the formula text as str, got {type(text).__name__}")
    try:
        p = _Parser(text)
        f = p.formula()
        if p.tok.kind != "end":
            raise p.error("expected an operator ('&', '|', '->', 'U', 'S') or the end of the formula")
        return f
    except RecursionError:
        raise STLSyntaxError("formula is nested too deeply", text, 0) from None
