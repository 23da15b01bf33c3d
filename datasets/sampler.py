"""Fixed-length windows over episodes with Diffusion Policy's padding semantics.

Symbols (as in Diffusion Policy): ``Tp = horizon`` (window length), ``To = n_obs_steps``,
``Ta = n_action_steps``. A window is ``Tp`` consecutive steps of one episode, and may start up to
``pad_before = To - 1`` steps before the episode's first step and end up to ``pad_after = Ta - 1`` steps
after its last step; frames outside the episode repeat the episode's first (or last) frame. Windows never
cross an episode boundary. An episode of ``L`` steps yields ``max(0, L - Tp + pad_before + pad_after + 1)``
windows, with starts ``s = -pad_before, ..., L - Tp + pad_after`` (relative to the episode's first step);
frame ``j`` of the window is step ``clip(s + j, 0, L - 1)``.

Timing for ``To = 2, Ta = 8, Tp = 16`` (window index ``j``)::

    j:       0   1   2  ...  8   9  ...  15
    obs:   [t-1  t]                             key_horizons={"obs": 2}: only the first To frames
    action:     [t  t+1 ...     t+7]            the Ta actions executed after observing step t

Per-key horizons (``key_horizons={"obs": To}``) return only the first ``h_k`` frames of the window for
that key: observation keys need ``To`` frames, not ``Tp``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from stlflow.datasets.store import EpisodeStore


def split_episodes(n_episodes: int, val_ratio: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split episode indices into train and validation sets.

    ``round(n_episodes * val_ratio)`` episodes (at least 1 when ``val_ratio > 0``, at most
    ``n_episodes - 1``) are drawn without replacement with ``numpy.random.default_rng(seed)``.

    Returns:
        ``(train_idx, val_idx)``: sorted int64 arrays that partition ``range(n_episodes)``.
    """
    if n_episodes < 0:
        raise ValueError(f"n_episodes must be >= 0, got {n_episodes}")
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    n_val = 0
    if val_ratio > 0 and n_episodes > 1:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    rng = np.random.default_rng(seed)
    val = np.sort(rng.choice(n_episodes, size=n_val, replace=False)).astype(np.int64)
    mask = np.ones(n_episodes, dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val


class SequenceSampler:
    """Windows of ``horizon`` steps over a store's episodes, held in memory (safe to fork or pickle).

    Args:
        store: an :class:`EpisodeStore`, or a mapping ``{key: (T_total, ...)}`` of concatenated arrays
            together with ``episode_ends``.
        horizon: ``Tp``, window length in steps.
        n_obs_steps: ``To``; ``pad_before = To - 1``.
        n_action_steps: ``Ta``; ``pad_after = Ta - 1`` unless ``pad_after`` is given.
        pad_after: steps a window may run past an episode's last step (None: ``Ta - 1``, Diffusion Policy's choice;
            ``Tp - To`` makes every step of an episode, the last included, the newest observation of a window).
        keys: keys to load (default: all).
        key_horizons: ``{key: h}`` with ``1 <= h <= horizon``: that key's windows are its first ``h`` frames.
        episodes: episode indices to draw windows from (default: all), e.g. from :func:`split_episodes`.
        episode_ends: required when ``store`` is a mapping of arrays.

    ``sampler[i]`` is ``{key: (h_key, *shape)}``; :meth:`sample_batch` returns ``(B, h_key, *shape)``.
    Attributes ``window_episode`` and ``window_start`` give each window's episode index and start step
    relative to the episode (negative inside the front padding).
    """

    def __init__(
        self,
        store: EpisodeStore | Mapping[str, np.ndarray],
        horizon: int,
        n_obs_steps: int = 1,
        n_action_steps: int = 1,
        pad_after: int | None = None,
        keys: Sequence[str] | None = None,
        key_horizons: Mapping[str, int] | None = None,
        episodes: Sequence[int] | np.ndarray | None = None,
        episode_ends: Sequence[int] | np.ndarray | None = None,
    ):
        self._set_window_geometry(horizon, n_obs_steps, n_action_steps, pad_after)
        all_keys, ends = _keys_and_episode_ends(store, episode_ends)
        self._set_keys(all_keys, keys, key_horizons)
        starts, lengths, ep_idx = _episode_table(ends, episodes)
        self.episodes = ep_idx
        sel_starts, sel_lengths = starts[ep_idx], lengths[ep_idx]
        self._load_episodes(store, sel_starts, sel_lengths, ep_idx, take_all=episodes is None)
        self._index_windows(sel_lengths, ep_idx)

    def _set_window_geometry(self, horizon: int, n_obs_steps: int, n_action_steps: int, pad_after: int | None) -> None:
        """Check and set ``Tp``, ``To``, ``Ta`` and how far a window may reach before and after its episode."""
        if int(horizon) < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if not 1 <= int(n_obs_steps) <= int(horizon):
            raise ValueError(f"n_obs_steps must be in [1, horizon={horizon}], got {n_obs_steps}")
        if not 1 <= int(n_action_steps) <= int(horizon):
            raise ValueError(f"n_action_steps must be in [1, horizon={horizon}], got {n_action_steps}")
        self.horizon = int(horizon)
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.pad_before = self.n_obs_steps - 1
        self.pad_after = self.n_action_steps - 1 if pad_after is None else int(pad_after)
        if not 0 <= self.pad_after < self.horizon:
            raise ValueError(f"pad_after must be in [0, horizon - 1 = {self.horizon - 1}], got {pad_after}")

    def _set_keys(
        self, all_keys: Sequence[str], keys: Sequence[str] | None, key_horizons: Mapping[str, int] | None
    ) -> None:
        """Check and set the keys to load (default: all) and each key's horizon (default: ``Tp``)."""
        self.keys = list(all_keys if keys is None else keys)
        for k in self.keys:
            if k not in all_keys:
                raise KeyError(f"key {k!r} is not in the data; available keys: {list(all_keys)}")
        self.key_horizons = {k: self.horizon for k in self.keys}
        for k, h in (key_horizons or {}).items():
            if k not in self.key_horizons:
                raise KeyError(f"key_horizons names {k!r}, which is not among the sampled keys {self.keys}")
            if not 1 <= int(h) <= self.horizon:
                raise ValueError(f"key_horizons[{k!r}] must be in [1, horizon={self.horizon}], got {h}")
            self.key_horizons[k] = int(h)

    def _load_episodes(
        self,
        store: EpisodeStore | Mapping[str, np.ndarray],
        sel_starts: np.ndarray,
        sel_lengths: np.ndarray,
        ep_idx: np.ndarray,
        take_all: bool,
    ) -> None:
        """Load the selected episodes into memory, compacted: (sum of selected lengths, ...) per key."""
        if not take_all:
            step_idx = (
                np.concatenate([np.arange(s, s + n) for s, n in zip(sel_starts, sel_lengths)])
                if len(ep_idx)
                else np.zeros(0, dtype=np.int64)
            )
        self.data: dict[str, np.ndarray] = {}
        for k in self.keys:
            full = store.get(k) if isinstance(store, EpisodeStore) else np.asarray(store[k])
            self.data[k] = full if take_all else full[step_idx]
        self._ep_start = (
            np.concatenate([[0], np.cumsum(sel_lengths)[:-1]]).astype(np.int64)
            if len(ep_idx)
            else (np.zeros(0, dtype=np.int64))
        )
        self._ep_length = sel_lengths.astype(np.int64)

    def _index_windows(self, sel_lengths: np.ndarray, ep_idx: np.ndarray) -> None:
        """Window table: window w belongs to compacted episode e(w) and starts at s(w) (relative)."""
        counts = np.maximum(0, sel_lengths - self.horizon + self.pad_before + self.pad_after + 1)
        self._win_ep = np.repeat(np.arange(len(ep_idx)), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        self.window_start = (np.arange(int(counts.sum())) - first - self.pad_before).astype(np.int64)
        self.window_episode = ep_idx[self._win_ep] if len(ep_idx) else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(len(self.window_start))

    def _frame_index(self, w: np.ndarray, h: int) -> np.ndarray:
        """``(B, h)`` row indices into ``self.data`` for windows ``w`` (edge frames replicated)."""
        e = self._win_ep[w]
        rel = self.window_start[w][:, None] + np.arange(h)[None, :]
        rel = np.clip(rel, 0, self._ep_length[e][:, None] - 1)
        return rel + self._ep_start[e][:, None]

    def sample_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Windows ``indices`` stacked: ``{key: (B, h_key, *shape)}``."""
        w = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(w) and (w.min() < -n or w.max() >= n):
            raise IndexError(f"window index out of range for a sampler with {n} windows")
        w = w % max(n, 1)
        cache: dict[int, np.ndarray] = {}
        out = {}
        for k in self.keys:
            h = self.key_horizons[k]
            if h not in cache:
                cache[h] = self._frame_index(w, h)
            out[k] = self.data[k][cache[h]]
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.sample_batch([i]).items()}


def _keys_and_episode_ends(
    store: EpisodeStore | Mapping[str, np.ndarray], episode_ends: Sequence[int] | np.ndarray | None
) -> tuple[Sequence[str], np.ndarray]:
    """The data's keys and episode end indices, from an EpisodeStore or from a mapping plus ``episode_ends``."""
    if isinstance(store, EpisodeStore):
        return store.keys, store.episode_ends
    if episode_ends is None:
        raise ValueError("episode_ends is required when the sampler is given a mapping of arrays")
    return list(store), np.asarray(episode_ends, dtype=np.int64)


def _episode_table(
    ends: np.ndarray, episodes: Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, lengths, ep_idx)``: every episode's first step and length, and the episodes to sample (checked)."""
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    lengths = ends - starts
    if np.any(lengths <= 0):
        raise ValueError("episode_ends must be strictly increasing")
    n_ep = len(ends)
    ep_idx = np.arange(n_ep) if episodes is None else np.asarray(episodes, dtype=np.int64).reshape(-1)
    if len(ep_idx) and (ep_idx.min() < 0 or ep_idx.max() >= n_ep):
        raise IndexError(f"episodes must be in [0, {n_ep}), got min {ep_idx.min()} max {ep_idx.max()}")
    return starts, lengths, ep_idx


class SequenceDataset(torch.utils.data.Dataset):
    """A torch ``Dataset`` over a :class:`SequenceSampler`: items are dicts of float32 tensors.

    ``transform`` (optional) maps the dict of tensors to a new dict, for one window or a whole batch (e.g.
    ``Normalizer.normalize_dict``, which handles any leading dimensions). The sampler holds
    plain numpy arrays, so ``DataLoader`` workers receive a copy (fork) without any open file handles.
    """

    def __init__(self, sampler: SequenceSampler, transform: Callable[[dict], dict] | None = None):
        self.sampler = sampler
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int | Sequence[int] | np.ndarray) -> dict[str, Any]:
        """Window ``i`` as ``{key: (h_key, ...)}``, or, for a list of indices, the stacked batch ``(B, h_key, ...)``.

        The batched form is the fast path: ``DataLoader(ds, sampler=BatchSampler(RandomSampler(ds), B, False),
        batch_size=None)`` gathers each batch with one vectorised numpy index instead of B small ones.
        """
        if isinstance(i, (int, np.integer)):
            item = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in self.sampler[int(i)].items()}
        else:
            item = {
                k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in self.sampler.sample_batch(i).items()
            }
        return self.transform(item) if self.transform is not None else item

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        # DataLoader's batched fetch (batch_size=B): one vectorised gather, then split for the collate function.
        batch = self.sampler.sample_batch(indices)
        tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in batch.items()}
        items = [{k: v[j] for k, v in tensors.items()} for j in range(len(indices))]
        if self.transform is not None:
            items = [self.transform(it) for it in items]
        return items
