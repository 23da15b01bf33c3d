"""Make diverse, rule-satisfying synthetic episodes from demonstrations by trajectory optimisation.

    stlflow augment data=demos.zarr out=augmented.zarr per_demo=8 [env=crossing] [workers=2] [seed=0]

For each demonstration, from its start state (the env reset with the episode's seed): sample STL parameters θ
for every behaviour mode of the task (conf/stl/<env>.yaml: the rules plus per-mode formulas, e.g. pass in front,
pass behind, yield, swerve left or right), including modes and values the demonstration did not show; optimise
``n_theta x n_init`` random control sequences per mode at once with Adam through the task's differentiable
dynamics model (hinge on smooth robustness at a small positive margin, plus a control-bound penalty); pick
``per_demo`` of the candidates that satisfy their θ by group-balanced farthest-point selection; replay each in
the real MuJoCo env and keep it only if it satisfies its θ there (exact robustness >= 0) without collision.

The demonstrations need ``stl_params`` (run ``stlflow calibrate`` first; without it the task defaults are used).
Output: an EpisodeStore with the demo store's keys (obs, action, signal_*) and per-episode attributes
``source=augmented``, ``mode``, ``stl_params``, ``seed``, ``parent_episode``. Deterministic for a seed, for any
number of workers. Prints the acceptance rate, diversity before/after selection and throughput.

Tasks: Crossing is optimised with gradients through ``env.dynamics_model()``; PickPlace has no differentiable
model, so it uses the cross-entropy method over MuJoCo rollouts from the demo's start state (perturbing the
demo's end-effector targets; its gripper timing is kept), selected by ``stl.opt`` in conf/stl/pickplace.yaml.
Its two modes are the target zones: the demo's own zone starts from the demo's actions, the other zone from the
demo retargeted there (``retarget_pick_place``), so every demo yields placements in both zones.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from stlflow.config import verb_config
from stlflow.datasets.augment import (
    AugmentReport,
    AugmentSettings,
    AugmentTask,
    DemoWindow,
    ModeSpec,
    ReplayResult,
    augment_store,
)


# ------------------------------------------------------------------------------------------------ Crossing
class CrossingAugmentation:
    """Builds :class:`DemoWindow` s for ``stlflow/Crossing-v0`` (one env instance for resets and replays).

    Mode signals besides the env's (speed, clearance, lateral, dist_goal), all after each control step:
    ``ped_dx`` = robot x - pedestrian 0's x (m); ``ped_ahead`` = (robot y - pedestrian 0's y) times the sign of
    the pedestrian's walking direction in y (m): > 0 on the side it walks towards (the robot passes in front).
    """

    def __init__(
        self,
        env_id: str = "stlflow/Crossing-v0",
        env_kwargs: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from stlflow.control.collect import make_env

        self.env = make_env(env_id, env_kwargs)
        self.u = self.env.unwrapped
        self.model = self.u.dynamics_model()
        self.dtype = dtype

    def _reset(self, seed: int) -> np.ndarray:
        obs, _ = self.env.reset(seed=int(seed))
        return obs

    @staticmethod
    def mode_signals_from_obs(next_obs: np.ndarray, dir_y: float) -> dict[str, np.ndarray]:
        """``ped_dx``, ``ped_ahead`` (T,) from the observations reached after each action (T, Do)."""
        from stlflow.envs.crossing import I_PEDS

        dx, dy = next_obs[:, I_PEDS + 1], next_obs[:, I_PEDS + 2]  # pedestrian 0 minus robot
        return {"ped_dx": (-dx).astype(np.float64), "ped_ahead": (-dy * dir_y).astype(np.float64)}

    def window(self, episode: dict[str, np.ndarray], attrs: dict[str, Any], horizon: int) -> DemoWindow:
        """The optimisation problem from the start of a recorded episode (``attrs['seed']`` gives the scene)."""
        if "seed" not in attrs:
            raise KeyError(f"episode attrs have no 'seed' (needed to reset the env to its start): {sorted(attrs)}")
        seed = int(attrs["seed"])
        obs0 = self._reset(seed)
        if not np.allclose(obs0, episode["obs"][0], atol=1e-4):
            raise ValueError(
                f"env reset with seed {seed} does not reproduce the episode's first observation "
                f"(max difference {np.abs(obs0 - episode['obs'][0]).max():.3g}); "
                "was it recorded with other env settings?"
            )
        horizon = int(min(horizon, self.u.max_steps))
        dt_ = self.dtype
        state0 = self.model.state_from_obs(torch.as_tensor(obs0[None], dtype=dt_))
        ctx = self.u.pedestrian_context(horizon).to(dt_)
        ped0 = ctx.ped_pos[:, :, 0, :]  # (1, H, 2)
        dir_y = float(np.sign(self.u.peds.direction[0, 1])) or 1.0
        model = self.model

        def rollout(controls: torch.Tensor) -> torch.Tensor:
            return model.rollout(state0.expand(controls.shape[0], -1), controls)

        def signals(states: torch.Tensor) -> dict[str, torch.Tensor]:
            sig = model.signals(states, ctx)
            sig["ped_dx"] = states[..., 0] - ped0[..., 0]
            sig["ped_ahead"] = (states[..., 1] - ped0[..., 1]) * dir_y
            return sig

        def replay(controls: np.ndarray) -> ReplayResult:
            result, episode = _replay(self.env, seed, controls)
            result.signals.update(self.mode_signals_from_obs(episode.obs[1:], dir_y))
            return result

        return DemoWindow(
            horizon=horizon,
            rollout=rollout,
            signals=signals,
            positions=lambda states: states[..., :2],
            replay=replay,
        )


# ------------------------------------------------------------------------------------------------ PickPlace
class PickPlaceAugmentation:
    """Builds :class:`DemoWindow` s for ``stlflow/PickPlace-v0``: no differentiable model, so the "rollout" steps
    MuJoCo itself from the demo's start state (``get_state``/``set_state``), one candidate after the other, for
    the sampling-based optimiser (``optimiser=cem``) that perturbs the demo's end-effector targets.

    Model "states" (B, H, 3 + S): the TCP position (m) then the env's STL signals in ``SIGNALS`` order.

    With ``retime`` (``{speed_fraction, scale_range}``, conf/stl/pickplace.yaml) each (mode, θ) group's nominal is
    the demo played faster or slower (:func:`retime_pick_place`) so that its top speed is ``speed_fraction`` times
    the group's requested ``v_max`` (scale clipped to ``scale_range``): the CEM's 5 mm perturbations cannot change
    the demo's pace, so without this every augmented episode moves at its demo's speed whatever θ it is labelled
    with, and a θ-conditioned policy cannot learn to follow a requested speed.
    """

    SIGNALS = ("ee_speed", "ee_height_clear", "in_target", "in_left", "in_right")

    def __init__(self, env_id: str = "stlflow/PickPlace-v0", env_kwargs: dict[str, Any] | None = None,
                 retime: dict[str, Any] | None = None) -> None:
        from stlflow.control.collect import make_env

        self.env = make_env(env_id, env_kwargs)
        self.u = self.env.unwrapped
        self.retime = None
        if retime:
            frac = float(retime.get("speed_fraction", 0.85))
            lo, hi = (float(x) for x in retime.get("scale_range", (0.5, 2.0)))
            if not (0.0 < frac <= 1.0 and 0.0 < lo <= 1.0 <= hi):
                raise ValueError(f"retime needs 0 < speed_fraction <= 1 and 0 < scale_range[0] <= 1 <= "
                                 f"scale_range[1]; got {retime}")
            self.retime = {"speed_fraction": frac, "scale_range": (lo, hi)}

    def window(self, episode: dict[str, np.ndarray], attrs: dict[str, Any]) -> DemoWindow:
        if "seed" not in attrs:
            raise KeyError(f"episode attrs have no 'seed' (needed to reset the env to its start): {sorted(attrs)}")
        seed, u = int(attrs["seed"]), self.u
        obs0, _ = self.env.reset(seed=seed)
        if not np.allclose(obs0, episode["obs"][0], atol=1e-4):
            raise ValueError(f"env reset with seed {seed} does not reproduce the episode's first observation")
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

        def replay(controls: np.ndarray) -> ReplayResult:
            return _replay(self.env, seed, controls)[0]

        return DemoWindow(horizon, rollout, signals, lambda states: states[..., :3], replay, nominal=nominal,
                          retime=retime)


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


class _Playback:
    """A controller that plays a fixed control sequence, one control per tick (for MuJoCo replay)."""

    def __init__(self, controls: np.ndarray) -> None:
        self.controls = np.asarray(controls, dtype=np.float32)
        self.t = 0

    def reset(self) -> None:
        self.t = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        u = self.controls[self.t]
        self.t += 1
        return u


def _replay(env: Any, seed: int, controls: np.ndarray) -> tuple[ReplayResult, Any]:
    """Replay ``controls`` (H, Du) from ``env.reset(seed)`` in the real env, through the control loop.

    Stops early when the env terminates or truncates. Returns the augmentation's ``ReplayResult`` and the loop's
    ``EpisodeResult`` (for task-specific extras such as signals computed from the observations reached).
    """
    from stlflow.control.loop import run_episode

    episode = run_episode(env, _Playback(controls), int(seed), max_steps=len(controls))
    result = ReplayResult(
        obs=np.asarray(episode.obs[:-1], dtype=np.float32),
        action=np.asarray(episode.action, dtype=np.float32),
        signals={k: np.asarray(v) for k, v in episode.signals.items()},
        collision=bool(episode.collision),
        attrs={"success": bool(episode.success), "length": episode.length},
    )
    return result, episode


def _modes(stl_cfg: dict[str, Any]) -> list[ModeSpec]:
    modes = stl_cfg.get("modes") or {"rules": {}}  # no modes: the rules alone, as one mode named "rules"
    return [
        ModeSpec(
            name, (m or {}).get("formula"), {k: tuple(v) for k, v in ((m or {}).get("param_ranges") or {}).items()}
        )
        for name, m in modes.items()
    ]


def make_task(
    env_id: str,
    env_kwargs: dict[str, Any],
    stl_cfg: dict[str, Any],
    modes: list[str] | None = None,
    dtype: str = "float32",
) -> AugmentTask:
    """The :class:`AugmentTask` of a task id with its ``conf/stl/<env>.yaml`` settings (runs in each worker).

    ``modes``: restrict to these behaviour modes (default: all in ``stl_cfg``).
    """
    ranges = {k: tuple(v) for k, v in (stl_cfg.get("param_ranges") or {}).items()}
    init = {
        k: None if stl_cfg.get(k) is None else np.asarray(stl_cfg[k], dtype=np.float64)
        for k in ("init_low", "init_high")
    }
    if env_id == "stlflow/PickPlace-v0":
        pp = PickPlaceAugmentation(env_id, env_kwargs, retime=stl_cfg.get("retime"))
        space = pp.env.action_space
        return AugmentTask(
            rules=pp.u.rules,
            modes=_modes(stl_cfg),
            param_ranges=ranges,
            defaults={k: float(v) for k, v in pp.u.rule_defaults.items()},
            control_low=np.asarray(space.low, dtype=np.float64),
            control_high=np.asarray(space.high, dtype=np.float64),
            dt=float(pp.u.dt),
            window=pp.window,
            **init,
        )
    if env_id != "stlflow/Crossing-v0":
        raise NotImplementedError(
            f"stlflow augment supports stlflow/Crossing-v0 and stlflow/PickPlace-v0, not {env_id}"
        )
    aug = CrossingAugmentation(env_id, env_kwargs, dtype=getattr(torch, dtype))
    u = aug.u
    specs = _modes(stl_cfg)
    if modes:
        unknown = set(modes) - {m.name for m in specs}
        if unknown:
            raise ValueError(f"unknown mode(s) {sorted(unknown)}; modes of {env_id}: {[m.name for m in specs]}")
        specs = [m for m in specs if m.name in modes]
    t_max = float(ranges.get("T", (0.0, 0.0))[1])  # the largest sampled time bound
    low = np.asarray(aug.model.control_low, dtype=np.float64)
    high = np.asarray(aug.model.control_high, dtype=np.float64)

    def window(episode: dict[str, np.ndarray], attrs: dict[str, Any]) -> DemoWindow:
        theta_t = float((attrs.get("stl_params") or u.rule_defaults).get("T", 0.0))  # the demo mode keeps its own T
        horizon = int(round(max(t_max, theta_t) / u.dt)) + 1  # samples 0 .. T/dt of the post-action signals
        return aug.window(episode, attrs, horizon)

    return AugmentTask(
        rules=u.rules,
        modes=specs,
        param_ranges=ranges,
        defaults={k: float(v) for k, v in u.rule_defaults.items()},
        control_low=low,
        control_high=high,
        dt=float(u.dt),
        window=window,
        **init,
    )


def settings_from_cfg(cfg) -> AugmentSettings:
    """:class:`AugmentSettings` from the ``augment`` config: ``per_demo``, the ``opt`` block, then the task's own
    ``stl.opt`` block on top (e.g. PickPlace selects ``optimiser: cem``; override it as ``stl.opt.<key>=``)."""
    opt = OmegaConf.to_container(cfg.opt, resolve=True)
    opt.update(OmegaConf.to_container(cfg.stl.get("opt") or OmegaConf.create({}), resolve=True))
    if opt.get("cem_std") is not None:
        opt["cem_std"] = tuple(float(x) for x in opt["cem_std"])
    return AugmentSettings(
        per_demo=int(cfg.per_demo),
        time_params=tuple(cfg.stl.get("time_params") or ()),
        **opt,
    )


def augment(cfg, progress: bool = True) -> AugmentReport:
    """Run the augmentation described by a composed ``augment`` config; returns its report."""
    from stlflow import stl
    from stlflow.datasets import EpisodeStore

    demos = EpisodeStore.open(cfg.data)
    env_id = demos.attrs.get("env_id") or cfg.env.id
    if env_id != cfg.env.id:
        raise ValueError(f"{cfg.data} holds {env_id} episodes but env={cfg.env.name} ({cfg.env.id})")
    if not any("stl_params" in a for a in demos.all_episode_attrs()):
        print(
            f"note: {cfg.data} has no calibrated stl_params (run `stlflow calibrate`); using the task defaults",
            file=sys.stderr,
        )
    stl_cfg = OmegaConf.to_container(cfg.stl, resolve=True)
    env_kwargs = dict(demos.attrs.get("env_kwargs") or OmegaConf.to_container(cfg.env.get("kwargs") or {}))
    modes = list(cfg.modes) if cfg.get("modes") else None
    settings = settings_from_cfg(cfg)
    factory = functools.partial(make_task, env_id, env_kwargs, stl_cfg, modes, settings.dtype)
    episodes = None if cfg.get("episodes") is None else range(min(int(cfg.episodes), demos.n_episodes))
    return augment_store(
        cfg.data,
        cfg.out,
        factory,
        settings,
        stl.parse,
        seed=int(cfg.seed),
        workers=int(cfg.workers),
        episodes=episodes,
        overwrite=bool(cfg.overwrite),
        progress=progress,
        out_attrs={"augment_settings": settings.__dict__ | {"time_params": list(settings.time_params)}},
    )


def format_report(r: AugmentReport) -> str:
    """The figures a user wants after a run, one per line."""
    lines = [
        f"demos: {r.n_demos}; candidates optimised: {r.n_candidates}; satisfying in the model: {r.n_satisfying} "
        f"({r.n_satisfying / max(r.n_candidates, 1):.1%})",
        f"replayed in MuJoCo: {r.n_replayed}; accepted: {r.n_accepted}; acceptance rate {r.acceptance_rate:.1%} "
        f"(rejected: {r.n_rejected_collision} collided, {r.n_replayed - r.n_accepted - r.n_rejected_collision} "
        f"missed their θ; by mode {json.dumps(r.rejected_by_mode, sort_keys=True)})",
        f"diversity (mean pairwise RMS distance of xy trajectories, m, per start state): all satisfying candidates "
        f"{r.div_candidates:.3f}; random {r.per_demo}-subset {r.div_random:.3f}; "
        f"selected {r.div_selected:.3f}",
        f"behaviour modes per start state: demos {r.modes_per_demo_before:.2f} -> "
        f"augmented {r.modes_per_demo_after:.2f}",
        f"modes: demos {json.dumps(r.mode_counts_demos, sort_keys=True)}; "
        f"augmented {json.dumps(r.mode_counts_augmented, sort_keys=True)}",
        f"throughput: {r.satisfying_per_second:.2f} stored (replay-verified) trajectories/s wall time "
        f"({r.seconds:.1f} s); {r.model_satisfying_per_second:.1f} model-satisfying candidates/s of optimisation",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg = verb_config("augment", argv, __doc__)
    if cfg is None:
        return 0
    try:
        report = augment(cfg, progress=bool(cfg.get("progress", True)))
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, NotImplementedError) as err:
        print(f"stlflow augment: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report.n_accepted} augmented episodes to {cfg.out}")
    print(format_report(report))
    return 0
