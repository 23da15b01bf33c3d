"""What every task's augmentation shares: replaying a control sequence in MuJoCo through the control loop, and the
behaviour modes of ``conf/stl/<task>.yaml`` as :class:`~stlflow.datasets.augment.ModeSpec` s.

The augmentation types are imported where they are used: looking a task up in the registry must not import torch
(a sim twin or a data tool does not need it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class Playback:
    """A controller that plays a fixed control sequence (H, Du), one control per tick."""

    def __init__(self, controls: np.ndarray) -> None:
        self.controls = np.asarray(controls, dtype=np.float32)
        self.t = 0

    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        self.t = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        u = self.controls[self.t]
        self.t += 1
        return u


def replay_controls(env: Any, seed: int, controls: np.ndarray) -> tuple[Any, Any]:
    """Replay ``controls`` (H, Du) from ``env.reset(seed)`` in the real env, through the control loop.

    Stops early when the env terminates or truncates. Returns the augmentation's ``ReplayResult`` and the loop's
    ``EpisodeResult`` (for task-specific extras such as signals computed from the observations reached).
    """
    from stlflow.control.loop import run_episode
    from stlflow.datasets.augment import ReplayResult  # imports torch: only when augmenting

    episode = run_episode(env, Playback(controls), int(seed), max_steps=len(controls))
    result = ReplayResult(
        obs=np.asarray(episode.obs[:-1], dtype=np.float32),
        action=np.asarray(episode.action, dtype=np.float32),
        signals={k: np.asarray(v) for k, v in episode.signals.items()},
        collision=bool(episode.collision),
        attrs={"success": bool(episode.success), "length": episode.length},
    )
    return result, episode


def mode_specs(stl_cfg: Mapping[str, Any], only: Sequence[str] | None = None, task: str = "") -> list[Any]:
    """The behaviour modes of a task's STL settings (no modes: the rules alone, as one mode named ``rules``);
    ``only`` restricts them to these names (an unknown name is an error listing the known ones)."""
    from stlflow.datasets.augment import ModeSpec

    modes = stl_cfg.get("modes") or {"rules": {}}
    specs = [ModeSpec(name, (m or {}).get("formula"),
                      {k: tuple(v) for k, v in ((m or {}).get("param_ranges") or {}).items()})
             for name, m in modes.items()]
    if only:
        unknown = set(only) - {m.name for m in specs}
        if unknown:
            raise ValueError(f"unknown mode(s) {sorted(unknown)}; modes of {task or 'the task'}: "
                             f"{[m.name for m in specs]}")
        specs = [m for m in specs if m.name in only]
    return specs


def check_start(env: Any, episode: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> tuple[int, np.ndarray]:
    """Reset ``env`` to a recorded episode's start (``attrs['seed']``); returns (seed, first observation).

    Raises ValueError without a seed or when the reset does not reproduce the recorded first observation.
    """
    if "seed" not in attrs:
        raise ValueError(f"episode attrs have no 'seed' (needed to reset the env to its start): {sorted(attrs)}")
    seed = int(attrs["seed"])
    obs0, _ = env.reset(seed=seed)
    if not np.allclose(obs0, episode["obs"][0], atol=1e-4):
        raise ValueError(
            f"env reset with seed {seed} does not reproduce the episode's first observation "
            f"(max difference {np.abs(obs0 - episode['obs'][0]).max():.3g}); was it recorded with other env settings?")
    return seed, obs0


def initial_control_range(stl_cfg: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    """``init_low`` / ``init_high`` of the STL settings as arrays (None where unset)."""
    return {k: None if stl_cfg.get(k) is None else np.asarray(stl_cfg[k], dtype=np.float64)
            for k in ("init_low", "init_high")}
