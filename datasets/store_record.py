"""The commit record of an :class:`~stlflow.datasets.store.EpisodeStore` (``stlflow.json``): a new one, reading and
checking one, and the record describing a Diffusion Policy zarr store (:func:`open_foreign`).

Diffusion Policy's zarr v2 stores (``data/<key>``, ``meta/episode_ends``, optionally ``.zarr.zip``) are read by
:func:`open_foreign`. The record is written by :func:`stlflow.datasets.store_io.write_commit_record`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from stlflow.datasets.store_io import (
    COMMIT_FILE,
    FORMAT_NAME,
    SCHEMA_VERSION,
    EpisodeStoreError,
    StoreCorruptError,
    to_jsonable,
)


def read_commit_record(path: Path) -> dict:
    """The commit record of the store at ``path``, checked for its format name, a supported schema version and
    the types of its fields (:class:`StoreCorruptError` naming the field otherwise)."""
    commit = path / COMMIT_FILE
    try:
        record = json.loads(commit.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreCorruptError(f"{commit} is not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise StoreCorruptError(f"{commit}: the commit record is a JSON {type(record).__name__}, expected an object")
    if record.get("format") != FORMAT_NAME:
        raise StoreCorruptError(f"{commit}: format is {record.get('format')!r}, expected {FORMAT_NAME!r}")
    version = record.get("schema_version", 0)
    if not _is_int(version) or version < 1:
        raise StoreCorruptError(f"{commit}: schema_version is {version!r}, expected a positive integer")
    if version > SCHEMA_VERSION:
        raise EpisodeStoreError(
            f"{path}: schema version {record['schema_version']} is newer than this stlflow supports "
            f"({SCHEMA_VERSION}); upgrade stlflow"
        )
    check_record_fields(record, str(commit))
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_record_fields(record: dict, where: str) -> None:
    """Raise :class:`StoreCorruptError` naming ``where`` and the field unless ``record``'s fields have their types:
    counts are integers >= 0 (no steps without episodes), ``dt`` positive or null, ``attrs`` an object, each key
    a per-step ``shape`` of integers >= 0 and a numeric ``dtype``."""
    for name in ("n_episodes", "n_steps"):
        value = record.get(name)
        if not _is_int(value) or value < 0:
            raise StoreCorruptError(f"{where}: {name} is {value!r}, expected an integer >= 0")
    if record["n_episodes"] > record["n_steps"]:
        raise StoreCorruptError(
            f"{where}: {record['n_episodes']} episodes but only {record['n_steps']} steps are committed "
            "(every episode has at least one step)"
        )
    if record["n_steps"] and not record["n_episodes"]:
        raise StoreCorruptError(f"{where}: {record['n_steps']} steps but no episode are committed")
    dt = record.get("dt")
    if dt is not None and (
        not isinstance(dt, (int, float)) or isinstance(dt, bool) or not math.isfinite(dt) or dt <= 0
    ):
        raise StoreCorruptError(f"{where}: dt is {dt!r}, expected a positive number of seconds or null")
    if not isinstance(record.get("attrs", {}), dict):
        raise StoreCorruptError(f"{where}: attrs is a {type(record['attrs']).__name__}, expected an object")
    keys = record.get("keys")
    if not isinstance(keys, dict):
        raise StoreCorruptError(f"{where}: keys is {keys!r}, expected an object {{key: {{shape, dtype}}}}")
    for key, spec in keys.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise StoreCorruptError(f"{where}: key {key!r} has shape {shape!r}, expected a list of integers >= 0")
        try:
            dtype = np.dtype(spec.get("dtype"))
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "biuf":
            raise StoreCorruptError(f"{where}: key {key!r} has dtype {spec.get('dtype')!r}, expected a numeric dtype")


def open_foreign(path: Path) -> tuple[zarr.Group, dict]:
    """A Diffusion Policy zarr store (v2 or v3, folder or ``.zip``), read-only: its root group and a commit
    record describing it (``dt`` unknown, attributes from the root group's).

    Raises :class:`EpisodeStoreError` if ``path`` is not such a store, :class:`StoreCorruptError` if it is one
    whose ``meta/episode_ends`` contradicts its arrays (float, negative or decreasing ends, ends past the data,
    ``data`` arrays of different lengths). Nothing is truncated or rounded.
    """
    try:
        if path.is_file() and path.suffix == ".zip":
            zstore = zarr.storage.ZipStore(path, mode="r")
        else:
            zstore = LocalStore(path, read_only=True)
        root = zarr.open_group(store=zstore, mode="r")
        data, meta = root["data"], root["meta"]
        ends_arr = meta["episode_ends"]
    except Exception as err:
        raise EpisodeStoreError(
            f"{path} is not an EpisodeStore: no {COMMIT_FILE}, and not a Diffusion Policy zarr store "
            f"(data/<key> arrays and meta/episode_ends) either ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(ends_arr, zarr.Array) or not isinstance(data, zarr.Group):
        raise StoreCorruptError(f"{path}: meta/episode_ends must be an array and data a group of arrays")
    ends = check_episode_ends(ends_arr, None, path)
    keys = {}
    rows = {}
    for key, arr in data.arrays():
        if arr.ndim == 0:
            raise StoreCorruptError(f"{path}: data/{key} is a scalar array; arrays need a leading time axis")
        if np.dtype(arr.dtype).kind not in "biuf":
            raise StoreCorruptError(f"{path}: data/{key} has non-numeric dtype {arr.dtype}")
        keys[key] = {"shape": list(arr.shape[1:]), "dtype": np.dtype(arr.dtype).str, "chunk_steps": arr.chunks[0]}
        rows[key] = int(arr.shape[0])
    if not keys:
        raise StoreCorruptError(f"{path}: a Diffusion Policy store without arrays under data/")
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"data/{k} {n}" for k, n in sorted(rows.items()))
        raise StoreCorruptError(f"{path}: the data arrays have different lengths (rows: {shown})")
    n_rows = next(iter(rows.values()))
    if len(ends) and int(ends[-1]) > n_rows:
        raise StoreCorruptError(
            f"{path}: meta/episode_ends ends at step {int(ends[-1])} but the data arrays hold {n_rows} rows"
        )
    record = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "dt": None,
        "attrs": to_jsonable(dict(root.attrs), "store attrs"),
        "keys": dict(sorted(keys.items())),
        "n_episodes": int(len(ends)),
        "n_steps": int(ends[-1]) if len(ends) else 0,
    }
    return root, record


def check_episode_ends(ends_arr: zarr.Array, n_episodes: int | None, path: Path) -> np.ndarray:
    """The first ``n_episodes`` (all when ``None``) entries of ``meta/episode_ends`` as int64, checked: a 1-D
    integer array (a float one is refused, never rounded) with that many entries, >= 1 and strictly increasing
    (every episode has a step). Raises :class:`StoreCorruptError` naming ``path`` and the offending entry."""
    name = "meta/episode_ends"
    if ends_arr.ndim != 1:
        raise StoreCorruptError(f"{path}: {name} has shape {tuple(ends_arr.shape)}, expected one dimension")
    dtype = np.dtype(ends_arr.dtype)
    if dtype.kind not in "iu":
        raise StoreCorruptError(f"{path}: {name} has dtype {dtype}, expected integers (refusing to round episode ends)")
    n = int(ends_arr.shape[0]) if n_episodes is None else int(n_episodes)
    if ends_arr.shape[0] < n:
        raise StoreCorruptError(f"{path}: {name} holds {ends_arr.shape[0]} entries but {n} episodes are committed")
    try:
        raw = np.asarray(ends_arr[:n])
    except Exception as err:  # corrupt chunk: numcodecs/zarr raise assorted types
        raise StoreCorruptError(f"{path}: cannot read {name} ({type(err).__name__}: {err})") from err
    if dtype.kind == "u" and len(raw) and int(raw.max()) > np.iinfo(np.int64).max:
        raise StoreCorruptError(f"{path}: {name} holds {int(raw.max())}, beyond int64")
    ends = raw.astype(np.int64)
    bad = np.flatnonzero(ends < 0)
    if len(bad):
        raise StoreCorruptError(f"{path}: {name} holds a negative end ({int(ends[bad[0]])} for episode {bad[0]})")
    lengths = np.diff(np.concatenate([[0], ends]))
    bad = np.flatnonzero(lengths <= 0)
    if len(bad):
        i = int(bad[0])
        before = f"episode {i - 1} ends at {int(ends[i - 1])}" if i else "the first episode starts at 0"
        raise StoreCorruptError(
            f"{path}: {name} is not strictly increasing: episode {i} ends at {int(ends[i])} and {before}"
        )
    return ends


def new_record(dt: float | None, attrs: dict, keys: dict[str, dict], chunk_bytes: int, durable: bool) -> dict:
    """The commit record of an empty store (``keys``: ``{key: {"shape", "dtype", "chunk_steps"}}``)."""
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "dt": None if dt is None else float(dt),
        "attrs": attrs,
        "chunk_bytes": int(chunk_bytes),
        "durable": bool(durable),
        "keys": keys,
        "n_episodes": 0,
        "n_steps": 0,
    }
