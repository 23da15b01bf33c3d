"""EpisodeStore: episodes of time-indexed arrays in a zarr v3 directory, appended atomically.

The layout on disk and the atomic file writes live in :mod:`stlflow.datasets.store_io`, the commit record in
:mod:`stlflow.datasets.store_record`, the writer lock in :mod:`stlflow.datasets.store_lock` and the writing methods
in :mod:`stlflow.datasets.store_write`.
Readers trust only the commit record (``stlflow.json``): ``data/*``, ``meta/episode_ends`` and
``meta/episode_attrs`` may be longer than the committed state (a writer killed mid-append); everything past
the committed length is ignored, and the next writer (``open(path, "a")``) truncates it.

Atomic append. ``add_episode`` validates everything first (nothing is written for bad input), then
writes the new steps past the committed end, then commits with one ``os.replace`` of ``stlflow.json``.
Every file (chunks and zarr metadata) is written to a temporary file and renamed over the old one, so a
chunk that holds committed steps is always either its old or its new version, and both hold the same
committed prefix. A process killed with SIGKILL at any point therefore leaves a store that opens with
every previously committed episode bit-identical. This protects against process death; power loss
also needs the data on disk before the commit, which ``durable=True`` buys with an ``fsync`` per file.

One writer at a time, enforced: ``create`` and ``open(path, "a")`` take an exclusive lock on
``<store>/.writer.lock`` (``fcntl.flock``), held until :meth:`EpisodeStore.close` (or the end of a ``with``
block, or garbage collection of the store object) and dropped by the kernel when the process dies, so a
SIGKILLed writer leaves no stale lock. Opening for writing while another process holds the lock raises
:class:`StoreLockedError` at once, naming the holder's pid; ``open(path, "a", timeout=SECONDS)`` waits for it
instead. The repair of an uncommitted tail runs only under the lock. Readers (mode ``"r"``) take no lock,
never repair and never block the writer: they see the episodes committed when they opened the store. Writers
of one store within one process share the lock, and their writes are serialised. On platforms without
``fcntl`` (Windows) there is no lock: nothing stops two writers there. Linux is what is tested.

Files that contradict each other (a commit record that does not parse, ``meta/episode_ends`` that is not
an increasing integer array ending at the committed steps, arrays shorter than the commit or of another
shape or dtype than it records) raise :class:`StoreCorruptError` naming the store and the problem; such a
store is never repaired or truncated.

Diffusion Policy's zarr v2 stores (``data/<key>``, ``meta/episode_ends``, optionally ``.zarr.zip``)
open read-only: ``dt`` is ``None`` and every episode's attributes are empty.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stlflow.datasets.store_check import committed_view, parse_episode_attrs, truncate_to_committed
from stlflow.datasets.store_io import (
    CHUNK_BYTES,
    COMMIT_FILE,
    AtomicLocalStore,
    EpisodeStoreError,
    StoreCorruptError,
    check_key_name,
    check_numeric_dtype,
    init_layout,
    replace_dir,
    temporary_sibling,
    to_jsonable,
)
from stlflow.datasets.store_lock import LOCK_FILE, StoreLockedError, WriterLock, acquire_writer_lock
from stlflow.datasets.store_merge import check_mergeable, copy_into_new_store
from stlflow.datasets.store_record import new_record, open_foreign, read_commit_record
from stlflow.datasets.store_write import EpisodeStoreWriting

__all__ = [
    "CHUNK_BYTES",
    "COMMIT_FILE",
    "LOCK_FILE",
    "EpisodeStore",
    "EpisodeStoreError",
    "StoreCorruptError",
    "StoreLockedError",
]


class EpisodeStore(EpisodeStoreWriting):
    """Episodes of time-indexed arrays (``obs``, ``action``, signals, ...) with per-episode attributes.

    Create with :meth:`create`, open with :meth:`open`. Arrays are ``(T, *shape)`` per episode, time on
    axis 0; ``dt`` is the sampling period in seconds (``None`` when unknown, e.g. imported data). The writing
    methods (:meth:`add_episode`, :meth:`set_attrs`, ...) are in
    :class:`~stlflow.datasets.store_write.EpisodeStoreWriting`.
    """

    def __init__(
        self,
        path: Path,
        root: zarr.Group,
        record: dict,
        mode: str,
        source_format: str,
        lock: WriterLock | None = None,
    ):
        # Use EpisodeStore.create / EpisodeStore.open.
        self._path = path
        self._root = root
        self._record = record
        self._mode = mode
        self._source_format = source_format  # "stlflow" or "diffusion_policy"
        self._lock = lock  # the writer lock (mode "a" only)
        self._closed = False
        self._arrays: dict[str, zarr.Array] = {}
        self._episode_ends = np.zeros(0, dtype=np.int64)
        self._attrs_cache: list[dict] | None = None
        self._load_committed()
        self._generation = lock.generation if lock is not None else 0

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        dt: float | None = 0.1,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        *,
        schema: Mapping[str, tuple[Sequence[int], Any]] | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        durable: bool = False,
        timeout: float | None = 0.0,
    ) -> EpisodeStore:
        """Create an empty store at ``path`` and open it in mode ``"a"`` (holding its writer lock).

        Args:
            path: directory to create (conventionally ``*.zarr``).
            dt: seconds per step (``None`` when unknown).
            attrs: JSON-able store-level attributes (task, source, ...).
            overwrite: replace an existing EpisodeStore at ``path``; a directory that is not a store is
                never deleted, nor a store another process has open for writing (:class:`StoreLockedError`).
            schema: optional ``{key: (per_step_shape, dtype)}``; otherwise the first episode fixes it.
            chunk_bytes: target uncompressed bytes per chunk along time.
            durable: fsync every written file (survives power loss, slower).
            timeout: seconds to wait for the writer lock of a store being overwritten (``None``: no limit).
        """
        path = Path(path)
        if dt is not None and (not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0):
            raise EpisodeStoreError(f"dt must be a positive number of seconds or None, got {dt!r}")
        store_attrs = to_jsonable(dict(attrs or {}), "store attrs")
        keys: dict[str, dict] = {}
        for key, (shape, dtype) in (schema or {}).items():
            check_key_name(key)
            dtype = np.dtype(dtype)
            check_numeric_dtype(key, dtype)
            keys[key] = {"shape": [int(s) for s in shape], "dtype": dtype.str, "chunk_steps": 0}
        old_lock = None
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists (pass overwrite=True to replace an EpisodeStore)")
            if not (path / COMMIT_FILE).is_file():
                raise EpisodeStoreError(f"refusing to overwrite {path}: it is not an EpisodeStore (no {COMMIT_FILE})")
            old_lock = acquire_writer_lock(path, timeout)  # nobody else is writing there
        # Build in a sibling temporary directory, lock it, and rename it: a killed create leaves no half store, and
        # the store is locked from the moment it appears at ``path``.
        lock = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_sibling(path)
            try:
                init_layout(tmp, new_record(dt, store_attrs, keys, chunk_bytes, durable))
                lock = acquire_writer_lock(tmp)
                replace_dir(tmp, path)
            finally:
                if tmp.exists():
                    if lock is not None:
                        lock.release()
                        lock = None
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if old_lock is not None:
                old_lock.release()
        return cls._open_native(path, "a", lock)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, timeout: float | None = 0.0) -> EpisodeStore:
        """Open an EpisodeStore (``mode`` ``"r"`` or ``"a"``) or a Diffusion Policy zarr store (``"r"`` only).

        Mode ``"a"`` takes the store's writer lock: if another process holds it, :class:`StoreLockedError`
        (naming the holder's pid) is raised at once, or after waiting up to ``timeout`` seconds (``None``: no
        limit). Under the lock, any uncommitted tail left by a killed writer is removed. Release the lock with
        :meth:`close` or a ``with`` block. Mode ``"r"`` takes no lock and changes nothing on disk.

        Raises :class:`StoreCorruptError` (naming the store and the problem) when the files contradict each
        other, e.g. a commit record that does not parse or ``meta/episode_ends`` that disagrees with it.
        """
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not path.exists():
            raise FileNotFoundError(f"no EpisodeStore at {path}: the path does not exist")
        if path.is_dir() and (path / COMMIT_FILE).is_file():
            lock = acquire_writer_lock(path, timeout) if mode == "a" else None
            return cls._open_native(path, mode, lock)
        if path.is_dir() and (path / "meta" / "episode_attrs").is_dir():
            raise StoreCorruptError(
                f"{path}: the commit record {COMMIT_FILE} is missing (meta/episode_attrs marks an stlflow "
                "EpisodeStore; without its commit record nothing in it is known to be committed)"
            )
        # Diffusion Policy layout (zarr v2 or v3, directory or .zip), read-only.
        if mode != "r":
            raise EpisodeStoreError(
                f"{path} is not an stlflow EpisodeStore (no {COMMIT_FILE}); foreign stores open read-only: "
                f"convert it with `stlflow data import dp {path} OUT`"
            )
        root, record = open_foreign(path)
        return cls(path, root, record, "r", "diffusion_policy")

    @classmethod
    def _open_native(cls, path: Path, mode: str, lock: WriterLock | None) -> EpisodeStore:
        """Open the stlflow store at ``path``; in mode ``"a"`` ``lock`` is its writer lock, taken by the caller
        (released here if opening fails). The commit record is read after the lock is taken: a writer that waited
        for the lock sees what the previous one committed."""
        try:
            # a writer of this store in another thread of this process may be appending: wait for its commit
            with lock.mutex if lock is not None else contextlib.nullcontext():
                record = read_commit_record(path)
                zstore = AtomicLocalStore(path, read_only=(mode == "r"))
                zstore.durable = bool(record.get("durable", False))
                try:
                    root = zarr.open_group(store=zstore, mode="r" if mode == "r" else "r+", zarr_format=3)
                except Exception as err:
                    raise StoreCorruptError(f"{path}: cannot open the zarr group: {err}") from err
                store = cls(path, root, record, mode, "stlflow", lock)
                if mode == "a":
                    store._repair()
            return store
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        """Release the writer lock (mode ``"a"``; readers hold nothing); idempotent. The object can still read the
        episodes it knew, but no longer write."""
        self._closed = True
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_committed(self) -> None:
        self._meta, self._episode_ends, self._arrays = committed_view(
            self._root, self._record, self._path, with_attrs=self._source_format == "stlflow"
        )
        self._attrs_cache = None

    def _repair(self) -> None:
        """Drop everything past the committed state (left by a writer that died mid-append). Only under the lock."""
        truncate_to_committed(self._root, self._record, self._arrays, self._meta, self._path)

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self._path

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def source_format(self) -> str:
        """``"stlflow"`` for native stores, ``"diffusion_policy"`` for foreign read-only ones."""
        return self._source_format

    @property
    def n_episodes(self) -> int:
        return int(self._record["n_episodes"])

    @property
    def n_steps(self) -> int:
        return int(self._record["n_steps"])

    @property
    def keys(self) -> list[str]:
        return list(self._record["keys"])

    @property
    def dt(self) -> float | None:
        """Seconds per step, or ``None`` when unknown."""
        return self._record["dt"]

    @property
    def attrs(self) -> dict:
        """Store-level attributes (a copy; change them with :meth:`set_attrs`)."""
        return json.loads(json.dumps(self._record["attrs"]))

    @property
    def schema_version(self) -> int:
        return int(self._record["schema_version"])

    @property
    def episode_ends(self) -> np.ndarray:
        """``(n_episodes,)`` int64: exclusive end step of each episode (Diffusion Policy's ``episode_ends``)."""
        return self._episode_ends.copy()

    @property
    def episode_lengths(self) -> np.ndarray:
        """``(n_episodes,)`` int64 number of steps of each episode."""
        return np.diff(np.concatenate([[0], self._episode_ends])).astype(np.int64)

    def key_shape(self, key: str) -> tuple[int, ...]:
        """Per-step shape of ``key`` (the array is ``(T, *key_shape)``)."""
        return tuple(self._spec(key)["shape"])

    def key_dtype(self, key: str) -> np.dtype:
        return np.dtype(self._spec(key)["dtype"])

    def _spec(self, key: str) -> dict:
        try:
            return self._record["keys"][key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the store at {self._path}; keys: {self.keys}") from None

    def __len__(self) -> int:
        return self.n_episodes

    def __repr__(self) -> str:
        return (
            f"EpisodeStore({str(self._path)!r}, mode={self._mode!r}, episodes={self.n_episodes}, "
            f"steps={self.n_steps}, keys={self.keys}, dt={self.dt})"
        )

    def __reduce__(self):
        # Pickles (e.g. into DataLoader workers) reopen the store read-only instead of sharing handles.
        return (EpisodeStore.open, (str(self._path), "r"))

    # ------------------------------------------------------------------ reading
    def _episode_range(self, i: int) -> tuple[int, int]:
        n = self.n_episodes
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"episode index must be an int, got {type(i).__name__}")
        if i < -n or i >= n:
            raise IndexError(f"episode {i} out of range: the store at {self._path} has {n} episodes")
        i = int(i) % n
        start = int(self._episode_ends[i - 1]) if i > 0 else 0
        return start, int(self._episode_ends[i])

    def episode(self, i: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays of episode ``i``: ``{key: (T_i, *shape)}``."""
        start, end = self._episode_range(i)
        return {k: np.asarray(self._arrays[k][start:end]) for k in (self.keys if keys is None else keys)}

    def get(self, key: str) -> np.ndarray:
        """The whole committed ``(n_steps, *shape)`` array of ``key``, episodes concatenated."""
        self._spec(key)
        return np.asarray(self._arrays[key][: self.n_steps])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        yield from self.iter_episodes()

    def iter_episodes(
        self, indices: Iterable[int] | None = None, keys: Iterable[str] | None = None, block_steps: int = 1 << 18
    ) -> Iterator[dict[str, np.ndarray]]:
        """Episodes ``indices`` (default: all, in order), reading runs of consecutive episodes of up to
        ``block_steps`` steps with one read per key instead of one per episode."""
        keys = self.keys if keys is None else list(keys)
        order = list(range(self.n_episodes)) if indices is None else [int(i) for i in indices]
        run: list[tuple[int, int]] = []  # (start, end) of consecutive episodes

        def flush() -> Iterator[dict[str, np.ndarray]]:
            lo, hi = run[0][0], run[-1][1]
            block = {k: np.asarray(self._arrays[k][lo:hi]) for k in keys}
            for a, b in run:
                yield {k: block[k][a - lo : b - lo] for k in keys}

        for i in order:
            start, end = self._episode_range(i)
            if run and (start != run[-1][1] or end - run[0][0] > block_steps):
                yield from flush()
                run = []
            run.append((start, end))
        if run:
            yield from flush()

    def _all_episode_attrs(self) -> list[dict]:
        if self._attrs_cache is None:
            if self._source_format != "stlflow" or self.n_episodes == 0:
                self._attrs_cache = [{} for _ in range(self.n_episodes)]
            else:
                raw = self._meta["episode_attrs"][: self.n_episodes]
                self._attrs_cache = parse_episode_attrs(np.asarray(raw).tolist(), self._path)
        return self._attrs_cache

    def episode_attrs(self, i: int) -> dict:
        """The JSON attributes of episode ``i`` (a copy)."""
        self._episode_range(i)
        return json.loads(json.dumps(self._all_episode_attrs()[int(i)]))

    def all_episode_attrs(self) -> list[dict]:
        """Attributes of every episode, in order (copies)."""
        return json.loads(json.dumps(self._all_episode_attrs()))

    # ------------------------------------------------------------------ derived stores
    def filter(
        self,
        out_path: str | os.PathLike,
        episodes: Iterable[int] | Callable[[dict], bool],
        overwrite: bool = False,
    ) -> EpisodeStore:
        """Copy a subset of episodes (indices, or a predicate on each episode's attrs) into a new store."""
        if callable(episodes):
            indices = [i for i, a in enumerate(self.all_episode_attrs()) if episodes(a)]
        else:
            indices = [int(i) for i in episodes]
            for i in indices:
                self._episode_range(i)
        attrs = self.attrs
        attrs.setdefault("filtered_from", str(self._path))
        return copy_into_new_store(EpisodeStore, out_path, [(self, indices)], attrs, overwrite)

    @classmethod
    def merge(
        cls, stores: Sequence[EpisodeStore | str | os.PathLike], out_path: str | os.PathLike, overwrite: bool = False
    ) -> EpisodeStore:
        """Concatenate the episodes of ``stores`` (same keys, shapes, dtypes and dt) into a new store."""
        opened = [s if isinstance(s, EpisodeStore) else cls.open(s) for s in stores]
        check_mergeable(opened)
        attrs = opened[0].attrs
        attrs["merged_from"] = [str(s.path) for s in opened]
        return copy_into_new_store(cls, out_path, [(s, range(s.n_episodes)) for s in opened], attrs, overwrite)

    def nbytes_on_disk(self) -> int:
        """Total size in bytes of the files under the store's path."""
        if self._path.is_file():
            return self._path.stat().st_size
        total = 0
        for folder, _, files in os.walk(self._path):  # os.walk skips folders that vanish (a writer's repair)
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # a writer's temporary file, renamed meanwhile
                    total += os.stat(os.path.join(folder, name)).st_size
        return total
