"""Consistency of an :class:`~stlflow.datasets.store.EpisodeStore` with its commit record.

- :func:`validate_episode`: an episode about to be appended, against the store's keys, shapes and dtypes
  (everything is checked before anything is written).
- :func:`committed_view`: the arrays of an opened store, checked to hold at least what the record commits and to
  agree with it (shapes, dtypes, ``episode_ends``); :func:`parse_episode_attrs` checks the episode attributes.
- :func:`truncate_to_committed`: drop what a writer killed mid-append left past the committed state (only ever
  called by the holder of the writer lock).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stlflow.datasets.store_io import (
    EpisodeStoreError,
    StoreCorruptError,
    check_key_name,
    check_numeric_dtype,
    remove_temporaries,
)
from stlflow.datasets.store_record import check_episode_ends

__all__ = ["committed_view", "parse_episode_attrs", "truncate_to_committed", "validate_episode"]


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
    (int64) and the ``data`` arrays of the store at ``path``.

    Raises :class:`StoreCorruptError` naming the store and the problem if they hold less than ``record`` commits
    or contradict it: ``episode_ends`` not integer, negative, not increasing or not ending at the committed steps;
    a committed key without its array, or whose array has another per-step shape or dtype (the real shapes are
    reported). Arrays longer than the commit are fine (a writer's uncommitted tail).
    """
    n_ep, n_steps = int(record["n_episodes"]), int(record["n_steps"])
    meta_group = _member(root, "meta", zarr.Group, path)
    ends_arr = _member(meta_group, "episode_ends", zarr.Array, path, "meta/")
    meta = {"episode_ends": ends_arr}
    if with_attrs:
        attrs_arr = _member(meta_group, "episode_attrs", zarr.Array, path, "meta/")
        if attrs_arr.ndim != 1 or attrs_arr.shape[0] < n_ep:
            raise StoreCorruptError(
                f"{path}: meta/episode_attrs has shape {tuple(attrs_arr.shape)} but {n_ep} episodes are committed"
            )
        meta["episode_attrs"] = attrs_arr
    ends = check_episode_ends(ends_arr, n_ep, path)
    if n_ep and int(ends[-1]) != n_steps:
        raise StoreCorruptError(f"{path}: meta/episode_ends ends at {ends[-1]} but {n_steps} steps are committed")
    data = _member(root, "data", zarr.Group, path)
    arrays = {}
    for key, spec in record["keys"].items():
        try:
            arr = data[key]
        except KeyError:
            raise StoreCorruptError(f"{path}: committed key {key!r} has no array data/{key}") from None
        if not isinstance(arr, zarr.Array):
            raise StoreCorruptError(f"{path}: data/{key} is a group, expected an array")
        want = tuple(spec["shape"])
        if arr.ndim != 1 + len(want) or tuple(arr.shape[1:]) != want:
            raise StoreCorruptError(
                f"{path}: data/{key} has shape {tuple(arr.shape)} (per step {tuple(arr.shape[1:])}) but the commit "
                f"record says per-step shape {want}"
            )
        if np.dtype(arr.dtype) != np.dtype(spec["dtype"]):
            have, want_dtype = np.dtype(arr.dtype), np.dtype(spec["dtype"])
            raise StoreCorruptError(f"{path}: data/{key} has dtype {have} but the commit record says {want_dtype}")
        if arr.shape[0] < n_steps:
            raise StoreCorruptError(f"{path}: data/{key} holds {arr.shape[0]} steps but {n_steps} are committed")
        arrays[key] = arr
    return meta, ends, arrays


def _member(group: zarr.Group, name: str, kind: type, path: Path, prefix: str = ""):
    try:
        node = group[name]
    except KeyError:
        raise StoreCorruptError(f"{path}: no {prefix}{name} (a missing or deleted part of the store)") from None
    except Exception as err:  # unreadable zarr.json
        raise StoreCorruptError(f"{path}: cannot read {prefix}{name} ({type(err).__name__}: {err})") from err
    if not isinstance(node, kind):
        want = "an array" if kind is zarr.Array else "a group"
        raise StoreCorruptError(f"{path}: {prefix}{name} is not {want}")
    return node


def parse_episode_attrs(raw: list, path: Path, first: int = 0) -> list[dict]:
    """The JSON objects of ``meta/episode_attrs`` entries ``raw`` (entry 0 is episode ``first``); an entry that is
    not a JSON object raises :class:`StoreCorruptError` naming the episode."""
    out = []
    for j, text in enumerate(raw):
        try:
            value = json.loads(text) if text else {}
        except (TypeError, ValueError) as err:
            raise StoreCorruptError(
                f"{path}: meta/episode_attrs[{first + j}] is not valid JSON ({err}): {str(text)[:80]!r}"
            ) from None
        if not isinstance(value, dict):
            raise StoreCorruptError(
                f"{path}: meta/episode_attrs[{first + j}] is a JSON {type(value).__name__}, expected an object"
            )
        out.append(value)
    return out


def truncate_to_committed(
    root: zarr.Group, record: dict, arrays: Mapping[str, zarr.Array], meta: Mapping[str, zarr.Array], path: Path
) -> None:
    """Resize ``arrays`` and ``meta`` to the committed steps and episodes, delete the ``data`` folders of
    uncommitted keys and the temporary files under ``path``. Only the holder of the writer lock may call it: it
    deletes what a live writer would be writing."""
    n_ep, n_steps = int(record["n_episodes"]), int(record["n_steps"])
    for arr in arrays.values():
        if arr.shape[0] != n_steps:
            arr.resize((n_steps, *arr.shape[1:]))
    # data/<key> folders of uncommitted keys, complete arrays or not (a first append killed mid-way)
    data_dir = path / "data"
    for child in list(data_dir.iterdir()) if data_dir.is_dir() else []:
        if child.is_dir() and child.name not in record["keys"]:
            shutil.rmtree(child)
    for arr in meta.values():
        if arr.shape[0] != n_ep:
            arr.resize((n_ep,))
    remove_temporaries(path)
