"""What every stlflow task shares: the scripted-expert protocol and task names."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

# Short task names (used by Hydra's env group and the CLI) -> gymnasium ids.
TASKS: dict[str, str] = {
    "crossing": "stlflow/Crossing-v0",
    "pickplace": "stlflow/PickPlace-v0",
}


@runtime_checkable
class Expert(Protocol):
    """A scripted expert bound to one env instance; it is also a controller (``reset``/``act``).

    Usage (what the collection loop does)::

        env = gym.make("stlflow/Crossing-v0"); expert = env.unwrapped.make_expert(seed)
        obs, info = env.reset(seed=seed); expert.reset()
        while not done: obs, r, term, trunc, info = env.step(expert.act(obs))

    ``mode`` names the behaviour mode drawn for this episode (e.g. ``"yield"``, ``"pass_left"``)
    and ``style`` holds the per-episode randomised style parameters (JSON-able floats).
    Both are fixed by ``seed`` alone. The expert may read the env's privileged state.
    """

    mode: str
    style: dict[str, Any]

    def reset(self) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...


def make_expert(env: Any, seed: int) -> Expert:
    """The scripted expert of ``env`` (a gymnasium env, wrapped or not) for episode ``seed``."""
    return env.unwrapped.make_expert(seed)
