"""The sim twin's wire format (:mod:`stlflow.control.twin`, ``stlflow serve-sim``; its client is
:class:`stlflow.control.zmq_robot.ZmqRobot`): the addresses, the sockets and the messages.

Sockets (all bound by the twin; :func:`endpoints` derives the three from one address)
    ``addr = ipc:///tmp/x``            -> ``ipc:///tmp/x.req``, ``ipc:///tmp/x.obs``, ``ipc:///tmp/x.cmd``
    ``addr = tcp://127.0.0.1:5555``    -> ``tcp://127.0.0.1:5555`` (req), ``:5556`` (obs), ``:5557`` (cmd)

    - ``req`` REP: requests, one reply each;
    - ``obs`` PUB: one observation per env step, and a heartbeat (the newest observation again, same ``seq``)
      whenever nothing was published for ``heartbeat`` seconds, so that a client can tell a quiet twin (lock-step,
      episode over) from a lost one;
    - ``cmd`` PULL: commands (reliable and in order while the twin lives, so lock-step runs lose none).

Every message is one msgpack map (``use_bin_type``; strings are str, floats are doubles: float32 values survive
exactly).

Requests (``req``) and replies; an error reply is ``{"ok": False, "error": str}``:
    ``{"req": "spec"}``                -> ``{"ok": True, "spec": {RobotSpec fields}, "twin": {...}}`` where ``twin``
                                          holds ``protocol``, ``env``, ``env_id``, ``env_kwargs``, ``mode``,
                                          ``speed``, ``period`` (wall s per tick = dt / speed), ``command_timeout``,
                                          ``heartbeat``, ``endpoints``, ``pid``
    ``{"req": "reset", "seed": int|None}`` -> ``{"ok": True, "obs": <observation>}`` (a new episode starts)
    ``{"req": "stats", "clear": bool}`` -> ``{"ok": True, "stats": {...}}`` (:meth:`SimTwin.stats`; ``clear``
                                          zeroes the counters after reading them)
    ``{"req": "ping"}``                -> ``{"ok": True, "seq": int, "wall": float}``
    ``{"req": "close"}``               -> ``{"ok": True}``, then the twin shuts down

Observation (``obs``)::

    {"seq": int,          # increasing over the twin's life (not reset per episode); a heartbeat repeats it
     "t": float,          # episode time on the sim clock (s) = steps since reset * dt
     "values": [float],   # (Do,) the env's observation
     "signals": {str: float},  # the task's STL signals at this state
     "done": bool,        # terminated or truncated: the twin steps no more until the next reset
     "info": {...},       # the env's scalar info (success, collision, time/step, ...) plus "terminated",
                          # "truncated", "action" (the action applied to reach this state, [] after reset),
                          # "held" (None, or why the hold action was applied: "no_command", "timeout", "requested")
     "episode": int,      # counts resets
     "beat": bool,        # True: a heartbeat (nothing new)
     "wall": float}       # time.time() when published
    {"closed": True, "seq": int, "wall": float}   # the twin's last message: it is shutting down

Commands (``cmd``)::

    {"action": [float], "obs_seq": int, "wall": float}   # computed from observation obs_seq
    {"hold": True, "wall": float}                        # keep still until the next action command
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import msgpack

__all__ = ["IPC_PATH_MAX", "PROTOCOL", "ROLES", "TwinError", "check_ipc_free", "endpoints", "pack", "unpack"]

PROTOCOL = 1
ROLES = ("req", "obs", "cmd")
IPC_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL (Linux)


class TwinError(ValueError):
    """Bad twin settings or an address that cannot be bound (the verb reports it and exits with status 2)."""


# ------------------------------------------------------------------------------------------------ the protocol
def endpoints(addr: str) -> dict[str, str]:
    """The three endpoints (``req``, ``obs``, ``cmd``) of a twin served at ``addr`` (see the module docstring):
    ``ipc://PATH`` -> ``PATH.req`` / ``PATH.obs`` / ``PATH.cmd``; ``tcp://HOST:PORT`` -> ports PORT, PORT+1, PORT+2."""
    addr = str(addr).strip()
    if addr.startswith("ipc://"):
        path = addr[len("ipc://"):]
        if not path:
            raise TwinError(f"address {addr!r} has no path (e.g. ipc:///tmp/stlflow-twin)")
        return {role: f"ipc://{path}.{role}" for role in ROLES}
    if addr.startswith("tcp://"):
        host, sep, port = addr[len("tcp://"):].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65533:
            raise TwinError(f"address {addr!r} must be tcp://HOST:PORT with a port in 1..65533 (the twin uses PORT, "
                            f"PORT+1 and PORT+2)")
        return {role: f"tcp://{host}:{int(port) + i}" for i, role in enumerate(ROLES)}
    raise TwinError(f"address {addr!r}: use ipc://PATH or tcp://HOST:PORT")


def pack(message: Mapping[str, Any]) -> bytes:
    """One protocol message as bytes (msgpack)."""
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """One protocol message from bytes (msgpack)."""
    return msgpack.unpackb(data, raw=False)


# ------------------------------------------------------------------------------------------------ ipc addresses
def check_ipc_free(path: str, ep: str) -> None:
    """ZeroMQ binds over a live ipc socket file silently (stealing the address), so look first: a file that accepts
    a connection is in use (TwinError); one that refuses is left over from a dead server and is removed."""
    if len(path.encode()) > IPC_PATH_MAX:
        raise TwinError(f"ipc path of {ep} is {len(path.encode())} bytes; at most {IPC_PATH_MAX} fit in a Unix socket "
                        f"address: use a shorter addr=")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise TwinError(f"cannot bind {ep}: folder {parent} does not exist")
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError as err:
        raise TwinError(f"cannot bind {ep}: {path} exists and is not a usable socket ({err})") from err
    finally:
        probe.close()
    raise TwinError(f"address {ep} is in use (another twin or program is serving on it); choose another addr=")
