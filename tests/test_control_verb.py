"""`stlflow control` on real subprocesses: lock-step episodes on the in-process simulator with their report and
recorded store, the refusals before connecting (exit 2), SIGINT mid-episode (exit 130, partial episode committed),
and one episode against a real `stlflow serve-sim` twin over ipc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stlflow.datasets import EpisodeStore, Normalizer
from stlflow.policy import Policy

CONTROL = [sys.executable, "-m", "stlflow", "control"]
TIMING_KEYS = ("tick_lateness_s", "obs_age_s", "infer_s", "source", "tick_index", "elapsed")


def tiny_policy(obs_dim: int = 20, action_dim: int = 2, seed: int = 0) -> Policy:
    """A randomly initialised flow policy; Crossing's dimensions by default, its actions slow (a long episode)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    acts = rng.uniform([0.0, -0.1][:action_dim] + [0.0] * (action_dim - 2), [0.2, 0.1][:action_dim] +
                       [0.1] * (action_dim - 2), (100, action_dim))
    norm = Normalizer.fit({"obs": rng.normal(size=(100, obs_dim)), "action": acts})
    return Policy(obs_dim, action_dim, n_obs_steps=2, horizon=8, n_action_steps=4, head={"kind": "flow"},
                  net={"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16}, normalizer=norm).eval()


@pytest.fixture(scope="module")
def folder():
    path = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))  # short: ipc paths must fit in 107 bytes
    tiny_policy().save(path / "ckpt")
    tiny_policy(obs_dim=7, action_dim=2).save(path / "ckpt7")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def control(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CONTROL, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir(), env={**os.environ, "MUJOCO_GL": "egl"})


def test_lockstep_sim_two_episodes_report_and_store(folder):
    out = folder / "lock"
    r = control(f"ckpt={folder / 'ckpt'}", "robot=sim", "mode=lockstep", "env=crossing", "rate_hz=10",
                "controller=rti", "k=2", "episodes=2", "seed=3", f"out={out}", "record=true", "env.kwargs.max_steps=12")
    assert r.returncode == 0, r.stderr
    for name in ("report.json", "report.md", "lateness_hist.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["robot"] == "sim" and report["rate_hz"] == pytest.approx(10.0)
    eps = report["episodes"]
    assert [e["seed"] for e in eps] == [3, 4]
    for e in eps:
        assert e["complete"] and e["estop"] is None and e["end_reason"] in ("truncated", "terminated", "success")
        assert e["ticks"] == 12 and sum(e["sources"].values()) == 12
        assert e["lateness_ms"]["max"] == 0.0  # a virtual clock is never late
        assert set(e["safety"]) >= {"nonfinite", "clamped", "stale", "estops"}
    assert report["aggregate"]["episodes"] == 2 and report["aggregate"]["ticks"] == 24
    assert "| all |" in (out / "report.md").read_text()
    with EpisodeStore.open(out / "episodes.zarr") as store:
        assert len(store) == 2 and set(TIMING_KEYS) <= set(store.keys)
        ep = store.episode(1)
        assert ep["obs"].shape == (12, 20) and ep["action"].shape == (12, 2) and np.isfinite(ep["action"]).all()
        assert set(np.unique(ep["source"])) <= {0, 1, 2}
        attrs = store.episode_attrs(1)
        assert attrs["seed"] == 4 and attrs["complete"] is True and attrs["end_reason"] == eps[1]["end_reason"]


@pytest.mark.parametrize(("args", "message"), [
    (("ckpt={ckpt7}", "robot=sim"), "dimensions (obs 7, action 2) differ from the robot's (obs 20, action 2)"),
    (("ckpt={ckpt}", "robot=sim", "rate_hz=20"), "rate_hz=20 does not match the task"),
    (("ckpt={ckpt}", "robot=sim", "mode=realtime", "speed=5", "rate_hz=10"), "rate_hz=10 does not match the task"),
    (("ckpt={ckpt}", "robot=ros"), "unknown robot 'ros'; choose one of ['sim', 'zmq']"),
    (("ckpt={ckpt}", "robot=zmq", "addr=ipc://{folder}/nobody", "connect_timeout=0.5"),
     "the sim twin at ipc://{folder}/nobody did not answer"),
    (("controller=expert", "robot=zmq", "addr=ipc://{folder}/nobody"), "runs on robot=sim only"),
    (("ckpt={ckpt}", "robot=sim", "inference=gpu"), "unknown inference 'gpu'; choose one of ['auto', 'process', "
                                                    "'thread']"),
    (("controller=expert", "robot=sim", "inference=process"), "it runs with inference=thread"),
])
def test_refusals_exit_2_with_one_line(folder, args, message):
    fill = {"ckpt": folder / "ckpt", "ckpt7": folder / "ckpt7", "folder": folder}
    out = folder / "refused"
    r = control(*(a.format(**fill) for a in args), f"out={out}")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stlflow control: "), r.stderr
    assert message.format(**fill) in lines[0]
    assert not (out / "episodes.zarr").exists()  # refused before anything ran


def _reader(proc: subprocess.Popen) -> list[str]:
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return lines


def _wait_line(lines: list[str], text: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, (proc.poll(), "".join(lines))
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _all_gone(pids: list[int], timeout: float = 20.0) -> bool:
    """Whether every process of ``pids`` ends within ``timeout`` s (the inference process, and multiprocessing's
    resource tracker, which ends when the last process using it has)."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def test_sigint_exits_130_with_the_partial_episode_committed(folder):
    out = folder / "sigint"
    proc = subprocess.Popen([*CONTROL, f"ckpt={folder / 'ckpt'}", "robot=sim", "mode=realtime", "speed=1",
                             "rate_hz=10", "episodes=3", f"out={out}", "env.kwargs.max_steps=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    lines = _reader(proc)
    _wait_line(lines, "running on robot=sim", proc)
    workers = _children(proc.pid)
    assert len(workers) >= 1  # the inference process (realtime mode runs the policy in a process of its own)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
    err = proc.stderr.read()
    assert rc == 130, (rc, "".join(lines), err)
    assert _all_gone(workers)  # stopped on the way out: no orphan
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] and len(report["episodes"]) == 1
    ep = report["episodes"][0]
    assert not ep["complete"] and ep["estop"] == "SIGINT" and ep["end_reason"] == "estop: SIGINT"
    with EpisodeStore.open(out / "episodes.zarr") as store:
        assert len(store) == 1
        attrs = store.episode_attrs(0)
        assert attrs["complete"] is False and attrs["end_reason"] == "estop: SIGINT"
        assert store.episode_lengths[0] == ep["ticks"] >= 5  # about 15 ticks in 1.5 s at 10 Hz


def test_a_sigkilled_control_process_leaves_no_inference_process(folder):
    proc = subprocess.Popen([*CONTROL, f"ckpt={folder / 'ckpt'}", "robot=sim", "mode=realtime", "speed=1",
                             "rate_hz=10", f"out={folder / 'killed'}", "env.kwargs.max_steps=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    lines = _reader(proc)
    _wait_line(lines, "running on robot=sim", proc)
    workers = _children(proc.pid)
    assert len(workers) >= 1
    proc.kill()
    proc.wait(10)
    assert _all_gone(workers)  # the worker sees its pipe close and ends by itself


def test_zmq_robot_against_a_serve_sim_twin(folder):
    addr = f"ipc://{folder}/twin"
    twin = subprocess.Popen([sys.executable, "-m", "stlflow", "serve-sim", "env=crossing", f"addr={addr}",
                             "mode=realtime", "speed=5", "env.kwargs.max_steps=25"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    try:
        lines = _reader(twin)
        _wait_line(lines, "serving", twin)
        out = folder / "zmq"
        r = control(f"ckpt={folder / 'ckpt'}", "robot=zmq", f"addr={addr}", "mode=realtime", "speed=5", "rate_hz=50",
                    "episodes=1", f"out={out}")
        assert r.returncode == 0, (r.stdout, r.stderr)
        report = json.loads((out / "report.json").read_text())
        ep = report["episodes"][0]
        assert ep["complete"] and ep["end_reason"] in ("truncated", "terminated", "success") and ep["ticks"] >= 20
        assert ep["sources"]["fresh"] + ep["sources"]["chunk"] > 0 and ep["twin"]["command_age"]["n"] > 0
        # one convention, ticks from the observation a command was planned from to the tick it is applied: a plan
        # acts from the tick after its observation on (the loop's deadlines lie on the twin's grid, and a command goes
        # out right after the tick's observation arrives), and the twin counts the same age where the command lands,
        # or one more for a command that reached it after its next step (a busy machine)
        assert ep["plan_delay_ticks"]["p50"] >= 1, ep
        ages, counts = np.asarray(ep["twin"]["command_age"]["hist"]).T  # the twin's median the loop's way
        assert -0.5 <= np.percentile(np.repeat(ages, counts), 50) - ep["command_age_ticks"]["p50"] <= 1, ep
        with EpisodeStore.open(out / "episodes.zarr") as store:
            assert len(store) == 1 and set(TIMING_KEYS) <= set(store.keys)
    finally:
        twin.terminate()
        twin.wait(20)
