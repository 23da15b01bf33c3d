"""The on-disk side of :class:`~stlflow.datasets.store.EpisodeStore`: layout, atomic file writes, arrays.

Layout (compatible with Diffusion Policy's ``ReplayBuffer`` once committed)::

    store.zarr/
      stlflow.json            commit record: the only source of truth (see below)
      zarr.json               zarr root group
      data/<key>              (T_total, *shape) arrays, episodes concatenated along time (axis 0)
      meta/episode_ends       (n_episodes,) int64, exclusive end index of each episode in ``data``
      meta/episode_attrs      (n_episodes,) UTF-8 strings, one JSON object per episode
      .writer.lock            the writer lock (:mod:`stlflow.datasets.store_lock`); holds the pid and host of the
                              process writing

``stlflow.json`` (:data:`COMMIT_FILE`) holds the schema version, ``dt`` (seconds per step), the store
attributes, each key's per-step shape and dtype, and the committed ``n_episodes`` and ``n_steps``; it is read and
checked by :mod:`stlflow.datasets.store_record` and written here (:func:`write_commit_record`).

Every file of a store (chunks, zarr metadata, the commit record) is written by one function,
``_atomic_write_bytes``: to a temporary sibling file, then renamed over the old one (optionally fsynced),
so a file is always either its old or its new content. Temporary files and folders end in ``_TMP_SUFFIX``;
:func:`remove_temporaries` deletes those a killed process left behind.

Defaults: chunks along time of about :data:`CHUNK_BYTES` (256 KiB) uncompressed per key (the per-step
dimensions are never split), compressed with Blosc/zstd level 3 with byte shuffle. Small chunks keep
an append cheap (the partial tail chunk is rewritten) and still read at hundreds of MB/s.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

SCHEMA_VERSION = 1
FORMAT_NAME = "stlflow.EpisodeStore"
COMMIT_FILE = "stlflow.json"
CHUNK_BYTES = 256 * 1024
"""Target uncompressed bytes per chunk of a data key (along time)."""
ATTRS_CHUNK = 1024
"""Episodes per chunk of ``meta/episode_ends`` and ``meta/episode_attrs``."""
_TMP_SUFFIX = ".stlflow-tmp"


class EpisodeStoreError(ValueError):
    """Bad input to, or a bad on-disk state of, an :class:`EpisodeStore`. The message names the key or path."""


class StoreCorruptError(EpisodeStoreError):
    """The files of a store contradict each other or the format (commit record, ``meta/episode_ends``, array
    shapes, ...); the message names the store and the inconsistency. Nothing is repaired or truncated."""


# ------------------------------------------------------------------------------------------------ files
def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: its entries, so that a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old or the new content.

    The one write of every file of a store (crash tests replace it to die at the n-th write).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden path next to ``path`` that :func:`remove_temporaries` recognises as temporary."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"


def remove_temporaries(root: Path) -> None:
    """Delete every temporary file or folder under ``root`` (left by a process killed mid-write)."""
    for tmp in root.rglob(f"*{_TMP_SUFFIX}"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the folder ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted after."""
    if not dst.exists():
        os.rename(src, dst)
        return
    trash = dst.parent / f".{dst.name}.replaced-{uuid.uuid4().hex}{_TMP_SUFFIX}"
    os.rename(dst, trash)
    os.rename(src, dst)
    shutil.rmtree(trash, ignore_errors=True)


class AtomicLocalStore(LocalStore):
    """A zarr ``LocalStore`` whose every write is write-to-temporary + rename (fsynced when ``durable``).

    Recent zarr releases already write this way; we do not rely on it, because a partially written
    chunk would corrupt committed steps that share the chunk with the appended ones.
    """

    durable: bool = False

    async def set(self, key: str, value: Any) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(_atomic_write_bytes, self.root / key, value.to_bytes(), self.durable)

    def set_sync(self, key: str, value: Any) -> None:
        self._check_writable()
        _atomic_write_bytes(self.root / key, value.to_bytes(), self.durable)


# ------------------------------------------------------------------------------------------------ commit record
def write_commit_record(folder: Path, record: dict, durable: bool | None = None) -> None:
    """Replace ``folder``'s commit record atomically (``durable`` defaults to the record's own flag)."""
    durable = bool(record.get("durable", False)) if durable is None else bool(durable)
    _atomic_write_bytes(folder / COMMIT_FILE, json.dumps(record, indent=1).encode(), durable)


def init_layout(folder: Path, record: dict) -> None:
    """Write an empty store into ``folder``: the zarr root group, the ``meta`` arrays, one empty ``data`` array per
    key of ``record`` (whose ``chunk_steps`` are filled in), then the commit record itself."""
    zstore = AtomicLocalStore(folder)
    zstore.durable = bool(record["durable"])
    root = zarr.open_group(store=zstore, mode="w", zarr_format=3)
    root.create_group("data")
    meta = root.create_group("meta")
    meta.create_array("episode_ends", shape=(0,), dtype="int64", chunks=(ATTRS_CHUNK,), fill_value=0)
    meta.create_array("episode_attrs", shape=(0,), dtype=str, chunks=(ATTRS_CHUNK,))
    for key, spec in record["keys"].items():
        spec["chunk_steps"] = create_data_array(root, key, spec, record["chunk_bytes"])
    write_commit_record(folder, record)


# ------------------------------------------------------------------------------------------------ arrays
def default_compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def create_data_array(root: zarr.Group, key: str, spec: dict, chunk_bytes: int) -> int:
    """Create the empty ``data/<key>`` array of ``spec`` (per-step ``shape``, ``dtype``); returns its steps per chunk.

    A stray array of that name (from a killed first append, never committed) is replaced.
    """
    shape = tuple(spec["shape"])
    dtype = np.dtype(spec["dtype"])
    step_bytes = max(1, dtype.itemsize * int(np.prod(shape, dtype=np.int64)))
    chunk_steps = int(max(1, chunk_bytes // step_bytes))
    name = f"data/{key}"
    if name in root:
        del root[name]
    root.create_array(
        name,
        shape=(0, *shape),
        dtype=dtype,
        chunks=(chunk_steps, *shape) if shape else (chunk_steps,),
        compressors=[default_compressor()],
        fill_value=0,
    )
    return chunk_steps


def grow_and_write(writes: list[tuple[zarr.Array, tuple[int, ...], int, np.ndarray]]) -> None:
    """For each ``(array, new_shape, start, values)``: resize, then write ``values`` at ``start`` along axis 0.

    The arrays are independent, so their writes run concurrently on zarr's event loop (one round trip
    instead of two per array); falls back to sequential calls if zarr's loop helper is unavailable.
    """
    try:
        from zarr.core.sync import sync
    except ImportError:  # pragma: no cover - zarr moved its private helper
        for arr, shape, start, values in writes:
            arr.resize(shape)
            arr[start : start + len(values)] = values
        return

    async def one(arr: zarr.Array, shape: tuple[int, ...], start: int, values: np.ndarray) -> None:
        await arr.async_array.resize(shape)
        await arr.async_array.setitem(slice(start, start + len(values)), values)

    async def all_writes() -> None:
        await asyncio.gather(*(one(*w) for w in writes))

    sync(all_writes())


# ------------------------------------------------------------------------------------------------ values
def to_jsonable(value: Any, where: str) -> Any:
    """Convert numpy scalars/arrays (recursively) to JSON types; raise naming ``where`` otherwise."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise EpisodeStoreError(f"{where}: attribute keys must be strings, got {k!r}")
            out[k] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes NaN/Infinity; Python's json reads them back
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise EpisodeStoreError(f"{where}: value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def check_key_name(key: Any) -> None:
    """Raise unless ``key`` is a usable array name (non-empty, no ``/``, no leading ``.``, no surrounding spaces)."""
    if not isinstance(key, str) or not key or "/" in key or key.startswith(".") or key != key.strip():
        raise EpisodeStoreError(
            f"bad key name {key!r}: keys are non-empty strings without '/', leading '.' or surrounding spaces"
        )


def check_numeric_dtype(key: str, dtype: np.dtype) -> None:
    """Raise unless ``dtype`` is bool, integer or floating point."""
    if dtype.kind not in "biuf":
        raise EpisodeStoreError(
            f"key {key!r}: dtype {dtype} is not supported (use bool, integer or floating point arrays)"
        )
