"""Confidence intervals for rates measured over a finite number of episodes.

A success rate of 14/16 is not 87.5% give or take nothing: with 16 episodes the 95% interval spans about 30
points. :func:`wilson_interval` is the Wilson score interval of a binomial proportion, which (unlike the normal
approximation ``p ± z sqrt(p (1 - p) / n)``) stays inside [0, 1] and does not collapse to a point at 0/n or n/n::

    centre    = (p + z² / 2n) / (1 + z² / n)
    halfwidth = z / (1 + z² / n) * sqrt(p (1 - p) / n + z² / 4n²)

with p = k / n and z the two-sided normal quantile of the confidence level (1.96 for 95%).
"""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["wilson_interval", "format_rate"]


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
