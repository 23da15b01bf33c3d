"""Confidence intervals for rates measured over a finite number of episodes.

A success rate of 14/16 is not 87.5% give or take nothing: with 16 episodes the 95% interval spans about 30
points. :func:`wilson_interval` is the Wilson score interval of a binomial proportion, which (unlike the normal
approximation ``p ± z sqrt(p (1 - p) / n)``) stays inside [0, 1] and does not collapse to a point at 0/n or n/n::

    centre    = (p + z² / 2n) / (1 + z² / n)
    halfwidth = z / (1 + z² / n) * sqrt(p (1 - p) / n + z² / 4n²)

with p = k / n and z the two-sided normal quantile of the confidence level (1.96 for 95%).

Two controllers run on the same seeds are compared episode by episode with :func:`paired_better_p` (McNemar's
exact test): only the seeds where exactly one of them succeeds carry information, and on those the null
hypothesis "equally good" is a fair coin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

__all__ = ["wilson_interval", "format_rate", "paired_better_p"]


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a binomial proportion ``successes / n``.

    ``successes``: a count in [0, n] (a float is accepted when it is a whole number, as rates times episodes are);
    ``n`` >= 1 trials; ``confidence`` in (0, 1). Raises ValueError naming the bad input.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n (trials) must be a whole number >= 1, got {n!r}")
    k = float(successes)
    if not math.isfinite(k) or abs(k - round(k)) > 1e-6 or not 0 <= round(k) <= n:
        raise ValueError(f"successes must be a whole number in [0, n={int(n)}], got {successes!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n, k = int(n), round(k)
    z = NormalDist().inv_cdf(0.5 + float(confidence) / 2.0)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def format_rate(rate: float, n: int, confidence: float = 0.95) -> str:
    """``"88% (64-97)"``: a rate over ``n`` episodes with its Wilson interval in percent (``"-"`` when n is 0 or the
    rate is NaN)."""
    if not n or rate is None or not math.isfinite(float(rate)):
        return "-"
    lo, hi = wilson_interval(round(float(rate) * n), int(n), confidence)
    return f"{float(rate):.0%} ({100 * lo:.0f}-{100 * hi:.0f})"


def paired_better_p(ours: Sequence[bool], theirs: Sequence[bool]) -> float:
    """One-sided p-value (McNemar's exact test) that ``theirs`` succeeds more often than ``ours`` on the same seeds.

    ``ours[i]``, ``theirs[i]``: the outcomes of the two controllers on seed i. With b the seeds only ``theirs``
    succeeds on and c those only ``ours`` does, p = P(X >= b) for X ~ Binomial(b + c, 1/2) (1.0 when b + c = 0):
    a small p says the gap is not seed noise. Raises ValueError when the lists differ in length.
    """
    if len(ours) != len(theirs):
        raise ValueError(f"paired outcomes need the same seeds: {len(ours)} against {len(theirs)} episodes")
    b = sum(1 for o, t in zip(ours, theirs) if t and not o)
    c = sum(1 for o, t in zip(ours, theirs) if o and not t)
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, i) for i in range(b, n + 1)) / 2.0**n)
