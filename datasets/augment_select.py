"""Selection and diversity measures of the STL augmentation: which satisfying candidates to keep, and how
different a set of trajectories is.

- :func:`farthest_point_selection`: greedy (optionally group-balanced) farthest-point order of candidates, so that
  diversity is chosen rather than hoped for.
- :func:`mean_pairwise_distance`: mean RMS distance between trajectories, the diversity figure of the reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["farthest_point_selection", "mean_pairwise_distance"]


def farthest_point_selection(
    points: torch.Tensor, k: int, groups: Sequence[int] | None = None, start: int = 0
) -> list[int]:
    """Up to ``k`` indices of ``points (N, F)``, each the farthest (Euclidean) from those already chosen.

    With ``groups`` (length N, a group id per point) the choice is balanced: each step serves the group with
    the fewest selections so far (ties: smallest id), picking its point farthest from *all* chosen points.
    ``start`` is the first index chosen. Returns the selection order.
    """
    n = points.shape[0]
    if n == 0 or k <= 0:
        return []
    gid = torch.zeros(n, dtype=torch.long) if groups is None else torch.as_tensor(list(groups), dtype=torch.long)
    chosen = [start]
    dist = torch.cdist(points, points[start : start + 1]).squeeze(1)
    taken = torch.zeros(n, dtype=torch.bool)
    taken[start] = True
    counts: dict[int, int] = {int(g): 0 for g in gid.unique()}
    counts[int(gid[start])] += 1
    while len(chosen) < min(k, n):
        open_groups = [g for g in sorted(counts) if bool(((gid == g) & ~taken).any())]
        g = min(open_groups, key=lambda x: counts[x])
        score = torch.where((gid == g) & ~taken, dist, torch.full_like(dist, -1.0))
        i = int(torch.argmax(score))
        chosen.append(i)
        taken[i] = True
        counts[g] += 1
        dist = torch.minimum(dist, torch.cdist(points, points[i : i + 1]).squeeze(1))
    return chosen


def mean_pairwise_distance(trajectories: torch.Tensor) -> float:
    """Mean over pairs of the RMS distance between trajectories ``(N, H, P)`` (units of P; 0 when N < 2)."""
    n, horizon = trajectories.shape[0], trajectories.shape[1]
    if n < 2:
        return 0.0
    d = torch.cdist(trajectories.reshape(n, -1).double(), trajectories.reshape(n, -1).double()) / math.sqrt(horizon)
    return float(d.sum() / (n * (n - 1)))
