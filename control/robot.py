"""The interface a robot driver implements, so that the same control loop runs a simulator, a twin over the
network, or a real arm.

A :class:`Robot` is a connection to something that moves: it reports its :class:`RobotSpec` (what its
observations and actions are, at what period), hands out the newest observation with the time it was taken, and
takes actions stamped with the observation they were computed from. It never blocks the loop for longer than the
timeout it is given, and :meth:`Robot.hold` must always be safe to call (it is called on every way out of the
loop, e-stops included).

Writing a driver for a real arm means implementing these seven methods around the vendor's API (see the README's
"Writing a robot driver").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


class RobotError(RuntimeError):
    """The robot is lost or refused a command (the loop latches its e-stop on it)."""


@dataclass(frozen=True)
class RobotSpec:
    """What a robot is to a controller: ``obs_dim`` (Do), ``action_dim`` (Da), ``dt`` (s per control tick),
    ``action_low`` / ``action_high`` (Da,) bounds in physical units, ``discrete_action_mask`` (Da,) True where a
    channel takes the values {-1, +1} (a gripper), ``task`` (registry name, when the robot is a known task) and
    ``rules`` / ``rule_defaults`` (the task's STL rules, for an online monitor)."""

    obs_dim: int
    action_dim: int
    dt: float
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    discrete_action_mask: tuple[bool, ...] = ()
    task: str | None = None
    rules: str | None = None
    rule_defaults: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dt <= 0:
            raise ValueError(f"dt must be > 0 seconds, got {self.dt}")
        for name in ("action_low", "action_high"):
            if len(getattr(self, name)) != self.action_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, action_dim is {self.action_dim}")


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
