"""Training batches for a Policy: observation histories, action chunks and per-episode θ.

:class:`ChunkData` wraps a :class:`stlflow.datasets.SequenceSampler` (Diffusion Policy windows and padding)
and adds each window's θ (the episode's calibrated STL parameters, episode attribute ``stl_params``).
The trainer asks it for batches of window indices; fetching is one vectorised gather.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from stlflow.datasets.normalizer import Normalizer
from stlflow.datasets.sampler import SequenceSampler
from stlflow.datasets.store import EpisodeStore

__all__ = ["ChunkData", "episode_params"]


def episode_params(store: EpisodeStore, names: Sequence[str]) -> np.ndarray:
    """θ of every episode, ``(n_episodes, P)``, from the episode attribute ``stl_params: {name: value}``."""
    out = np.zeros((store.n_episodes, len(names)), dtype=np.float64)
    for i in range(store.n_episodes):
        values = (store.episode_attrs(i) or {}).get("stl_params")
        if not isinstance(values, Mapping):
            raise KeyError(
                f"{store.path}: episode {i} has no 'stl_params' attribute; run `stlflow calibrate` first "
                f"or train without θ (policy.cond_params=[])"
            )
        missing = [n for n in names if n not in values]
        if missing:
            raise KeyError(f"{store.path}: episode {i} stl_params lack {missing}; it has {sorted(values)}")
        out[i] = [float(values[n]) for n in names]
    return out


class ChunkData:
    """Windows ``{"obs": (To, Do), "action": (Tp, Da)[, "params": (P,)]}`` over a set of episodes.

    Args:
        store: an :class:`EpisodeStore`, or a mapping ``{key: (T_total, D)}`` with ``episode_ends``.
        horizon, n_obs_steps, n_action_steps: Tp, To, Ta (the sampler pads To-1 steps before an episode).
        pad_after: steps a window may run past an episode's end (None: ``Tp - To``, so that every step, the last
            ones included, is the newest observation of some window). Diffusion Policy pads only ``Ta - 1``: the
            last ``Tp - To - Ta + 1`` steps of every episode are then never a window's present, which a receding
            horizon of Ta never needs but a controller that re-plans every tick does. On PickPlace, whose expert
            opens the gripper in an episode's last steps, policies trained with ``Ta - 1`` learned "the release
            is 7 steps ahead" for every state and never opened the gripper when re-planning every tick.
        episodes: episode indices to use (default all), e.g. one side of ``split_episodes``.
        params: θ per episode ``(n_episodes, P)`` (all episodes of the store, not only ``episodes``), or None.
        obs_key, action_key: the store keys to read.
    """

    def __init__(
        self,
        store: EpisodeStore | Mapping[str, np.ndarray],
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        episodes: Sequence[int] | np.ndarray | None = None,
        params: np.ndarray | None = None,
        obs_key: str = "obs",
        action_key: str = "action",
        episode_ends: Sequence[int] | np.ndarray | None = None,
        pad_after: int | None = None,
    ):
        self.obs_key, self.action_key = obs_key, action_key
        pad_after = int(horizon) - int(n_obs_steps) if pad_after is None else int(pad_after)
        self.sampler = SequenceSampler(
            store, horizon, n_obs_steps=n_obs_steps, n_action_steps=n_action_steps, pad_after=pad_after,
            keys=[obs_key, action_key],
            key_horizons={obs_key: n_obs_steps}, episodes=episodes, episode_ends=episode_ends,
        )
        self.params = None if params is None else np.asarray(params, dtype=np.float32)
        if self.params is not None and self.params.ndim != 2:
            raise ValueError(f"params must be (n_episodes, P), got shape {self.params.shape}")
        if len(self.sampler) == 0:
            raise ValueError("no training windows: the episodes are empty or shorter than the horizon allows")

    def __len__(self) -> int:
        return len(self.sampler)

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Windows ``indices`` stacked: obs (B, To, Do), action (B, Tp, Da), params (B, P) float32 tensors."""
        raw = self.sampler.sample_batch(indices)
        out = {
            "obs": torch.from_numpy(np.asarray(raw[self.obs_key], dtype=np.float32)),
            "action": torch.from_numpy(np.asarray(raw[self.action_key], dtype=np.float32)),
        }
        if self.params is not None:
            ep = self.sampler.window_episode[np.asarray(indices, dtype=np.int64)]
            out["params"] = torch.from_numpy(self.params[ep])
        return out

    def fit_normalizer(self, modes: Mapping[str, str] | None = None) -> Normalizer:
        """Normaliser fitted on these episodes' steps (obs Gaussian, action and θ min-max by default)."""
        modes = dict(modes or {"obs": "gaussian", "action": "minmax", "params": "minmax"})
        data: dict[str, Any] = {
            "obs": self.sampler.data[self.obs_key].reshape(-1, self.sampler.data[self.obs_key].shape[-1]),
            "action": self.sampler.data[self.action_key].reshape(-1, self.sampler.data[self.action_key].shape[-1]),
        }
        if self.params is not None:
            data["params"] = self.params[self.sampler.episodes]
        return Normalizer.fit(data, modes={k: modes.get(k, "minmax") for k in data})
