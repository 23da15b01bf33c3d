"""``SimRobot``: the :class:`~stlflow.control.robot.Robot` protocol over a MuJoCo task env in this process.

Two modes:

- **lock-step** (``realtime=False``, the default): the robot lives on a
  :class:`~stlflow.control.realtime.VirtualClock`. The env steps when the clock reaches the next step time
  (``t_reset + n * period``), with the command held at that moment: the control loop sends its action, then moves
  the clock to the next deadline, and the env steps once. Nothing moves while the controller thinks, so a loop on
  this robot reproduces :func:`stlflow.control.loop.run_episode` (same observations, actions and success).
- **wall clock** (``realtime=True``): the env steps every ``period`` seconds of the wall clock on the robot's own
  thread with the last command (or the hold action), as a real robot would, whether or not a command came.
  ``speed`` > 1 runs the simulated world that many times faster than real time (period = dt / speed).

In both modes an observation is stamped with its step time on ``robot.clock`` (the loop uses the same clock);
``info["sim_t"]`` holds the simulated time. :meth:`SimRobot.hold` commands the task's hold action
(:func:`stlflow.control.robot.hold_action`: zero velocity for Crossing, the current set-point for PickPlace).
Stepping stops when the episode ends (terminated or truncated), until the next :meth:`SimRobot.reset`.

The env is ``robot.env`` (a scripted expert reads it: ``robot.env.unwrapped.make_expert(seed)``). The expert reads
the env's privileged state while it plans, which is only consistent in lock-step (in wall-clock mode the robot's
thread steps the env meanwhile).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from stlflow.control.clock import realtime_priority
from stlflow.control.realtime import MonotonicClock, VirtualClock
from stlflow.control.robot import Observation, RobotError, RobotSpec, hold_action

__all__ = ["SimRobot"]


class SimRobot:
    """A task's env as a robot (see the module docstring).

    Args:
        task: a task name (``stlflow.control.tasks`` registry) or a ``Task``.
        env_kwargs: keyword arguments of the env (e.g. ``max_steps``).
        realtime: False: lock-step on a virtual clock; True: the env steps on its own thread at the wall clock.
        clock: lock-step: a :class:`VirtualClock` (default a new one); wall clock: any clock (default monotonic).
        speed: simulated seconds per clock second (the env steps every ``dt / speed`` s of the clock).
        hold: ``hold(obs) -> action`` that keeps the robot still (default the task's, from
            :func:`~stlflow.control.robot.hold_action`).
        max_catchup: wall clock: steps run back to back when the thread is late by whole periods; beyond that the
            missed steps are skipped and counted (``stats["overruns"]``).
        rt_priority: wall clock: SCHED_FIFO priority of the stepping thread (None: normal). Give it the loop's: the
            thread shares the loop's GIL, and a thread preempted by other work while it holds the GIL stalls a
            real-time loop thread that wants it (refused without CAP_SYS_NICE: a warning, normal priority).
    """

    def __init__(self, task: Any, *, env_kwargs: Mapping[str, Any] | None = None, realtime: bool = False,
                 clock: Any = None, speed: float = 1.0, hold: Callable[[np.ndarray], np.ndarray] | None = None,
                 max_catchup: int = 5, rt_priority: int | None = None) -> None:
        from stlflow.control.tasks import get_task

        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.task = get_task(task) if isinstance(task, str) else task
        self.realtime = bool(realtime)
        if self.realtime:
            self.clock = clock if clock is not None else MonotonicClock()
        else:
            self.clock = clock if clock is not None else VirtualClock()
            if not isinstance(self.clock, VirtualClock):
                raise ValueError("a lock-step SimRobot needs a VirtualClock (pass realtime=True for the wall clock)")
        self.speed = float(speed)
        self.env_kwargs = dict(env_kwargs or {})
        self.env = self.task.make_env(self.env_kwargs)
        self._hold_fn = hold if hold is not None else (lambda obs: hold_action(self.task, obs))
        self._hold_fn(np.zeros(int(np.prod(self.env.observation_space.shape)), np.float32))  # unknown task: fail now
        self._spec = self._make_spec()
        self.period = self._spec.period
        self.max_catchup = int(max_catchup)
        self.rt_priority = rt_priority
        self._cv = threading.Condition(threading.RLock())
        self._connected = self._closed = False
        self._thread: threading.Thread | None = None
        self._active = False  # an episode is running (reset called, not done)
        self._epoch = 0
        self._t_reset = 0.0
        self._n = 0  # env steps since the reset
        self._seq = -1
        self._returned = -1  # seq of the newest observation handed out
        self._newest: Observation | None = None
        self._command: np.ndarray | None = None
        self._command_seq = -1
        self.stats = {"steps": 0, "sends": 0, "holds": 0, "overruns": 0}
        self.trajectory: dict[str, list] = {"obs": [], "action": [], "t": []}

    def _make_spec(self) -> RobotSpec:
        u, space = self.env.unwrapped, self.env.action_space
        info = self.task.info
        return RobotSpec(
            obs_dim=int(np.prod(self.env.observation_space.shape)), action_dim=int(np.prod(space.shape)),
            dt=float(u.dt), action_low=tuple(float(x) for x in np.asarray(space.low).reshape(-1)),
            action_high=tuple(float(x) for x in np.asarray(space.high).reshape(-1)),
            discrete_action_mask=tuple(bool(b) for b in np.asarray(u.discrete_action_mask).reshape(-1)),
            task=self.task.name, rules=info.rules, rule_defaults=dict(info.rule_defaults), speed=self.speed)

    # -------------------------------------------------------------------------------------------- protocol
    def spec(self) -> RobotSpec:
        return self._spec

    def connect(self) -> None:
        if self._closed:
            raise RobotError("the SimRobot is closed")
        if self._connected:
            return
        self._connected = True
        if self.realtime:
            self._thread = threading.Thread(target=self._run, name="stlflow-simrobot", daemon=True)
            self._thread.start()
        else:
            self.clock.subscribe(self._advance_to)

    def reset(self, seed: int | None = None) -> Observation:
        if not self._connected:
            raise RobotError("connect() the SimRobot before reset()")
        with self._cv:
            obs, info = self.env.reset(seed=None if seed is None else int(seed))
            self._epoch += 1
            self._t_reset, self._n = self.clock.now(), 0
            self._active = True
            self._command, self._command_seq = None, -1
            self.trajectory = {"obs": [np.asarray(obs)], "action": [], "t": [self._t_reset]}
            out = self._publish(obs, info, terminated=False, truncated=False, reward=0.0)
            self._returned = out.seq
            self._cv.notify_all()
            return out

    def observe(self, timeout: float) -> Observation | None:
        with self._cv:
            if self.realtime and timeout > 0:
                end = time.monotonic() + timeout
                while self._newest is not None and self._newest.seq <= self._returned and not self._closed:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
            if self._closed:
                raise RobotError("the SimRobot is closed")
            if self._newest is None or self._newest.seq <= self._returned:
                return None
            self._returned = self._newest.seq
            return self._newest

    def send(self, action: np.ndarray, obs_seq: int) -> None:
        a = np.array(action, dtype=np.float64).reshape(-1)
        if a.shape != (self._spec.action_dim,) or not np.all(np.isfinite(a)):
            raise RobotError(f"refused command {action!r}: it must be {self._spec.action_dim} finite numbers")
        with self._cv:
            if self._closed:
                raise RobotError("the SimRobot is closed")
            self._command, self._command_seq = a, int(obs_seq)
            self.stats["sends"] += 1

    def hold(self) -> None:
        with self._cv:
            self.stats["holds"] += 1
            if self._newest is not None and not self._closed:
                self._command = self._hold_fn(np.asarray(self._newest.values))
                self._command_seq = -1

    def close(self) -> None:
        if self._closed:
            return
        self.hold()
        with self._cv:
            self._closed, self._active = True, False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(5.0)
        if not self.realtime:
            self.clock.unsubscribe(self._advance_to)
        self.env.close()

    def __enter__(self) -> SimRobot:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- stepping
    def _step_time(self, n: int) -> float:
        return self._t_reset + n * self.period

    def _publish(self, obs: Any, info: Mapping[str, Any], *, terminated: bool, truncated: bool,
                 reward: float) -> Observation:
        self._seq += 1
        values = np.array(obs, copy=True)
        values.setflags(write=False)
        extra = {k: v for k, v in info.items() if k != "signals" and np.isscalar(v)}
        out = Observation(values=values, t=self._step_time(self._n), seq=self._seq,
                          signals={k: float(v) for k, v in dict(info.get("signals", {})).items()},
                          done=bool(terminated or truncated),
                          info={**extra, "success": bool(info.get("success", False)), "reward": float(reward),
                                "terminated": bool(terminated), "truncated": bool(truncated),
                                "sim_t": self._n * self._spec.dt, "step": self._n})
        self._newest = out
        return out

    def _step_once(self) -> None:
        """One env step with the held command (the hold action when none came); the caller holds the lock."""
        command = self._command if self._command is not None else self._hold_fn(np.asarray(self._newest.values))
        obs, reward, terminated, truncated, info = self.env.step(command)
        self._n += 1
        self.stats["steps"] += 1
        self.trajectory["obs"].append(np.asarray(obs))
        self.trajectory["action"].append(np.array(command, copy=True))
        self.trajectory["t"].append(self._step_time(self._n))
        self._publish(obs, info, terminated=terminated, truncated=truncated, reward=reward)
        if terminated or truncated:
            self._active = False
        self._cv.notify_all()

    def _advance_to(self, t: float) -> None:
        """Lock-step: step the env for every step time up to ``t`` (the virtual clock calls this)."""
        with self._cv:
            while self._active and not self._closed and self._step_time(self._n + 1) <= t + 1e-9 * self.period:
                self._step_once()

    def _run(self) -> None:
        """Wall clock: step every period from the reset, with the newest command."""
        with realtime_priority(self.rt_priority):
            self._step_on_the_clock()

    def _sleep_until(self, due: float) -> None:
        """Wall clock: sleep until ``due`` without the clock's final spin. A spinning thread holds the GIL, and the
        control loop's thread wakes for the same deadline: the robot steps a few tens of µs late instead."""
        if not isinstance(self.clock, MonotonicClock):
            self.clock.sleep_until(due)
            return
        while (rest := due - self.clock.now()) > 0:
            time.sleep(rest)

    def _step_on_the_clock(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._active:
                    self._cv.wait()
                if self._closed:
                    return
                epoch, due = self._epoch, self._step_time(self._n + 1)
            self._sleep_until(due)
            with self._cv:
                if self._closed:
                    return
                if epoch != self._epoch or not self._active:
                    continue
                behind = int((self.clock.now() - self._step_time(self._n + 1)) // self.period)
                if behind > self.max_catchup:  # skip what cannot be caught up; the world time jumps
                    self.stats["overruns"] += behind - self.max_catchup
                    self._t_reset += (behind - self.max_catchup) * self.period
                for _ in range(1 + min(max(behind, 0), self.max_catchup)):
                    if not self._active:
                        break
                    self._step_once()
