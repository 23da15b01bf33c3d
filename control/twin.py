"""The MuJoCo sim twin: a task's env in its own process, served over ZeroMQ like a robot (``stlflow serve-sim``).

The twin is the server side of :class:`stlflow.control.zmq_robot.ZmqRobot`; together they let the control loop
drive a simulator exactly as it would drive a real arm (a separate process with its own clock, a network in
between, observations that age while the policy thinks).

The sockets, the addresses and the messages (the wire format) are documented in
:mod:`stlflow.control.twin_protocol`; :func:`endpoints`, :func:`pack`, :func:`unpack`, :class:`TwinError` and
:data:`PROTOCOL` are importable from here too.

Modes
    ``realtime``: after a reset the env is stepped every ``period = dt / speed`` wall seconds on absolute
    deadlines (``t_reset + k * period``; a tick that is late by whole periods skips them rather than bursting, and
    counts an overrun) with the newest command received. A command is used from its first tick until a newer one
    arrives; if none arrived for ``command_timeout`` wall seconds, or none since the reset, or the client asked to
    hold, the tick applies the task's hold action (:func:`hold_action`) and counts a hold.
    ``lockstep``: the env steps once per action command, in arrival order, and never otherwise: a client that
    sends the same actions after the same seeded reset gets the same observations as the env stepped in-process.
    A hold command is counted but does not step (the simulated robot does not move while nobody commands it).

    In both modes a command computed from an observation of an earlier episode (``obs_seq`` below the seq of the
    newest reset) or arriving after the episode ended is dropped and counted, and a malformed one is rejected and
    counted (the twin keeps running). The command age recorded when a command lands is ``seq of the state it is
    applied to - obs_seq``: the ticks from the tick of the observation it was planned from to the tick it is
    applied (the convention of the control loop's report too, :mod:`stlflow.control.robot_run`): 0 when it acts on
    the very state it was computed from (always so in lock-step), 1 when the twin ticked once in between (a command
    sent right after the next observation arrived, as the wall-clock loop sends them).

Shutdown: SIGTERM / SIGINT (the verb turns them into ``should_stop``), or a ``close`` request. The twin publishes
``{"closed": True}``, closes its sockets (which removes its ipc socket files) and returns; the verb exits 0. An
address in use is a :class:`TwinError` (the verb: one line on stderr, exit status 2), found before the task loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zmq

from stlflow.control.robot import HOLD_ACTIONS
from stlflow.control.robot import hold_action as _robot_hold_action
from stlflow.control.twin_protocol import (
    IPC_PATH_MAX,
    PROTOCOL,
    ROLES,
    TwinError,
    check_ipc_free,
    endpoints,
    pack,
    unpack,
)

__all__ = ["HOLDS", "IPC_PATH_MAX", "MODES", "PROTOCOL", "ROLES", "SimTwin", "TwinError", "endpoints", "hold_action",
           "pack", "unpack"]

MODES = ("realtime", "lockstep")


# ------------------------------------------------------------------------------------------------ hold actions
HOLDS = HOLD_ACTIONS
"""Task name -> hold action of an observation: the one table, :data:`stlflow.control.robot.HOLD_ACTIONS`."""


def hold_action(task: Any, obs: np.ndarray) -> np.ndarray:
    """The action that keeps ``task``'s robot still at observation ``obs`` (Do,):
    :func:`stlflow.control.robot.hold_action`; a task with none is a :class:`TwinError`."""
    try:
        return _robot_hold_action(task, obs)
    except ValueError as err:
        raise TwinError(str(err)) from err


# ------------------------------------------------------------------------------------------------ the server
@dataclass
class _Command:
    action: np.ndarray
    obs_seq: int
    arrival: float  # perf_counter
    used: bool = False


class SimTwin:
    """A task's env served over ZeroMQ (see the module docstring for the protocol and the two modes).

    Use: ``twin = SimTwin("crossing", "ipc:///tmp/x"); twin.bind(); twin.load(); twin.serve(should_stop);
    twin.close()``. :meth:`bind` comes first so that an address in use fails before the task (and torch) loads.

    Args:
        env: task name (``stlflow.control.tasks`` registry) or gymnasium id.
        addr: ``ipc://PATH`` or ``tcp://HOST:PORT`` (:func:`endpoints`).
        mode: ``realtime`` or ``lockstep``.
        speed: realtime only: sim seconds per wall second (the env ticks every ``dt / speed`` s).
        command_timeout: realtime only: wall seconds without a command after which the twin holds.
        heartbeat: wall seconds of silence on the ``obs`` socket after which the newest observation is repeated.
        seed: seed of the reset done at start-up (the twin then waits, idle, for a ``reset`` request).
        env_kwargs: passed to the env's constructor (``conf/env/<name>.yaml`` ``kwargs``).
    """

    def __init__(self, env: str, addr: str, *, mode: str = "realtime", speed: float = 1.0,
                 command_timeout: float = 0.5, heartbeat: float = 0.1, seed: int | None = 0,
                 env_kwargs: Mapping[str, Any] | None = None) -> None:
        if mode not in MODES:
            raise TwinError(f"mode must be one of {list(MODES)}; got {mode!r}")
        for name, value in (("speed", speed), ("command_timeout", command_timeout), ("heartbeat", heartbeat)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise TwinError(f"{name} must be a number > 0; got {value!r}")
        self.env_name, self.addr, self.mode = str(env), str(addr), mode
        self.speed, self.command_timeout, self.heartbeat = float(speed), float(command_timeout), float(heartbeat)
        self.seed = None if seed is None else int(seed)
        self.env_kwargs = dict(env_kwargs or {})
        self.endpoints = endpoints(addr)
        self._ctx: zmq.Context | None = None
        self._sockets: dict[str, zmq.Socket] = {}
        self._bound: list[str] = []
        self.env: Any = None
        self._closing = False
        self._seq = 0
        self._episode = 0
        self._running = False
        self._last_msg: dict[str, Any] | None = None
        self._clear_stats()

    # -------------------------------------------------------------------------------------------- set-up
    def bind(self) -> dict[str, str]:
        """Bind the three sockets; returns {role: endpoint}. An address in use (a live ipc socket file, a bound tcp
        port) is a :class:`TwinError`; a stale ipc socket file (its server died) is removed and reused."""
        self._ctx = zmq.Context()
        kinds = {"req": zmq.REP, "obs": zmq.PUB, "cmd": zmq.PULL}
        try:
            for role in ROLES:
                ep = self.endpoints[role]
                if ep.startswith("ipc://"):
                    check_ipc_free(ep[len("ipc://"):], ep)
                sock = self._ctx.socket(kinds[role])
                sock.setsockopt(zmq.LINGER, 0)
                self._sockets[role] = sock
                try:
                    sock.bind(ep)
                except zmq.ZMQError as err:
                    if err.errno == zmq.EADDRINUSE:
                        raise TwinError(f"address {ep} is in use (another twin or program is bound to it); "
                                        f"choose another addr=") from err
                    raise TwinError(f"cannot bind {ep}: {err}") from err
                self._bound.append(ep)
        except BaseException:
            self.close(publish=False)
            raise
        return dict(self.endpoints)

    def load(self) -> None:
        """Make the env, read its spec and hold action, and reset it once (``seed``); the twin is then idle."""
        from stlflow.control.robot import RobotSpec
        from stlflow.control.tasks import get_task

        self.task = get_task(self.env_name)
        self.env = self.task.make_env(self.env_kwargs)
        u, info = self.env.unwrapped, self.task.info
        space = self.env.action_space
        fields = dict(
            obs_dim=int(np.prod(self.env.observation_space.shape)), action_dim=int(np.prod(space.shape)),
            dt=float(u.dt), action_low=tuple(float(x) for x in np.asarray(space.low).reshape(-1)),
            action_high=tuple(float(x) for x in np.asarray(space.high).reshape(-1)),
            discrete_action_mask=tuple(bool(b) for b in np.asarray(u.discrete_action_mask).reshape(-1)),
            task=self.task.name, rules=info.rules, rule_defaults=dict(info.rule_defaults), speed=self.speed)
        known = {f.name for f in dataclasses.fields(RobotSpec)}  # ``speed`` where RobotSpec has that field
        self.spec = RobotSpec(**{k: v for k, v in fields.items() if k in known})
        self.period = self.spec.dt / self.speed
        self._hold_check = hold_action(self.task, np.zeros(self.spec.obs_dim, np.float32))  # fails early if unknown
        self._reset(self.seed)
        self._running = False  # idle until a client asks for an episode

    def twin_info(self) -> dict[str, Any]:
        """What the ``spec`` reply says about the twin itself (beyond the RobotSpec)."""
        return {"protocol": PROTOCOL, "env": self.task.name, "env_id": self.task.env_id, "env_kwargs": self.env_kwargs,
                "mode": self.mode, "speed": self.speed, "period": self.period, "dt": self.spec.dt,
                "command_timeout": self.command_timeout, "heartbeat": self.heartbeat,
                "endpoints": dict(self.endpoints), "pid": os.getpid()}

    # -------------------------------------------------------------------------------------------- the loop
    def serve(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Serve until a ``close`` request or ``should_stop()`` (checked at least every 50 ms)."""
        if self.env is None:
            raise RuntimeError("call bind() and load() before serve()")
        rep, pull = self._sockets["req"], self._sockets["cmd"]
        poller = zmq.Poller()
        poller.register(rep, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        clock = time.perf_counter
        self._next_beat = clock() + self.heartbeat
        while not self._closing and not should_stop():
            now = clock()
            if self._running and self.mode == "realtime" and now >= self._deadline:
                self._tick(now)
                continue
            wake = self._next_beat
            if self._running and self.mode == "realtime":
                wake = min(wake, self._deadline)
            timeout_ms = int(max(0.0, min(wake - now, 0.05)) * 1000)  # floor: the last millisecond is polled
            events = dict(poller.poll(timeout_ms))
            if events.get(rep):
                self._serve_requests()
            if events.get(pull):
                self._take_commands()
            if clock() >= self._next_beat and self._last_msg is not None:
                self._publish({**self._last_msg, "beat": True, "wall": time.time()})

    def close(self, publish: bool = True) -> None:
        """Publish the last message (``closed``), close the sockets, remove the ipc socket files this twin bound, and
        close the env."""
        if publish and "obs" in self._sockets:
            try:
                self._sockets["obs"].send(pack({"closed": True, "seq": self._seq, "wall": time.time()}), zmq.NOBLOCK)
                self._sockets["obs"].setsockopt(zmq.LINGER, 200)
            except zmq.ZMQError:
                pass
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        for ep in self._bound:  # libzmq leaves ipc socket files behind; remove the ones this twin bound
            if ep.startswith("ipc://"):
                try:
                    os.unlink(ep[len("ipc://"):])
                except OSError:
                    pass
        self._bound.clear()
        if self.env is not None:
            self.env.close()
            self.env = None

    # -------------------------------------------------------------------------------------------- requests
    def _serve_requests(self) -> None:
        rep = self._sockets["req"]
        while not self._closing:
            try:
                data = rep.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._request(unpack(data))
            except Exception as err:  # a bad request must not take the twin down
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            rep.send(pack(reply))

    def _request(self, msg: Any) -> dict[str, Any]:
        kind = msg.get("req") if isinstance(msg, dict) else None
        if kind == "spec":
            return {"ok": True, "spec": asdict(self.spec), "twin": self.twin_info()}
        if kind == "reset":
            seed = msg.get("seed")
            if seed is not None and not isinstance(seed, int):
                return {"ok": False, "error": f"reset seed must be an integer or None; got {seed!r}"}
            return {"ok": True, "obs": self._reset(seed)}
        if kind == "stats":
            stats = self.stats()
            if msg.get("clear"):
                self._clear_stats()
            return {"ok": True, "stats": stats}
        if kind == "ping":
            return {"ok": True, "seq": self._seq, "wall": time.time()}
        if kind == "close":
            self._closing = True
            return {"ok": True}
        return {"ok": False, "error": f"unknown request {kind!r}; requests: spec, reset, stats, ping, close"}

    # -------------------------------------------------------------------------------------------- commands
    def _take_commands(self) -> None:
        pull = self._sockets["cmd"]
        while True:
            try:
                data = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.perf_counter()
            self._n["commands"] += 1
            try:
                msg = unpack(data)
                if msg.get("hold"):
                    self._n["hold_requests"] += 1
                    if self.mode == "realtime":
                        self._hold_requested = True
                    continue
                action = np.asarray(msg["action"], dtype=np.float64).reshape(-1)
                obs_seq = int(msg["obs_seq"])
                if action.shape != (self.spec.action_dim,) or not np.all(np.isfinite(action)):
                    raise ValueError(f"action must be {self.spec.action_dim} finite numbers; got {msg['action']!r}")
                if obs_seq > self._seq:
                    raise ValueError(f"obs_seq {obs_seq} is newer than the newest observation ({self._seq})")
            except Exception as err:
                self._n["rejected"] += 1
                self._last_error = f"command rejected: {type(err).__name__}: {err}"
                continue
            if not self._running or obs_seq < self._episode_seq0:
                self._n["dropped"] += 1
                continue
            if self.mode == "lockstep":
                self._land(action, obs_seq)
                self._applied_ages[self._seq - obs_seq] += 1
                self._step(action, None)
            else:
                if self._newest is not None and not self._newest.used:
                    self._n["superseded"] += 1
                self._newest = _Command(action, obs_seq, now)
                self._hold_requested = False

    def _land(self, action: np.ndarray, obs_seq: int) -> None:
        self._n["commands_used"] += 1
        self._ages[self._seq - obs_seq] += 1

    # -------------------------------------------------------------------------------------------- stepping
    def _tick(self, now: float) -> None:
        """One realtime tick at deadline ``self._deadline`` (``now`` >= it)."""
        self._late.append(now - self._deadline)
        self._late_max = max(self._late_max, now - self._deadline)
        cmd, reason = self._newest, None
        if self._hold_requested:
            reason = "requested"
        elif cmd is None:
            reason = "no_command"
        elif now - cmd.arrival > self.command_timeout:
            reason = "timeout"
            if not self._timed_out:
                self._n["timeouts"] += 1
                self._timed_out = True
        if reason is None:
            self._timed_out = False
            if cmd.used:
                self._n["repeats"] += 1
            else:
                cmd.used = True
                self._land(cmd.action, cmd.obs_seq)
            self._applied_ages[self._seq - cmd.obs_seq] += 1
            action = cmd.action
        else:
            action = hold_action(self.task, self._obs)
        self._step(action, reason)
        self._deadline += self.period
        behind = time.perf_counter() - self._deadline
        if behind > 0:  # missed whole ticks: skip them (keep the grid), never burst
            skipped = math.ceil(behind / self.period)
            self._n["overruns"] += 1
            self._n["skipped_ticks"] += skipped
            self._deadline += skipped * self.period

    def _step(self, action: np.ndarray, held: str | None) -> None:
        if held is not None:
            self._n["holds"] += 1
            self._n[f"holds_{held}"] += 1
        try:
            obs, _, terminated, truncated, info = self.env.step(action)
        except Exception as err:  # e.g. a simulation that diverged: end the episode, keep serving
            self._last_error = f"env.step failed: {type(err).__name__}: {err}"
            self._running = False
            self._seq += 1
            self._publish({**self._last_msg, "seq": self._seq, "done": True, "beat": False, "wall": time.time(),
                           "info": {**self._last_msg["info"], "error": self._last_error}})
            return
        self._seq += 1
        self._steps += 1
        self._n["ticks"] += 1
        done = bool(terminated or truncated)
        if done:
            self._running = False
        self._obs = obs
        self._publish(self._message(obs, info, done, terminated, truncated, action, held))

    def _reset(self, seed: int | None) -> dict[str, Any]:
        obs, info = self.env.reset(seed=seed)
        self._seq += 1
        self._episode += 1
        self._episode_seq0 = self._seq
        self._steps = 0
        self._running = True
        self._newest, self._hold_requested, self._timed_out = None, False, False
        self._deadline = time.perf_counter() + self.period
        self._obs = obs
        self._n["resets"] += 1
        msg = self._message(obs, info, False, False, False, None, None)
        self._publish(msg)
        return msg

    def _message(self, obs: np.ndarray, info: Mapping[str, Any], done: bool, terminated: bool, truncated: bool,
                 action: np.ndarray | None, held: str | None) -> dict[str, Any]:
        sub = {k: _scalar(v) for k, v in info.items() if k != "signals" and _scalar(v) is not None}
        sub.update(terminated=bool(terminated), truncated=bool(truncated), held=held,
                   action=[] if action is None else [float(a) for a in action])
        signals = {str(k): float(v) for k, v in dict(info.get("signals") or {}).items()}
        return {"seq": self._seq, "t": round(self._steps * self.spec.dt, 9),
                "values": np.asarray(obs).reshape(-1).tolist(), "signals": signals, "done": bool(done),
                "info": sub, "episode": self._episode, "beat": False, "wall": time.time()}

    def _publish(self, msg: dict[str, Any]) -> None:
        self._last_msg = msg
        try:
            self._sockets["obs"].send(pack(msg), zmq.NOBLOCK)
        except zmq.Again:  # PUB never blocks; a full queue drops the message for that subscriber
            pass
        self._next_beat = time.perf_counter() + self.heartbeat

    # -------------------------------------------------------------------------------------------- stats
    def _clear_stats(self) -> None:
        self._n: Counter[str] = Counter()
        self._ages: Counter[int] = Counter()
        self._applied_ages: Counter[int] = Counter()
        self._late: deque[float] = deque(maxlen=100_000)
        self._late_max = 0.0
        self._last_error: str | None = None
        self._since = time.time()

    def stats(self) -> dict[str, Any]:
        """Counters since start-up or the last ``stats`` request with ``clear``:

        ``ticks`` (env steps), ``resets``, ``commands`` (messages received on ``cmd``), ``commands_used`` (action
        commands that landed on a tick), ``superseded`` (realtime: replaced by a newer one before any tick used
        them), ``repeats`` (realtime ticks that reused the newest command), ``dropped`` (from an earlier episode, or
        after the episode ended), ``rejected`` (malformed; ``last_error`` says why), ``holds`` (ticks stepped with
        the hold action) = ``holds_no_command`` + ``holds_timeout`` + ``holds_requested``, ``timeouts`` (times the
        command timeout started a hold), ``hold_requests``, ``command_age`` (ticks, see the module docstring:
        ``n``, ``mean``, ``p50``, ``p99``, ``max``, ``hist`` [[age, count], ...], once per command, on the tick it
        lands), ``applied_age`` (the same, once per tick stepped with a command, repeats included: how old the
        information behind each applied action was), ``late`` (realtime: how late
        ticks ran after their deadline, s: ``p50``, ``p99``, ``max``), ``overruns`` / ``skipped_ticks`` (ticks
        late by a whole period, and the ticks skipped to catch up), plus the state: ``mode``, ``episode``, ``seq``,
        ``running``, ``steps`` (in this episode), ``since`` (time.time() of the start of the counts)."""
        n = self._n
        keys = ("ticks", "resets", "commands", "commands_used", "superseded", "repeats", "dropped", "rejected",
                "holds", "holds_no_command", "holds_timeout", "holds_requested", "timeouts", "hold_requests",
                "overruns", "skipped_ticks")
        late = np.asarray(self._late, dtype=float)
        return {**{k: int(n[k]) for k in keys}, "command_age": _histogram_stats(self._ages),
                "applied_age": _histogram_stats(self._applied_ages),
                "late": {"p50": float(np.percentile(late, 50)) if late.size else 0.0,
                         "p99": float(np.percentile(late, 99)) if late.size else 0.0, "max": float(self._late_max)},
                "mode": self.mode, "episode": self._episode, "seq": self._seq, "running": self._running,
                "steps": self._steps, "last_error": self._last_error, "since": self._since}


# ------------------------------------------------------------------------------------------------ helpers
def _scalar(v: Any) -> Any:
    """A JSON-able scalar of ``v`` (bool, int, float, str), or None when it is not one."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, str):
        return v
    return None


def _histogram_stats(hist: Counter[int]) -> dict[str, Any]:
    n = sum(hist.values())
    if not n:
        return {"n": 0, "mean": 0.0, "p50": 0, "p99": 0, "max": 0, "hist": []}
    ages = sorted(hist)

    def quantile(q: float) -> int:
        need, seen = q * n, 0
        for a in ages:
            seen += hist[a]
            if seen >= need:
                return int(a)
        return int(ages[-1])

    return {"n": n, "mean": sum(a * c for a, c in hist.items()) / n, "p50": quantile(0.5), "p99": quantile(0.99),
            "max": int(ages[-1]), "hist": [[int(a), int(hist[a])] for a in ages]}
