"""Fit the task rules' free parameters θ on demonstrations, per episode and dataset-wide.

    stlflow calibrate data=demos.zarr env=crossing [q=0.95] [margin=0.05] [params=[v_max,d_safe]]

Per episode: the tightest values of the parameters that the episode satisfies (``stlflow.stl.calibrate``, mode
"tightest"; bisection for thresholds, exhaustive scan for time bounds), loosened by a margin, so that every
demonstration satisfies its own specification. They are written into the store as the episode attribute
``stl_params`` ({name: value}); parameters that are not calibrated keep the task's defaults there.
Dataset-wide: the tightest values that a fraction q of the demonstrations satisfies (mode "dataset"), written
into the store attributes as ``stl_params_dataset`` (with ``stl_calibration``: q, margins, the parameters).
Prints a table per parameter (min / median / max) overall and per behaviour mode, and the notes of the
calibration (non-monotone parameters, episodes that do not satisfy their own θ).
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from stlflow.config import verb_config


def _rule_set(store, env_id: str) -> tuple[dict[str, str], dict[str, float]]:
    """The task's separate rules and their defaults: from the store's attributes, else from the env."""
    attrs = store.attrs
    rule_list, defaults = attrs.get("rule_list"), attrs.get("rule_defaults")
    if isinstance(rule_list, list):
        rule_list = None  # an older collector stored only names
    if not rule_list or not defaults:
        from stlflow.control.collect import make_env

        env = make_env(env_id)
        try:
            u = env.unwrapped
            rule_list = dict(getattr(u, "rule_list", None) or {"rules": u.rules})
            defaults = dict(u.rule_defaults)
        finally:
            env.close()
    return dict(rule_list), {k: float(v) for k, v in defaults.items()}


def calibrate(cfg) -> int:
    """Run the calibration described by a composed ``calibrate`` config; returns the exit status."""
    from stlflow.datasets import EpisodeStore
    from stlflow.datasets.augment_calibrate import calibrate_store, summary_table

    try:
        store = EpisodeStore.open(cfg.data, mode="a")
    except (FileNotFoundError, ValueError) as err:
        print(f"stlflow calibrate: cannot open data={cfg.data}: {err}", file=sys.stderr)
        return 2
    stored_env = store.attrs.get("env_id")
    if stored_env and stored_env != cfg.env.id:
        print(
            f"stlflow calibrate: {cfg.data} holds {stored_env} episodes but env={cfg.env.name} ({cfg.env.id})",
            file=sys.stderr,
        )
        return 2
    rules, defaults = _rule_set(store, cfg.env.id)
    params = list(cfg.params if cfg.params is not None else cfg.stl.calibrate_params)
    margin = float(cfg.margin) if cfg.margin is not None else OmegaConf.to_container(cfg.stl.margin)
    try:
        cal = calibrate_store(store, rules, params, defaults, margin=margin, q=float(cfg.q))
    except (KeyError, ValueError) as err:
        print(f"stlflow calibrate: {err}", file=sys.stderr)
        return 2
    for i, theta in enumerate(cal.per_episode):
        store.set_episode_attrs(i, {"stl_params": {**defaults, **theta}, "stl_rho_own": float(cal.rho[i])})
    store.set_attrs(
        {
            "stl_params_dataset": {**defaults, **cal.dataset},
            "stl_calibration": {"q": float(cfg.q), "margin": margin, "params": params, "notes": cal.notes},
        }
    )
    n = len(cal.per_episode)
    print(f"calibrated {params} on {n} episodes of {cfg.data} (q={cfg.q}; margin={margin})")
    print(summary_table(cal))
    print(f"each demo satisfies its own θ: {int(cal.satisfied.sum())}/{n}")
    for note in cal.notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str]) -> int:
    cfg = verb_config("calibrate", argv, __doc__)
    if cfg is None:
        return 0
    return calibrate(cfg)
