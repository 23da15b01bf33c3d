"""The robot control loop (`stlflow control`): timing, equivalence with lock-step evaluation, and faults.

    python benchmarks/control_loop.py [--seconds 60] [--seeds 50] [--ckpt DIR] [--train-steps 1500] [--skip a,b,c]
        [--rates 100,50] [--workers thread,process] [--robots sim,zmq]

(a) timing: Crossing in realtime mode at 100 Hz (speed 10: dt/speed = 10 ms) and 50 Hz, RTI (k=2, a plan every
    tick: the most inference work) on the inference worker, for --seconds each, with and without SCHED_FIFO
    (rt_priority=1), the worker a thread of the loop's process or an InferenceProcess, the robot the in-process
    SimRobot (its stepping thread shares the loop's GIL) or a serve-sim twin process over ipc: lateness p50 / p99 /
    max and overruns (ticks later than 10% of the period), with the load average (other jobs on the machine) at
    the end of each row and the host's steal time during it (ms per second: the time the hypervisor ran something
    else while this machine's vCPUs were runnable, from /proc/stat). "refused" where the OS refuses SCHED_FIFO.
    The anchor, before each rate's rows: a bare loop (`benchmarks/bare_loop.py`: a sleep-then-spin loop in a fresh
    interpreter, no package code, nothing else to do) at the same rate and priority: the lateness this machine
    gives any loop.
(b) equivalence: the same policy and the shipped RTI over --seeds seeds, lock-step `evaluate(EvalJob(..., delay=1))`
    against `stlflow control robot=zmq` on a `serve-sim` twin at 5x real time (speed=5, 50 Hz; the loop and the
    inference process at SCHED_FIFO --eq-rt-priority), with the inference process and with a thread: success
    rates, plan delay and command age p50 (the loop's and the twin's count), ticks per plan, e-stops. The policy
    is --ckpt, or one trained here (expert demos + a short flow training run).
(c) faults, each with the time to a safe state: the twin killed, the control process SIGKILLed, the inference
    worker raising, a NaN action, SIGINT.

Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from stlflow.control.clock import host_steal_seconds
from stlflow.control.controllers import ControllerSpec
from stlflow.control.realtime import RealtimeLoop
from stlflow.control.robot_run import RobotJob, run
from stlflow.control.sim_robot import SimRobot
from stlflow.control.zmq_robot import ZmqRobot

TASK = "crossing"
PY = [sys.executable, "-m", "stlflow"]
ENV = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}


# ------------------------------------------------------------------------------------------------ helpers
def slow_policy(seed: int = 0):
    """A small untrained flow policy whose actions are slow (the episode outlasts a timing run)."""
    from stlflow.datasets import Normalizer
    from stlflow.policy import Policy

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    norm = Normalizer.fit({"obs": rng.normal(size=(100, 20)), "action": rng.uniform((0, -0.1), (0.2, 0.1), (100, 2))})
    return Policy(20, 2, n_obs_steps=2, horizon=8, n_action_steps=4, head={"kind": "flow"},
                  net={"name": "mlp", "width": 64, "n_blocks": 2, "time_embed_dim": 16}, normalizer=norm).eval()


def trained_policy(folder: Path, steps: int) -> str:
    """Expert demonstrations and a short training run; returns the checkpoint folder."""
    from stlflow.control.collect import collect
    from stlflow.control.jobs import CollectJob, TrainJob, policy_config
    from stlflow.control.training import train_policy

    data = folder / "demos.zarr"
    collect(CollectJob(TASK, 60, data, seed=0, workers=min(8, os.cpu_count() or 1), progress=False))
    train = {"steps": steps, "batch_size": 128, "warmup_steps": min(100, steps // 10), "ckpt_every": 0,
             "eval_every": 0, "val_every": max(1, steps // 2), "progress": False, "tensorboard": False,
             "threads": min(8, os.cpu_count() or 1)}
    train_policy(TrainJob(TASK, data, folder / "ckpt", policy=policy_config(), train=train, log=lambda *_: None))
    return str(folder / "ckpt")


def start_twin(addr: str, *overrides: str) -> subprocess.Popen:
    proc = subprocess.Popen([*PY, "serve-sim", f"env={TASK}", f"addr={addr}", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    wait_for(lines, "serving", proc)
    proc.lines = lines  # type: ignore[attr-defined]
    return proc


def wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} never came (rc {proc.poll()}):\n{''.join(lines)}")
        time.sleep(0.01)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ (a) timing
def load() -> str:
    """The 1 / 5 / 15-minute load averages (runnable processes; the machine's cores: os.cpu_count())."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def steal_rate(start: float, seconds: float) -> float:
    """Host steal time in ms per second of wall time since ``start`` (a :func:`host_steal_seconds` reading)."""
    return (host_steal_seconds() - start) * 1e3 / max(seconds, 1e-9)


def bare_row(rate: int, prio: int | None, seconds: float) -> str:
    """The anchor row of (a): ``benchmarks/bare_loop.py`` at ``rate`` Hz and ``prio`` for ``seconds``."""
    s0, t0 = host_steal_seconds(), time.perf_counter()
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("bare_loop.py")), str(1.0 / rate), str(seconds),
                        str(prio or 0)], capture_output=True, text=True)
    steal = steal_rate(s0, time.perf_counter() - t0)
    if r.returncode != 0:
        granted = "refused" if "Operation not permitted" in r.stderr else "failed"
        return f"{rate:>4}Hz {'bare loop (anchor)':>21} {granted:>12}  {r.stderr.strip()[-200:]}"
    lat = np.array([float(x) for x in r.stdout.split()]) * 1e3
    p50, p99 = np.percentile(lat, [50, 99])
    return (f"{rate:>4}Hz {'bare loop (anchor)':>21} {'SCHED_FIFO 1' if prio else 'off':>12} {'-':>8} {lat.size:>6} "
            f"{p50:>12.3f} {p99:>12.3f} {lat.max():>12.3f} {int(np.sum(lat > 100.0 / rate)):>9} {'-':>7} "
            f"{'-':>13} {load():>16} {steal:>10.1f}")


def timing(seconds: float, rates: list[int], workers: list[str], robots: list[str]) -> None:
    """Rows of (a): consecutive episodes (seeds 0, 1, ...) until ``seconds`` of ticking, their ticks pooled."""
    print(f"(a) timing: Crossing realtime, RTI k=2 planning every tick on its worker, {seconds:g} s per row (episodes "
          f"in a row); {os.cpu_count()} cores, load average {load()} at the start")
    print("    robot sim: SimRobot stepping on a thread of the loop's process; zmq: a serve-sim twin process over ipc")
    print("    worker thread: the controller on a thread of the loop's process; process: InferenceProcess (own core)")
    print("    steal: ms per second that the hypervisor kept this machine's runnable vCPUs (both) from running")
    print(f"{'rate':>6} {'robot / worker':>21} {'rt_priority':>12} {'episodes':>8} {'ticks':>6} "
          f"{'late p50 ms':>12} {'late p99 ms':>12} {'late max ms':>12} {'overruns':>9} {'missed':>7} "
          f"{'infer p50 ms':>13} {'load 1/5/15 min':>16} {'steal ms/s':>10}")
    policy = slow_policy()
    folder = Path(tempfile.mkdtemp(prefix="ctlt-", dir="/tmp"))
    for rate in rates:
        for prio in (None, 1):
            print(bare_row(rate, prio, seconds), flush=True)
        for robot in robots:
            for worker in workers:
                for prio in (None, 1):
                    print(timing_row(policy, robot, worker, rate, prio, seconds, folder), flush=True)


def _timing_robot(kind: str, rate: int, prio: int | None, folder: Path):
    """A connected robot for (a) and what to call when the row is done (the sim's thread at the loop's priority)."""
    if kind == "sim":
        robot = SimRobot(TASK, realtime=True, speed=rate * 0.1, env_kwargs={"max_steps": 10**7}, rt_priority=prio)
        robot.connect()
        return robot, robot.close
    twin = start_twin(f"ipc://{folder}/t{rate}", "mode=realtime", f"speed={rate * 0.1:g}",
                      "env.kwargs.max_steps=10000000")
    robot = ZmqRobot(f"ipc://{folder}/t{rate}")
    robot.connect()

    def close() -> None:
        robot.close()
        stop(twin)

    return robot, close


def timing_row(policy, robot_kind: str, worker_kind: str, rate: int, prio: int | None, seconds: float,
               folder: Path) -> str:
    """One row of (a): episodes until ``seconds`` have passed or an e-stop; lateness over all their ticks."""
    from stlflow.control.inference import InferenceProcess
    from stlflow.control.robot_run import EpisodeController
    from stlflow.policy.rti import RTIController

    late, infer, overruns, missed, ticks, episodes, granted, estop = [], [], 0, 0, 0, 0, "off", None
    s0, t0 = host_steal_seconds(), time.perf_counter()
    robot, close = _timing_robot(robot_kind, rate, prio, folder)
    period = robot.spec().period
    process = None
    if worker_kind == "process":
        process = InferenceProcess(EpisodeController(ControllerSpec.create("rti", k=2), policy), period, priority=prio)
        process.start()
    try:
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end and estop is None:
            ctrl = None if process else RTIController(policy, k=2, seed=episodes)
            loop = RealtimeLoop(robot, ctrl, obs_wait=0.3 * period, rt_priority=prio, worker=process)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res = loop.run(episodes, duration=max(t_end - time.monotonic(), period))
            t = res.ticks
            late.append(np.asarray(t["lateness"], np.float64))
            infer.append(np.where(t["plan_seq"] >= 0, t["infer_s"], np.nan))
            overruns, missed = overruns + res.counters["late"], missed + res.counters["missed"]
            ticks, episodes, estop = ticks + res.length, episodes + 1, res.estop
            if prio is not None:
                granted = "SCHED_FIFO 1" if res.counters["rt_priority"] else "refused"
    finally:
        if process is not None:
            process.stop()
        close()
    steal = steal_rate(s0, time.perf_counter() - t0)
    lat = np.concatenate(late) * 1e3
    inf = np.concatenate(infer) * 1e3
    inf = inf[np.isfinite(inf)]
    p50, p99 = np.percentile(lat, [50, 99])
    return (f"{rate:>4}Hz {f'{robot_kind} / {worker_kind}':>21} {granted:>12} {episodes:>8} {ticks:>6} {p50:>12.3f} "
            f"{p99:>12.3f} {lat.max():>12.3f} {overruns:>9} {missed:>7} "
            f"{np.median(inf) if inf.size else float('nan'):>13.3f} {load():>16} {steal:>10.1f}"
            + (f"  e-stop: {estop}" if estop else ""))


# ------------------------------------------------------------------------------------------------ (b) equivalence
def _ticks_per_plan(episodes: list[dict]) -> float:
    return sum(e["ticks"] for e in episodes) / max(1, sum(e["safety"].get("plans", 0) for e in episodes))


def _twin_age_p50(episodes: list[dict]) -> float:
    """Median command age on the twin's count (ticks from the state a command was computed from to the state it is
    applied to), over every command of every episode."""
    hist: dict[int, int] = {}
    for e in episodes:
        for age, n in (e.get("twin") or {}).get("command_age", {}).get("hist", []):
            hist[int(age)] = hist.get(int(age), 0) + int(n)
    if not hist:
        return float("nan")
    ages = np.repeat(list(hist), list(hist.values()))
    return float(np.percentile(ages, 50))


def equivalence(ckpt: str, seeds: int, folder: Path, what: str, workers: list[str], prio: int | None) -> None:
    from stlflow.control.evaluate import evaluate
    from stlflow.control.jobs import EvalJob, controller_defaults

    spec = ControllerSpec.create("rti", **controller_defaults("rti", TASK))
    print(f"\n(b) equivalence over {seeds} seeds (1000..), policy: {what}; controller: {spec.label()} (the shipped "
          f"one); load average {load()} at the start")
    t0 = time.perf_counter()
    rep = evaluate(EvalJob(TASK, ckpt, spec, seeds, seed=1000, delay=1, progress=False,
                           workers=min(8, os.cpu_count() or 1)))
    t_eval = time.perf_counter() - t0
    print("    cmd age: ticks from the tick of the observation a command was planned from to the tick it is applied "
          "(loop: the plan's age when sent; twin: counted where it lands)")
    print("    plan delay: ticks from a plan's observation to its first command (lock-step: the delay, 1); cmd age "
          "then runs up to the plan's last tick")
    interval, _ = spec.worker_schedule(1)
    print(f"{'run':<52} {'success':>8} {'plan delay p50':>15} {'cmd age p50':>12} {'twin age p50':>13} "
          f"{'ticks/plan':>11} {'e-stops':>8} {'wall s':>7} {'load 1/5/15 min':>16}")
    print(f"{'evaluate lock-step, delay=1':<52} {rep.metrics['success_rate']:>8.1%} {1:>15} "
          f"{np.median(np.arange(1, interval + 1)):>12.1f} {'-':>13} {interval:>11.2f} {'-':>8} {t_eval:>7.1f} "
          f"{load():>16}", flush=True)
    fifo = f", FIFO {prio}" if prio else ""
    for worker in workers:
        addr = f"ipc://{folder}/eq-{worker}"
        twin = start_twin(addr, "mode=realtime", "speed=5")
        try:
            t0 = time.perf_counter()
            out = folder / f"eq_out_{worker}"
            r = subprocess.run([*PY, "control", f"ckpt={ckpt}", "robot=zmq", f"addr={addr}", "mode=realtime",
                                "speed=5", "rate_hz=50", "controller=rti", f"inference={worker}", f"episodes={seeds}",
                                "seed=1000", f"out={out}", *([f"rt_priority={prio}"] if prio else [])],
                               capture_output=True, text=True, env=ENV)
            t_zmq = time.perf_counter() - t0
        finally:
            stop(twin)
        if r.returncode != 0:
            print(f"  stlflow control inference={worker} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
            continue
        report = json.loads((out / "report.json").read_text())
        agg, eps = report["aggregate"], report["episodes"]
        print(f"{f'stlflow control robot=zmq, twin 5x, {worker}{fifo}':<52} {agg['success_rate']:>8.1%} "
              f"{report['plan_delay_ticks_p50']:>15.0f} {agg['command_age_ticks_p50']:>12.1f} "
              f"{_twin_age_p50(eps):>13.1f} {_ticks_per_plan(eps):>11.2f} "
              f"{agg['estops']:>8} {t_zmq:>7.1f} {load():>16}", flush=True)


# ------------------------------------------------------------------------------------------------ (c) faults
class Faulty:
    """An RTI controller that raises (``mode='raise'``) on its ``at``-th call, or a one-action controller that
    returns NaN for calls ``at .. at+n-1`` (``mode='nan'``); ``when`` is the perf_counter time of the fault."""

    def __init__(self, inner, mode: str, at: int, n: int = 3) -> None:
        self.inner, self.mode, self.at, self.n, self.calls, self.when = inner, mode, at, n, 0, None
        if mode == "raise":
            self.plan = inner.plan

    def reset(self, seed=None, obs=None):
        self.calls = 0
        return self.inner.reset(seed=seed, obs=obs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Raising(Faulty):
    def act(self, obs, elapsed=0, t=None):
        self.calls += 1
        if self.calls == self.at:
            self.when = time.perf_counter()
            raise RuntimeError("injected inference failure")
        return self.inner.act(obs, elapsed=elapsed, t=t)


class NaNs(Faulty):
    def act(self, obs):
        self.calls += 1
        a = np.asarray(self.inner.act(obs), np.float64)
        if self.at <= self.calls < self.at + self.n:
            self.when = self.when or time.perf_counter()
            return np.full_like(a, np.nan)
        return a


def _episodes(out: Path) -> int:
    from stlflow.datasets import EpisodeStore

    with EpisodeStore.open(out / "episodes.zarr") as store:
        return len(store)


def fault_twin_killed(folder: Path, policy) -> tuple[str, str, str, str]:
    """1. the twin killed: the loop's robot is lost -> e-stop; time from the kill to the e-stop tick."""
    addr = f"ipc://{folder}/kill"
    twin = start_twin(addr, "mode=realtime", "speed=1", "env.kwargs.max_steps=100000")
    box: dict = {}
    stale = 0.5
    job = RobotJob(TASK, robot="zmq", addr=addr, policy=policy, controller=ControllerSpec.create("rti", k=2),
                   out=folder / "f_kill", rate_hz=10, speed=1, mode="realtime", stale_timeout=stale,
                   handle_signals=False)
    th = threading.Thread(target=lambda: box.update(result=run(
        job, policy=policy, on_start=lambda s: box.update(started=time.perf_counter()),
        on_episode=lambda rec: box.update(ended=time.perf_counter()))))
    th.start()
    while "started" not in box:
        time.sleep(0.01)
    time.sleep(1.5)
    t_kill = time.perf_counter()
    twin.kill()
    twin.wait()
    th.join(30)
    res = box["result"]
    ep = res.report["episodes"][0]
    # the episode's end (just after its e-stop tick) bounds the time to the safe state from above
    t_safe = box["ended"] - t_kill
    n = _episodes(folder / "f_kill")
    return ("twin SIGKILLed", f"e-stop ({ep['estop'][:60]}...)", f"<= {t_safe:.3f} s (stale_timeout {stale} "
            f"+ 1 tick = {stale + 0.1:.1f} s)", f"store opens, {n} episode")


def fault_control_killed(folder: Path, ckpt: str) -> tuple[str, str, str, str]:
    """2. the control process SIGKILLed: the twin holds after its command timeout."""
    addr = f"ipc://{folder}/ctl"
    cmd_timeout = 0.3
    twin = start_twin(addr, "mode=realtime", "speed=1", f"command_timeout={cmd_timeout}",
                      "env.kwargs.max_steps=100000")
    try:
        watcher = ZmqRobot(addr)
        watcher.connect()
        ctl = subprocess.Popen([*PY, "control", f"ckpt={ckpt}", "robot=zmq", f"addr={addr}", "mode=realtime",
                                "speed=1", "rate_hz=10", f"out={folder / 'f_ctl'}"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=ENV)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(ctl.stdout.readline, "")), daemon=True).start()
        wait_for(lines, "running on robot=zmq", ctl)
        time.sleep(1.5)
        t_kill = time.perf_counter()
        ctl.kill()
        ctl.wait()
        held = None
        while time.perf_counter() - t_kill < 5:
            o = watcher.observe(0.2)
            if o is not None and o.info.get("held") == "timeout":
                held = time.perf_counter() - t_kill
                break
        watcher.close()
        return ("control process SIGKILLed", "twin holds (command timeout)",
                f"{held:.3f} s (command_timeout {cmd_timeout} + 1 tick = {cmd_timeout + 0.1:.1f} s)"
                if held is not None else "no hold seen in 5 s", "-")
    finally:
        stop(twin)


def fault_inference_raises(folder: Path, policy) -> tuple[str, str, str, str]:
    """3. the inference worker raising: e-stop on the next tick, traceback in the report."""
    from stlflow.policy.rti import RTIController

    holder: dict = {}

    def raising(robot, seed):
        holder["c"] = Raising(RTIController(policy, k=2, seed=seed), "raise", at=20)
        return holder["c"]

    job = RobotJob(TASK, robot="sim", policy=policy, out=folder / "f_raise", rate_hz=10, speed=1, mode="realtime",
                   env_kwargs={"max_steps": 100000}, handle_signals=False)
    ended: list[float] = []
    res = run(job, policy=policy, controller_factory=raising, on_episode=lambda rec: ended.append(time.perf_counter()))
    ep = res.report["episodes"][0]
    t_safe = ended[0] - holder["c"].when
    return ("inference worker raises", f"e-stop ({ep['estop'][:50]})",
            f"<= {t_safe:.3f} s (period 0.1 s)",
            "traceback in report" if ep["failure"] and "Traceback" in ep["failure"] else "NO traceback")


def fault_nan_action(folder: Path) -> tuple[str, str, str, str]:
    """4. a NaN action: held on that tick, counted, the run goes on."""
    def nans(robot, seed):
        return NaNs(robot.env.unwrapped.make_expert(seed), "nan", at=10, n=3)

    job = RobotJob(TASK, robot="sim", controller=ControllerSpec.create("expert"), out=folder / "f_nan", rate_hz=10,
                   mode="lockstep", env_kwargs={"max_steps": 40}, handle_signals=False)
    ep = run(job, controller_factory=nans).report["episodes"][0]
    return ("NaN action (3 ticks)", f"hold ({ep['sources']['hold']} ticks held, {ep['safety']['nonfinite']} "
            f"non-finite counted)", "0 ticks (the same tick holds)",
            f"complete={ep['complete']}, {ep['ticks']} ticks")


def fault_sigint(folder: Path, ckpt: str) -> tuple[str, str, str, str]:
    """5. SIGINT: exit 130, partial episode saved."""
    out = folder / "f_int"
    proc = subprocess.Popen([*PY, "control", f"ckpt={ckpt}", "robot=sim", "mode=realtime", "rate_hz=10",
                             "episodes=3", f"out={out}", "env.kwargs.max_steps=100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    wait_for(lines, "running on robot=sim", proc)
    time.sleep(1.5)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
    t_exit = time.perf_counter() - t0
    from stlflow.datasets import EpisodeStore

    with EpisodeStore.open(out / "episodes.zarr") as store:
        attrs = store.episode_attrs(len(store) - 1) if len(store) else {}
    return ("SIGINT", f"exit {rc}", f"e-stop on the next tick; process exit after {t_exit:.2f} s",
            f"partial episode saved: complete={attrs.get('complete')}, {attrs.get('length')} ticks")


def faults(folder: Path, ckpt: str) -> None:
    from stlflow.control.evaluate import load_policy

    print("\n(c) faults (time to a safe state)")
    rows = []
    policy = load_policy(ckpt)
    rows.append(fault_twin_killed(folder, policy))
    rows.append(fault_control_killed(folder, ckpt))
    rows.append(fault_inference_raises(folder, policy))
    rows.append(fault_nan_action(folder))
    rows.append(fault_sigint(folder, ckpt))

    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in [("fault", "reaction", "time to safe state", "after"), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, width)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds per timing row (a)")
    ap.add_argument("--seeds", type=int, default=50, help="seeds of the equivalence run (b)")
    ap.add_argument("--ckpt", default=None, help="policy checkpoint (default: one trained here)")
    ap.add_argument("--train-steps", type=int, default=1500, help="training steps when no --ckpt is given")
    ap.add_argument("--rates", default="100,50", help="rates (Hz) of the timing rows (a)")
    ap.add_argument("--workers", default="thread,process", help="inference workers of the timing rows (a)")
    ap.add_argument("--robots", default="sim,zmq", help="robots of the timing rows (a): sim (in-process), zmq (twin)")
    ap.add_argument("--eq-workers", default="process,thread", help="inference workers of the twin rows of (b)")
    ap.add_argument("--eq-rt-priority", type=int, default=1, help="rt_priority of the twin rows of (b) (0: none)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    args = ap.parse_args()
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))
    folder = Path(tempfile.mkdtemp(prefix="ctlb-", dir="/tmp"))
    if "a" not in skip:
        timing(args.seconds, [int(r) for r in args.rates.split(",")], args.workers.split(","), args.robots.split(","))
    ckpt, what = args.ckpt, f"--ckpt {args.ckpt}"
    if ckpt is None and not {"b", "c"} <= skip:
        t0 = time.perf_counter()
        ckpt = trained_policy(folder, args.train_steps)
        what = (f"trained here ({args.train_steps} steps on 60 expert demos, {time.perf_counter() - t0:.0f} s; "
                f"no --ckpt given)")
    if "b" not in skip:
        equivalence(ckpt, args.seeds, folder, what, args.eq_workers.split(","), args.eq_rt_priority or None)
    if "c" not in skip:
        faults(folder, ckpt)


if __name__ == "__main__":
    main()
