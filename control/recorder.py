"""Recorder: turns the control loop's steps into EpisodeStore episodes.

Stored keys of one episode of length T (one row per executed action)::

    obs            (T, Do)  the observation the action was chosen from (obs[t] at tick t)
    action         (T, Da)  the action the env executed at tick t
    signal_<name>  (T,)     info["signals"][name] returned by the step that executed action[t],
                            i.e. the STL signal of the state *reached after* action[t] (not of obs[t])

With an injected delay the executed action was chosen from an older observation; collection runs with delay 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stlflow.control.loop import EpisodeResult


class EpisodeRecorder:
    """A loop hook that keeps the current episode in memory; :meth:`episode` returns its arrays.

    ``attrs`` given at construction are copied into every episode's attributes; ``extra_attrs`` (a callable
    ``result -> dict``) adds per-episode ones (e.g. the expert's mode and style).
    """

    def __init__(self, attrs: dict[str, Any] | None = None, extra_attrs: Any = None) -> None:
        self.attrs, self.extra_attrs = dict(attrs or {}), extra_attrs
        self._obs: list[np.ndarray] = []
        self._action: list[np.ndarray] = []
        self._signals: dict[str, list[float]] = {}
        self._seed = -1
        self._done: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None

    def begin(self, seed: int, obs: np.ndarray, info: dict) -> None:
        self._obs, self._action, self._signals, self._seed, self._done = [], [], {}, int(seed), None

    def step(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, info: dict) -> None:
        self._obs.append(np.asarray(obs, dtype=np.float32))
        self._action.append(np.asarray(action, dtype=np.float32))
        for name, value in info.get("signals", {}).items():
            self._signals.setdefault(name, []).append(float(value))

    def end(self, result: EpisodeResult) -> None:
        arrays = {"obs": np.stack(self._obs), "action": np.stack(self._action)}
        for name, values in self._signals.items():
            arrays[f"signal_{name}"] = np.asarray(values, dtype=np.float32)
        attrs = dict(self.attrs)
        attrs.update(seed=self._seed, success=bool(result.success), collision=bool(result.collision),
                     length=int(result.length))
        if self.extra_attrs is not None:
            attrs.update(self.extra_attrs(result))
        self._done = (arrays, attrs)

    def episode(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, attrs) of the last finished episode."""
        if self._done is None:
            raise RuntimeError("no finished episode: run the loop with this recorder as its hook first")
        return self._done


def write_episode(store: Any, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> int:
    """Append one recorded episode to an EpisodeStore; returns its index."""
    return int(store.add_episode(arrays, attrs=attrs))
