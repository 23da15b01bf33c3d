"""The control loop: a task env and a controller stepped in lock-step at the env's control rate.

One loop drives everything that acts on an env: demonstration collection (the scripted expert as the controller,
the recorder on), closed-loop evaluation (a policy controller), and later the robot at wall-clock rate.

Timing of one lock-step episode with an injected observation-to-action delay of d ticks::

    tick t:  obs_t --controller.act--> a_t (queued)      env executes  a_{t-d}   (a_0 while t < d)
             env.step(a_{t-d}) --> obs_{t+1}, info_{t+1}  (info["signals"]: the state reached after the step)

With d = 0 the action chosen from obs_t is the one executed at tick t. During the first d ticks nothing computed
from a fresh observation has arrived yet; the env then executes the controller's first action a_0 (the prefix is
padded with the first real action). The env's clock is frozen while the controller thinks (lock-step), so the
measured per-tick latency is reported, not simulated; the delay option simulates it deterministically in ticks.

A controller is anything with ``reset(seed=None, obs=None)`` (the episode seed and its first observation) and
``act(obs) -> action``; when it has ``last_nfe`` the loop records the network evaluations of each
tick. Work a controller does in ``reset`` (e.g. RTI's ``plan_at_reset``) is outside the ticks' latency; the
evaluation runner reports it separately.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Controller(Protocol):
    """One observation in, one action out, per control tick; ``reset`` starts an episode (``seed``: the episode
    seed, for the controller's noise; ``obs``: the first observation, where a controller may plan)."""

    def reset(self, seed: int | None = None, obs: Any = None) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...


class StepHook(Protocol):
    """Called by the loop; the recorder implements it."""

    def begin(self, seed: int, obs: np.ndarray, info: dict) -> None: ...

    def step(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, info: dict) -> None: ...

    def end(self, result: EpisodeResult) -> None: ...


@dataclass
class EpisodeResult:
    """What one episode of the loop produced.

    ``obs`` (T+1, Do): the observations from reset to the last step; ``action`` (T, Da): the actions the env
    executed (``action[t]`` moved ``obs[t]`` to ``obs[t+1]``); ``chosen`` (T, Da): what the controller returned at
    tick t (equal to ``action`` when delay = 0); ``signals`` name -> (T,): ``info["signals"]`` after each step;
    ``latency_s`` (T,): wall time of ``act``; ``nfe`` (T,): network evaluations per tick (0 for non-networks).
    """

    seed: int
    obs: np.ndarray
    action: np.ndarray
    chosen: np.ndarray
    signals: dict[str, np.ndarray]
    latency_s: np.ndarray
    nfe: np.ndarray
    reward: np.ndarray
    success: bool
    collision: bool
    terminated: bool
    truncated: bool
    frames: list[np.ndarray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.action.shape[0])


def run_episode(
    env: Any,
    controller: Any,
    seed: int,
    *,
    delay: int = 0,
    max_steps: int | None = None,
    hook: StepHook | None = None,
    render: bool = False,
) -> EpisodeResult:
    """Run one lock-step episode of ``controller`` on ``env`` from ``env.reset(seed=seed)``.

    Args:
        env: a gymnasium env (wrapped or not) of an stlflow task.
        controller: see :class:`Controller`; reset with ``seed`` and the first observation before the first tick.
        seed: the episode seed (env reset and controller).
        delay: injected observation-to-action delay in ticks (0..; see the module docstring).
        max_steps: stop after this many steps even if the env has not (None: the env's own time limit).
        hook: optional recorder, called at the start, after every step and at the end.
        render: keep an RGB frame per step (``env.render()``; needs ``render_mode="rgb_array"``).
    """
    if delay < 0:
        raise ValueError(f"delay must be >= 0 ticks, got {delay}")
    obs, info = env.reset(seed=int(seed))
    controller.reset(seed=int(seed), obs=obs)
    if hook is not None:
        hook.begin(int(seed), obs, info)
    limit = max_steps if max_steps is not None else getattr(env.unwrapped, "max_steps", None)
    observations, actions, chosen, rewards, latencies, nfes = [np.asarray(obs)], [], [], [], [], []
    signals: dict[str, list[float]] = {}
    frames = [env.render()] if render else []
    pending: deque[np.ndarray] = deque()
    collision = terminated = truncated = False
    t = 0
    while True:
        t0 = time.perf_counter()
        a = np.asarray(controller.act(obs))
        latencies.append(time.perf_counter() - t0)
        nfes.append(int(getattr(controller, "last_nfe", 0) or 0))
        chosen.append(a)
        pending.append(a)
        executed = pending.popleft() if len(pending) > delay else chosen[0]
        next_obs, reward, terminated, truncated, info = env.step(executed)
        if hook is not None:
            hook.step(obs, executed, next_obs, info)
        actions.append(np.asarray(executed))
        rewards.append(float(reward))
        for name, value in info.get("signals", {}).items():
            signals.setdefault(name, []).append(float(value))
        collision = collision or bool(info.get("collision", False))
        if render:
            frames.append(env.render())
        obs = next_obs
        observations.append(np.asarray(obs))
        t += 1
        if terminated or truncated or (limit is not None and t >= limit):
            break
    result = EpisodeResult(
        seed=int(seed),
        obs=np.stack(observations),
        action=np.stack(actions),
        chosen=np.stack(chosen),
        signals={k: np.asarray(v, dtype=np.float64) for k, v in signals.items()},
        latency_s=np.asarray(latencies, dtype=np.float64),
        nfe=np.asarray(nfes, dtype=np.int64),
        reward=np.asarray(rewards, dtype=np.float64),
        success=bool(info.get("success", False)),
        collision=collision,
        terminated=bool(terminated),
        truncated=bool(truncated),
        frames=frames,
    )
    if hook is not None:
        hook.end(result)
    return result
