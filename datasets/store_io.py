"""The on-disk side of :class:`~stlflow.datasets.store.EpisodeStore`: layout, commit record, atomic file writes.

Layout (compatible with Diffusion Policy's ``ReplayBuffer`` once committed)::

    store.zarr/
      stlflow.json            commit record: the only source of truth (see below)
      zarr.json               zarr root group
      data/<key>              (T_total, *shape) arrays, episodes concatenated along time (axis 0)
      meta/episode_ends       (n_episodes,) int64, exclusive end index of each episode in ``data``
      meta/episode_attrs      (n_episodes,) UTF-8 strings, one JSON object per episode
      .writer.lock            the writer lock (see below); holds the pid and host of the process writing

``stlflow.json`` (:data:`COMMIT_FILE`) holds the schema version, ``dt`` (seconds per step), the store
attributes, each key's per-step shape and dtype, and the committed ``n_episodes`` and ``n_steps``.

Every file of a store (chunks, zarr metadata, the commit record) is written by one function,
``_atomic_write_bytes``: to a temporary sibling file, then renamed over the old one (optionally fsynced),
so a file is always either its old or its new content. Temporary files and folders end in ``_TMP_SUFFIX``;
:func:`remove_temporaries` deletes those a killed process left behind.

One writer at a time: :func:`acquire_writer_lock` takes an exclusive advisory lock (``fcntl.flock``) on
``<store>/.writer.lock`` for as long as a store is open for writing. The kernel drops the lock when the
holder's last file descriptor closes, so a process killed with SIGKILL never leaves a stale lock. Within one
process, writers of the same store share the lock (and a mutex that serialises their writes); a child made
by ``fork`` does not inherit it. Readers take no lock. On platforms without ``fcntl`` (Windows) no lock is
taken at all: nothing stops two writers there. The lock is advisory and local: on network file systems it
is only as good as their ``flock`` emulation.

Defaults: chunks along time of about :data:`CHUNK_BYTES` (256 KiB) uncompressed per key (the per-step
dimensions are never split), compressed with Blosc/zstd level 3 with byte shuffle. Small chunks keep
an append cheap (the partial tail chunk is rewritten) and still read at hundreds of MB/s.

Diffusion Policy's zarr v2 stores (``data/<key>``, ``meta/episode_ends``, optionally ``.zarr.zip``) are read
by :func:`open_foreign`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no writer lock (see the module docstring)
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
FORMAT_NAME = "stlflow.EpisodeStore"
COMMIT_FILE = "stlflow.json"
CHUNK_BYTES = 256 * 1024
"""Target uncompressed bytes per chunk of a data key (along time)."""
ATTRS_CHUNK = 1024
"""Episodes per chunk of ``meta/episode_ends`` and ``meta/episode_attrs``."""
_TMP_SUFFIX = ".stlflow-tmp"
LOCK_FILE = ".writer.lock"
"""The writer lock file inside a store (see :func:`acquire_writer_lock`)."""


class EpisodeStoreError(ValueError):
    """Bad input to, or a bad on-disk state of, an :class:`EpisodeStore`. The message names the key or path."""


class StoreCorruptError(EpisodeStoreError):
    """The files of a store contradict each other or the format (commit record, ``meta/episode_ends``, array
    shapes, ...); the message names the store and the inconsistency. Nothing is repaired or truncated."""


class StoreLockedError(EpisodeStoreError):
    """Another process holds the store's writer lock. ``path`` is the store, ``pid`` and ``host`` the holder's
    (``None`` when it has not written them yet)."""

    def __init__(self, message: str, path: Path, pid: int | None = None, host: str | None = None):
        super().__init__(message)
        self.path = path
        self.pid = pid
        self.host = host


# ------------------------------------------------------------------------------------------------ files
def _fsync_dir(path: Path) -> None:
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
        _fsync_dir(path.parent)


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


# ------------------------------------------------------------------------------------------------ writer lock
class _Held:
    """This process's hold on one lock file: shared by every writer of that store in the process."""

    def __init__(self, fd: int, key: tuple[int, int]):
        self.fd = fd
        self.key = key
        self.pid = os.getpid()
        self.refs = 1
        self.lost = False  # set in a child made by fork: the lock belongs to the parent
        self.mutex = threading.RLock()  # serialises the writes of this process's writers
        self.generation = 0  # bumped by every write: another writer object of this process wrote


_HELD: dict[tuple[int, int], _Held] = {}
_HELD_MUTEX = threading.RLock()  # re-entrant: garbage collection may release a lock (WriterLock.__del__) inside


def _forget_locks_in_child() -> None:
    # A forked child shares the parent's open file description: closing the child's copy leaves the parent's lock
    # in place (and lets the kernel drop it when the parent dies); the child's writers can no longer write.
    global _HELD_MUTEX
    _HELD_MUTEX = threading.RLock()
    for held in _HELD.values():
        held.lost = True
        held.mutex = threading.RLock()
        try:
            os.close(held.fd)
        except OSError:
            pass
        held.fd = -1
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


class WriterLock:
    """A handle on the writer lock of one store (see :func:`acquire_writer_lock`); :meth:`release` it once.

    Garbage collection of the handle releases it too. ``held`` is ``False`` after :meth:`release` and in a child
    process made by ``fork``; ``mutex`` serialises writes of the writers of this store in this process, and
    ``generation`` counts them (a writer that sees it change reloads the committed state).
    """

    def __init__(self, held: _Held | None, folder: Path):
        self._held = held
        self._released = False
        self.folder = folder
        self._mutex = held.mutex if held is not None else threading.RLock()

    @property
    def held(self) -> bool:
        if self._released:
            return False
        return self._held is None or not self._held.lost  # no fcntl: nothing to lose

    @property
    def lost_to_fork(self) -> bool:
        return not self._released and self._held is not None and self._held.lost

    @property
    def mutex(self) -> threading.RLock:
        return self._held.mutex if self._held is not None else self._mutex

    @property
    def generation(self) -> int:
        return self._held.generation if self._held is not None else 0

    def bump(self) -> int:
        if self._held is None:
            return 0
        self._held.generation += 1
        return self._held.generation

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        held, self._held = self._held, None
        if held is None or fcntl is None:
            return
        with _HELD_MUTEX:
            if held.lost:
                return
            held.refs -= 1
            if held.refs > 0:
                return
            if _HELD.get(held.key) is held:
                del _HELD[held.key]
            if held.pid == os.getpid():
                try:
                    os.ftruncate(held.fd, 0)  # no stale holder in the file
                    fcntl.flock(held.fd, fcntl.LOCK_UN)
                except OSError:
                    pass
            try:
                os.close(held.fd)
            except OSError:
                pass

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the kernel drops the lock anyway
            pass


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holder(folder: Path) -> dict:
    """What the lock file of the store at ``folder`` says about its holder (``pid``, ``host``, ``since``), or
    ``{}``. Only meaningful while the lock is held."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return {}
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _locked_error(folder: Path, holder: dict, timeout: float) -> StoreLockedError:
    pid, host = holder.get("pid"), holder.get("host")
    pid = pid if isinstance(pid, int) else None
    host = host if isinstance(host, str) else None
    who = f"pid {pid}" if pid is not None else "pid not yet recorded"
    if host:
        who += f" on host {host}"
    if isinstance(holder.get("since"), str):
        who += f", since {holder['since']}"
    if pid == os.getpid():
        who += ": this process, through a file descriptor inherited or opened outside EpisodeStore"
    wait = (
        f"still locked after waiting {timeout:g} s"
        if timeout > 0
        else "EpisodeStore.open(path, 'a', timeout=SECONDS) waits for it"
    )
    return StoreLockedError(
        f"{folder} is locked for writing by another process ({who}); {wait}. "
        "Readers can open it with mode='r' at any time.",
        folder,
        pid,
        host,
    )


def acquire_writer_lock(folder: Path, timeout: float | None = 0.0) -> WriterLock:
    """Take the exclusive writer lock of the store at ``folder`` (``<folder>/.writer.lock``, created if missing).

    Fails at once with :class:`StoreLockedError` (naming the holder's pid and host) when another process holds
    it, or polls for up to ``timeout`` seconds (``None``: no limit). A writer of the same store in this process
    shares the lock. The holder writes ``{"pid", "host", "since"}`` into the file. Without ``fcntl`` this takes
    no lock (see the module docstring).
    """
    folder = Path(folder)
    if timeout is not None and (not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0):
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
    if fcntl is None:  # pragma: no cover
        return WriterLock(None, folder)
    lock_path = folder / LOCK_FILE
    deadline = math.inf if timeout is None else time.monotonic() + float(timeout)
    pause = 0.002
    while True:
        try:
            fd = _open_lock_file(lock_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no EpisodeStore at {folder}: the folder does not exist") from None
        except OSError as err:
            raise EpisodeStoreError(
                f"{folder}: cannot open the writer lock {lock_path} ({err.strerror}); "
                "a store that cannot be written opens read-only (mode='r')"
            ) from err
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with _HELD_MUTEX:
            held = _HELD.get(key)
            if held is not None and held.pid == os.getpid() and not held.lost:
                held.refs += 1
                os.close(fd)
                return WriterLock(held, folder)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                got = False
            if got:
                # the folder may have been replaced (create(overwrite=True)) since we opened the file: lock what is
                # at the path now
                try:
                    now = os.stat(lock_path)
                    same = (now.st_dev, now.st_ino) == key
                except FileNotFoundError:
                    same = False
                if same:
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": stamp})
                    try:
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, info.encode(), 0)
                    except OSError:  # a lock file this user may lock but not write (another user's store)
                        pass
                    held = _Held(fd, key)
                    _HELD[key] = held
                    return WriterLock(held, folder)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                if not folder.is_dir():
                    raise FileNotFoundError(f"no EpisodeStore at {folder}: the folder was removed")
                continue
        holder = _read_holder(fd)
        os.close(fd)
        now = time.monotonic()
        if now >= deadline:
            raise _locked_error(folder, holder, 0.0 if timeout is None else float(timeout))
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, 0.05)


def _open_lock_file(lock_path: Path) -> int:
    """A descriptor on ``lock_path`` (created, mode 0666 less the umask, so that every user who may write the store
    may lock it); read-only if this user may not write the file (``flock`` needs no write access)."""
    flags = getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | flags, 0o666)
    except PermissionError:
        return os.open(lock_path, os.O_RDONLY | flags)


def remove_if_abandoned(folder: Path, pid: int | None) -> bool:
    """Delete ``folder`` (a staging or build folder of another process) if its owner is gone; True if deleted.

    With a lock file the lock decides (the kernel dropped it when the owner died; robust to pid reuse): the
    folder is deleted while this process holds the lock. Without one, the owner is gone when no process ``pid``
    runs; without either, nothing is deleted.
    """
    lock_path = folder / LOCK_FILE
    if fcntl is not None and lock_path.is_file():
        try:
            fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            with _HELD_MUTEX:
                if (st.st_dev, st.st_ino) in _HELD:  # this process writes there
                    return False
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return False
            shutil.rmtree(folder, ignore_errors=True)
            return True
        finally:
            os.close(fd)
    if pid is None or pid_alive(pid):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


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
