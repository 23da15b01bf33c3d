"""Consistency of an :class:`~stlflow.datasets.store.EpisodeStore` with its commit record.

- :func:`validate_episode`: an episode about to be appended, against the store's keys, shapes and dtypes
  (everything is checked before anything is written).
- :func:`committed_view`: the arrays of an opened store, checked to hold at least what the record commits.
- :func:`truncate_to_committed`: drop what a writer killed mid-append left past the committed state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stlflow.datasets.store_io import EpisodeStoreError, check_key_name, check_numeric_dtype, remove_temporaries

__all__ = ["committed_view", "truncate_to_committed", "validate_episode"]


def validate_episode(episode: Mapping[str, Any], keys: Mapping[str, dict], where: str) -> dict[str, np.ndarray]:
    """``episode``'s arrays checked against the store's ``keys`` (``{key: {"shape", "dtype"}}``; empty: any keys)
    and cast to the store's dtypes (numpy's ``same_kind`` rule), contiguous. Raises naming ``where``."""
    if not isinstance(episode, Mapping) or not episode:
        raise EpisodeStoreError(f"{where}: expected a non-empty dict of arrays, got {type(episode).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for key, value in episode.items():
        check_key_name(key)
        arr = np.asarray(value)
        if arr.ndim == 0:
            raise EpisodeStoreError(f"{where}: key {key!r} is a scalar; arrays need a leading time axis (T, ...)")
        arrays[key] = arr
    if keys:
        missing = sorted(set(keys) - set(arrays))
        extra = sorted(set(arrays) - set(keys))
        if missing or extra:
            raise EpisodeStoreError(
                f"{where}: keys do not match the store's keys {sorted(keys)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
    lengths = {k: a.shape[0] for k, a in arrays.items()}
    T = max(lengths.values())
    if T == 0:
        raise EpisodeStoreError(f"{where}: episode has 0 steps")
    ragged = {k: n for k, n in lengths.items() if n != T}
    if ragged:
        raise EpisodeStoreError(f"{where}: ragged lengths: key(s) {ragged} have fewer steps than the others ({T})")
    out = {}
    for key, arr in arrays.items():
        check_numeric_dtype(key, arr.dtype)
        if key in keys:
            want_shape = tuple(keys[key]["shape"])
            want_dtype = np.dtype(keys[key]["dtype"])
            if arr.shape[1:] != want_shape:
                raise EpisodeStoreError(
                    f"{where}: key {key!r} has per-step shape {arr.shape[1:]}, the store holds {want_shape}"
                )
            if not np.can_cast(arr.dtype, want_dtype, casting="same_kind"):
                raise EpisodeStoreError(
                    f"{where}: key {key!r} has dtype {arr.dtype}, which does not cast to the store's {want_dtype}"
                )
            arr = arr.astype(want_dtype, copy=False)
        out[key] = np.ascontiguousarray(arr)
    return out


def committed_view(
    root: zarr.Group, record: dict, path: Path, with_attrs: bool = True
) -> tuple[dict[str, zarr.Array], np.ndarray, dict[str, zarr.Array]]:
    """The ``meta`` arrays (``episode_ends`` and, ``with_attrs``, ``episode_attrs``), the committed episode ends
    (int64) and the ``data`` arrays of the store at ``path``; raises if they hold less than ``record`` commits."""
    n_ep, n_steps = int(record["n_episodes"]), int(record["n_steps"])
    meta_group = root["meta"]
    ends_arr = meta_group["episode_ends"]
    meta = {"episode_ends": ends_arr}
    if with_attrs:
        meta["episode_attrs"] = meta_group["episode_attrs"]
    if ends_arr.shape[0] < n_ep:
        raise EpisodeStoreError(
            f"{path}: meta/episode_ends holds {ends_arr.shape[0]} entries but {n_ep} episodes are committed"
        )
    ends = np.asarray(ends_arr[:n_ep], dtype=np.int64)
    if n_ep and int(ends[-1]) != n_steps:
        raise EpisodeStoreError(f"{path}: meta/episode_ends ends at {ends[-1]} but {n_steps} steps are committed")
    if np.any(np.diff(np.concatenate([[0], ends])) <= 0):
        raise EpisodeStoreError(f"{path}: meta/episode_ends is not strictly increasing")
    arrays = {}
    for key in record["keys"]:
        try:
            arr = root["data"][key]
        except KeyError as err:
            raise EpisodeStoreError(f"{path}: committed key {key!r} has no array data/{key}") from err
        if arr.shape[0] < n_steps:
            raise EpisodeStoreError(f"{path}: data/{key} holds {arr.shape[0]} steps but {n_steps} are committed")
        arrays[key] = arr
    return meta, ends, arrays


def truncate_to_committed(
    root: zarr.Group, record: dict, arrays: Mapping[str, zarr.Array], meta: Mapping[str, zarr.Array], path: Path
) -> None:
    """Resize ``arrays`` and ``meta`` to the committed steps and episodes, delete data arrays of uncommitted keys
    and the temporary files under ``path``."""
    n_ep, n_steps = int(record["n_episodes"]), int(record["n_steps"])
    for arr in arrays.values():
        if arr.shape[0] != n_steps:
            arr.resize((n_steps, *arr.shape[1:]))
    data = root["data"]
    for name in list(data.array_keys()):
        if name not in record["keys"]:
            del data[name]
    for arr in meta.values():
        if arr.shape[0] != n_ep:
            arr.resize((n_ep,))
    remove_temporaries(path)
