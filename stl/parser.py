"""STL text -> abstract syntax tree: the tokenizer, the recursive-descent parser and :func:`parse`.

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

The tree is built from the nodes of :mod:`stlflow.stl.syntax`; ``str(tree)`` prints text that parses back to an
equal tree. What a formula means (interval bounds in the unit of ``dt``, windows truncated at the end of the
signal, the smooth error bound) is stated in :mod:`stlflow.stl.semantics`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .syntax import (
    UNBOUNDED,
    Abs,
    And,
    BinaryTemporal,
    BinOp,
    Expr,
    Formula,
    Implies,
    Interval,
    Neg,
    Not,
    Num,
    Or,
    Param,
    Predicate,
    Signal,
    Temporal,
)

__all__ = ["STLSyntaxError", "parse"]


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
