"""Calibrating a task's parametric STL rules on the demonstrations of an EpisodeStore.

Each rule is calibrated on its own, with the parameters it mentions that are being calibrated; the rule's other
parameters keep their default values. Per episode (``stlflow.stl.calibrate`` mode ``"tightest"``): the tightest
values that the episode satisfies, loosened by a per-parameter margin -- so each demonstration satisfies its own
specification, as in the pSTL diffusion-policy paper. Dataset-wide (mode ``"dataset"``): the tightest values
satisfied by a fraction ``q`` of the demonstrations. Time bounds are found by exhaustive scan, thresholds by
bisection (both inside ``stlflow.stl.calibrate``).

Signals come from the store's ``signal_<name>`` keys (``signal_<name>[t]``: the signal after ``action[t]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stlflow.stl import Formula

__all__ = ["Calibration", "calibrate_store", "episode_signals", "summary_table"]


@dataclass
class Calibration:
    """Result of :func:`calibrate_store`.

    ``per_episode[i]``: ``{param: value}`` of episode ``i`` (margin included); ``dataset``: ``{param: value}``;
    ``rho[i]``: exact robustness of all the rules at episode ``i``'s own θ (defaults for the rest);
    ``satisfied[i] = rho[i] >= 0``; ``modes[i]``: the episode's behaviour mode attribute;
    ``notes``: what the calibration had to warn about (non-monotone parameters, unsatisfiable episodes).
    """

    params: list[str]
    per_episode: list[dict[str, float]]
    dataset: dict[str, float]
    rho: np.ndarray
    satisfied: np.ndarray
    modes: list[str]
    notes: list[str] = field(default_factory=list)


def episode_signals(store: Any, i: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """``{name: (T,) float64}`` from the store's ``signal_<name>`` keys of episode ``i``."""
    missing = [n for n in names if f"signal_{n}" not in store.keys]
    if missing:
        raise KeyError(
            f"the store at {store.path} has no key(s) {['signal_' + n for n in missing]} needed by the rules; "
            f"its keys are {store.keys}"
        )
    arrays = store.episode(i, keys=[f"signal_{n}" for n in names])
    return {n: np.asarray(arrays[f"signal_{n}"], dtype=np.float64).reshape(-1) for n in names}


def _edge_padded(signals: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack episodes of different lengths into (B, T_max) by repeating each episode's last sample.

    Exact for the task rules at sample 0: an unbounded ``G``/``F`` or a window that runs past an episode's end
    takes the min/max over the real samples plus copies of the last one, which does not change it; and a
    window ending before the end reads no padding.
    """
    t_max = max(len(next(iter(s.values()))) for s in signals)
    out = {}
    for k in signals[0]:
        rows = [np.pad(s[k], (0, t_max - len(s[k])), mode="edge") for s in signals]
        out[k] = np.stack(rows)
    return out


def _rule_texts(rules: str | Mapping[str, str] | Sequence[str]) -> list[str]:
    if isinstance(rules, str):
        return [rules]
    if isinstance(rules, Mapping):
        return list(rules.values())
    return list(rules)


def _margin_for(margin: float | Mapping[str, float], name: str) -> float:
    return float(margin.get(name, 0.0)) if isinstance(margin, Mapping) else float(margin)


def calibrate_store(
    store: Any,
    rules: str | Mapping[str, str] | Sequence[str],
    params: Sequence[str],
    defaults: Mapping[str, float],
    *,
    margin: float | Mapping[str, float] = 0.0,
    q: float = 0.95,
    episodes: Sequence[int] | None = None,
) -> Calibration:
    """Calibrate ``params`` of ``rules`` on the episodes of ``store`` (an open EpisodeStore).

    Args:
        rules: one STL text, or the task's separate rules (``rule_list``: name -> text, or a list); with separate
            rules each parameter is calibrated on the rule(s) that mention it, which keeps unrelated rules from
            masking it (a demo's tightest speed limit must not depend on its clearance).
        params: the parameters to calibrate; the others take ``defaults``.
        defaults: a value for every parameter of the rules.
        margin: loosening added to each tightest value (a float for all, or per parameter), in the parameter's
            unit (seconds for time bounds); applied in the direction that makes the rule easier to satisfy.
        q: fraction of demonstrations the dataset-level values must satisfy.
        episodes: indices to use (default all).
    """
    specs, full = _parse_rules(_rule_texts(rules), params, defaults)
    idx = list(range(store.n_episodes)) if episodes is None else [int(i) for i in episodes]
    if not idx:
        raise ValueError(f"no episodes to calibrate in {store.path}")
    dt = float(store.dt)
    signals = [episode_signals(store, i, sorted(full.signals)) for i in idx]

    per_episode: list[dict[str, float]] = [{} for _ in idx]
    dataset: dict[str, float] = {}
    notes: list[str] = []
    padded = _edge_padded(signals)
    for spec in specs:
        mine = [p for p in params if p in spec.params]
        if not mine:
            continue
        fixed = {k: float(defaults[k]) for k in spec.params if k not in mine}
        sig = {k: padded[k] for k in spec.signals}
        for name in mine:  # one at a time: a non-monotone parameter must not take the others down with it
            others = {k: float(defaults[k]) for k in mine if k != name}  # the rule's other parameters at defaults
            _calibrate_param(spec, sig, dt, name, {**fixed, **others}, defaults, margin, q, per_episode, dataset,
                             notes)

    rho = _own_theta_robustness(full, signals, dt, params, defaults, per_episode)
    satisfied = rho >= 0
    if not satisfied.all():
        bad = [idx[j] for j in np.nonzero(~satisfied)[0]]
        notes.append(f"{len(bad)} episode(s) do not satisfy the rules at their own θ (e.g. {bad[:5]})")
    modes = [str(store.episode_attrs(i).get("mode", "?")) for i in idx]
    return Calibration(list(params), per_episode, dataset, rho, satisfied, modes, notes)


def _parse_rules(
    texts: list[str], params: Sequence[str], defaults: Mapping[str, float]
) -> tuple[list[Formula], Formula]:
    """The parsed rules and their conjunction, checked: every parameter is calibrated or has a default."""
    from stlflow import stl

    specs = [stl.parse(t) for t in texts]
    full = stl.parse(" & ".join(f"({t})" for t in texts)) if len(texts) > 1 else specs[0]
    unknown = set(params) - set(full.params)
    if unknown:
        raise ValueError(
            f"parameter(s) {sorted(unknown)} do not occur in the rules; their parameters: {sorted(full.params)}"
        )
    missing = set(full.params) - set(params) - set(defaults)
    if missing:
        raise ValueError(f"no default value for parameter(s) {sorted(missing)}; defaults given: {dict(defaults)}")
    return specs, full


def _calibrate_param(
    spec: Formula,
    sig: dict[str, np.ndarray],
    dt: float,
    name: str,
    fixed: dict[str, float],
    defaults: Mapping[str, float],
    margin: float | Mapping[str, float],
    q: float,
    per_episode: list[dict[str, float]],
    dataset: dict[str, float],
    notes: list[str],
) -> None:
    """Calibrate parameter ``name`` of one rule into ``per_episode`` and ``dataset``; what went wrong into ``notes``.

    An episode that satisfies the rule at no finite value (or at every value) keeps the default, and so do all
    episodes when the parameter cannot be calibrated at all.
    """
    from stlflow import stl

    try:
        tight = stl.calibrate(
            spec, sig, dt, params=[name], mode="tightest", margin=_margin_for(margin, name), fixed=fixed
        )
        whole = stl.calibrate(
            spec, sig, dt, params=[name], mode="dataset", q=q, margin=_margin_for(margin, name), fixed=fixed
        )
    except ValueError as err:  # not monotone, or no demonstration satisfies the rule at any value
        notes.append(f"{{{name}}} in {spec}: not calibrated ({err}); episodes keep the default {defaults.get(name)}")
        for theta in per_episode:
            theta[name] = float(defaults[name])
        dataset[name] = float(defaults[name])
        return
    values = np.asarray(tight.values[name], dtype=np.float64)
    bad = ~np.isfinite(values) | np.isnan(np.asarray(tight.tightest[name], dtype=np.float64))
    if bad.any():
        notes.append(
            f"{{{name}}} in {spec}: {int(bad.sum())} episode(s) satisfy it at no finite value or at every "
            f"value; they keep the default {defaults.get(name)}"
        )
    for j in range(len(per_episode)):
        per_episode[j][name] = float(defaults[name]) if bad[j] else float(values[j])
    dataset[name] = float(whole.dataset[name])


def _own_theta_robustness(
    full: Formula,
    signals: list[dict[str, np.ndarray]],
    dt: float,
    params: Sequence[str],
    defaults: Mapping[str, float],
    per_episode: list[dict[str, float]],
) -> np.ndarray:
    """(N,) exact robustness of all the rules at each episode's own θ (defaults for the parameters not calibrated)."""
    rho = np.empty(len(signals))
    for j, s in enumerate(signals):
        theta = {**{k: float(defaults[k]) for k in full.params if k not in params}, **per_episode[j]}
        rho[j] = float(full.robustness({k: s[k] for k in full.signals}, dt=dt, params=theta))
    return rho


def summary_table(cal: Calibration) -> str:
    """A plain-text table: per parameter, min / median / max over all episodes and per behaviour mode."""
    groups = ["all", *sorted(set(cal.modes))]
    rows = [("param", "mode", "n", "min", "median", "max", "dataset")]
    for p in cal.params:
        for g in groups:
            vals = np.array([e[p] for e, m in zip(cal.per_episode, cal.modes) if g == "all" or m == g])
            if vals.size == 0:
                continue
            ds = f"{cal.dataset[p]:.4g}" if g == "all" and p in cal.dataset else ""
            rows.append((p, g, str(vals.size), f"{vals.min():.4g}", f"{np.median(vals):.4g}", f"{vals.max():.4g}", ds))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
