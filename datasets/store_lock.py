"""The writer lock of an :class:`~stlflow.datasets.store.EpisodeStore`: one writer at a time.

:func:`acquire_writer_lock` takes an exclusive advisory lock (``fcntl.flock``) on ``<store>/.writer.lock``
(:data:`LOCK_FILE`) for as long as a store is open for writing. The kernel drops the lock when the holder's last file
descriptor closes, so a process killed with SIGKILL never leaves a stale lock. Within one process, writers of the same
store share the lock (and a mutex that serialises their writes); a child made by ``fork`` does not inherit it.
Readers take no lock. On platforms without ``fcntl`` (Windows) no lock is taken at all: nothing stops two writers
there. The lock is advisory and local: on network file systems it is only as good as their ``flock`` emulation.

:func:`remove_if_abandoned` deletes another process's staging or build folder once its owner is gone (its lock free,
or for a folder without one, no process of its pid alive: :func:`pid_alive`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from stlflow.datasets.store_io import EpisodeStoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no writer lock (see the module docstring)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".writer.lock"
"""The writer lock file inside a store (see :func:`acquire_writer_lock`)."""


class StoreLockedError(EpisodeStoreError):
    """Another process holds the store's writer lock. ``path`` is the store, ``pid`` and ``host`` the holder's
    (``None`` when it has not written them yet)."""

    def __init__(self, message: str, path: Path, pid: int | None = None, host: str | None = None):
        super().__init__(message)
        self.path = path
        self.pid = pid
        self.host = host


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
