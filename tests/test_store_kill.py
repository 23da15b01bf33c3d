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

With concurrent openers (:func:`run_concurrent_kills`): a writer is SIGKILLed at random moments while a prober
process opens the store every few milliseconds, for appending (it must get the writer lock error naming the
writer's pid while the writer lives, and succeed once it is dead) and for reading (it must see every episode the
writer has logged as committed). The writer logs each committed episode's checksum to a side file; afterwards
every committed episode matches it byte for byte and the store opens in both modes. The default suite runs a
few kills; ``-m slow`` (or ``python tests/test_store_kill.py --runs 50``) runs 50 seeds and prints the pass count.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from stlflow.datasets import EpisodeStore

# Shared by the test (expected values) and the writer: the episode with index i.
EPISODE_SRC = r"""
import hashlib
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

def checksum(ep):
    h = hashlib.sha256()
    for k in sorted(ep):
        a = np.ascontiguousarray(ep[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()

def read_log(path):
    # {episode: checksum} of the complete lines of the writer's side file
    try:
        text = open(path).read()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            i, digest = line.split()
            out[int(i)] = digest
    return out
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
checksum, read_log = ns["checksum"], ns["read_log"]


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
    store.close()  # mode "a": release the writer lock before the next writer opens
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


# ------------------------------------------------------------------------------------------------------------------
# A writer killed at random moments while another process keeps opening the store for appending and for reading.

CONCURRENT_LAUNCHER_SRC = (
    EPISODE_SRC
    + r"""
import json, os, random, signal, sys, time, traceback
from stlflow.datasets.store import EpisodeStore


def set_status(path, **status):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


def writer(path, log, out):
    # the prober may hold the lock for a moment (it opens for appending every few ms): wait for it
    store = EpisodeStore.open(path, mode="a", timeout=60)
    os.write(out, b"ready\n")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while True:
        i = store.n_episodes
        ep = episode_for(i)
        store.add_episode(ep, attrs=attrs_for(i))
        os.write(fd, f"{i} {checksum(ep)}\n".encode())  # one write: a line is complete or absent
        os.write(out, b"committed\n")
        if i % 2 == 0:
            store.set_episode_attrs(i, calibrated_attrs_for(i))


job = json.loads(sys.stdin.readline())
rnd = random.Random(job["seed"])
kills = 0
for trial in range(job["trials"]):
    set_status(job["status"], phase="starting", trial=trial, pid=None)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            writer(job["path"], job["log"], w)
        except BaseException:
            os.write(w, ("error " + traceback.format_exc().replace(chr(10), " | ") + "\n").encode())
        os._exit(1)
    os.close(w)
    pipe = os.fdopen(r, "rb", buffering=0)
    rest = b""
    if trial % 3 != 1 and rnd.random() < 0.2:  # a kill that may strike while the writer opens and repairs
        time.sleep(rnd.uniform(0.0, 0.01))
    else:
        first = pipe.readline()
        if first == b"ready\n":
            set_status(job["status"], phase="alive", trial=trial, pid=pid)
            if trial % 3 == 1:  # after a first commit (a slow machine still commits something), during the next
                line = pipe.readline()
                rest += b"" if line == b"committed\n" else line
                time.sleep(rnd.uniform(0.0, 0.05))
            else:  # at a random moment: opening, appending, committing, rewriting attrs
                time.sleep(rnd.uniform(0.0, 0.12))
        else:
            rest += first
    os.kill(pid, signal.SIGKILL)
    _, st = os.waitpid(pid, 0)
    rest += pipe.read()
    pipe.close()
    if b"error" in rest or not (os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL):  # it died of the kill
        print(json.dumps({"error": rest.decode(errors="replace"), "trial": trial}), flush=True)
        sys.exit(1)
    kills += 1
    set_status(job["status"], phase="dead", trial=trial, pid=pid)
    time.sleep(job["gap"])  # room for the prober to open the store with no writer alive
print(json.dumps({"kills": kills}), flush=True)
"""
)

PROBER_SRC = (
    EPISODE_SRC
    + r"""
import json, os, random, sys, time
from stlflow.datasets.store import EpisodeStore, StoreLockedError
from stlflow.datasets.store_lock import pid_alive

job = json.loads(sys.stdin.readline())
rnd = random.Random(job["seed"] + 7)
stats = {"locked_while_alive": 0, "opened_after_death": 0, "opened_other": 0, "locked_other": 0, "reads": 0,
         "violations": []}


def status():
    try:
        with open(job["status"]) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {"phase": "none"}


def violation(text):
    if len(stats["violations"]) < 20:
        stats["violations"].append(text)


def check(store, logged, how):
    # every episode the writer logged as committed is there; the newest one is intact
    n = store.n_episodes
    if logged and n <= max(logged):
        violation(f"{how}: {n} episodes but episode {max(logged)} was logged as committed")
    if n:
        got = checksum(store.episode(n - 1))
        if got != checksum(episode_for(n - 1)):
            violation(f"{how}: episode {n - 1} differs from what the writer appended")
    for i in rnd.sample(sorted(logged), min(2, len(logged))):
        if i < n and checksum(store.episode(i)) != logged[i]:
            violation(f"{how}: episode {i} differs from the checksum the writer logged")


while not os.path.exists(job["stop"]):
    # open for appending
    s0, logged = status(), read_log(job["log"])
    try:
        store = EpisodeStore.open(job["path"], mode="a")
    except StoreLockedError as err:
        s1 = status()
        if s0 == s1 and s0["phase"] == "dead":
            violation(f"lock error with no writer alive ({s0}): {err}")
        elif s0 == s1 and s0["phase"] == "alive":
            stats["locked_while_alive"] += 1
            if err.pid != s0["pid"] or str(s0["pid"]) not in str(err) or job["path"] not in str(err):
                violation(f"the lock error names pid {err.pid}, the writer is {s0['pid']}: {err}")
        else:
            stats["locked_other"] += 1
    except Exception as err:  # noqa: BLE001 - every failure to open is a finding
        violation(f"open(a) failed with {type(err).__name__}: {err}")
    else:
        try:
            s1 = status()
            if s0["phase"] == "alive":
                # we hold the lock, so the writer (which held it since before "alive") is dying or dead
                deadline = time.monotonic() + 2.0
                while pid_alive(s0["pid"]) and time.monotonic() < deadline:
                    time.sleep(0.001)
                if pid_alive(s0["pid"]):
                    violation(f"opened for appending while writer {s0['pid']} is alive")
                stats["opened_other"] += 1
            elif s0 == s1 and s0["phase"] == "dead":
                stats["opened_after_death"] += 1
            else:
                stats["opened_other"] += 1
            check(store, logged, "open(a)")
        except Exception as err:  # noqa: BLE001
            violation(f"after open(a): {type(err).__name__}: {err}")
        finally:
            store.close()
    # open for reading: no lock, no repair, the committed episodes
    logged = read_log(job["log"])
    try:
        reader = EpisodeStore.open(job["path"], mode="r")
        check(reader, logged, "open(r)")
        stats["reads"] += 1
    except Exception as err:  # noqa: BLE001
        violation(f"open(r): {type(err).__name__}: {err}")
    time.sleep(rnd.uniform(0.001, 0.005))
print(json.dumps(stats), flush=True)
"""
)


def _python(src: str, job: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", src], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(job) + "\n")
    proc.stdin.flush()
    return proc


def run_concurrent_kills(folder: Path, seed: int, trials: int, gap: float = 0.03) -> dict:
    """One run: ``trials`` writers SIGKILLed at random moments while a prober opens the store every few ms.

    Returns the prober's counts; raises AssertionError on any violation or damaged episode.
    """
    path = folder / "store.zarr"
    log, status, stop = folder / "committed.log", folder / "status.json", folder / "stop"
    EpisodeStore.create(path, dt=0.1, chunk_bytes=2048).close()
    common = {"path": str(path), "log": str(log), "status": str(status), "stop": str(stop), "seed": seed}
    prober = _python(PROBER_SRC, common)
    launcher = _python(CONCURRENT_LAUNCHER_SRC, {**common, "trials": trials, "gap": gap})
    try:
        out, _ = launcher.communicate(timeout=600)
    finally:
        stop.touch()
        prober_out, _ = prober.communicate(timeout=120)
        if launcher.poll() is None:
            launcher.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert "error" not in result and result["kills"] == trials, result
    stats = json.loads(prober_out.strip().splitlines()[-1])
    assert not stats["violations"], stats["violations"]

    # afterwards: the store opens in both modes and every committed episode is what the writer committed
    logged = read_log(log)
    assert logged, "the writers committed nothing: the test means nothing"
    for mode in ("r", "a", "r"):
        with EpisodeStore.open(path, mode=mode) as store:
            n = store.n_episodes
            # the episodes a writer committed but was killed before logging are the last of its run
            assert max(logged) < n <= max(logged) + trials + 1
            attrs = store.all_episode_attrs()
            for i, ep in enumerate(store.iter_episodes()):
                digest = checksum(ep)
                assert digest == checksum(episode_for(i)), f"episode {i} changed"
                assert logged.get(i, digest) == digest, f"episode {i} differs from the checksum the writer logged"
                assert attrs[i] in (attrs_for(i), calibrated_attrs_for(i)), (i, attrs[i])
    assert not list(path.rglob("*.stlflow-tmp"))  # the last open(a) repaired under the lock
    return {**stats, "episodes": n, "kills": trials}


def test_sigkill_while_other_processes_open_the_store(tmp_path):
    stats = run_concurrent_kills(tmp_path, seed=0, trials=8)
    print(stats)
    assert stats["locked_while_alive"] > 0, stats  # the prober met a live writer
    assert stats["opened_after_death"] > 0, stats  # ... and opened the store once it was dead
    assert stats["reads"] > 0


@pytest.mark.slow
def test_sigkill_while_other_processes_open_the_store_50_runs(tmp_path):
    passed, failures = run_many(tmp_path, runs=50, trials=20)
    print(f"concurrent SIGKILL runs passed: {passed}/50")
    assert passed == 50, failures


def run_many(folder: Path, runs: int, trials: int) -> tuple[int, list[str]]:
    passed, failures = 0, []
    for seed in range(runs):
        run_dir = folder / f"run{seed}"
        run_dir.mkdir()
        t0 = time.perf_counter()
        try:
            stats = run_concurrent_kills(run_dir, seed=seed, trials=trials)
            ok = stats["locked_while_alive"] > 0 and stats["opened_after_death"] > 0
            if not ok:
                raise AssertionError(f"the prober never met a live writer, or never a dead one: {stats}")
            passed += 1
            print(f"run {seed}: ok in {time.perf_counter() - t0:.1f} s  {stats}", flush=True)
        except AssertionError as err:
            failures.append(f"run {seed}: {err}")
            print(f"run {seed}: FAILED: {err}", flush=True)
    return passed, failures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SIGKILL a store writer while other processes open the store.")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--trials", type=int, default=20, help="writers killed per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n_passed, _ = run_many(Path(tmp), args.runs, args.trials)
    print(f"passed {n_passed}/{args.runs}")
    sys.exit(0 if n_passed == args.runs else 1)
