"""The interface a robot driver implements, so that the same control loop runs a simulator, a twin over the
network, or a real arm.

A :class:`Robot` is a connection to something that moves: it reports its :class:`RobotSpec` (what its
observations and actions are, at what period), hands out the newest observation with the time it was taken, and
takes actions stamped with the observation they were computed from. It never blocks the loop for longer than the
timeout it is given, and :meth:`Robot.hold` must always be safe to call (it is called on every way out of the
loop, e-stops included).

Writing a driver for a real arm means implementing these seven methods around the vendor's API (see the README's
"Writing a robot driver").

Clocks: a driver may have a ``clock`` attribute (a :class:`stlflow.control.realtime.Clock`): its observations are
then stamped on that clock and the control loop runs on it too (the in-process simulator,
:class:`stlflow.control.sim_robot.SimRobot`, on a virtual clock for lock-step runs). Without one, ``Observation.t``
is the robot's own time and the loop measures an observation's age from when it received it.

Holding still is a different action per robot (zero for a velocity command, the current set-point for a position
target): :func:`hold_action` gives it for the known tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


class RobotError(RuntimeError):
    """The robot is lost or refused a command (the loop latches its e-stop on it)."""


@dataclass(frozen=True)
class RobotSpec:
    """What a robot is to a controller: ``obs_dim`` (Do), ``action_dim`` (Da), ``dt`` (s per control tick),
    ``action_low`` / ``action_high`` (Da,) bounds in physical units, ``discrete_action_mask`` (Da,) True where a
    channel takes the values {-1, +1} (a gripper), ``task`` (registry name, when the robot is a known task),
    ``rules`` / ``rule_defaults`` (the task's STL rules, for an online monitor) and ``speed`` (the robot's seconds
    per wall-clock second: 1 for a real robot, more for a simulator run faster than real time). ``dt`` and the STL
    intervals are in the robot's seconds; the control period on the wall clock is :attr:`period` = dt / speed."""

    obs_dim: int
    action_dim: int
    dt: float
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    discrete_action_mask: tuple[bool, ...] = ()
    task: str | None = None
    rules: str | None = None
    rule_defaults: dict[str, float] = field(default_factory=dict)
    speed: float = 1.0

    def __post_init__(self) -> None:
        if self.dt <= 0:
            raise ValueError(f"dt must be > 0 seconds, got {self.dt}")
        if not self.speed > 0:
            raise ValueError(f"speed (robot seconds per wall-clock second) must be > 0, got {self.speed}")
        for name in ("action_low", "action_high"):
            if len(getattr(self, name)) != self.action_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, action_dim is {self.action_dim}")

    @property
    def period(self) -> float:
        """Wall-clock seconds per control tick (``dt / speed``)."""
        return self.dt / self.speed


@dataclass(frozen=True)
class Observation:
    """One observation: ``values`` (Do,) physical units, ``t`` (s, the robot's clock when it was taken), ``seq``
    (increasing sequence number), ``signals`` (the task's STL signals at that state, when the robot knows them),
    ``done`` (the episode ended: goal reached, collision, time limit) and ``info`` (anything else)."""

    values: np.ndarray
    t: float
    seq: int
    signals: dict[str, float] = field(default_factory=dict)
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ hold actions
def crossing_hold(obs: np.ndarray) -> np.ndarray:
    """Crossing commands a velocity (v m/s, omega rad/s): holding still is (0, 0), the drive brakes to a standstill."""
    return np.zeros(2)


def pickplace_hold(obs: np.ndarray) -> np.ndarray:
    """PickPlace commands an absolute TCP target and a gripper: holding still is the current servo set-point and the
    current gripper command, both in the observation (``ee_target`` obs[18:21], ``grip_cmd`` obs[21]); a zero action
    would drive the TCP to the workspace origin and open the gripper."""
    obs = np.asarray(obs, dtype=np.float64).reshape(-1)
    return np.concatenate([obs[18:21], obs[21:22]])


HOLD_ACTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"crossing": crossing_hold, "pickplace": pickplace_hold}
"""Task name -> the action that keeps that task's robot still at an observation. For a velocity or torque command
hold is zero; for an absolute position target it is the last commanded target (which the observation must carry)."""


def hold_action(task: Any, obs: np.ndarray) -> np.ndarray:
    """The action (Da,) float64 that keeps ``task``'s robot still at observation ``obs``: the task's own
    ``hold_action(obs)`` when it has one, else :data:`HOLD_ACTIONS` by task name (a ``Task`` or a name)."""
    fn = getattr(task, "hold_action", None) or HOLD_ACTIONS.get(getattr(task, "name", task))
    if fn is None:
        raise ValueError(f"no hold action known for task {getattr(task, 'name', task)!r}: give the task a "
                         f"hold_action(obs) method or add it to HOLD_ACTIONS (known: {sorted(HOLD_ACTIONS)})")
    return np.asarray(fn(np.asarray(obs)), dtype=np.float64).reshape(-1)


@runtime_checkable
class Robot(Protocol):
    """A robot driver (see the module docstring)."""

    def spec(self) -> RobotSpec:
        """What the robot is (known before :meth:`connect`)."""
        ...

    def connect(self) -> None:
        """Open the connection; raises :class:`RobotError` when the robot cannot be reached."""
        ...

    def reset(self, seed: int | None = None) -> Observation:
        """Start an episode (a simulator resets to ``seed``; a real arm moves to its start pose) and return the
        first observation."""
        ...

    def observe(self, timeout: float) -> Observation | None:
        """The newest observation, waiting at most ``timeout`` seconds for one newer than the last returned
        (None if none came)."""
        ...

    def send(self, action: np.ndarray, obs_seq: int) -> None:
        """Command ``action`` (Da,) physical units, computed from observation ``obs_seq``."""
        ...

    def hold(self) -> None:
        """Stop moving and keep still (safe to call at any time, repeatedly)."""
        ...

    def close(self) -> None:
        """Hold, then release the connection."""
        ...
