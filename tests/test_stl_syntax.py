"""Parser: precedence, aliases, parameters, error positions, fuzzed input raising only STLSyntaxError, and the round
trip ``parse(str(f)) == f`` for every tree that can be built (negated and edge constants included)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stlflow.stl import STLSyntaxError, parse
from stlflow.stl.syntax import (
    Abs,
    And,
    BinaryTemporal,
    BinOp,
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

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_precedence_and_associativity():
    f = parse("G x < 1 & y > 2 | z >= 0 -> a <= 1 -> b < 2")
    assert isinstance(f, Implies) and isinstance(f.right, Implies)  # right associative
    assert isinstance(f.left, Or) and isinstance(f.left.args[0], And)
    assert isinstance(f.left.args[0].args[0], Temporal)  # G binds tighter than &
    u = parse("!a < 1 U[0,2] F b > 0 & c < 1")
    assert isinstance(u, And) and isinstance(u.args[0], BinaryTemporal)
    assert isinstance(u.args[0].left, Not) and isinstance(u.args[0].right, Temporal)
    assert parse("(x + 1) * 2 < -y") == Predicate(parse("(x + 1) * 2 < 0").left, "<", parse("0 < -y").right)


def test_word_aliases_and_intervals():
    words = parse("always[0,1] (x < 1) and not eventually (y > 0) or (x < 1 until[0:2] y > 0) implies once x > 0")
    symbols = parse("G[0,1](x < 1) & !F(y > 0) | (x < 1 U[0,2] y > 0) -> O(x > 0)")
    assert words == symbols
    assert parse("historically[1,inf] (x<1) since y>0") == parse("H[1,inf](x < 1) S y > 0")
    f = parse("F[{a},{b}](dist <= {eps}) & G[0, inf](abs(v - 1) < 2)")
    assert f.params == {"a", "b", "eps"} and f.signals == {"dist", "v"} and f.interval_params == {"a", "b"}
    assert f.args[0].interval == Interval(Param("a"), Param("b"))
    assert parse("G(x<1)").interval == Interval(Num(0.0), None) == parse("G[0,inf](x<1)").interval


@pytest.mark.parametrize(
    "text, line, column, fragment",
    [
        ("G[0,5 (speed < 1)", 1, 7, "expected ']'"),
        ("x < 1 &", 1, 8, "end of input"),
        ("x < 1 & & y > 2", 1, 9, "expected a number"),
        ("x < 1\n  & G[0,1] y ? 2", 2, 14, "unexpected character '?'"),
        ("x < y < z", 1, 7, "do not chain"),
        ("a < 1 U b < 1 U c < 1", 1, 15, "not associative"),
        ("F[2,1](x < 1)", 1, 6, "empty interval"),
        ("G[0,-1](x<1)", 1, 5, "interval bound"),
        ("x < {1a}", 1, 5, "parameter name"),
        ("G(x)", 1, 5, "comparison"),
        ("x < 1e999", 1, 5, "out of range"),
        ("speed", 1, 6, "comparison"),
    ],
)
def test_errors_point_at_the_offending_text(text, line, column, fragment):
    with pytest.raises(STLSyntaxError) as info:
        parse(text)
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert fragment in str(err)
    caret_line = str(err).splitlines()[-1]
    assert caret_line.index("^") - 2 == column - 1  # the caret sits under the column


def test_deep_nesting_is_a_syntax_error_not_a_crash():
    with pytest.raises(STLSyntaxError, match="nested too deeply"):
        parse("(" * 5000 + "x < 1" + ")" * 5000)
    assert parse("(" * 30 + "x < 1" + ")" * 30) == parse("x < 1")


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("GFHOUS!&|()[]{},:<>=-+*.0123456789 xyinfabs\n\t_e$")), max_size=40))
def test_fuzzed_input_raises_only_syntax_errors(text):
    try:
        f = parse(text)
    except STLSyntaxError as err:
        assert 1 <= err.line and 1 <= err.column and "^" in str(err)
        return
    assert parse(str(f)) == f


@FUZZ
@given(st.text(max_size=30))
def test_arbitrary_unicode_raises_only_syntax_errors(text):
    try:
        parse(text)
    except STLSyntaxError:
        pass


# --------------------------------------------------------------------------- round trip of every tree

EDGE_CONSTANTS = [0, 0.0, -0.0, 1, -1, 1.0, -1.0, 0.5, -2.5, 7, -7, 2**60, 1e-300, -1e-300, 1e300, -1e300, 5e-324,
                  -5e-324, 1.7976931348623157e308, 1e16, 0.1, 123456.789]


def _constants():
    """Edge constants (zero of both signs, integers and floats, tiny, huge, subnormal) and any finite float."""
    return st.one_of(st.sampled_from(EDGE_CONSTANTS), st.floats(allow_nan=False, allow_infinity=False),
                     st.integers(-(2**70), 2**70))


NAMES = st.sampled_from(["x", "y", "speed", "d_goal", "v2", "nan", "e1", "Gx", "always_on"])


def expressions():
    leaf = st.one_of(st.builds(Num, _constants()), st.builds(Signal, NAMES), st.builds(Param, NAMES | st.just("G")))
    return st.recursive(leaf, lambda e: st.one_of(
        st.builds(Neg, e), st.builds(Abs, e), st.builds(BinOp, st.sampled_from(["+", "-", "*"]), e, e)),
        max_leaves=6)


@st.composite
def intervals(draw):
    def bound():
        return draw(st.one_of(st.builds(Num, st.sampled_from([0, 0.0, -0.0, 1, 2.5, 1e-300, 1e300, 3])),
                              st.builds(Param, NAMES)))
    lo, hi = bound(), draw(st.one_of(st.none(), st.just("bound")))
    hi = None if hi is None else bound()
    if isinstance(lo, Num) and isinstance(hi, Num) and hi.value < lo.value:
        lo, hi = hi, lo
    return Interval(lo, hi)


def trees():
    leaf = st.builds(Predicate, expressions(), st.sampled_from(["<", "<=", ">", ">="]), expressions())
    return st.recursive(leaf, lambda f: st.one_of(
        st.builds(Not, f),
        st.builds(lambda xs: And(tuple(xs)), st.lists(f, min_size=2, max_size=3)),
        st.builds(lambda xs: Or(tuple(xs)), st.lists(f, min_size=2, max_size=3)),
        st.builds(Implies, f, f),
        st.builds(Temporal, st.sampled_from(["G", "F", "H", "O"]), intervals(), f),
        st.builds(BinaryTemporal, st.sampled_from(["U", "S"]), intervals(), f, f),
    ), max_leaves=8)


@FUZZ
@given(trees())
def test_every_tree_prints_text_that_parses_back(f):
    text = str(f)
    g = parse(text)
    assert g == f, (text, str(g))
    assert str(g) == text


@pytest.mark.parametrize("text, tree", [
    ("-(0) < x", Predicate(Neg(Num(0.0)), "<", Signal("x"))),
    ("-0 < x", Predicate(Num(-0.0), "<", Signal("x"))),
    ("-(1) * x < 2", Predicate(BinOp("*", Neg(Num(1.0)), Signal("x")), "<", Num(2.0))),
    ("-1 * x < 2", Predicate(BinOp("*", Num(-1.0), Signal("x")), "<", Num(2.0))),
    ("--1 < x", Predicate(Neg(Num(-1.0)), "<", Signal("x"))),
    ("x - -1e300 < 1e-300", Predicate(BinOp("-", Signal("x"), Num(-1e300)), "<", Num(1e-300))),
])
def test_negated_constants_round_trip(text, tree):
    assert parse(text) == tree
    assert parse(str(tree)) == tree and str(parse(str(tree))) == str(tree)


def test_zero_keeps_its_sign_and_integers_equal_floats():
    assert str(parse("x < -0")) == "x < -0.0" and str(parse("x < 0")) == "x < 0.0"
    assert str(Predicate(Neg(Num(0)), "<", Signal("x"))) == "-(0.0) < x"
    assert parse(str(Predicate(Signal("x"), "<", Num(3)))) == Predicate(Signal("x"), "<", Num(3))
    big = Predicate(Signal("x"), "<", Num(2**53 + 1))  # an int a float cannot hold: stored as the float it prints
    assert parse(str(big)) == big and Num(3).value == 3.0 and type(Num(3).value) is float
    assert str(Temporal("G", Interval(Num(-0.0), Num(1)), parse("x < 1"))) == "G[0.0,1.0](x < 1.0)"


@pytest.mark.parametrize("build, error", [
    (lambda: Num(float("inf")), "finite"),
    (lambda: Num(float("nan")), "finite"),
    (lambda: Num(10**400), "finite"),
    (lambda: Num("1"), "real number"),
    (lambda: Num(True), "real number"),
    (lambda: Signal("G"), "reserved"),
    (lambda: Signal("always"), "reserved"),
    (lambda: Signal("1x"), "a letter"),
    (lambda: Signal("x y"), "a letter"),
    (lambda: Param(""), "a letter"),
    (lambda: Interval(Num(-1.0), None), "Num >= 0"),
    (lambda: Interval(Num(2.0), Num(1.0)), "empty"),
    (lambda: Interval(Signal("x"), None), "Num >= 0 or a Param"),
    (lambda: And((parse("x < 1"),)), "two or more"),
    (lambda: Or(()), "two or more"),
    (lambda: Not(Signal("x")), "must be a Formula"),
    (lambda: Predicate(Signal("x"), "==", Num(1.0)), "op must be one of"),
    (lambda: Temporal("X", Interval(Num(0.0), None), parse("x < 1")), "op must be one of"),
    (lambda: BinOp("/", Signal("x"), Num(1.0)), "op must be one of"),
])
def test_nodes_refuse_trees_the_grammar_cannot_print(build, error):
    with pytest.raises((TypeError, ValueError), match=error):
        build()
