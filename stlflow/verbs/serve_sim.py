"""Serve a MuJoCo task as a sim twin over ZeroMQ: the robot side of ``stlflow control`` without a robot.

    stlflow serve-sim env=crossing addr=ipc:///tmp/x [mode=realtime|lockstep] [speed=1.0] [command_timeout=0.5]
    stlflow serve-sim env=pickplace addr=tcp://127.0.0.1:5555 mode=lockstep

The task runs in this process and publishes observations (PUB), takes commands (PULL) and answers requests
(REP: reset, spec, stats, ping, close) on three endpoints derived from `addr` (ipc://PATH -> PATH.req, PATH.obs,
PATH.cmd; tcp://HOST:PORT -> PORT, PORT+1, PORT+2), printed at start. `mode=realtime` steps the env every
dt/speed seconds with the newest command and holds the robot still when commands stop for `command_timeout`
seconds; `mode=lockstep` steps once per command, so runs are reproducible. Clients: stlflow.control.zmq_robot.
ZmqRobot; the protocol is documented in stlflow.control.twin. Stops on Ctrl-C, SIGTERM or a `close` request
(exit status 0); an address in use or a bad setting is one line on stderr and exit status 2.
"""

from __future__ import annotations

import signal

from stlflow.config import plain, run_job, verb_config


def _config(argv: list[str]):
    """The composed ``serve_sim`` config, or None after printing --help."""
    return verb_config("serve-sim", argv, __doc__, config_name="serve_sim")


def main(argv: list[str]) -> int:
    cfg = _config(argv)
    if cfg is None:
        return 0
    from stlflow.control.twin import SimTwin

    stop: list[int] = []

    def on_signal(signum, frame) -> None:
        stop.append(signum)

    def run() -> int:
        seed = cfg.get("seed")
        twin = SimTwin(str(cfg.env.name), str(cfg.addr), mode=str(cfg.mode), speed=cfg.speed,
                       command_timeout=cfg.command_timeout, heartbeat=cfg.heartbeat,
                       seed=None if seed is None else int(seed), env_kwargs=plain(cfg.env.get("kwargs") or {}))
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            bound = twin.bind()
            for role, what in (("req", "requests (REP)"), ("obs", "observations (PUB)"), ("cmd", "commands (PULL)")):
                print(f"stlflow serve-sim: {what:19s} {bound[role]}", flush=True)
            twin.load()
            spec = twin.spec
            print(f"stlflow serve-sim: serving {twin.task.name} ({twin.task.env_id}) {twin.mode} at {twin.speed:g}x: "
                  f"dt {spec.dt:g} s, tick every {twin.period:g} s, obs {spec.obs_dim}, action {spec.action_dim}; "
                  f"stop with Ctrl-C, SIGTERM or a close request", flush=True)
            twin.serve(lambda: bool(stop))
            stats = twin.stats()
        finally:
            twin.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        why = signal.Signals(stop[0]).name if stop else "close request"
        print(f"stlflow serve-sim: stopped ({why}) after {stats['ticks']} ticks, {stats['resets']} resets, "
              f"{stats['commands']} commands, {stats['holds']} holds", flush=True)
        return 0

    return run_job("serve-sim", run)
