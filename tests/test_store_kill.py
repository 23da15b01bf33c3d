"""Atomic append: a writer process killed with SIGKILL during ``add_episode`` leaves a store that opens and
holds every previously committed episode bit-identical.

A launcher process imports stlflow once and forks one writer process per trial (so a trial costs
milliseconds, not an interpreter start). Each writer appends episodes in a loop to one store that grows
across all trials, and dies by SIGKILL:
- at a random time: the launcher sends SIGKILL a random delay after the writer opened the store;
- at a chosen file write: the writer kills itself just before its k-th file write (or after writing half of
  the temporary file), for a spread of k, which reaches every step of the append protocol.
After every kill the test process opens the store (alternately read-only and for appending, which repairs)
and checks every episode against its deterministic expected content, byte for byte.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np

from stlflow.datasets import EpisodeStore

# Shared by the test (expected values) and the writer: the episode with index i.
EPISODE_SRC = r"""
import numpy as np

def episode_for(i):
    rng = np.random.default_rng(1000 + i)
    T = int(rng.integers(1, 300))
    return {
        "obs": rng.normal(size=(T, 6)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(T, 2)),
        "signal_speed": rng.uniform(0, 3, size=T).astype(np.float32),
        "done": np.arange(T) == T - 1,
    }

def attrs_for(i):
    return {"i": i, "seed": 1000 + i, "mode": ["yield", "left", "right"][i % 3]}

def calibrated_attrs_for(i):
    return {**attrs_for(i), "theta": {"v_max": 0.25 * i}}
"""

LAUNCHER_SRC = (
    EPISODE_SRC
    + r"""
import json, os, signal, sys, time, traceback
import stlflow.datasets.store_io as store_mod
from stlflow.datasets.store import EpisodeStore


def writer(path, kill_at, half, out):
    # runs in the forked child: append forever, report each commit, die by SIGKILL
    if kill_at:
        real = store_mod._atomic_write_bytes
        count = [0]

        def dying_write(p, data, durable=False):
            count[0] += 1
            if count[0] == kill_at:
                if half:  # leave a half-written temporary file behind
                    p.parent.mkdir(parents=True, exist_ok=True)
                    with open(p.parent / f".{p.name}.dying{store_mod._TMP_SUFFIX}", "wb") as f:
                        f.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(p, data, durable)

        store_mod._atomic_write_bytes = dying_write
    store = EpisodeStore.open(path, mode="a")
    os.write(out, b"ready\n")
    while True:
        i = store.n_episodes
        store.add_episode(episode_for(i), attrs=attrs_for(i))
        os.write(out, f"committed {i}\n".encode())
        if i % 2 == 0:  # later calibration rewrites an episode's attrs in place
            store.set_episode_attrs(i, calibrated_attrs_for(i))


for command in sys.stdin:
    job = json.loads(command)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            writer(job["path"], job["kill_at"], job["half"], w)
        except BaseException:
            os.write(w, ("error " + traceback.format_exc().replace(chr(10), " | ") + "\n").encode())
        os._exit(1)
    os.close(w)
    lines, buf = [], b""
    with os.fdopen(r, "rb") as pipe:
        if job["kill_after"] is not None:
            first = pipe.readline()
            lines.append(first.decode().strip())
            if first.strip() == b"ready":
                time.sleep(job["kill_after"])
                os.kill(pid, signal.SIGKILL)
        lines += [line.decode().strip() for line in pipe]
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"killed": killed, "lines": lines}), flush=True)
"""
)

ns: dict = {}
exec(EPISODE_SRC, ns)
episode_for, attrs_for, calibrated_attrs_for = ns["episode_for"], ns["attrs_for"], ns["calibrated_attrs_for"]


class Launcher:
    """The forking launcher process; ``run`` forks one writer and returns the commits it reported."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER_SRC], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, path, kill_after: float | None = None, kill_at: int = 0, half: bool = False) -> list[int]:
        job = {"path": str(path), "kill_after": kill_after, "kill_at": kill_at, "half": half}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        errors = [line for line in result["lines"] if line.startswith("error")]
        assert not errors and result["killed"], result
        if kill_at == 0:
            assert result["lines"][0] == "ready", result
        return [int(line.split()[1]) for line in result["lines"] if line.startswith("committed")]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def check_store(path, committed_before: int, reported: list[int], mode: str) -> int:
    """Every episode committed so far is intact; returns the store's episode count."""
    store = EpisodeStore.open(path, mode=mode)
    n = store.n_episodes
    assert n >= committed_before
    if reported:
        assert n - 1 in (reported[-1], reported[-1] + 1)  # at most one commit the writer had no time to report
    # the first commit fixes the keys; a writer killed before it leaves an empty store with none
    assert store.keys == (["obs", "action", "signal_speed", "done"] if n else [])
    ends = store.episode_ends
    assert len(ends) == n and (n == 0 or ends[-1] == store.n_steps)
    data = {k: store.get(k) for k in store.keys}
    attrs = store.all_episode_attrs()
    start = 0
    for i in range(n):
        want = episode_for(i)
        end = int(ends[i])
        for k, v in want.items():
            got = data[k][start:end]
            assert got.dtype == v.dtype and got.shape == v.shape, (i, k)
            assert got.tobytes() == v.tobytes(), f"episode {i} key {k} changed"
        assert attrs[i] in (attrs_for(i), calibrated_attrs_for(i)), (i, attrs[i])
        start = end
    return n


def test_sigkill_during_add_episode_keeps_committed_episodes(tmp_path):
    path = tmp_path / "killed.zarr"
    # small chunks: appends rewrite partial chunks holding committed steps and span several chunks
    EpisodeStore.create(path, dt=0.1, chunk_bytes=2048)
    rnd = random.Random(0)
    launcher = Launcher()
    n = kills = 0
    try:
        for trial in range(30):  # kills at random times
            reported = launcher.run(path, kill_after=rnd.uniform(0.0, 0.15))
            kills += 1
            n = check_store(path, n, reported, mode="r" if trial % 2 else "a")
        for k in range(1, 31):  # kills at the k-th file write (k = 1 may strike while open() repairs)
            reported = launcher.run(path, kill_at=k, half=bool(k % 2))
            kills += 1
            n = check_store(path, n, reported, mode="a")
    finally:
        launcher.close()
    assert kills >= 20
    assert n >= 10, "too few episodes were committed for the test to mean anything"
    # the killed store still takes appends after a repair, and they read back
    store = EpisodeStore.open(path, mode="a")
    store.add_episode(episode_for(n), attrs=attrs_for(n))
    assert check_store(path, n + 1, [], mode="r") == n + 1
    assert not list(path.rglob("*.stlflow-tmp"))
    assert np.array_equal(EpisodeStore.open(path).episode(n)["obs"], episode_for(n)["obs"])
