"""``ZmqRobot``: the :class:`~stlflow.control.robot.Robot` protocol as a client of the sim twin over ZeroMQ.

The twin (``stlflow serve-sim``, :mod:`stlflow.control.twin`, which documents the sockets and messages) runs the
MuJoCo task in its own process; this driver talks to it exactly as a driver of a real arm talks to the arm::

    robot = ZmqRobot("ipc:///tmp/stlflow-twin")
    robot.connect()                       # RobotError naming the address when the twin does not answer
    obs = robot.reset(seed=0)
    while not obs.done:
        robot.send(controller.act(obs.values), obs.seq)
        obs = robot.observe(timeout=1.0) or obs   # the newest observation only; RobotError when the twin is lost
    robot.close()

Observations arrive on a latest-only subscriber (``zmq.CONFLATE``): a reader that falls behind gets the newest
observation, never a backlog. The twin repeats its newest observation as a heartbeat when it has nothing new (in
lock-step mode, between episodes), so silence means a lost twin: :meth:`observe` raises :class:`RobotError` when
no message at all came for ``stale_timeout`` seconds. A ZmqRobot is not thread-safe (one thread per instance).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import zmq

from stlflow.control.robot import Observation, RobotError, RobotSpec
from stlflow.control.twin import endpoints, pack, unpack


class ZmqRobot:
    """A sim twin at ``addr`` (``ipc://PATH`` or ``tcp://HOST:PORT``, as given to ``stlflow serve-sim``).

    Args:
        connect_timeout: seconds :meth:`connect` waits for the twin's answer and its first published message.
        request_timeout: seconds a request (``spec``, ``reset``, ``stats``, ...) waits for its reply.
        stale_timeout: seconds without any message from the twin after which :meth:`observe` raises RobotError
            (the twin sends a heartbeat every ``heartbeat`` s, 0.1 s by default, so this must be well above it).
    """

    def __init__(self, addr: str, *, connect_timeout: float = 5.0, request_timeout: float = 2.0,
                 stale_timeout: float = 1.0) -> None:
        try:
            self.endpoints = endpoints(addr)
        except ValueError as err:
            raise RobotError(str(err)) from err
        self.addr = str(addr)
        self.connect_timeout, self.request_timeout = float(connect_timeout), float(request_timeout)
        self.stale_timeout = float(stale_timeout)
        self._ctx: zmq.Context | None = None
        self._req: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._push: zmq.Socket | None = None
        self._spec: RobotSpec | None = None
        self.twin_info: dict[str, Any] = {}
        self._last_seq = -1
        self._last_rx = 0.0
        self.latest: Observation | None = None

    # -------------------------------------------------------------------------------------------- Robot protocol
    def spec(self) -> RobotSpec:
        """The twin's :class:`RobotSpec` (asked once, then cached); :attr:`twin_info` holds the rest of the reply
        (``mode``, ``speed``, ``period`` = wall s per tick, ``command_timeout``, ``env``, ``env_id``, ...)."""
        if self._spec is None:
            self._fetch_spec(self.connect_timeout if self._sub is None else self.request_timeout)
        return self._spec

    def connect(self) -> None:
        """Open the sockets and wait (``connect_timeout``) until the twin answers a request and its observations
        reach this subscriber; RobotError naming the address otherwise."""
        if self._sub is not None:
            return
        ctx = self._context()
        deadline = time.monotonic() + self.connect_timeout
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.CONFLATE, 1)  # latest-only: must be set before connecting
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoints["obs"])
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 1000)
        push.connect(self.endpoints["cmd"])
        try:
            self._fetch_spec(max(0.0, deadline - time.monotonic()))
            # The first published message proves the subscription is live (PUB drops messages for subscribers that
            # are still joining, so a reset's first step could otherwise be missed).
            if not sub.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise RobotError(f"the sim twin at {self.addr} answers requests but publishes nothing on "
                                 f"{self.endpoints['obs']} within {self.connect_timeout:g} s")
            self._receive(sub)
        except BaseException:
            sub.close()
            push.close()
            raise
        self._sub, self._push = sub, push
        self._last_rx = time.monotonic()

    def reset(self, seed: int | None = None) -> Observation:
        """Start an episode on the twin (``seed`` seeds the env's reset) and return its first observation."""
        self._require_connected()
        reply = self.request("reset", seed=None if seed is None else int(seed))
        obs = self._observation(reply["obs"])
        self._last_seq, self._last_rx, self.latest = obs.seq, time.monotonic(), obs
        return obs

    def observe(self, timeout: float) -> Observation | None:
        """The newest observation, waiting at most ``timeout`` s for one newer than the last returned (None if none
        came). RobotError when the twin sent nothing at all (not even a heartbeat) for ``stale_timeout`` s, or
        announced that it is closing."""
        self._require_connected()
        now = time.monotonic()
        deadline = now + max(0.0, float(timeout))
        while True:
            stale_at = self._last_rx + self.stale_timeout
            wait = min(deadline, stale_at) - now
            if self._sub.poll(max(0, int(np.ceil(wait * 1000)))):
                msg = self._receive(self._sub)
                if msg.get("closed"):
                    raise RobotError(f"the sim twin at {self.addr} shut down")
                if int(msg["seq"]) > self._last_seq:
                    obs = self._observation(msg)
                    self._last_seq, self.latest = obs.seq, obs
                    return obs
            now = time.monotonic()
            if now >= self._last_rx + self.stale_timeout:
                raise RobotError(f"lost the sim twin at {self.addr}: no message for {now - self._last_rx:.2f} s "
                                 f"(stale_timeout {self.stale_timeout:g} s)")
            if now >= deadline:
                return None

    def send(self, action: np.ndarray, obs_seq: int) -> None:
        """Command ``action`` (Da,) computed from observation ``obs_seq``; RobotError for an action of the wrong
        size or with non-finite values (refused here, before it travels) or when the command queue is full."""
        self._require_connected()
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        da = self.spec().action_dim
        if a.shape != (da,) or not np.all(np.isfinite(a)):
            raise RobotError(f"refused action {np.asarray(action).tolist()!r}: the twin takes {da} finite numbers")
        try:
            self._push.send(pack({"action": a.tolist(), "obs_seq": int(obs_seq), "wall": time.time()}), zmq.NOBLOCK)
        except zmq.Again as err:
            raise RobotError(f"the command queue to the sim twin at {self.addr} is full (is the twin alive?)") from err

    def hold(self) -> None:
        """Ask the twin to keep the robot still (realtime: the hold action every tick until the next command;
        lock-step: nothing moves anyway). Never raises; a no-op when not connected."""
        if self._push is None:
            return
        try:
            self._push.send(pack({"hold": True, "wall": time.time()}), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        """Hold, then close the sockets (the twin keeps running; :meth:`shutdown` stops it)."""
        self.hold()
        if self._push is not None:
            self._push.setsockopt(zmq.LINGER, 200)  # let the hold leave
        for sock in (self._req, self._sub, self._push):
            if sock is not None:
                sock.close()
        self._req = self._sub = self._push = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -------------------------------------------------------------------------------------------- beyond the protocol
    def request(self, kind: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """One request to the twin (``spec``, ``reset``, ``stats``, ``ping``, ``close``): the reply as a dict.
        RobotError when no reply comes within ``timeout`` (default ``request_timeout``) or the twin refuses."""
        timeout = self.request_timeout if timeout is None else float(timeout)
        sock = self._req_socket()
        sock.send(pack({"req": kind, **fields}))
        if not sock.poll(max(0, int(np.ceil(timeout * 1000)))):
            # A REQ socket waiting for a reply can send nothing more: drop it, the next request opens a fresh one.
            sock.close()
            self._req = None
            raise RobotError(f"the sim twin at {self.addr} did not answer {kind!r} within {timeout:g} s "
                             f"({self.endpoints['req']}; is `stlflow serve-sim addr={self.addr}` running?)")
        reply = unpack(sock.recv())
        if not reply.get("ok"):
            raise RobotError(f"the sim twin at {self.addr} refused {kind!r}: {reply.get('error')}")
        return reply

    def stats(self, clear: bool = False) -> dict[str, Any]:
        """The twin's counters (:meth:`stlflow.control.twin.SimTwin.stats`); ``clear`` zeroes them after reading."""
        return self.request("stats", clear=bool(clear))["stats"]

    def shutdown(self) -> None:
        """Ask the twin process to exit (a ``close`` request), then close this client."""
        try:
            self.request("close")
        finally:
            self.close()

    def __enter__(self) -> ZmqRobot:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- internals
    def _context(self) -> zmq.Context:
        if self._ctx is None:
            self._ctx = zmq.Context()
        return self._ctx

    def _req_socket(self) -> zmq.Socket:
        if self._req is None:
            self._req = self._context().socket(zmq.REQ)
            self._req.setsockopt(zmq.LINGER, 0)
            self._req.connect(self.endpoints["req"])
        return self._req

    def _fetch_spec(self, timeout: float) -> None:
        reply = self.request("spec", timeout=timeout)
        known = {f.name for f in dataclasses.fields(RobotSpec)}  # a newer twin may send fields this one lacks
        fields = {k: v for k, v in dict(reply["spec"]).items() if k in known}
        for name in ("action_low", "action_high", "discrete_action_mask"):
            fields[name] = tuple(fields[name])
        self._spec = RobotSpec(**fields)
        self.twin_info = dict(reply.get("twin") or {})

    def _require_connected(self) -> None:
        if self._sub is None:
            raise RobotError(f"ZmqRobot({self.addr!r}) is not connected: call connect() first")

    def _receive(self, sock: zmq.Socket) -> dict[str, Any]:
        msg = unpack(sock.recv())
        self._last_rx = time.monotonic()
        return msg

    @staticmethod
    def _observation(msg: dict[str, Any]) -> Observation:
        info = dict(msg.get("info") or {})
        info.update(episode=msg.get("episode"), wall=msg.get("wall"))
        return Observation(values=np.asarray(msg["values"], dtype=np.float32), t=float(msg["t"]), seq=int(msg["seq"]),
                           signals={str(k): float(v) for k, v in dict(msg.get("signals") or {}).items()},
                           done=bool(msg["done"]), info=info)
