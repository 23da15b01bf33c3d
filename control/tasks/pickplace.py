"""PickPlace (``stlflow/PickPlace-v0``): tabletop pick and place with a Cartesian end-effector and a binary gripper.

What is specific to the task beyond its env: the behaviour mode (the zone the cube ends in), STL guidance of the
speed rule through the set-point model :class:`~stlflow.envs.pickplace_dynamics.PickPlaceKinematics` (the TCP
follows its commanded set-point closely, so the speed of the planned targets stands in for the TCP speed), and the
augmentation problem: PickPlace has no differentiable model of the cube, so the cross-entropy method perturbs the
demo's end-effector targets over MuJoCo rollouts from the demo's start state; the other zone's placements start
from the demo retargeted there (:func:`retarget_pick_place`), and each (mode, θ) group's nominal is re-timed to
the requested speed (:func:`retime_pick_place`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stlflow.control.tasks.base import Task
from stlflow.control.tasks.replay import check_start, initial_control_range, mode_specs, replay_controls


class PickPlaceTask(Task):
    name = "pickplace"
    env_id = "stlflow/PickPlace-v0"
    path = slice(0, 3)  # TCP xyz (m)
    speed_signal = "ee_speed"
    speed_rule = "speed_limit"
    sweep = (0.2, 0.3, 0.4, 0.5)  # the demonstrations' top speeds are 0.17-0.37 m/s
    cell = 0.02
    guided_rules = ("speed_limit",)  # the one rule the set-point model decides
    # speeds here are tenths of a m/s: a sharper smooth max (gap <= log(15) / 200 = 0.014 m/s), a 1 cm/s margin and
    # steps of at most 0.01 normalised units (~3 mm of TCP target) instead of Crossing's metre-scale defaults
    guidance_options = {"smooth": 200.0, "margin": 0.01, "max_step": 0.01, "scale": 0.01}

    def mode(self, obs: np.ndarray) -> str:
        """The zone the cube ends in (``left``/``right``), else ``"none"`` (the zones are the task's modes)."""
        from stlflow.envs.pickplace import pickplace_signals

        sig = pickplace_signals(np.asarray(obs)[-1:])
        if sig["in_left"][-1] >= 0:
            return "left"
        return "right" if sig["in_right"][-1] >= 0 else "none"

    def dynamics(self) -> Any:
        from stlflow.envs.pickplace_dynamics import PickPlaceKinematics

        return PickPlaceKinematics()

    def model_inputs(self, obs_history: np.ndarray, horizon: int) -> tuple[Any, Any]:
        """Start state (1, 3): the newest observation's servo set-point (the last commanded TCP target); no
        context."""
        import torch

        from stlflow.envs.pickplace_dynamics import PickPlaceKinematics

        obs = np.asarray(obs_history, dtype=np.float32).reshape(-1, np.asarray(obs_history).shape[-1])[-1]
        return PickPlaceKinematics.state_from_obs(torch.as_tensor(obs[None])), None

    def augmentation(self, env_kwargs: Mapping[str, Any], stl_cfg: Mapping[str, Any],
                     modes: Sequence[str] | None = None, dtype: str = "float32") -> Any:
        """CEM augmentation over MuJoCo rollouts (see :class:`PickPlaceAugmentation`)."""
        from stlflow.datasets.augment import AugmentTask

        pp = PickPlaceAugmentation(self, env_kwargs, retime=stl_cfg.get("retime"))
        space = pp.env.action_space
        return AugmentTask(
            rules=pp.u.rules, modes=mode_specs(stl_cfg, modes, self.env_id),
            param_ranges={k: tuple(v) for k, v in (stl_cfg.get("param_ranges") or {}).items()},
            defaults={k: float(v) for k, v in pp.u.rule_defaults.items()},
            control_low=np.asarray(space.low, dtype=np.float64),
            control_high=np.asarray(space.high, dtype=np.float64),
            dt=float(pp.u.dt), window=pp.window, stack=pp.stack, **initial_control_range(stl_cfg))


class PickPlaceAugmentation:
    """Builds :class:`~stlflow.datasets.augment.DemoWindow` s for PickPlace: no differentiable model, so the
    "rollout" steps MuJoCo itself from the demo's start state (``get_state``/``set_state``), one candidate after
    the other, for the sampling-based optimiser (``optimiser=cem``) that perturbs the demo's end-effector targets.

    Model "states" (B, H, 3 + S): the TCP position (m) then the env's STL signals in ``SIGNALS`` order.

    With ``retime`` (``{speed_fraction, scale_range}`` of the task's STL settings) each (mode, θ) group's nominal is
    the demo played faster or slower (:func:`retime_pick_place`) so that its top speed is ``speed_fraction`` times
    the group's requested ``v_max`` (scale clipped to ``scale_range``): the CEM's 5 mm perturbations cannot change
    the demo's pace, so without this every augmented episode moves at its demo's speed whatever θ it is labelled
    with, and a θ-conditioned policy cannot learn to follow a requested speed.
    """

    SIGNALS = ("ee_speed", "ee_height_clear", "in_target", "in_left", "in_right")

    def __init__(self, task: Task, env_kwargs: Mapping[str, Any] | None = None,
                 retime: Mapping[str, Any] | None = None) -> None:
        self.env = task.make_env(env_kwargs)
        self.u = self.env.unwrapped
        self.retime = None
        if retime:
            frac = float(retime.get("speed_fraction", 0.85))
            lo, hi = (float(x) for x in retime.get("scale_range", (0.5, 2.0)))
            if not (0.0 < frac <= 1.0 and 0.0 < lo <= 1.0 <= hi):
                raise ValueError(f"retime needs 0 < speed_fraction <= 1 and 0 < scale_range[0] <= 1 <= "
                                 f"scale_range[1]; got {retime}")
            self.retime = {"speed_fraction": frac, "scale_range": (lo, hi)}

    def window(self, episode: dict[str, np.ndarray], attrs: Mapping[str, Any]) -> Any:
        import torch

        from stlflow.datasets.augment import DemoWindow

        seed, obs0 = check_start(self.env, episode, attrs)
        u = self.u
        state0 = u.get_state()
        demo = np.asarray(episode["action"], dtype=np.float64)
        zones = {side: np.asarray(obs0[u.obs_index[f"zone_{side}"]], dtype=np.float64) for side in ("left", "right")}
        nominal = {"*": demo}
        mode = attrs.get("mode")
        if mode in zones:  # the demo's zone is known: also offer the other zone (a mode the demo did not show)
            other = "right" if mode == "left" else "left"
            moved = retarget_pick_place(demo, zones[mode], zones[other])
            if moved is not None:
                nominal[other] = moved
        longest = max(len(v) for v in nominal.values())
        retime = None
        if self.retime is not None:
            demo_speed = float(np.max(np.linalg.norm(np.asarray(episode["obs"])[:, u.obs_index["ee_vel"]], axis=-1)))
            frac, (lo, hi) = self.retime["speed_fraction"], self.retime["scale_range"]
            start = np.asarray(obs0[u.obs_index["ee_target"]], dtype=np.float64)

            def retime(nom: np.ndarray, theta: dict[str, float]) -> np.ndarray:
                if "v_max" not in theta or demo_speed <= 0:
                    return nom
                scale = float(np.clip(frac * theta["v_max"] / demo_speed, lo, hi))
                return retime_pick_place(nom, scale, start=start)

            longest = int(np.ceil(longest / lo))  # the slowest re-timing must fit in the rollouts
        horizon = min(longest, int(u.max_steps))

        def rollout(controls: torch.Tensor) -> torch.Tensor:
            out = np.empty((controls.shape[0], horizon, 3 + len(self.SIGNALS)))
            for b, seq in enumerate(controls.detach().cpu().numpy()):
                u.set_state(state0)
                for t in range(horizon):
                    obs, _, _, _, info = u.step(seq[t])
                    out[b, t, :3] = obs[:3]
                    out[b, t, 3:] = [info["signals"][k] for k in self.SIGNALS]
            return torch.as_tensor(out)

        def signals(states: torch.Tensor) -> dict[str, torch.Tensor]:
            return {k: states[..., 3 + i] for i, k in enumerate(self.SIGNALS)}

        def replay(controls: np.ndarray) -> Any:
            return replay_controls(self.env, seed, controls)[0]

        return DemoWindow(horizon, rollout, signals, lambda states: states[..., :3], replay, nominal=nominal,
                          retime=retime, data={"state0": state0})

    def stack(self, windows: Sequence[Any], replay_threads: int = 1) -> Any:
        """The windows as one batch whose rollout runs MuJoCo's multi-threaded ``mujoco.rollout``
        (:func:`stlflow.control.tasks.pickplace_rollout.rollout_states`: the same states as the window's own
        step-by-step rollout) with ``replay_threads`` threads; replays go through each window's own."""
        import torch

        from stlflow.control.tasks.pickplace_rollout import rollout_states
        from stlflow.datasets.augment import WindowBatch

        horizons = sorted({w.horizon for w in windows})
        if len(horizons) != 1:
            raise ValueError(f"PickPlace windows of one batch must share their horizon; got {horizons}")
        states0 = [w.data["state0"] for w in windows]

        def rollout(controls: torch.Tensor, demo: torch.Tensor) -> torch.Tensor:
            c = controls.detach().cpu().numpy()
            out = np.empty((len(c), horizons[0], 3 + len(self.SIGNALS)))
            for i in np.unique(demo.numpy()):
                rows = np.flatnonzero(demo.numpy() == i)
                out[rows] = rollout_states(self.env, states0[i], c[rows], self.SIGNALS, threads=replay_threads)
            return torch.as_tensor(out)

        return WindowBatch(horizons[0], rollout, lambda states, demo: windows[0].signals(states),
                           windows[0].positions, lambda items: [windows[i].replay(c) for i, c in items])


def retime_pick_place(actions: np.ndarray, scale: float, start: np.ndarray | None = None,
                      still_tol: float = 1e-4) -> np.ndarray:
    """A PickPlace action sequence (T, 4) played ``scale`` times faster (> 1) or slower (< 1).

    Steps in which the TCP target moves last ``1 / scale`` as long; steps in which it holds still (grasp and
    release waits) or the gripper command switches keep their duration, so the gripper still has time to close
    on the cube. ``start``: the servo set-point before the first action (the env's ``ee_target`` at reset), so that
    the move to the first target is re-timed too. Targets are interpolated linearly in the new time; the gripper
    command at a new step is the last original command at or before it; the last action is always kept (the
    release). Returns (T', 4), T' ~ (moving steps) / scale + (still steps).
    """
    a = np.asarray(actions, dtype=np.float64)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if scale == 1.0 or len(a) < 2:
        return a.copy()
    if start is not None:  # the set-point at reset, with the first action's gripper command
        a = np.concatenate([np.append(np.asarray(start, dtype=np.float64)[:3], a[0, 3])[None], a])
    moves = np.linalg.norm(np.diff(a[:, :3], axis=0), axis=1) > still_tol
    switches = np.diff(a[:, 3]) != 0
    tau = np.concatenate([[0.0], np.cumsum(np.where(moves & ~switches, 1.0 / scale, 1.0))])
    tq = np.arange(int(np.floor(tau[-1] + 1e-9)) + 1, dtype=np.float64)
    if tau[-1] - tq[-1] > 1e-9:
        tq = np.append(tq, tau[-1])
    xyz = np.stack([np.interp(tq, tau, a[:, j]) for j in range(3)], axis=1)
    grip = a[np.searchsorted(tau, tq + 1e-9, side="right") - 1, 3]
    out = np.concatenate([xyz, grip[:, None]], axis=1)
    return out[1:] if start is not None else out


def retarget_pick_place(actions: np.ndarray, zone_from: np.ndarray, zone_to: np.ndarray) -> np.ndarray | None:
    """A PickPlace demo's actions (T, 4) moved to place in another zone: the nominal of an unseen mode.

    The grasp (first closing command) and everything before it are kept. The closed-gripper segment up to the
    release (grasp wait, lift, carry, lower) is re-timed so that its horizontal speed does not grow (stretched by
    the ratio of the new to the old carry distance when that is > 1) and bent so that the target goes straight
    from the grasp point to the old drop point moved by ``zone_to - zone_from`` (the same offset from the zone
    centre), in proportion to the demo's horizontal progress; the release and what follows are shifted by the
    same offset. Heights and gripper commands are the demo's. Returns (T', 4) or None when the demo has no
    grasp followed by a release.
    """
    a = np.asarray(actions, dtype=np.float64)
    closed = a[:, 3] > 0
    if not closed.any():
        return None
    g = int(np.argmax(closed))
    opened = np.flatnonzero(~closed[g:])
    if not len(opened):
        return None
    r = g + int(opened[0])
    p_g, p_r = a[g, :2], a[r - 1, :2]
    shift = np.asarray(zone_to, dtype=np.float64) - np.asarray(zone_from, dtype=np.float64)
    dist_from = float(np.linalg.norm(p_r - p_g))
    dist_to = float(np.linalg.norm(p_r + shift - p_g))
    n_old = r - g
    n_new = max(n_old, int(np.ceil(n_old * dist_to / max(dist_from, 1e-6))))
    src = np.linspace(0.0, n_old - 1, n_new) if n_old > 1 else np.zeros(n_new)
    seg = np.stack([np.interp(src, np.arange(n_old), a[g:r, j]) for j in range(4)], axis=1)
    progress = np.clip(np.linalg.norm(seg[:, :2] - p_g, axis=1) / max(dist_from, 1e-6), 0.0, 1.0)
    seg[:, :2] += progress[:, None] * shift
    seg[:, 3] = 1.0
    tail = a[r:].copy()
    tail[:, :2] += shift
    return np.concatenate([a[:g], seg, tail])
