"""STL parameter vectors θ for the augmentation (:func:`sample_theta`) and the specification a behaviour mode
optimises (:func:`spec_text`); used by :func:`stlflow.datasets.augment.augment_demo`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from stlflow.datasets.augment import ModeSpec

__all__ = ["sample_theta", "spec_text"]


def spec_text(rules: str, mode: ModeSpec) -> str:
    """The STL text optimised for ``mode``: ``(rules) & (mode.formula)``, or the rules alone."""
    return rules if not mode.formula else f"({rules}) & ({mode.formula})"


def sample_theta(
    ranges: dict[str, tuple[float, float]],
    rng: np.random.Generator,
    *,
    base: dict[str, float] | None = None,
    time_params: Sequence[str] = (),
    dt: float = 1.0,
) -> dict[str, float]:
    """One θ: each parameter uniform in its (low, high) range; parameters only in ``base`` keep their value.

    Time-bound parameters (``time_params``) are rounded to a multiple of ``dt`` (STL interval bounds must be).
    The draw order is the sorted parameter names, so a seed gives the same θ whatever the dict order.
    """
    theta = dict(base or {})
    for name in sorted(ranges):
        lo, hi = ranges[name]
        if not hi >= lo:
            raise ValueError(f"parameter range for {name!r} is empty: ({lo}, {hi})")
        value = float(rng.uniform(lo, hi))
        if name in time_params:
            value = max(round(value / dt), 1) * dt
        theta[name] = value
    return theta
