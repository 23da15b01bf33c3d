"""The sim twin (`stlflow serve-sim`, stlflow.control.twin) and its client ZmqRobot (stlflow.control.zmq_robot).

Every twin is a real `python -m stlflow serve-sim` subprocess on real ipc sockets in a temporary folder. Start-up
costs seconds (the task registry imports torch), so the twins a test needs are all launched together when the
module's first test asks for one, and each test then takes about a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stlflow.control.robot import Observation, Robot, RobotError
from stlflow.control.tasks import get_task
from stlflow.control.twin import SimTwin, TwinError, endpoints, hold_action
from stlflow.control.zmq_robot import ZmqRobot

SERVE = [sys.executable, "-m", "stlflow", "serve-sim"]


class TwinProcess:
    """One `stlflow serve-sim` subprocess; stdout and stderr are collected by reader threads."""

    def __init__(self, addr: str, *overrides: str, env: str = "crossing") -> None:
        self.addr = addr
        self.proc = subprocess.Popen([*SERVE, f"env={env}", f"addr={addr}", *overrides], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()

    def wait_ready(self, timeout: float = 90.0) -> TwinProcess:
        deadline = time.monotonic() + timeout
        while not any("serving" in line for line in self.out):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"twin at {self.addr} not ready (rc {self.proc.poll()}):\n{''.join(self.out)}\n"
                                     f"{''.join(self.err)}")
            time.sleep(0.02)
        return self

    def robot(self, **options) -> ZmqRobot:
        robot = ZmqRobot(self.addr, **options)
        robot.connect()
        return robot

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def folder():
    path = Path(tempfile.mkdtemp(prefix="twin-", dir="/tmp"))  # short: ipc paths must fit in 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stale_socket_file(path: Path) -> None:
    """A Unix socket file whose server is gone (what a SIGKILLed twin leaves behind)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


@pytest.fixture(scope="module")
def twins(folder):
    """The twins of this module, launched at once (see the module docstring); ready on first use."""
    _stale_socket_file(folder / "term.req")  # test_twin_exits_on_sigterm: the twin must reuse this address
    long_run = "env.kwargs.max_steps=100000"
    procs = {
        "lockstep": TwinProcess(f"ipc://{folder}/lock", "mode=lockstep"),
        "pickplace": TwinProcess(f"ipc://{folder}/pick", "mode=lockstep", env="pickplace"),
        "realtime": TwinProcess(f"ipc://{folder}/rt", "mode=realtime", "speed=5", "command_timeout=0.2", long_run),
        "kill": TwinProcess(f"ipc://{folder}/kill", "mode=realtime", long_run),
        "term": TwinProcess(f"ipc://{folder}/term", "mode=realtime", long_run),
    }

    class Ready(dict):
        def __getitem__(self, name: str) -> TwinProcess:
            return dict.__getitem__(self, name).wait_ready()

    yield Ready(procs)
    for p in procs.values():  # all at once: each takes a second to exit (the interpreter unloads torch)
        if p.proc.poll() is None:
            p.proc.terminate()
    for p in procs.values():
        p.stop()


# ------------------------------------------------------------------------------------------------ protocol basics
def test_spec_and_reset_round_trip(twins):
    twin = twins["lockstep"]
    robot = twin.robot()
    try:
        assert isinstance(robot, Robot)
        spec, task = robot.spec(), get_task("crossing")
        env = task.make_env(robot.twin_info["env_kwargs"])
        assert (spec.obs_dim, spec.action_dim, spec.dt, spec.task) == (20, 2, task.info.dt, "crossing")
        assert spec.action_low == tuple(float(x) for x in env.action_space.low)
        assert spec.action_high == tuple(float(x) for x in env.action_space.high)
        assert spec.discrete_action_mask == (False, False)
        assert (spec.rules, spec.rule_defaults) == (task.info.rules, task.info.rule_defaults)
        assert robot.twin_info["mode"] == "lockstep" and robot.twin_info["endpoints"] == endpoints(twin.addr)
        assert robot.spec() is spec  # cached

        first = robot.reset(seed=11)
        want, info = env.reset(seed=11)
        assert isinstance(first, Observation) and np.array_equal(first.values, want)
        assert first.values.dtype == np.float32 and first.t == 0.0 and not first.done
        assert first.signals == info["signals"] and first.info["action"] == [] and first.info["held"] is None
        again = robot.reset(seed=11)
        assert again.seq > first.seq and np.array_equal(again.values, first.values)
        assert robot.observe(timeout=0.3) is None  # lock-step: nothing moves until a command comes
        with pytest.raises(RobotError, match="refused action"):
            robot.send(np.array([1.0, 0.0, 0.0]), again.seq)
        with pytest.raises(RobotError, match="unknown request"):
            robot.request("dance")
        env.close()
    finally:
        robot.close()


def test_connect_timeout_names_the_address(folder):
    addr = f"ipc://{folder}/nobody"
    robot = ZmqRobot(addr, connect_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(RobotError, match=f"{addr}.*did not answer"):
        robot.connect()
    assert time.monotonic() - t0 < 2.0
    robot.close()


# ------------------------------------------------------------------------------------------------ lock-step
def _lockstep_run(robot: ZmqRobot, task_name: str, seed: int, actions: np.ndarray) -> int:
    """Send ``actions`` through ``robot`` and check every observation against the env stepped in-process; returns the
    number of steps taken."""
    env = get_task(task_name).make_env(robot.twin_info["env_kwargs"])
    obs = robot.reset(seed=seed)
    want, _ = env.reset(seed=seed)
    assert np.array_equal(obs.values, want)
    for i, a in enumerate(actions):
        robot.send(a, obs.seq)
        nxt = robot.observe(timeout=5.0)
        assert nxt is not None and nxt.seq == obs.seq + 1, f"step {i}: {nxt}"
        want, _, terminated, truncated, info = env.step(a)
        assert np.array_equal(nxt.values, want), f"step {i}: twin and in-process env differ"
        assert nxt.signals == info["signals"] and nxt.done == (terminated or truncated)
        assert nxt.info["action"] == [float(x) for x in a] and nxt.t == pytest.approx((i + 1) * env.unwrapped.dt)
        obs = nxt
        if obs.done:
            break
    env.close()
    return i + 1


def test_lockstep_matches_env_in_process(twins):
    robot = twins["lockstep"].robot()
    try:
        rng = np.random.default_rng(0)
        actions = np.stack([rng.uniform(0.0, 1.2, 80), rng.uniform(-0.6, 0.6, 80)], axis=1).astype(np.float32)
        robot.stats(clear=True)
        n = _lockstep_run(robot, "crossing", 5, actions)
        assert n >= 40
        stats = robot.stats()
        assert stats["ticks"] == n and stats["commands_used"] == n and stats["holds"] == 0
        assert stats["command_age"]["hist"] == [[0, n]]  # every command acts on the state it was computed from
        assert _lockstep_run(robot, "crossing", 5, actions) == n  # and again: reproducible
    finally:
        robot.close()


def test_lockstep_pickplace_and_close_request(twins):
    twin = twins["pickplace"]
    robot = twin.robot()
    spec = robot.spec()
    assert (spec.obs_dim, spec.action_dim, spec.discrete_action_mask) == (22, 4, (False, False, False, True))
    first = robot.reset(seed=3)
    rng = np.random.default_rng(1)
    target = first.values[:3].astype(np.float64) + rng.uniform(-0.05, 0.05, (30, 3)).cumsum(axis=0) * 0.2
    grip = np.where(np.arange(30) < 15, -1.0, 1.0)
    assert _lockstep_run(robot, "pickplace", 3, np.column_stack([target, grip])) == 30
    robot.shutdown()
    assert twin.proc.wait(10) == 0
    assert "stopped (close request)" in "".join(twin.out)


# ------------------------------------------------------------------------------------------------ realtime
def test_latest_only_delivery(twins):
    """A reader that sleeps through ~30 ticks gets the newest observation next, not the one after its last."""
    robot = twins["realtime"].robot()
    try:
        period = robot.twin_info["period"]
        assert period == pytest.approx(0.02)
        first = robot.reset(seed=0)
        time.sleep(0.6)
        got = robot.observe(timeout=1.0)
        newest = robot.request("ping")["seq"]
        assert got.seq - first.seq >= 10  # the twin ticked on its own clock meanwhile
        assert newest - got.seq <= 2  # and the reader got (nearly) the newest, no backlog
        nxt = robot.observe(timeout=1.0)
        assert 1 <= nxt.seq - got.seq <= 3
    finally:
        robot.close()


def _observe_until(robot: ZmqRobot, predicate, timeout: float = 2.0) -> Observation:
    """The first new observation that satisfies ``predicate`` (ticks already under way may come first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obs = robot.observe(timeout=deadline - time.monotonic())
        if obs is not None and predicate(obs):
            return obs
    raise AssertionError(f"no such observation within {timeout} s; last: {robot.latest}")


def test_hold_on_command_timeout(twins):
    robot = twins["realtime"].robot()
    try:
        obs = robot.reset(seed=0)
        robot.stats(clear=True)
        t_end = time.monotonic() + 0.4  # 20 ticks (2 s of sim time) answering every observation at once
        while time.monotonic() < t_end:
            robot.send([1.0, 0.0], obs.seq)
            obs = robot.observe(timeout=1.0)
        assert obs.values[4] > 0.5 and obs.info["held"] is None  # driving
        time.sleep(1.0)  # no command for 50 ticks: the twin holds after command_timeout = 0.2 s
        stats = robot.stats()
        assert stats["timeouts"] == 1 and stats["holds_timeout"] >= 20
        assert stats["holds"] == stats["holds_no_command"] + stats["holds_timeout"]
        a = robot.observe(timeout=1.0)
        time.sleep(0.2)
        b = robot.observe(timeout=1.0)
        assert b.seq - a.seq >= 5 and b.info["held"] == "timeout" and b.info["action"] == [0.0, 0.0]
        assert abs(float(b.values[4])) < 1e-6 and abs(float(b.values[5])) < 1e-6  # stopped
        assert np.allclose(a.values[:2], b.values[:2], atol=1e-6)  # and staying where it stopped

        robot.send([0.5, 0.0], b.seq)  # a command moves it again (from the first tick after it arrives) ...
        assert _observe_until(robot, lambda o: o.info["held"] is None).info["action"] == [0.5, 0.0]
        robot.hold()  # ... and a hold request stops it, with no timeout to wait for
        assert _observe_until(robot, lambda o: o.info["held"] == "requested").info["action"] == [0.0, 0.0]
        assert robot.stats()["hold_requests"] == 1
    finally:
        robot.close()


def test_hold_actions_keep_robots_still():
    """The hold action of each task, stepped in-process: Crossing brakes to a standstill, PickPlace keeps its
    servo set-point and its grip (a held cube is not dropped)."""
    task = get_task("crossing")
    env = task.make_env()
    obs, _ = env.reset(seed=0)
    for _ in range(10):
        obs, *_ = env.step(np.array([1.5, 1.0]))
    for _ in range(15):
        obs, *_ = env.step(hold_action(task, obs))
    still, *_ = env.step(hold_action(task, obs))
    assert abs(still[4]) < 1e-9 and abs(still[5]) < 1e-9 and np.allclose(still[:4], obs[:4], atol=1e-9)
    env.close()

    task = get_task("pickplace")
    env = task.make_env()
    obs, _ = env.reset(seed=0)
    for _ in range(8):
        obs, *_ = env.step(np.append(obs[18:21] + [0.02, 0.0, -0.01], 1.0))
    set_point = obs[18:22].copy()
    for _ in range(20):
        obs, *_ = env.step(hold_action(task, obs))
    assert np.array_equal(obs[18:22], set_point)  # target and grip command kept
    assert np.linalg.norm(obs[3:6]) < 1e-3 and np.linalg.norm(obs[0:3] - obs[18:21]) < 5e-3
    env.close()


# ------------------------------------------------------------------------------------------------ failures
def test_observe_raises_when_twin_is_killed(twins):
    twin = twins["kill"]
    robot = twin.robot(stale_timeout=0.5)
    try:
        obs = robot.reset(seed=0)
        assert robot.observe(timeout=1.0).seq > obs.seq
        twin.proc.send_signal(signal.SIGKILL)
        twin.proc.wait(5)
        t0 = time.monotonic()
        with pytest.raises(RobotError, match=f"lost the sim twin at {twin.addr}"):
            while time.monotonic() - t0 < 5.0:
                robot.observe(timeout=0.05)  # None while not yet stale
        assert time.monotonic() - t0 <= 0.5 + 0.3
        robot.hold()  # always safe
    finally:
        robot.close()


def test_address_in_use_exits_2(twins):
    twin = twins["lockstep"]
    t0 = time.monotonic()
    proc = subprocess.run([*SERVE, f"addr={twin.addr}", "mode=lockstep"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"address {twin.addr}.req is in use" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 20  # refused before the task loads
    robot = twin.robot()  # the first twin still owns its address
    assert robot.request("ping")["ok"]
    robot.close()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        addr = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        proc = subprocess.run([*SERVE, f"addr={addr}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"address {addr} is in use" in proc.stderr, proc.stderr


def test_bad_settings_exit_2(folder):
    proc = subprocess.run([*SERVE, f"addr=ipc://{folder}/bad", "mode=fast"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "stlflow serve-sim: mode must be one of" in proc.stderr, proc.stderr
    for options, message in (({"speed": 0}, "speed must be a number > 0"),
                             ({"addr": "udp://x"}, "use ipc://PATH or tcp://HOST:PORT"),
                             ({"addr": "tcp://localhost:65535"}, "port in 1..65533")):
        with pytest.raises(TwinError, match=message):
            SimTwin("crossing", **{"addr": f"ipc://{folder}/bad", **options})
    twin = SimTwin("crossing", f"ipc://{folder}/no/such/folder/x")
    with pytest.raises(TwinError, match="does not exist"):
        twin.bind()


def test_twin_exits_on_sigterm(twins, folder):
    twin = twins["term"]  # it started over a stale socket file left at its address (see the fixture)
    robot = twin.robot()
    try:
        robot.reset(seed=0)
        twin.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        with pytest.raises(RobotError, match=f"the sim twin at {twin.addr} shut down"):
            while time.monotonic() - t0 < 5.0:
                robot.observe(timeout=0.1)
        assert time.monotonic() - t0 < 1.0  # its last message said so at once
        assert twin.proc.wait(10) == 0
        assert "stopped (SIGTERM)" in "".join(twin.out)
        assert not any(os.path.exists(ep[len("ipc://"):]) for ep in endpoints(twin.addr).values())
    finally:
        robot.close()
