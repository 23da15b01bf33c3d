"""What every stlflow env shares: the scripted-expert protocol, ``make_env`` and off-screen rendering."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


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

    def reset(self, seed: int | None = None, obs: Any = None) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None, render_mode: str | None = None) -> Any:
    """``gym.make`` of a registered env id, with ``env_kwargs``; an unknown id is a ValueError listing the stlflow
    ids."""
    import gymnasium as gym

    kwargs = dict(env_kwargs or {})
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as err:
        from gymnasium.envs.registration import registry

        ours = sorted(k for k in registry if k.startswith("stlflow/"))
        raise ValueError(f"unknown env id {env_id!r}; stlflow env ids: {ours}") from err


def make_expert(env: Any, seed: int) -> Expert:
    """The scripted expert of ``env`` (a gymnasium env, wrapped or not) for episode ``seed``."""
    return env.unwrapped.make_expert(seed)


class OffscreenRenderer:
    """Off-screen RGB rendering of a MuJoCo model, created lazily on the first frame.

    Needs an OpenGL back-end: set ``MUJOCO_GL=egl`` (GPU or Mesa EGL) or ``MUJOCO_GL=osmesa``
    (software) on headless machines. Without one, the first frame raises a ``RuntimeError``
    that says so, instead of MuJoCo's low-level GL message.
    """

    def __init__(self, model: Any, width: int = 480, height: int = 360) -> None:
        self.model, self.width, self.height = model, width, height
        self._renderer = None

    def render(self, data: Any, camera: str | int = -1) -> np.ndarray:
        """An (height, width, 3) uint8 frame of ``data`` seen from ``camera`` (name or id; -1 = free camera)."""
        if self._renderer is None:
            import mujoco

            try:
                self._renderer = mujoco.Renderer(self.model, height=self.height, width=self.width)
            except Exception as err:  # mujoco raises various GL errors; make the remedy obvious
                import os

                raise RuntimeError(
                    f"off-screen rendering failed ({err}); MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}. "
                    "Set MUJOCO_GL=egl (or MUJOCO_GL=osmesa for software rendering) before importing mujoco."
                ) from err
        self._renderer.update_scene(data, camera=camera)
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
