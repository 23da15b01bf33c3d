"""Closed-loop samples from start states, and the measures a table of them needs: diversity of paths (time-indexed
and along the route), behaviour modes, the area valid samples cover, and Spearman's rank correlation (does the
realised speed follow the requested one?).

A *valid* sample satisfies the rules at the requested θ (exact robustness >= 0) and does not collide; diversity
over the valid samples is what the STL-diffusion literature reports, and it cannot be inflated by failures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stlflow.control.controllers import EXPERT, ControllerSpec
from stlflow.control.tasks import get_task


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant or n < 2."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # average the ranks of ties
            m = v == value
            r[m] = r[m].mean()
        return r

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def diversity(trajectories: Sequence[np.ndarray]) -> float:
    """Mean pairwise RMS distance (m) between paths (T_i, D), shorter ones held at their last point."""
    import torch

    from stlflow.datasets.augment_select import mean_pairwise_distance

    if len(trajectories) < 2:
        return 0.0
    n = max(len(t) for t in trajectories)
    padded = np.stack([np.concatenate([t, np.repeat(t[-1:], n - len(t), 0)]) for t in trajectories])
    return mean_pairwise_distance(torch.as_tensor(padded))


def arc_length_resample(path: np.ndarray, n: int = 64) -> np.ndarray:
    """``n`` points (n, D) spaced evenly along the arc length of ``path`` (T, D) (all at the start when it is still)."""
    p = np.asarray(path, dtype=np.float64)
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
    if s[-1] <= 1e-12:
        return np.repeat(p[:1], n, axis=0)
    q = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(q, s, p[:, j]) for j in range(p.shape[1])], axis=1)


def path_diversity(trajectories: Sequence[np.ndarray], n: int = 64) -> float:
    """Mean pairwise RMS distance (m) between the *routes* of paths (T_i, D): each path resampled to ``n`` points
    evenly spaced along its arc length, so two runs of one route at different speeds count as the same behaviour
    (the time-indexed :func:`diversity` counts differences in pace too).
    """
    import torch

    from stlflow.datasets.augment_select import mean_pairwise_distance

    if len(trajectories) < 2:
        return 0.0
    return mean_pairwise_distance(torch.as_tensor(np.stack([arc_length_resample(t, n) for t in trajectories])))


def covered_area(paths: Sequence[np.ndarray], cell: float) -> float:
    """Area (m²) of the union of ``cell`` x ``cell`` grid squares that the xy paths (T_i, >=2) pass through.

    Each path is densified to points at most cell / 4 apart along its arc length first, so a fast path covers the
    squares between its samples. The grid is fixed in the world frame, so areas of different sets compare.
    """
    cells: set[tuple[int, int]] = set()
    for path in paths:
        xy = np.asarray(path, dtype=np.float64)[:, :2]
        length = float(np.sum(np.linalg.norm(np.diff(xy, axis=0), axis=1))) if len(xy) > 1 else 0.0
        dense = arc_length_resample(xy, max(2, int(np.ceil(4 * length / cell)) + 1))
        cells.update(map(tuple, np.floor(dense / cell).astype(np.int64).tolist()))
    return len(cells) * cell * cell


class Reseeded:
    """A controller whose noise seed is ``seed * 1000 + sample`` (several samples from one start state)."""

    def __init__(self, inner: Any, sample: int) -> None:
        self.inner, self.sample = inner, int(sample)

    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        self.inner.reset(seed=None if seed is None else int(seed) * 1000 + self.sample, obs=obs)

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = self.inner.act(obs)
        self.last_nfe = getattr(self.inner, "last_nfe", 0)
        return action


def closed_loop_samples(policy: Any, seeds: Sequence[int], samples: int, stl_params: Mapping[str, float], *,
                        controller: ControllerSpec | None = None, max_steps: int | None = None,
                        task: str = "crossing") -> list[dict[str, Any]]:
    """Run ``samples`` closed-loop episodes from each start state ``seeds`` (different controller noise each).

    ``policy``: a Policy, or None with the ``expert`` controller (then samples > 1 repeat the deterministic
    expert). Returns one record per episode: ``seed``, ``sample``, ``xy`` (T+1, D: the task's path),
    ``mode``, ``max_speed`` (of the task's speed signal), ``success``, ``collision``, ``robustness`` (exact, all
    rules at θ = the task's defaults overridden by ``stl_params``).
    """
    from stlflow.control.evaluate import policy_theta, rule_robustness
    from stlflow.control.loop import run_episode

    t = get_task(task)
    spec = controller or ControllerSpec.create("rti")
    theta = t.resolve_theta(stl_params)
    records = []
    for s in seeds:
        for j in range(samples):
            env = t.make_env()
            try:
                u = env.unwrapped
                if spec.name == EXPERT:
                    ctrl = spec.build(None, expert=u.make_expert(int(s)))
                else:
                    ctrl = Reseeded(spec.build(policy, seed=int(s), stl_params=policy_theta(policy, theta)), j)
                res = run_episode(env, ctrl, int(s), max_steps=max_steps)
                sig = {k: np.asarray(v, dtype=np.float64) for k, v in u.signals(res.obs).items()}
                rho, _ = rule_robustness(u.rules, None, sig, u.dt, theta)
                records.append({"seed": int(s), "sample": j, "xy": t.path_of(res.obs), "mode": t.mode(res.obs),
                                "max_speed": float(np.max(sig[t.speed_signal])) if t.speed_signal else float("nan"),
                                "success": bool(res.success), "collision": bool(res.collision),
                                "robustness": float(rho)})
            finally:
                env.close()
    return records


def is_valid(record: Mapping[str, Any]) -> bool:
    """A closed-loop sample that satisfies the rules (exact robustness >= 0) and does not collide."""
    return bool(record["robustness"] >= 0 and not record["collision"])


def sample_metrics(records: Sequence[Mapping[str, Any]], cell: float = 0.1) -> dict[str, float]:
    """Per start state, averaged over start states.

    Over all samples: mean pairwise distance of the paths (time-indexed, ``diversity_m``, and along the route,
    ``path_diversity_m``) and number of distinct modes reached (``modes_per_start``). Failed samples count here
    too, so a policy that crashes in varied ways scores as diverse.

    Over the *valid* samples only (rules satisfied, no collision; :func:`is_valid`), as the STL-diffusion paper
    measures diversity: their mean pairwise distance (time-indexed, ``valid_diversity_m``), distinct modes reached
    (``valid_modes_per_start``), the xy area their paths cover on a ``cell`` grid (``valid_area_m2``, the paper's
    "valid area" on a fixed grid) and the fraction of valid samples (``valid_fraction``). A start state with fewer
    than two valid samples has no valid diversity (0), one with none also no valid modes or area.
    """
    by_seed: dict[int, list[Mapping[str, Any]]] = {}
    for r in records:
        by_seed.setdefault(int(r["seed"]), []).append(r)
    div = [diversity([r["xy"] for r in rs]) for rs in by_seed.values()]
    route = [path_diversity([r["xy"] for r in rs]) for rs in by_seed.values()]
    modes = [len({r["mode"] for r in rs} - {"none"}) for rs in by_seed.values()]  # "none": never level with it
    valid = [[r for r in rs if is_valid(r)] for rs in by_seed.values()]
    v_modes = [len({r["mode"] for r in rs} - {"none"}) for rs in valid]
    v_area = [covered_area([r["xy"] for r in rs], cell) for rs in valid]
    v_div = [diversity([r["xy"] for r in rs]) for rs in valid]  # 0 for fewer than two

    def mean(v: list[float]) -> float:
        return float(np.mean(v)) if v else float("nan")

    return {"diversity_m": mean(div), "path_diversity_m": mean(route), "modes_per_start": mean(modes),
            "valid_diversity_m": mean(v_div), "valid_modes_per_start": mean(v_modes), "valid_area_m2": mean(v_area),
            "valid_fraction": mean([is_valid(r) for r in records])}
