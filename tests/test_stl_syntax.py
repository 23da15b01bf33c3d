"""Parser: precedence, aliases, parameters, error positions, and fuzzed input raising only STLSyntaxError."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stlflow.stl import STLSyntaxError, parse
from stlflow.stl.syntax import And, BinaryTemporal, Implies, Interval, Not, Num, Or, Param, Predicate, Temporal

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
