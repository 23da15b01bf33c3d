"""The EpisodeStore writer lock: one writing process at a time, readers never blocked, no stale lock after SIGKILL.

Every holder here is a real process (a ``python -c`` child) holding a real ``flock``; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from stlflow.datasets import EpisodeStore, EpisodeStoreError
from stlflow.datasets.store import LOCK_FILE, StoreLockedError

HOLDER_SRC = r"""
import sys, time
from stlflow.datasets import EpisodeStore
store = EpisodeStore.open(sys.argv[1], "a")
if len(sys.argv) > 2:  # leave a temporary file as if an append were under way
    open(sys.argv[2], "wb").write(b"half a chunk")
print("held", flush=True)
line = sys.stdin.readline()  # "close", or EOF
store.close()
print("closed", flush=True)
time.sleep(float(line.split()[1]) if line.startswith("close ") else 0)
"""


class Holder:
    """A child process that opens ``path`` for appending and holds the writer lock until told to close."""

    def __init__(self, path, temp_file=None):
        args = [sys.executable, "-c", HOLDER_SRC, str(path)] + ([str(temp_file)] if temp_file else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == "held", line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self, then_sleep: float = 0.0) -> None:
        self.proc.stdin.write(f"close {then_sleep}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "closed"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def open_elsewhere(path) -> str:
    """Open ``path`` for appending in another process: "opened", or the StoreLockedError's message."""
    code = (
        "import sys\nfrom stlflow.datasets.store import EpisodeStore, StoreLockedError\n"
        "try:\n    EpisodeStore.open(sys.argv[1], 'a').close()\n    print('opened')\n"
        "except StoreLockedError as err:\n    print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@contextlib.contextmanager
def holder(path, temp_file=None):
    h = Holder(path, temp_file)
    try:
        yield h
    finally:
        h.stop()


def episode(T: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"obs": rng.normal(size=(T, 3)).astype(np.float32), "action": rng.normal(size=(T, 2))}


def digest(path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.rglob("*")
        if p.is_file() and p.name != LOCK_FILE
    }


@pytest.fixture
def store_path(tmp_path):
    with EpisodeStore.create(tmp_path / "s.zarr", dt=0.1) as store:
        for i in range(3):
            store.add_episode(episode(5 + i, i), attrs={"i": i})
    return tmp_path / "s.zarr"


def test_second_process_gets_a_named_error_at_once(store_path):
    with holder(store_path) as h:
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError) as exc:
            EpisodeStore.open(store_path, mode="a")
        assert time.monotonic() - t0 < 1.0
        err = exc.value
        assert isinstance(err, EpisodeStoreError) and err.pid == h.pid and err.path == store_path
        assert err.host == socket.gethostname()
        assert f"{store_path} is locked for writing by another process (pid {h.pid} on host" in str(err)
        assert "timeout=SECONDS" in str(err)
        assert json.loads((store_path / LOCK_FILE).read_text())["pid"] == h.pid
        # readers are never blocked and see the committed episodes
        reader = EpisodeStore.open(store_path)
        assert reader.n_episodes == 3 and reader.episode_attrs(2) == {"i": 2}
        # create(overwrite=True) does not pull the store away from its writer either
        with pytest.raises(StoreLockedError, match=f"pid {h.pid}"):
            EpisodeStore.create(store_path, overwrite=True)
        assert EpisodeStore.open(store_path).n_episodes == 3
        h.close()
        with EpisodeStore.open(store_path, mode="a") as store:  # released: open at once
            assert store.n_episodes == 3


def test_timeout_waits_for_the_holder(store_path):
    with holder(store_path) as h:
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError, match=r"still locked after waiting 0.3 s"):
            EpisodeStore.open(store_path, mode="a", timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 2.0
        # the holder appends nothing but closes in a moment: a writer that waits gets the store after it
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.stdout.write('close 0\\n')"],
            stdout=h.proc.stdin,
        )
        t0 = time.monotonic()
        with EpisodeStore.open(store_path, mode="a", timeout=30) as store:
            waited = time.monotonic() - t0
            store.add_episode(episode(4, 9))
        proc.wait()
        assert 0.3 < waited < 30
    assert EpisodeStore.open(store_path).n_episodes == 4
    with pytest.raises(ValueError, match="timeout"):
        EpisodeStore.open(store_path, mode="a", timeout=-1)


def test_sigkilled_holder_leaves_no_stale_lock(store_path):
    h = Holder(store_path)
    h.kill()
    with EpisodeStore.open(store_path, mode="a") as store:  # at once, no timeout needed
        store.add_episode(episode(2))
    assert EpisodeStore.open(store_path).n_episodes == 4


def test_no_repair_while_another_process_writes(store_path):
    """The bug this lock fixes: a second opener deleted a live writer's files and truncated its tail."""
    # an uncommitted tail and a temporary file, as a writer in the middle of add_episode has them
    root = zarr.open_group(store_path, mode="r+")
    n = EpisodeStore.open(store_path).n_steps
    for key in ("obs", "action"):
        arr = root["data"][key]
        arr.resize((n + 6, *arr.shape[1:]))
    temp = store_path / "data" / "obs" / ".c.0.0.1234.stlflow-tmp"
    with holder(store_path, temp_file=temp) as h:
        before = digest(store_path)
        for _ in range(20):
            with pytest.raises(StoreLockedError):
                EpisodeStore.open(store_path, mode="a")
            assert EpisodeStore.open(store_path).n_steps == n  # readers see the commit, not the tail
        assert digest(store_path) == before and temp.exists()
        h.close()
    with EpisodeStore.open(store_path, mode="a"):  # now the repair runs, under the lock
        pass
    assert not temp.exists()
    assert zarr.open_group(store_path, mode="r")["data"]["obs"].shape[0] == n


def test_close_context_manager_and_garbage_collection_release(store_path):
    store = EpisodeStore.open(store_path, mode="a")
    store.close()
    store.close()  # idempotent
    assert store.closed and store.n_episodes == 3 and store.episode(0)["obs"].shape == (5, 3)  # still reads
    with pytest.raises(EpisodeStoreError, match="closed"):
        store.add_episode(episode(2))
    assert open_elsewhere(store_path) == "opened"

    with EpisodeStore.open(store_path, mode="a") as store:
        store.add_episode(episode(3))
        assert "is locked for writing" in open_elsewhere(store_path)
    assert store.closed
    assert open_elsewhere(store_path) == "opened"

    EpisodeStore.open(store_path, mode="a").add_episode(episode(2))  # dropped at once: released by gc
    gc.collect()
    assert open_elsewhere(store_path) == "opened"
    assert EpisodeStore.open(store_path).n_episodes == 5
    reader = EpisodeStore.open(store_path)
    reader.close()  # readers hold nothing; close is harmless
    assert reader.n_episodes == 5


def test_writers_in_one_process_share_the_lock_and_each_others_commits(store_path):
    a = EpisodeStore.open(store_path, mode="a")
    b = EpisodeStore.open(store_path, mode="a")  # same process: shares the lock (and repairs nothing of a's)
    a.add_episode(episode(4, 10), attrs={"by": "a"})
    b.add_episode(episode(6, 11), attrs={"by": "b"})  # b first catches up with a's commit
    a.set_episode_attrs(3, {"seen": True})
    b.set_attrs({"note": "b"})
    a.set_attrs({"other": 1})  # keeps b's store attrs
    reader = EpisodeStore.open(store_path)
    assert reader.n_episodes == 5 and reader.episode_lengths.tolist()[-2:] == [4, 6]
    assert reader.episode_attrs(3) == {"by": "a", "seen": True} and reader.episode_attrs(4) == {"by": "b"}
    assert reader.attrs == {"note": "b", "other": 1}
    a.close()
    assert f"(pid {os.getpid()} on host" in open_elsewhere(store_path)  # b still holds it for this process
    b.close()
    assert open_elsewhere(store_path) == "opened"


def test_forked_child_cannot_write_and_parent_keeps_the_lock(store_path):
    store = EpisodeStore.open(store_path, mode="a")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            store.add_episode(episode(2))
            msg = "child wrote"
        except EpisodeStoreError as err:
            msg = str(err)
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        msg = f.read()
    os.waitpid(pid, 0)
    assert "opened for writing by a parent process" in msg
    assert f"(pid {os.getpid()} on host" in open_elsewhere(store_path)  # the child's exit did not release it
    store.add_episode(episode(2))
    store.close()
    assert open_elsewhere(store_path) == "opened"
    assert EpisodeStore.open(store_path).n_episodes == 4


def test_create_holds_the_lock_until_closed(tmp_path):
    path = tmp_path / "new.zarr"
    store = EpisodeStore.create(path)
    assert (path / LOCK_FILE).is_file()
    assert f"(pid {os.getpid()} on host" in open_elsewhere(path)
    store.add_episode(episode(3))
    store.close()
    with holder(path) as h:
        with pytest.raises(StoreLockedError, match=f"pid {h.pid}"):
            EpisodeStore.create(path, overwrite=True)
        h.close()
    with EpisodeStore.create(path, overwrite=True, dt=0.5) as fresh:
        assert fresh.n_episodes == 0 and fresh.dt == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name != "new.zarr"]


def test_threads_with_their_own_writers_serialise(store_path):
    """Writers of one store in several threads of one process share the lock; their appends and an open(a) that
    repairs in a third thread never lose a commit."""
    import threading

    errors = []

    def append(tag: str) -> None:
        try:
            store = EpisodeStore.open(store_path, mode="a")
            for j in range(15):
                store.add_episode(episode(3 + j % 4, j), attrs={"tag": tag, "j": j})
            store.close()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def reopen() -> None:
        try:
            for _ in range(15):
                EpisodeStore.open(store_path, mode="a").close()
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=append, args=(t,)) for t in "ab"] + [threading.Thread(target=reopen)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    reader = EpisodeStore.open(store_path)
    assert reader.n_episodes == 3 + 30
    attrs = reader.all_episode_attrs()[3:]
    for tag in "ab":
        mine = [(i, a["j"]) for i, a in enumerate(attrs, 3) if a["tag"] == tag]
        assert [j for _, j in mine] == list(range(15))
        for i, j in mine:
            got, want = reader.episode(i), episode(3 + j % 4, j)
            assert all(np.array_equal(got[k], want[k]) for k in want)
    assert open_elsewhere(store_path) == "opened"
