"""Atomic append: a writer process killed with SIGKILL during ``add_episode`` leaves a store that opens and
holds every previously committed episode bit-identical.

Two kinds of kills, on one store that grows across all of them:
- at random times: the parent sends SIGKILL after a random delay while the child appends in a loop;
- at every write: the child kills itself just before its k-th file write (or half-way through writing
  the temporary file), for a spread of k, which reaches every step of the append protocol.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from stlflow.datasets import EpisodeStore

# Shared by the parent (expected values) and the child (writer): the episode with index i.
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

CHILD_SRC = (
    EPISODE_SRC
    + r"""
import os, signal, sys
import stlflow.datasets.store as store_mod
from stlflow.datasets.store import EpisodeStore

kill_at = int(os.environ.get("KILL_AT_WRITE", "0"))
half = os.environ.get("KILL_HALF", "0") == "1"
if kill_at:
    real = store_mod._atomic_write_bytes
    count = [0]

    def dying_write(path, data, durable=False):
        count[0] += 1
        if count[0] == kill_at:
            if half:  # leave a half-written temporary file behind
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path.parent / f".{path.name}.dying{store_mod._TMP_SUFFIX}", "wb") as f:
                    f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, data, durable)

    store_mod._atomic_write_bytes = dying_write

store = EpisodeStore.open(sys.argv[1], mode="a")
print("ready", flush=True)
while True:
    i = store.n_episodes
    store.add_episode(episode_for(i), attrs=attrs_for(i))
    print(f"committed {i}", flush=True)
    if i % 2 == 0:  # later calibration rewrites an episode's attrs in place
        store.set_episode_attrs(i, calibrated_attrs_for(i))
"""
)

ns: dict = {}
exec(EPISODE_SRC, ns)
episode_for, attrs_for, calibrated_attrs_for = ns["episode_for"], ns["attrs_for"], ns["calibrated_attrs_for"]


def run_child(path, env_extra: dict | None = None, kill_after: float | None = None) -> list[int]:
    """Run the writer; SIGKILL it ``kill_after`` seconds after it is ready (or let it kill itself)."""
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SRC, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    ready = proc.stdout.readline()
    if ready.strip() != "ready":  # only a self-kill may strike before ready (while open() repairs the store)
        assert kill_after is None and proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read()
        return []
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"child exited with {proc.returncode}: {err}"
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]


def check_store(path, committed_before: int, reported: list[int], mode: str) -> int:
    """Every episode committed so far is intact; returns the store's episode count."""
    store = EpisodeStore.open(path, mode=mode)
    n = store.n_episodes
    assert n >= committed_before
    if reported:
        assert n - 1 in (reported[-1], reported[-1] + 1)  # at most one commit the child had no time to report
    assert store.keys == ["obs", "action", "signal_speed", "done"]
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
    n = 0
    kills = 0
    for trial in range(20):  # kills at random times
        reported = run_child(path, kill_after=rnd.uniform(0.0, 0.25))
        kills += 1
        n = check_store(path, n, reported, mode="r" if trial % 2 else "a")
    for k in (1, 2, 3, 4, 5, 6, 8, 10, 13, 17, 22, 29):  # kills at the k-th file write
        reported = run_child(path, {"KILL_AT_WRITE": str(k), "KILL_HALF": str(k % 2)})
        kills += 1
        n = check_store(path, n, reported, mode="a")
    assert kills >= 20
    assert n >= 10, "too few episodes were committed for the test to mean anything"
    # the killed store still takes appends after a repair, and they read back
    store = EpisodeStore.open(path, mode="a")
    store.add_episode(episode_for(n), attrs=attrs_for(n))
    assert check_store(path, n + 1, [], mode="r") == n + 1
    assert not list(path.rglob("*.stlflow-tmp"))
    assert np.array_equal(EpisodeStore.open(path).episode(n)["obs"], episode_for(n)["obs"])
