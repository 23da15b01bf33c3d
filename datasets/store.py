"""EpisodeStore: episodes of time-indexed arrays in a zarr v3 directory, appended atomically.

Layout (compatible with Diffusion Policy's ``ReplayBuffer`` once committed)::

    store.zarr/
      stlflow.json            commit record: the only source of truth (see below)
      zarr.json               zarr root group
      data/<key>              (T_total, *shape) arrays, episodes concatenated along time (axis 0)
      meta/episode_ends       (n_episodes,) int64, exclusive end index of each episode in ``data``
      meta/episode_attrs      (n_episodes,) UTF-8 strings, one JSON object per episode

``stlflow.json`` holds the schema version, ``dt`` (seconds per step), the store attributes, each key's
per-step shape and dtype, and the committed ``n_episodes`` and ``n_steps``. Readers trust only it:
``data/*``, ``meta/episode_ends`` and ``meta/episode_attrs`` may be longer than the committed state
(a writer killed mid-append); everything past the committed length is ignored, and the next writer
(``open(path, "a")``) truncates it.

Atomic append. ``add_episode`` validates everything first (nothing is written for bad input), then
writes the new steps past the committed end, then commits with one ``os.replace`` of ``stlflow.json``.
Every file (chunks and zarr metadata) is written to a temporary file and renamed over the old one, so a
chunk that holds committed steps is always either its old or its new version, and both hold the same
committed prefix. A process killed with SIGKILL at any point therefore leaves a store that opens with
every previously committed episode bit-identical. This protects against process death; power loss
also needs the data on disk before the commit, which ``durable=True`` buys with an ``fsync`` per file.
One writer at a time; readers in other processes may open the store while it is being appended to.

Defaults: chunks along time of about ``CHUNK_BYTES`` (256 KiB) uncompressed per key (the per-step
dimensions are never split), compressed with Blosc/zstd level 3 with byte shuffle. Small chunks keep
an append cheap (the partial tail chunk is rewritten) and still read at hundreds of MB/s.

Diffusion Policy's zarr v2 stores (``data/<key>``, ``meta/episode_ends``, optionally ``.zarr.zip``)
open read-only: ``dt`` is ``None`` and every episode's attributes are empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def _default_compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
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
        _fsync_dir(path.parent)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the folder ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted after."""
    if not dst.exists():
        os.rename(src, dst)
        return
    trash = dst.parent / f".{dst.name}.replaced-{uuid.uuid4().hex}{_TMP_SUFFIX}"
    os.rename(dst, trash)
    os.rename(src, dst)
    shutil.rmtree(trash, ignore_errors=True)


class _AtomicLocalStore(LocalStore):
    """A zarr ``LocalStore`` whose every write is write-to-temporary + rename (optionally fsynced).

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


def _grow_and_write(writes: list[tuple[zarr.Array, tuple[int, ...], int, np.ndarray]]) -> None:
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


def _to_jsonable(value: Any, where: str) -> Any:
    """Convert numpy scalars/arrays (recursively) to JSON types; raise naming ``where`` otherwise."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise EpisodeStoreError(f"{where}: attribute keys must be strings, got {k!r}")
            out[k] = _to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _to_jsonable(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes NaN/Infinity; Python's json reads them back
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise EpisodeStoreError(f"{where}: value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def _check_key_name(key: Any) -> None:
    if not isinstance(key, str) or not key or "/" in key or key.startswith(".") or key != key.strip():
        raise EpisodeStoreError(
            f"bad key name {key!r}: keys are non-empty strings without '/', leading '.' or surrounding spaces"
        )


def _check_numeric_dtype(key: str, dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise EpisodeStoreError(
            f"key {key!r}: dtype {dtype} is not supported (use bool, integer or floating point arrays)"
        )


class EpisodeStore:
    """Episodes of time-indexed arrays (``obs``, ``action``, signals, ...) with per-episode attributes.

    Create with :meth:`create`, open with :meth:`open`. Arrays are ``(T, *shape)`` per episode, time on
    axis 0; ``dt`` is the sampling period in seconds (``None`` when unknown, e.g. imported data).
    """

    def __init__(self, path: Path, root: zarr.Group, record: dict, mode: str, source_format: str):
        # Use EpisodeStore.create / EpisodeStore.open.
        self._path = path
        self._root = root
        self._record = record
        self._mode = mode
        self._source_format = source_format  # "stlflow" or "diffusion_policy"
        self._arrays: dict[str, zarr.Array] = {}
        self._episode_ends = np.zeros(0, dtype=np.int64)
        self._attrs_cache: list[dict] | None = None
        self._load_committed()

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
    ) -> EpisodeStore:
        """Create an empty store at ``path`` and open it in mode ``"a"``.

        Args:
            path: directory to create (conventionally ``*.zarr``).
            dt: seconds per step (``None`` when unknown).
            attrs: JSON-able store-level attributes (task, source, ...).
            overwrite: replace an existing EpisodeStore at ``path``; a directory that is not a store is
                never deleted.
            schema: optional ``{key: (per_step_shape, dtype)}``; otherwise the first episode fixes it.
            chunk_bytes: target uncompressed bytes per chunk along time.
            durable: fsync every written file (survives power loss, slower).
        """
        path = Path(path)
        if dt is not None and (not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0):
            raise EpisodeStoreError(f"dt must be a positive number of seconds or None, got {dt!r}")
        store_attrs = _to_jsonable(dict(attrs or {}), "store attrs")
        keys: dict[str, dict] = {}
        for key, (shape, dtype) in (schema or {}).items():
            _check_key_name(key)
            dtype = np.dtype(dtype)
            _check_numeric_dtype(key, dtype)
            keys[key] = {"shape": [int(s) for s in shape], "dtype": dtype.str, "chunk_steps": 0}
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists (pass overwrite=True to replace an EpisodeStore)")
            if not (path / COMMIT_FILE).is_file():
                raise EpisodeStoreError(f"refusing to overwrite {path}: it is not an EpisodeStore (no {COMMIT_FILE})")
        # Build in a sibling temporary directory and rename: a killed create leaves no half store.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            zstore = _AtomicLocalStore(tmp)
            zstore.durable = bool(durable)
            root = zarr.open_group(store=zstore, mode="w", zarr_format=3)
            root.create_group("data")
            meta = root.create_group("meta")
            meta.create_array("episode_ends", shape=(0,), dtype="int64", chunks=(ATTRS_CHUNK,), fill_value=0)
            meta.create_array("episode_attrs", shape=(0,), dtype=str, chunks=(ATTRS_CHUNK,))
            record = {
                "format": FORMAT_NAME,
                "schema_version": SCHEMA_VERSION,
                "dt": None if dt is None else float(dt),
                "attrs": store_attrs,
                "chunk_bytes": int(chunk_bytes),
                "durable": bool(durable),
                "keys": keys,
                "n_episodes": 0,
                "n_steps": 0,
            }
            for key, spec in keys.items():
                spec["chunk_steps"] = cls._create_data_array(root, key, spec, chunk_bytes)
            _atomic_write_bytes(tmp / COMMIT_FILE, json.dumps(record, indent=1).encode(), durable)
            _replace_dir(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path, mode="a")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> EpisodeStore:
        """Open an EpisodeStore (``mode`` ``"r"`` or ``"a"``) or a Diffusion Policy zarr store (``"r"`` only).

        In mode ``"a"`` any uncommitted tail left by a killed writer is removed first.
        """
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not path.exists():
            raise FileNotFoundError(f"no EpisodeStore at {path}: the path does not exist")
        commit = path / COMMIT_FILE
        if path.is_dir() and commit.is_file():
            try:
                record = json.loads(commit.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise EpisodeStoreError(f"{commit} is not valid JSON: {err}") from err
            if record.get("format") != FORMAT_NAME:
                raise EpisodeStoreError(f"{commit}: format is {record.get('format')!r}, expected {FORMAT_NAME!r}")
            if record.get("schema_version", 0) > SCHEMA_VERSION:
                raise EpisodeStoreError(
                    f"{path}: schema version {record['schema_version']} is newer than this stlflow supports "
                    f"({SCHEMA_VERSION}); upgrade stlflow"
                )
            zstore = _AtomicLocalStore(path, read_only=(mode == "r"))
            zstore.durable = bool(record.get("durable", False))
            try:
                root = zarr.open_group(store=zstore, mode="r" if mode == "r" else "r+", zarr_format=3)
            except Exception as err:
                raise EpisodeStoreError(f"{path}: cannot open the zarr group: {err}") from err
            store = cls(path, root, record, mode, "stlflow")
            if mode == "a":
                store._repair()
            return store
        # Diffusion Policy layout (zarr v2 or v3, directory or .zip), read-only.
        if mode != "r":
            raise EpisodeStoreError(
                f"{path} is not an stlflow EpisodeStore (no {COMMIT_FILE}); foreign stores open read-only: "
                f"convert it with `stlflow data import dp {path} OUT`"
            )
        try:
            if path.is_file() and path.suffix == ".zip":
                zstore = zarr.storage.ZipStore(path, mode="r")
            else:
                zstore = LocalStore(path, read_only=True)
            root = zarr.open_group(store=zstore, mode="r")
            data, meta = root["data"], root["meta"]
            ends = np.asarray(meta["episode_ends"][:], dtype=np.int64)
        except Exception as err:
            raise EpisodeStoreError(
                f"{path} is not an EpisodeStore: no {COMMIT_FILE}, and not a Diffusion Policy zarr store "
                f"(data/<key> arrays and meta/episode_ends) either ({type(err).__name__}: {err})"
            ) from err
        keys = {}
        for key, arr in data.arrays():
            keys[key] = {"shape": list(arr.shape[1:]), "dtype": np.dtype(arr.dtype).str, "chunk_steps": arr.chunks[0]}
        record = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "dt": None,
            "attrs": _to_jsonable(dict(root.attrs), "store attrs"),
            "keys": dict(sorted(keys.items())),
            "n_episodes": int(len(ends)),
            "n_steps": int(ends[-1]) if len(ends) else 0,
        }
        return cls(path, root, record, "r", "diffusion_policy")

    @staticmethod
    def _create_data_array(root: zarr.Group, key: str, spec: dict, chunk_bytes: int) -> int:
        shape = tuple(spec["shape"])
        dtype = np.dtype(spec["dtype"])
        step_bytes = max(1, dtype.itemsize * int(np.prod(shape, dtype=np.int64)))
        chunk_steps = int(max(1, chunk_bytes // step_bytes))
        name = f"data/{key}"
        if name in root:  # stray array from a killed first append: never committed
            del root[name]
        root.create_array(
            name,
            shape=(0, *shape),
            dtype=dtype,
            chunks=(chunk_steps, *shape) if shape else (chunk_steps,),
            compressors=[_default_compressor()],
            fill_value=0,
        )
        return chunk_steps

    def _load_committed(self) -> None:
        n_ep, n_steps = int(self._record["n_episodes"]), int(self._record["n_steps"])
        meta = self._root["meta"]
        ends_arr = meta["episode_ends"]
        self._meta = {"episode_ends": ends_arr}
        if self._source_format == "stlflow":
            self._meta["episode_attrs"] = meta["episode_attrs"]
        if ends_arr.shape[0] < n_ep:
            raise EpisodeStoreError(
                f"{self._path}: meta/episode_ends holds {ends_arr.shape[0]} entries but {n_ep} episodes are committed"
            )
        self._episode_ends = np.asarray(ends_arr[:n_ep], dtype=np.int64)
        if n_ep and int(self._episode_ends[-1]) != n_steps:
            raise EpisodeStoreError(
                f"{self._path}: meta/episode_ends ends at {self._episode_ends[-1]} but {n_steps} steps are committed"
            )
        if np.any(np.diff(np.concatenate([[0], self._episode_ends])) <= 0):
            raise EpisodeStoreError(f"{self._path}: meta/episode_ends is not strictly increasing")
        self._arrays = {}
        for key in self._record["keys"]:
            try:
                arr = self._root["data"][key]
            except KeyError as err:
                raise EpisodeStoreError(f"{self._path}: committed key {key!r} has no array data/{key}") from err
            if arr.shape[0] < n_steps:
                raise EpisodeStoreError(
                    f"{self._path}: data/{key} holds {arr.shape[0]} steps but {n_steps} are committed"
                )
            self._arrays[key] = arr
        self._attrs_cache = None

    def _repair(self) -> None:
        """Drop everything past the committed state (left by a writer that died mid-append)."""
        n_ep, n_steps = self.n_episodes, self.n_steps
        for arr in self._arrays.values():
            if arr.shape[0] != n_steps:
                arr.resize((n_steps, *arr.shape[1:]))
        data = self._root["data"]
        for name in list(data.array_keys()):
            if name not in self._record["keys"]:
                del data[name]
        for arr in self._meta.values():
            if arr.shape[0] != n_ep:
                arr.resize((n_ep,))
        for tmp in self._path.rglob(f"*{_TMP_SUFFIX}"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

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
                self._attrs_cache = [json.loads(s) if s else {} for s in np.asarray(raw).tolist()]
        return self._attrs_cache

    def episode_attrs(self, i: int) -> dict:
        """The JSON attributes of episode ``i`` (a copy)."""
        self._episode_range(i)
        return json.loads(json.dumps(self._all_episode_attrs()[int(i)]))

    def all_episode_attrs(self) -> list[dict]:
        """Attributes of every episode, in order (copies)."""
        return json.loads(json.dumps(self._all_episode_attrs()))

    # ------------------------------------------------------------------ writing
    def _check_writable(self) -> None:
        if self._mode != "a":
            raise EpisodeStoreError(f"{self._path} is open read-only; use EpisodeStore.open(path, mode='a')")

    def _validate_episode(self, episode: Mapping[str, Any], keys: dict[str, dict], where: str) -> dict:
        if not isinstance(episode, Mapping) or not episode:
            raise EpisodeStoreError(f"{where}: expected a non-empty dict of arrays, got {type(episode).__name__}")
        arrays: dict[str, np.ndarray] = {}
        for key, value in episode.items():
            _check_key_name(key)
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
            _check_numeric_dtype(key, arr.dtype)
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
        self._check_writable()
        episodes = list(episodes)
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
            arrays = self._validate_episode(ep, {**keys, **new_keys}, where)
            if not keys and not new_keys:
                new_keys = {
                    k: {"shape": list(a.shape[1:]), "dtype": a.dtype.str, "chunk_steps": 0} for k, a in arrays.items()
                }
                arrays = self._validate_episode(arrays, new_keys, where)
            checked.append(arrays)
        attrs_json = [
            json.dumps(_to_jsonable(dict(a or {}), f"episode {self.n_episodes + j} attrs"))
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
                spec["chunk_steps"] = self._create_data_array(
                    self._root, key, spec, record.get("chunk_bytes", CHUNK_BYTES)
                )
                arrays_by_key[key] = self._root["data"][key]
                record["keys"][key] = spec
            writes = [
                (arr, (n1, *arr.shape[1:]), n0, np.concatenate([a[key] for a in checked]))
                for key, arr in arrays_by_key.items()
            ]
            e1 = e0 + len(checked)
            writes.append((self._meta["episode_ends"], (e1,), e0, new_ends))
            writes.append((self._meta["episode_attrs"], (e1,), e0, np.array(attrs_json, dtype=object)))
            _grow_and_write(writes)
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
        _atomic_write_bytes(
            self._path / COMMIT_FILE, json.dumps(record, indent=1).encode(), record.get("durable", False)
        )

    def set_episode_attrs(self, i: int, attrs: Mapping[str, Any], replace: bool = False) -> None:
        """Merge ``attrs`` into episode ``i``'s attributes (or replace them when ``replace``); atomic."""
        self._check_writable()
        self._episode_range(i)
        i = int(i) % self.n_episodes
        new = {} if replace else self.episode_attrs(i)
        new.update(_to_jsonable(dict(attrs), f"episode {i} attrs"))
        text = json.dumps(new)
        self._meta["episode_attrs"][i] = text
        self._all_episode_attrs()[i] = json.loads(text)

    def set_attrs(self, attrs: Mapping[str, Any], replace: bool = False) -> None:
        """Merge ``attrs`` into the store-level attributes (or replace them); atomic."""
        self._check_writable()
        record = json.loads(json.dumps(self._record))
        if replace:
            record["attrs"] = {}
        record["attrs"].update(_to_jsonable(dict(attrs), "store attrs"))
        self._write_record(record)
        self._record = record

    # ------------------------------------------------------------------ derived stores
    def filter(
        self,
        out_path: str | os.PathLike,
        episodes: Iterable[int] | Callable[[dict], bool],
        overwrite: bool = False,
    ) -> EpisodeStore:
        """Copy a subset of episodes (indices, or a predicate on each episode's attrs) into a new store."""
        if callable(episodes):
            all_attrs = self._all_episode_attrs()
            indices = [i for i in range(self.n_episodes) if episodes(json.loads(json.dumps(all_attrs[i])))]
        else:
            indices = [int(i) for i in episodes]
            for i in indices:
                self._episode_range(i)
        attrs = self.attrs
        attrs.setdefault("filtered_from", str(self._path))
        out = EpisodeStore.create(out_path, dt=self.dt, attrs=attrs, overwrite=overwrite, schema=self._schema())
        _copy_episodes(self, indices, out)
        return out

    @classmethod
    def merge(
        cls, stores: Sequence[EpisodeStore | str | os.PathLike], out_path: str | os.PathLike, overwrite: bool = False
    ) -> EpisodeStore:
        """Concatenate the episodes of ``stores`` (same keys, shapes, dtypes and dt) into a new store."""
        opened = [s if isinstance(s, EpisodeStore) else cls.open(s) for s in stores]
        if not opened:
            raise EpisodeStoreError("merge needs at least one store")
        first = opened[0]
        for s in opened[1:]:
            if s._schema() != first._schema():
                raise EpisodeStoreError(
                    f"cannot merge {s.path}: its keys {s._schema()} differ from {first.path}'s {first._schema()}"
                )
            if s.dt != first.dt:
                raise EpisodeStoreError(f"cannot merge {s.path}: dt {s.dt} differs from {first.path}'s dt {first.dt}")
        attrs = first.attrs
        attrs["merged_from"] = [str(s.path) for s in opened]
        out = cls.create(out_path, dt=first.dt, attrs=attrs, overwrite=overwrite, schema=first._schema())
        for s in opened:
            _copy_episodes(s, range(s.n_episodes), out)
        return out

    def _schema(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (tuple(v["shape"]), np.dtype(v["dtype"]).str) for k, v in self._record["keys"].items()}

    def nbytes_on_disk(self) -> int:
        """Total size in bytes of the files under the store's path."""
        if self._path.is_file():
            return self._path.stat().st_size
        return sum(p.stat().st_size for p in self._path.rglob("*") if p.is_file())


def _copy_episodes(src: EpisodeStore, indices: Iterable[int], dst: EpisodeStore, batch_steps: int = 1 << 18) -> None:
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
