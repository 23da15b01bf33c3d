"""The writing side of :class:`~stlflow.datasets.store.EpisodeStore`: atomic appends and attribute updates.

:class:`EpisodeStoreWriting` is the base class of ``EpisodeStore`` that holds its writing methods; it works on the
state the store sets up (``_record``, ``_root``, ``_meta``, ``_arrays``, ``_episode_ends``, ``_lock``, ...) and is
not used on its own. How an append stays atomic is described in :mod:`stlflow.datasets.store`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from stlflow.datasets.store_check import validate_episode
from stlflow.datasets.store_io import (
    CHUNK_BYTES,
    COMMIT_FILE,
    EpisodeStoreError,
    create_data_array,
    grow_and_write,
    to_jsonable,
    write_commit_record,
)
from stlflow.datasets.store_record import read_commit_record

__all__ = ["EpisodeStoreWriting"]


class EpisodeStoreWriting:
    """The writing methods of :class:`~stlflow.datasets.store.EpisodeStore` (its base class)."""

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Serialise with the other writers of this store in this process, and start from what is committed on disk
        if one of them wrote since this object last did."""
        self._check_writable()
        lock = self._lock
        with lock.mutex:
            if lock.generation != self._generation:
                self._record = read_commit_record(self._path)
                self._load_committed()
            try:
                yield
            finally:
                self._generation = lock.bump()

    def _check_writable(self) -> None:
        if self._mode != "a":
            raise EpisodeStoreError(f"{self._path} is open read-only; use EpisodeStore.open(path, mode='a')")
        if self._closed or self._lock is None:
            raise EpisodeStoreError(f"{self._path}: this store object is closed; open the store again to write")
        if self._lock.lost_to_fork:
            raise EpisodeStoreError(
                f"{self._path} was opened for writing by a parent process (forked); open the store again here"
            )

    def add_episode(self, episode: Mapping[str, Any], attrs: Mapping[str, Any] | None = None) -> int:
        """Append one episode atomically and return its index.

        Args:
            episode: ``{key: (T, *shape)}`` arrays of equal length ``T >= 1``. After the first episode the
                keys, per-step shapes and dtypes are fixed; values are cast to the store's dtype when numpy's
                ``same_kind`` rule allows it (e.g. float64 -> float32), otherwise an error is raised.
            attrs: JSON-able episode attributes (source, seed, behaviour mode, STL parameters, ...).
        """
        return self.add_episodes([episode], [attrs])[0]

    def add_episodes(
        self, episodes: Sequence[Mapping[str, Any]], attrs: Sequence[Mapping[str, Any] | None] | None = None
    ) -> list[int]:
        """Append several episodes with one commit (all or none survive a crash); returns their indices."""
        with self._writing():
            return self._add_episodes(list(episodes), attrs)

    def _add_episodes(
        self, episodes: list[Mapping[str, Any]], attrs: Sequence[Mapping[str, Any] | None] | None
    ) -> list[int]:
        attrs_list = list(attrs) if attrs is not None else [None] * len(episodes)
        if len(attrs_list) != len(episodes):
            raise EpisodeStoreError(f"got {len(episodes)} episodes but {len(attrs_list)} attrs")
        if not episodes:
            return []
        # 1. validate everything before writing anything
        keys = dict(self._record["keys"])
        new_keys: dict[str, dict] = {}
        checked = []
        for j, ep in enumerate(episodes):
            where = f"episode {self.n_episodes + j}"
            arrays = validate_episode(ep, {**keys, **new_keys}, where)
            if not keys and not new_keys:
                new_keys = {
                    k: {"shape": list(a.shape[1:]), "dtype": a.dtype.str, "chunk_steps": 0} for k, a in arrays.items()
                }
                arrays = validate_episode(arrays, new_keys, where)
            checked.append(arrays)
        attrs_json = [
            json.dumps(to_jsonable(dict(a or {}), f"episode {self.n_episodes + j} attrs"))
            for j, a in enumerate(attrs_list)
        ]
        # 2. write past the committed end
        n0, e0 = self.n_steps, self.n_episodes
        lengths = [next(iter(a.values())).shape[0] for a in checked]
        n1 = n0 + sum(lengths)
        new_ends = n0 + np.cumsum(lengths, dtype=np.int64)
        record = json.loads(json.dumps(self._record))
        try:
            arrays_by_key = dict(self._arrays)
            for key, spec in new_keys.items():
                spec["chunk_steps"] = create_data_array(self._root, key, spec, record.get("chunk_bytes", CHUNK_BYTES))
                arrays_by_key[key] = self._root["data"][key]
                record["keys"][key] = spec
            writes = [
                (arr, (n1, *arr.shape[1:]), n0, np.concatenate([a[key] for a in checked]))
                for key, arr in arrays_by_key.items()
            ]
            e1 = e0 + len(checked)
            writes.append((self._meta["episode_ends"], (e1,), e0, new_ends))
            writes.append((self._meta["episode_attrs"], (e1,), e0, np.array(attrs_json, dtype=object)))
            grow_and_write(writes)
            # 3. commit
            record["n_episodes"] = e0 + len(checked)
            record["n_steps"] = int(n1)
            self._write_record(record)
        except BaseException:
            # e.g. disk full: go back to what is committed on disk and drop the uncommitted tail
            with contextlib.suppress(Exception):
                self._record = json.loads((self._path / COMMIT_FILE).read_text())
                self._load_committed()
                self._repair()
            raise
        self._record = record
        self._arrays = arrays_by_key
        self._episode_ends = np.concatenate([self._episode_ends, new_ends])
        if self._attrs_cache is not None:
            self._attrs_cache.extend(json.loads(s) for s in attrs_json)
        return list(range(e0, e0 + len(checked)))

    def _write_record(self, record: dict) -> None:
        write_commit_record(self._path, record)

    def set_episode_attrs(self, i: int, attrs: Mapping[str, Any], replace: bool = False) -> None:
        """Merge ``attrs`` into episode ``i``'s attributes (or replace them when ``replace``); atomic."""
        with self._writing():
            self._episode_range(i)
            i = int(i) % self.n_episodes
            new = {} if replace else self.episode_attrs(i)
            new.update(to_jsonable(dict(attrs), f"episode {i} attrs"))
            text = json.dumps(new)
            self._meta["episode_attrs"][i] = text
            self._all_episode_attrs()[i] = json.loads(text)

    def set_attrs(self, attrs: Mapping[str, Any], replace: bool = False) -> None:
        """Merge ``attrs`` into the store-level attributes (or replace them); atomic."""
        with self._writing():
            record = json.loads(json.dumps(self._record))
            if replace:
                record["attrs"] = {}
            record["attrs"].update(to_jsonable(dict(attrs), "store attrs"))
            self._write_record(record)
            self._record = record
