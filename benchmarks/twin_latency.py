"""Benchmark the sim twin (``stlflow serve-sim``) and its client ``ZmqRobot``: transport latency and command age.

    python benchmarks/twin_latency.py [--transport ipc tcp] [--requests 1000] [--hz 100] [--seconds 10]

Starts one twin per transport as a real ``python -m stlflow serve-sim`` subprocess (Crossing, realtime, speed chosen
so that it ticks at ``--hz``: 10 x its 10 Hz for 100 Hz) and prints:

- request/reply round trip (a ``ping`` request; ``--requests`` of them): p50, p99, max in microseconds;
- observation delivery (publish time stamped by the twin to ``observe`` returning it, same host clock): p50, p99;
- command age at the twin for a client that answers each observation at once with one command, over ``--seconds``
  of realtime ticking: the histogram of ages in ticks (0: the command acted on the state it was computed from; 1:
  the twin ticked once before it landed), p50/p99/max; the same per tick (a tick that reuses the newest command
  because no newer one arrived in time applies an older one); the twin's ticks, holds, overruns and tick lateness.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stlflow.control.zmq_robot import ZmqRobot


def start_twin(addr: str, hz: float) -> subprocess.Popen:
    speed = hz * 0.1  # Crossing's dt is 0.1 s
    proc = subprocess.Popen([sys.executable, "-m", "stlflow", "serve-sim", "env=crossing", f"addr={addr}",
                             "mode=realtime", f"speed={speed:g}", "env.kwargs.max_steps=1000000"],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "serving" in line:
            return proc
    raise SystemExit(f"the twin at {addr} did not start (exit status {proc.wait()})")


def quantiles_us(x: list[float]) -> str:
    a = np.asarray(x) * 1e6
    return f"p50 {np.percentile(a, 50):7.0f} us   p99 {np.percentile(a, 99):7.0f} us   max {a.max():7.0f} us"


def measure(addr: str, requests: int, seconds: float) -> None:
    robot = ZmqRobot(addr, connect_timeout=60.0)
    robot.connect()
    for _ in range(50):  # warm-up
        robot.request("ping")
    rtt = []
    for _ in range(requests):
        t0 = time.perf_counter()
        robot.request("ping")
        rtt.append(time.perf_counter() - t0)
    print(f"  request/reply round trip ({requests} pings):  {quantiles_us(rtt)}")

    hold = np.zeros(robot.spec().action_dim)
    robot.stats(clear=True)
    obs = robot.reset(seed=0)
    robot.send(hold, obs.seq)  # the reset's observation comes in the reply; answer it too
    delivery = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        nxt = robot.observe(timeout=1.0)
        if nxt is None:
            continue
        delivery.append(time.time() - nxt.info["wall"])
        obs = nxt
        robot.send(hold, obs.seq)  # answer at once: computed from the observation just received
    stats = robot.stats()
    print(f"  observation delivery (publish -> observe):  {quantiles_us(delivery)}")
    age = stats["command_age"]
    hist = ", ".join(f"{a}: {n}" for a, n in age["hist"])
    hz = 1 / robot.twin_info["period"]
    print(f"  command age at the twin ({age['n']} commands over {seconds:g} s at {hz:g} Hz): "
          f"p50 {age['p50']} p99 {age['p99']} max {age['max']} ticks, mean {age['mean']:.4f}; histogram {{{hist}}}")
    age = stats["applied_age"]
    hist = ", ".join(f"{a}: {n}" for a, n in age["hist"])
    print(f"  age of the command applied on each tick ({age['n']} ticks, repeats included): p50 {age['p50']} "
          f"p99 {age['p99']} max {age['max']} ticks, mean {age['mean']:.4f}; histogram {{{hist}}}")
    print(f"  twin: {stats['ticks']} ticks, {stats['commands']} commands ({stats['superseded']} superseded, "
          f"{stats['dropped']} dropped), {stats['holds']} holds ({stats['holds_no_command']} before the first command, "
          f"{stats['holds_timeout']} on timeout), {stats['repeats']} ticks reusing a command, {stats['overruns']} "
          f"overruns; tick lateness p50 {stats['late']['p50'] * 1e6:.0f} us p99 {stats['late']['p99'] * 1e6:.0f} us "
          f"max {stats['late']['max'] * 1e6:.0f} us")
    robot.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", nargs="+", default=["ipc", "tcp"], choices=["ipc", "tcp"])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--hz", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=47311, help="first of the three tcp ports")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="twin-", dir="/tmp") as tmp:
        for transport in args.transport:
            addr = f"ipc://{Path(tmp) / 'bench'}" if transport == "ipc" else f"tcp://127.0.0.1:{args.port}"
            proc = start_twin(addr, args.hz)
            try:
                print(f"{transport}: {addr}")
                measure(addr, args.requests, args.seconds)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
