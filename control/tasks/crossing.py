"""Crossing (``stlflow/Crossing-v0``): a unicycle robot drives down a corridor while pedestrians cross.

What is specific to the task beyond its env: the behaviour mode of a trajectory (the expert's five modes), the
model inputs of STL guidance through :class:`~stlflow.envs.crossing_dynamics.CrossingDynamics` (pedestrians
predicted at constant velocity from the observation alone: nothing privileged), and the augmentation problem
(gradient-based trajectory optimisation through the same model, every candidate replayed in MuJoCo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stlflow.control.tasks.base import Task
from stlflow.control.tasks.replay import check_start, initial_control_range, mode_specs, replay_controls


class CrossingTask(Task):
    name = "crossing"
    env_id = "stlflow/Crossing-v0"
    path = slice(0, 2)  # robot xy (m)
    speed_signal = "speed"
    speed_rule = "speed"
    sweep = (0.9, 1.1, 1.3, 1.5)
    cell = 0.1
    guided_rules = ("speed", "clearance", "corridor")  # the rules a 1.5 s chunk can decide (reaching the goal is not)

    def mode(self, obs: np.ndarray, side: float = 0.6, stop_speed: float = 0.15, near: float = 0.5) -> str:
        """Behaviour mode of a trajectory ``obs`` (T, Do) w.r.t. pedestrian 0 (the expert's five modes).

        At the step where the robot is level with the pedestrian (smallest |x_robot - x_ped|, which must be <=
        ``near`` m; else ``"none"``): ``left``/``right`` when |lateral| >= ``side`` m; else ``front`` when the robot
        is on the side the pedestrian walks toward, otherwise ``yield`` if it slowed below ``stop_speed`` m/s
        before, else ``behind``.
        """
        from stlflow.envs.crossing import I_PEDS, I_V, I_Y

        obs = np.asarray(obs)
        if obs.ndim != 2 or obs.shape[0] == 0 or obs[0, I_PEDS] < 0.5:
            return "none"
        dx = obs[:, I_PEDS + 1]  # pedestrian x minus robot x
        t = int(np.argmin(np.abs(dx)))
        if abs(dx[t]) > near:
            return "none"
        lateral = float(obs[t, I_Y])
        if lateral >= side:
            return "left"
        if lateral <= -side:
            return "right"
        vy = obs[:, I_PEDS + 4]
        moving = vy[np.abs(vy) > 1e-3]
        dir_y = float(np.sign(moving[0])) if moving.size else 1.0
        ahead = -float(obs[t, I_PEDS + 2]) * dir_y  # (robot y - pedestrian y) along its walking direction
        if ahead > 0:
            return "front"
        return "yield" if float(np.min(np.abs(obs[: t + 1, I_V]))) < stop_speed and t > 0 else "behind"

    def dynamics(self) -> Any:
        from stlflow.envs.crossing_dynamics import CrossingDynamics

        return CrossingDynamics()

    def model_inputs(self, obs_history: np.ndarray, horizon: int) -> tuple[Any, Any]:
        """Start state (1, 5) and :class:`CrossingContext` for H = ``horizon`` steps from the newest observation.

        Pedestrians are predicted at constant velocity from their observed position and velocity (the env's
        pedestrians walk straight lines, so this is exact while they walk and conservative once they stop); the
        goal is the robot position plus the observed goal offset. Uses nothing but ``obs_history[-1]`` (Do,).
        """
        import torch

        from stlflow.envs.crossing import DT, I_PEDS, N_PEDS, PED_STRIDE
        from stlflow.envs.crossing_dynamics import CrossingContext, CrossingDynamics

        obs = np.asarray(obs_history, dtype=np.float32).reshape(-1, np.asarray(obs_history).shape[-1])[-1]
        state0 = CrossingDynamics.state_from_obs(torch.as_tensor(obs[None]))
        peds = obs[I_PEDS:].reshape(N_PEDS, PED_STRIDE)
        times = DT * np.arange(1, int(horizon) + 1, dtype=np.float32)
        pos = obs[None, None, :2] + peds[None, :, 1:3] + times[:, None, None] * peds[None, :, 3:5]  # (H, P, 2)
        ctx = CrossingContext(
            ped_pos=torch.as_tensor(pos[None]),
            ped_present=torch.as_tensor(peds[None, :, 0]),
            goal=torch.as_tensor((obs[:2] + obs[6:8])[None]),
        )
        return state0, ctx

    def augmentation(self, env_kwargs: Mapping[str, Any], stl_cfg: Mapping[str, Any],
                     modes: Sequence[str] | None = None, dtype: str = "float32") -> Any:
        """Gradient-based augmentation through ``env.dynamics_model()`` (see :class:`CrossingAugmentation`)."""
        import torch

        from stlflow.datasets.augment import AugmentTask

        aug = CrossingAugmentation(self, env_kwargs, dtype=getattr(torch, dtype))
        u = aug.u
        ranges = {k: tuple(v) for k, v in (stl_cfg.get("param_ranges") or {}).items()}
        t_max = float(ranges.get("T", (0.0, 0.0))[1])  # the largest sampled time bound

        def window(episode: dict[str, np.ndarray], attrs: dict[str, Any]) -> Any:
            theta_t = float((attrs.get("stl_params") or u.rule_defaults).get("T", 0.0))  # the demo mode keeps its T
            horizon = int(round(max(t_max, theta_t) / u.dt)) + 1  # samples 0 .. T/dt of the post-action signals
            return aug.window(episode, attrs, horizon)

        return AugmentTask(
            rules=u.rules, modes=mode_specs(stl_cfg, modes, self.env_id), param_ranges=ranges,
            defaults={k: float(v) for k, v in u.rule_defaults.items()},
            control_low=np.asarray(aug.model.control_low, dtype=np.float64),
            control_high=np.asarray(aug.model.control_high, dtype=np.float64),
            dt=float(u.dt), window=window, stack=aug.stack, **initial_control_range(stl_cfg))


class CrossingAugmentation:
    """Builds :class:`~stlflow.datasets.augment.DemoWindow` s for Crossing (one env instance for resets, replays).

    Mode signals besides the env's (speed, clearance, lateral, dist_goal), all after each control step:
    ``ped_dx`` = robot x - pedestrian 0's x (m); ``ped_ahead`` = (robot y - pedestrian 0's y) times the sign of
    the pedestrian's walking direction in y (m): > 0 on the side it walks towards (the robot passes in front).
    """

    def __init__(self, task: Task, env_kwargs: Mapping[str, Any] | None = None, dtype: Any = None) -> None:
        import torch

        self.env = task.make_env(env_kwargs)
        self.u = self.env.unwrapped
        self.model = self.u.dynamics_model()
        self.dtype = dtype or torch.float32

    @staticmethod
    def mode_signals_from_obs(next_obs: np.ndarray, dir_y: float) -> dict[str, np.ndarray]:
        """``ped_dx``, ``ped_ahead`` (T,) from the observations reached after each action (T, Do)."""
        from stlflow.envs.crossing import I_PEDS

        dx, dy = next_obs[:, I_PEDS + 1], next_obs[:, I_PEDS + 2]  # pedestrian 0 minus robot
        return {"ped_dx": (-dx).astype(np.float64), "ped_ahead": (-dy * dir_y).astype(np.float64)}

    def window(self, episode: dict[str, np.ndarray], attrs: Mapping[str, Any], horizon: int) -> Any:
        """The optimisation problem from the start of a recorded episode (``attrs['seed']`` gives the scene)."""
        import torch

        from stlflow.datasets.augment import DemoWindow

        seed, obs0 = check_start(self.env, episode, attrs)
        horizon = int(min(horizon, self.u.max_steps))
        state0 = self.model.state_from_obs(torch.as_tensor(obs0[None], dtype=self.dtype))
        ctx = self.u.pedestrian_context(horizon).to(self.dtype)
        ped0 = ctx.ped_pos[:, :, 0, :]  # (1, H, 2)
        dir_y = float(np.sign(self.u.peds.direction[0, 1])) or 1.0
        model, env = self.model, self.env

        def rollout(controls: torch.Tensor) -> torch.Tensor:
            return model.rollout(state0.expand(controls.shape[0], -1), controls)

        def signals(states: torch.Tensor) -> dict[str, torch.Tensor]:
            sig = model.signals(states, ctx)
            sig["ped_dx"] = states[..., 0] - ped0[..., 0]
            sig["ped_ahead"] = (states[..., 1] - ped0[..., 1]) * dir_y
            return sig

        def replay(controls: np.ndarray) -> Any:
            result, ep = replay_controls(env, seed, controls)
            result.signals.update(self.mode_signals_from_obs(ep.obs[1:], dir_y))
            return result

        data = {"state0": state0, "ctx": ctx, "ped0": ped0, "dir_y": dir_y, "replay_scene": (self.env, seed, dir_y)}
        return DemoWindow(horizon=horizon, rollout=rollout, signals=signals,
                          positions=lambda states: states[..., :2], replay=replay, data=data)

    @staticmethod
    def stack(windows: Sequence[Any], replay_threads: int = 1) -> Any:
        """Several windows of :meth:`window` as one batched problem (see
        :func:`stlflow.control.tasks.crossing_augment.stack_windows`)."""
        from stlflow.control.tasks.crossing_augment import stack_windows

        return stack_windows(windows, replay_threads)
