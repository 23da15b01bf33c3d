"""Stores made from other stores: the checks and the batched copy behind ``EpisodeStore.filter`` and ``.merge``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from stlflow.datasets.store_io import EpisodeStoreError

if TYPE_CHECKING:
    from stlflow.datasets.store import EpisodeStore

__all__ = ["check_mergeable", "copy_episodes", "copy_into_new_store", "store_schema"]

COPY_BATCH_STEPS = 1 << 18
"""Steps per commit while copying episodes."""


def store_schema(store: EpisodeStore) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (per-step shape, dtype string)}`` of ``store`` (the ``schema`` argument of ``EpisodeStore.create``)."""
    return {k: (store.key_shape(k), np.dtype(store.key_dtype(k)).str) for k in store.keys}


def check_mergeable(stores: Sequence[EpisodeStore]) -> None:
    """Raise unless there is at least one store and all have the first one's keys, shapes, dtypes and dt."""
    if not stores:
        raise EpisodeStoreError("merge needs at least one store")
    first = stores[0]
    for s in stores[1:]:
        if store_schema(s) != store_schema(first):
            raise EpisodeStoreError(
                f"cannot merge {s.path}: its keys {store_schema(s)} differ from {first.path}'s {store_schema(first)}"
            )
        if s.dt != first.dt:
            raise EpisodeStoreError(f"cannot merge {s.path}: dt {s.dt} differs from {first.path}'s dt {first.dt}")


def copy_into_new_store(
    store_class: type[EpisodeStore],
    out_path: str | os.PathLike,
    parts: Sequence[tuple[EpisodeStore, Iterable[int]]],
    attrs: dict,
    overwrite: bool = False,
) -> EpisodeStore:
    """A new store at ``out_path`` with the first part's dt and schema and ``attrs``, holding the episodes of each
    ``(store, indices)`` part in order."""
    first = parts[0][0]
    out = store_class.create(out_path, dt=first.dt, attrs=attrs, overwrite=overwrite, schema=store_schema(first))
    for src, indices in parts:
        copy_episodes(src, indices, out)
    return out


def copy_episodes(
    src: EpisodeStore, indices: Iterable[int], dst: EpisodeStore, batch_steps: int = COPY_BATCH_STEPS
) -> None:
    """Append ``src``'s episodes ``indices`` to ``dst`` in batches of about ``batch_steps`` steps."""
    batch, batch_attrs, steps = [], [], 0
    indices = list(indices)
    for i, ep in zip(indices, src.iter_episodes(indices)):
        batch.append(ep)
        batch_attrs.append(src.episode_attrs(i))
        steps += len(next(iter(ep.values())))
        if steps >= batch_steps:
            dst.add_episodes(batch, batch_attrs)
            batch, batch_attrs, steps = [], [], 0
    if batch:
        dst.add_episodes(batch, batch_attrs)
