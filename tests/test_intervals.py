"""Paired comparison of two controllers on the same seeds (McNemar's exact test, control/intervals.py)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stlflow.control.intervals import paired_better_p

outcomes = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=0, max_size=60)


def test_known_cases():
    # theirs wins on 10 seeds, ours on none: 2^-10
    assert paired_better_p([False] * 10 + [True] * 5, [True] * 15) == pytest.approx(2.0**-10)
    # 6 against 1: P(X >= 6), X ~ Bin(7, 1/2) = (7 + 1) / 128
    ours = [False] * 6 + [True] + [True] * 20
    theirs = [True] * 6 + [False] + [True] * 20
    assert paired_better_p(ours, theirs) == pytest.approx(8 / 128)
    # the seeds both solve, or both fail, carry nothing
    assert paired_better_p([True, False] * 30, [True, False] * 30) == 1.0
    with pytest.raises(ValueError, match="same seeds"):
        paired_better_p([True], [True, False])


@given(outcomes)
def test_the_two_one_sided_p_values_add_up_to_one_plus_the_tie(pairs):
    ours, theirs = [o for o, _ in pairs], [t for _, t in pairs]
    b = sum(t and not o for o, t in pairs)
    n = b + sum(o and not t for o, t in pairs)
    tie = math.comb(n, b) / 2.0**n if n else 1.0
    total = paired_better_p(ours, theirs) + paired_better_p(theirs, ours)
    assert total == pytest.approx(1.0 + tie if n else 2.0)


@given(outcomes)
def test_one_more_win_for_them_never_raises_p(pairs):
    ours, theirs = [o for o, _ in pairs], [t for _, t in pairs]
    p = paired_better_p(ours, theirs)
    assert 0.0 < p <= 1.0
    # turn a seed both fail into one only theirs solves
    assert paired_better_p(ours + [False], theirs + [True]) <= p + 1e-12
