"""The main job, stage by stage: demonstrations -> calibrated θ -> augmented data -> θ-conditioned policy -> loop.

``stlflow demo`` (:func:`run_demo`) runs every stage on Crossing and writes a results folder; each stage is also a
function of its own here, so that benchmarks and tests call the same code:

==========  ==============================================================  =================================
stage       what it calls                                                   output
==========  ==============================================================  =================================
collect     :func:`stlflow.control.collect.collect` (scripted expert)       ``data/demos.zarr``
calibrate   ``stlflow calibrate`` (:mod:`stlflow.datasets.augment_calibrate`) ``stl_params`` per episode
augment     ``stlflow augment`` (:mod:`stlflow.datasets.augment`)           ``data/augmented.zarr``
train       ``stlflow train`` (:class:`stlflow.policy.trainer.Trainer`)     ``policy/`` (θ-conditioned flow)
evaluate    :func:`stlflow.control.evaluate.evaluate` (RTI controller) at   metrics per requested θ
            each requested θ, with and without STL guidance; diversity and
            trajectories from extra closed-loop samples per start state
report      tables, JSON, plots, MP4s                                       ``report.json``, ``results.md``, ...
==========  ==============================================================  =================================

A failing stage raises :class:`StageError` naming the stage and the cause.

Task wiring for STL guidance (the policy layer does not import envs): :func:`crossing_model_inputs` builds the
differentiable model's start state and the pedestrians' predicted positions (constant velocity, from the
observation alone: nothing privileged), and :func:`crossing_guidance` puts it together with the task's rules.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "StageError",
    "crossing_model_inputs",
    "crossing_guidance",
    "crossing_mode",
    "pickplace_mode",
    "TaskWiring",
    "TASKS",
    "task_wiring",
    "spearman",
    "closed_loop_samples",
    "diversity",
    "stage_collect",
    "stage_calibrate",
    "stage_augment",
    "stage_train",
    "stage_evaluate",
    "write_demo_outputs",
    "run_demo",
]

ENV = "crossing"
ENV_ID = "stlflow/Crossing-v0"
GUIDED_RULES = ("speed", "clearance", "corridor")  # the rules a 1.5 s chunk can decide (reaching the goal is not)


class StageError(RuntimeError):
    """A pipeline stage failed: ``stage`` names it, the message says why."""

    def __init__(self, stage: str, cause: BaseException | str) -> None:
        self.stage = stage
        why = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause)
        super().__init__(f"stage '{stage}' failed: {why}")


@contextmanager
def stage(name: str, index: int, total: int, log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Announce a stage, time it, and turn any exception inside it into a :class:`StageError`."""
    info: dict[str, Any] = {}
    log(f"[{index}/{total}] {name} ...")
    t0 = time.perf_counter()
    try:
        yield info
    except StageError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 - every failure is reported with its stage
        raise StageError(name, err) from err
    info["seconds"] = time.perf_counter() - t0
    log(f"[{index}/{total}] {name} done in {info['seconds']:.1f} s")


# ============================================================================================ Crossing task wiring
def crossing_model_inputs(obs_history: np.ndarray, horizon: int) -> tuple[Any, Any]:
    """Start state (1, 5) and :class:`CrossingContext` for H = ``horizon`` steps from the newest observation.

    Pedestrians are predicted at constant velocity from their observed position and velocity (the env's
    pedestrians walk straight lines, so this is exact while they walk and conservative once they stop); the goal is
    the robot position plus the observed goal offset. Uses nothing but the observation ``obs_history[-1]`` (Do,).
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


def crossing_guidance(params: Mapping[str, float] | None = None, rules: Sequence[str] = GUIDED_RULES,
                      **options: Any) -> Any:
    """:class:`stlflow.policy.guidance.STLGuidance` for Crossing: the named rules through ``CrossingDynamics``.

    ``params``: θ for the rules (defaults: the env's ``rule_defaults``; a θ-conditioned policy's requested values
    override them at every tick). ``options``: ``scale``, ``max_step``, ``margin``, ``smooth``, ``iters``, ``t_max``,
    ``particles``.
    """
    from stlflow.envs.crossing import DT, RULE_DEFAULTS, RULE_LIST
    from stlflow.envs.crossing_dynamics import CrossingDynamics

    return _task_guidance("Crossing", RULE_LIST, RULE_DEFAULTS, tuple(RULE_LIST), rules, CrossingDynamics(),
                          crossing_model_inputs, DT, params, options)


def _task_guidance(task: str, rule_list: Mapping[str, str], defaults: Mapping[str, float], modelled: Sequence[str],
                   rules: Sequence[str], dynamics: Any, model_inputs: Callable, dt: float,
                   params: Mapping[str, float] | None, options: Mapping[str, Any]) -> Any:
    """STLGuidance on the conjunction of the named ``rules`` (each one the task's model decides, ``modelled``),
    at θ = the task's rule defaults overridden by ``params``."""
    from stlflow.policy.guidance import STLGuidance

    unknown = [r for r in rules if r not in modelled]
    if unknown:
        raise ValueError(f"{task} guidance models only the rules {list(modelled)}; got {unknown}")
    text = " & ".join(rule_list[r] for r in rules)
    theta = {**defaults, **dict(params or {})}
    return STLGuidance(text, dynamics, model_inputs, dt, params=theta, **options)


def crossing_mode(obs: np.ndarray, side: float = 0.6, stop_speed: float = 0.15, near: float = 0.5) -> str:
    """Behaviour mode of a Crossing trajectory ``obs`` (T, Do) w.r.t. pedestrian 0 (the expert's five modes).

    At the step where the robot is level with the pedestrian (smallest |x_robot - x_ped|, which must be <= ``near``
    m; else ``"none"``): ``left``/``right`` when |lateral| >= ``side`` m; else ``front`` when the robot is on the side
    the pedestrian walks toward, otherwise ``yield`` if it slowed below ``stop_speed`` m/s before, else ``behind``.
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


PICKPLACE_GUIDED_RULES = ("speed_limit",)  # the one rule the set-point model decides (see pickplace_dynamics)


def pickplace_model_inputs(obs_history: np.ndarray, horizon: int) -> tuple[Any, Any]:
    """Start state (1, 3) of :class:`~stlflow.envs.pickplace_dynamics.PickPlaceKinematics`: the newest
    observation's servo set-point (the last commanded TCP target); no context."""
    import torch

    from stlflow.envs.pickplace_dynamics import PickPlaceKinematics

    obs = np.asarray(obs_history, dtype=np.float32).reshape(-1, np.asarray(obs_history).shape[-1])[-1]
    return PickPlaceKinematics.state_from_obs(torch.as_tensor(obs[None])), None


def pickplace_guidance(params: Mapping[str, float] | None = None, rules: Sequence[str] = PICKPLACE_GUIDED_RULES,
                       **options: Any) -> Any:
    """:class:`stlflow.policy.guidance.STLGuidance` for PickPlace: the speed rule through the set-point model.

    The arm's TCP follows its commanded set-point closely, so the speed of the planned targets is a differentiable
    stand-in for the TCP speed (``stlflow.envs.pickplace_dynamics``). ``params``/``options`` as for
    :func:`crossing_guidance`.
    """
    from stlflow.envs.pickplace import RULE_DEFAULTS, RULE_LIST
    from stlflow.envs.pickplace_dynamics import DT, PickPlaceKinematics

    # speeds here are tenths of a m/s: a sharper smooth max (gap <= log(15) / 200 = 0.014 m/s), a 1 cm/s margin and
    # steps of at most 0.01 normalised units (~3 mm of TCP target) instead of Crossing's metre-scale defaults
    opts = {"smooth": 200.0, "margin": 0.01, "max_step": 0.01, "scale": 0.01, **options}
    return _task_guidance("PickPlace", RULE_LIST, RULE_DEFAULTS, PICKPLACE_GUIDED_RULES, rules, PickPlaceKinematics(),
                          pickplace_model_inputs, DT, params, opts)


def pickplace_mode(obs: np.ndarray) -> str:
    """Behaviour mode of a PickPlace trajectory ``obs`` (T, 22): the zone the cube ends in (``left``/``right``), else
    ``"none"`` (the zones are the task's modes, as in conf/stl/pickplace.yaml)."""
    from stlflow.envs.pickplace import pickplace_signals

    sig = pickplace_signals(np.asarray(obs)[-1:])
    if sig["in_left"][-1] >= 0:
        return "left"
    return "right" if sig["in_right"][-1] >= 0 else "none"


@dataclass(frozen=True)
class TaskWiring:
    """What the STL benchmark and the sampling helpers need to know of a task.

    ``speed_signal`` / ``speed_rule``: the signal the controllability sweep measures (its maximum) and the rule that
    bounds it by ``v_max``; ``path``: the slice of the observation whose closed-loop paths the diversity compares
    (Crossing: robot xy; PickPlace: TCP xyz); ``mode``: behaviour-mode classifier of a trajectory; ``guidance``:
    factory of STL guidance (None: the task has no differentiable model, so no guided rows); ``sweep``: default
    requested v_max values; ``cell``: grid cell (m) of the valid-area measure.
    """

    env: str
    env_id: str
    speed_signal: str
    speed_rule: str
    path: slice
    mode: Callable[[np.ndarray], str]
    guidance: Callable[..., Any] | None
    sweep: tuple[float, ...]
    cell: float = 0.1  # grid cell (m) of the valid-area measure (:func:`covered_area`)


TASKS: dict[str, TaskWiring] = {
    ENV: TaskWiring(ENV, ENV_ID, "speed", "speed", slice(0, 2), crossing_mode, crossing_guidance,
                    (0.9, 1.1, 1.3, 1.5)),
    "pickplace": TaskWiring("pickplace", "stlflow/PickPlace-v0", "ee_speed", "speed_limit", slice(0, 3),
                            pickplace_mode, pickplace_guidance, (0.2, 0.3, 0.4, 0.5), 0.02),  # demos 0.17-0.37
}


def task_wiring(task: str) -> TaskWiring:
    """The :class:`TaskWiring` of ``task`` (``crossing``, ``pickplace``); a clear error for anything else."""
    if task not in TASKS:
        raise ValueError(f"no task wiring for {task!r}; tasks: {sorted(TASKS)}")
    return TASKS[task]


# ============================================================================================ metrics
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant or n < 2."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # average the ranks of ties
            m = v == value
            r[m] = r[m].mean()
        return r

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def diversity(trajectories: Sequence[np.ndarray]) -> float:
    """Mean pairwise RMS distance (m) between paths (T_i, D), shorter ones held at their last point."""
    import torch

    from stlflow.datasets.augment import mean_pairwise_distance

    if len(trajectories) < 2:
        return 0.0
    n = max(len(t) for t in trajectories)
    padded = np.stack([np.concatenate([t, np.repeat(t[-1:], n - len(t), 0)]) for t in trajectories])
    return mean_pairwise_distance(torch.as_tensor(padded))


def arc_length_resample(path: np.ndarray, n: int = 64) -> np.ndarray:
    """``n`` points (n, D) spaced evenly along the arc length of ``path`` (T, D) (all at the start when it is still)."""
    p = np.asarray(path, dtype=np.float64)
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
    if s[-1] <= 1e-12:
        return np.repeat(p[:1], n, axis=0)
    q = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(q, s, p[:, j]) for j in range(p.shape[1])], axis=1)


def path_diversity(trajectories: Sequence[np.ndarray], n: int = 64) -> float:
    """Mean pairwise RMS distance (m) between the *routes* of paths (T_i, D): each path resampled to ``n`` points
    evenly spaced along its arc length, so two runs of one route at different speeds count as the same behaviour
    (the time-indexed :func:`diversity` counts differences in pace too).
    """
    import torch

    from stlflow.datasets.augment import mean_pairwise_distance

    if len(trajectories) < 2:
        return 0.0
    return mean_pairwise_distance(torch.as_tensor(np.stack([arc_length_resample(t, n) for t in trajectories])))


def covered_area(paths: Sequence[np.ndarray], cell: float) -> float:
    """Area (m²) of the union of ``cell`` x ``cell`` grid squares that the xy paths (T_i, >=2) pass through.

    Each path is densified to points at most cell / 4 apart along its arc length first, so a fast path covers the
    squares between its samples. The grid is fixed in the world frame, so areas of different sets compare.
    """
    cells: set[tuple[int, int]] = set()
    for path in paths:
        xy = np.asarray(path, dtype=np.float64)[:, :2]
        length = float(np.sum(np.linalg.norm(np.diff(xy, axis=0), axis=1))) if len(xy) > 1 else 0.0
        dense = arc_length_resample(xy, max(2, int(np.ceil(4 * length / cell)) + 1))
        cells.update(map(tuple, np.floor(dense / cell).astype(np.int64).tolist()))
    return len(cells) * cell * cell


class _Reseeded:
    """A controller whose noise seed is ``seed * 1000 + sample`` (several samples from one start state)."""

    def __init__(self, inner: Any, sample: int) -> None:
        self.inner, self.sample = inner, int(sample)

    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        from stlflow.control.loop import reset_controller

        reset_controller(self.inner, None if seed is None else int(seed) * 1000 + self.sample, obs)

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = self.inner.act(obs)
        self.last_nfe = getattr(self.inner, "last_nfe", 0)
        return action


def closed_loop_samples(policy: Any, seeds: Sequence[int], samples: int, stl_params: Mapping[str, float], *,
                        controller: str = "rti", controller_kw: Mapping[str, Any] | None = None,
                        max_steps: int | None = None, task: str = ENV) -> list[dict[str, Any]]:
    """Run ``samples`` closed-loop episodes from each start state ``seeds`` (different controller noise each).

    ``policy``: a Policy, or None with ``controller="expert"`` (then samples > 1 repeat the deterministic expert).
    Returns one record per episode: ``seed``, ``sample``, ``xy`` (T+1, D: the task's path, see
    :class:`TaskWiring`), ``mode``, ``max_speed`` (m/s, of the task's speed signal), ``success``, ``collision``,
    ``robustness`` (exact, all rules at ``stl_params``).
    """
    wiring = task_wiring(task)
    from stlflow.control.collect import make_env
    from stlflow.control.controllers import make_controller
    from stlflow.control.evaluate import rule_robustness
    from stlflow.control.loop import run_episode

    records = []
    for s in seeds:
        for j in range(samples):
            env = make_env(wiring.env_id)
            try:
                u = env.unwrapped
                theta = {**{k: float(v) for k, v in u.rule_defaults.items()}, **dict(stl_params)}
                if controller == "expert":
                    ctrl = u.make_expert(int(s))
                else:
                    kw = dict(controller_kw or {})
                    names = list(policy.param_names)
                    if names and kw.get("params") is None:
                        kw["params"] = {n: theta[n] for n in names}
                    ctrl = _Reseeded(make_controller(controller, policy, seed=int(s), **kw), j)
                res = run_episode(env, ctrl, int(s), max_steps=max_steps)
                sig = {k: np.asarray(v, dtype=np.float64) for k, v in u.signals(res.obs).items()}
                rho, _ = rule_robustness(u.rules, None, sig, u.dt, theta)
                records.append({"seed": int(s), "sample": j, "xy": res.obs[:, wiring.path].astype(np.float64),
                                "mode": wiring.mode(res.obs),
                                "max_speed": float(np.max(sig[wiring.speed_signal])),
                                "success": bool(res.success), "collision": bool(res.collision),
                                "robustness": float(rho)})
            finally:
                env.close()
    return records


def is_valid(record: Mapping[str, Any]) -> bool:
    """A closed-loop sample that satisfies the rules (exact robustness >= 0) and does not collide."""
    return bool(record["robustness"] >= 0 and not record["collision"])


def sample_metrics(records: Sequence[Mapping[str, Any]], cell: float = 0.1) -> dict[str, float]:
    """Per start state, averaged over start states.

    Over all samples: mean pairwise distance of the paths (time-indexed, ``diversity_m``, and along the route,
    ``path_diversity_m``) and number of distinct modes reached (``modes_per_start``). Failed samples count here
    too, so a policy that crashes in varied ways scores as diverse.

    Over the *valid* samples only (rules satisfied, no collision; :func:`is_valid`), as the STL-diffusion paper
    measures diversity: their mean pairwise distance (time-indexed, ``valid_diversity_m``), distinct modes reached
    (``valid_modes_per_start``), the xy area their paths cover on a ``cell`` grid (``valid_area_m2``, the paper's
    "valid area" on a fixed grid) and the fraction of valid samples (``valid_fraction``). A start state with fewer
    than two valid samples has no valid diversity (0), one with none also no valid modes or area.
    """
    by_seed: dict[int, list[Mapping[str, Any]]] = {}
    for r in records:
        by_seed.setdefault(int(r["seed"]), []).append(r)
    div = [diversity([r["xy"] for r in rs]) for rs in by_seed.values()]
    route = [path_diversity([r["xy"] for r in rs]) for rs in by_seed.values()]
    modes = [len({r["mode"] for r in rs} - {"none"}) for rs in by_seed.values()]  # "none": never level with it
    valid = [[r for r in rs if is_valid(r)] for rs in by_seed.values()]
    v_modes = [len({r["mode"] for r in rs} - {"none"}) for rs in valid]
    v_area = [covered_area([r["xy"] for r in rs], cell) for rs in valid]
    v_div = [diversity([r["xy"] for r in rs]) for rs in valid]  # 0 for fewer than two

    def mean(v: list[float]) -> float:
        return float(np.mean(v)) if v else float("nan")

    return {"diversity_m": mean(div), "path_diversity_m": mean(route), "modes_per_start": mean(modes),
            "valid_diversity_m": mean(v_div), "valid_modes_per_start": mean(v_modes), "valid_area_m2": mean(v_area),
            "valid_fraction": mean([is_valid(r) for r in records])}


# ============================================================================================ stages
def stage_collect(out: Path, episodes: int, seed: int = 0, workers: int = 1, progress: bool = True,
                  task: str = ENV) -> Path:
    """Expert demonstrations of ``task`` (Crossing by default) into ``out`` (an EpisodeStore)."""
    from stlflow.control.collect import collect

    collect(task, int(episodes), out, seed=int(seed), workers=int(workers), overwrite=True, progress=progress)
    return out


def stage_calibrate(data: Path, q: float = 0.95, log: Callable[[str], None] = print, task: str = ENV
                    ) -> dict[str, Any]:
    """``stlflow calibrate data=...`` in process: per-episode θ (``stl_params``) and dataset θ into the store."""
    import contextlib
    import io

    from stlflow.config import compose
    from stlflow.datasets import EpisodeStore
    from stlflow.verbs.calibrate import calibrate

    cfg = compose("calibrate", [f"env={task}", f"data={data}", f"q={q}"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        status = calibrate(cfg)
    text = buf.getvalue().rstrip()
    if status != 0:
        raise RuntimeError(text or f"stlflow calibrate returned {status}")
    log(text)
    store = EpisodeStore.open(data)
    own = [float(a.get("stl_rho_own", float("nan"))) for a in store.all_episode_attrs()]
    return {"dataset_theta": dict(store.attrs["stl_params_dataset"]),
            "own_theta_satisfied": int(np.sum(np.asarray(own) >= 0)), "episodes": store.n_episodes,
            "table": text}


def stage_augment(data: Path, out: Path, per_demo: int, demos: int | None, workers: int = 1, seed: int = 0,
                  opt: Mapping[str, Any] | None = None, modes: Sequence[str] | None = None,
                  progress: bool = True, task: str = ENV) -> dict[str, Any]:
    """``stlflow augment`` in process on the first ``demos`` demonstrations; returns its report as a dict."""
    from stlflow.config import compose
    from stlflow.verbs.augment import augment, format_report

    overrides = [f"env={task}", f"data={data}", f"out={out}", f"per_demo={int(per_demo)}", f"workers={int(workers)}",
                 f"seed={int(seed)}", "overwrite=true", f"progress={str(bool(progress)).lower()}"]
    if demos is not None:
        overrides.append(f"episodes={int(demos)}")
    if modes:
        overrides.append("modes=[" + ",".join(modes) + "]")
    overrides += [f"opt.{k}={v}" for k, v in dict(opt or {}).items()]
    report = augment(compose("augment", overrides), progress=progress)
    if report.n_accepted == 0:
        raise RuntimeError(f"augmentation accepted no episode ({report.n_replayed} replayed); "
                           "raise the optimisation budget (opt.iters, opt.n_init)")
    return {**report.as_dict(), "text": format_report(report)}


def stage_train(stores: Sequence[Path], merged: Path, out: Path, cond_params: Sequence[str], steps: int,
                batch_size: int, net: Mapping[str, Any] | None = None, seed: int = 0, threads: int = 1,
                progress: bool = True, task: str = ENV) -> Any:
    """``stlflow train`` (flow head, MLP) in process on the concatenation of ``stores``; returns the Policy."""
    from stlflow.datasets import EpisodeStore
    from stlflow.policy import Policy
    from stlflow.verbs.train import main as train_main

    data = stores[0]
    if len(stores) > 1:
        EpisodeStore.merge(list(stores), merged, overwrite=True)
        data = merged
    argv = [f"env={task}", f"data={data}", f"out={out}", "policy=flow", "net=mlp", "eval_episodes=0",
            f"train.steps={int(steps)}",
            f"train.batch_size={int(batch_size)}", f"train.seed={int(seed)}", f"train.threads={int(threads)}",
            f"train.warmup_steps={max(1, min(500, int(steps) // 10))}", f"train.val_every={max(1, int(steps) // 4)}",
            f"train.ckpt_every={int(steps)}", "train.tensorboard=false", f"train.progress={str(progress).lower()}",
            "policy.cond_params=[" + ",".join(cond_params) + "]"]
    argv += [f"policy.net.{k}={v}" for k, v in dict(net or {}).items()]
    status = train_main(argv)
    if status != 0:
        raise RuntimeError(f"stlflow train returned {status}")
    return Policy.load(out)


@dataclass
class EvalRow:
    """One evaluated setting: the requested θ and whether STL guidance was on."""

    label: str
    theta: dict[str, float]
    guided: bool
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    guidance_ms_per_tick: float = float("nan")


def stage_evaluate(policy: Any, thetas: Sequence[Mapping[str, float]], episodes: int, *, seed: int = 1000,
                   k: int = 2, guidance: Mapping[str, Any] | None = None, compare_guidance: bool = True,
                   diversity_starts: int = 2, diversity_samples: int = 4, max_steps: int | None = None,
                   workers: int = 1, progress: bool = True, log: Callable[[str], None] = print) -> list[EvalRow]:
    """Closed loop with the RTI controller (k steps per tick) at each requested θ, without and with STL guidance.

    ``guidance``: options of :func:`crossing_guidance` (``enabled`` false: no guided rows). Metrics per row come
    from :func:`stlflow.control.evaluate.evaluate` (seeds ``seed ..``, satisfaction at the requested θ); diversity,
    modes, realised max speed and trajectories from ``diversity_starts`` start states x ``diversity_samples``.
    """
    from stlflow.control.evaluate import evaluate

    gopts = dict(guidance or {})
    enabled = bool(gopts.pop("enabled", False))
    settings = [False, True] if (enabled and compare_guidance) else [enabled]
    rows: list[EvalRow] = []
    div_seeds = [int(seed) + i for i in range(int(diversity_starts))]
    for theta in thetas:
        theta = {k_: float(v) for k_, v in theta.items()}
        for guided in settings:
            g = crossing_guidance(theta, **gopts) if guided else None
            kw: dict[str, Any] = {"k": int(k)}
            if g is not None:
                kw["guidance"] = g
            label = f"v_max={theta.get('v_max', float('nan')):.2f}" + (" +guidance" if guided else "")
            t0 = time.perf_counter()
            rep = evaluate(policy, ENV, int(episodes), seed=int(seed), workers=int(workers), controller="rti",
                           controller_kw=kw, stl_params=theta, max_steps=max_steps, progress=progress)
            row = EvalRow(label, theta, guided, dict(rep["metrics"]), list(rep["ticks"]["latency_ms"]))
            if g is not None:
                g.reset_counters()
            row.samples = closed_loop_samples(policy, div_seeds, int(diversity_samples), theta, controller="rti",
                                              controller_kw=kw, max_steps=max_steps)
            if g is not None and g.calls:
                ticks = sum(len(s["xy"]) - 1 for s in row.samples)
                row.guidance_ms_per_tick = 1e3 * g.seconds / max(ticks, 1)
            row.metrics.update(sample_metrics(row.samples))
            row.metrics["max_speed_mean"] = float(np.mean([s["max_speed"] for s in row.samples]))
            row.metrics["meets_v_max"] = float(np.mean([s["max_speed"] <= theta["v_max"] for s in row.samples]))
            log(f"  {label}: success {row.metrics['success_rate']:.0%}, STL sat. "
                f"{row.metrics['stl_satisfaction_rate']:.0%}, collisions {row.metrics['collision_rate']:.0%} "
                f"({time.perf_counter() - t0:.1f} s)")
            rows.append(row)
    return rows


# ============================================================================================ outputs
def results_table(rows: Sequence[EvalRow]) -> str:
    """Markdown table of the evaluated rows."""
    head = ("| requested θ | guidance | success | STL sat. | collision | max speed (m/s) | meets v_max | "
            "diversity (m) | modes/start | valid modes/start | p50 ms | p99 ms | guidance ms/tick |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        m = r.metrics
        g = "-" if math.isnan(r.guidance_ms_per_tick) else f"{r.guidance_ms_per_tick:.2f}"
        out.append(
            f"| v_max={r.theta.get('v_max', float('nan')):.2f} | {'on' if r.guided else 'off'} | "
            f"{m['success_rate']:.0%} | {m['stl_satisfaction_rate']:.0%} | {m['collision_rate']:.0%} | "
            f"{m['max_speed_mean']:.2f} | {m['meets_v_max']:.0%} | {m['diversity_m']:.2f} | "
            f"{m['modes_per_start']:.1f} | {m['valid_modes_per_start']:.1f} | {m['latency_p50_ms']:.1f} | "
            f"{m['latency_p99_ms']:.1f} | {g} |")
    if rows:
        n_starts = len({s["seed"] for s in rows[0].samples})
        out.append(f"\nsuccess, STL sat. (all rules at the requested θ), collision, latency: "
                   f"{int(rows[0].metrics['episodes'])} episodes per row; max speed, meets v_max (max speed <= v_max), "
                   f"diversity (mean pairwise distance of xy paths), modes (valid: among the samples that keep the "
                   f"rules without colliding): {n_starts} start states x "
                   f"{len(rows[0].samples) // max(n_starts, 1)} samples. guidance ms/tick: in this process.")
    return "\n".join(out) + "\n"


def write_demo_outputs(out: Path, rows: Sequence[EvalRow], summary: Mapping[str, Any], policy: Any = None,
                       video_episodes: int = 0, video_max_steps: int | None = None, k: int = 2,
                       guidance: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """``report.json``, ``results.md``, ``trajectories.png``, ``satisfaction_diversity.png``, ``latency_hist.png``
    and ``videos/*.mp4`` (the first requested θ; guided when guidance is enabled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "results.md", "trajectories": out / "trajectories.png",
             "bars": out / "satisfaction_diversity.png", "latency": out / "latency_hist.png"}
    table = results_table(rows)
    paths["markdown"].write_text(f"# stlflow demo: {ENV_ID}\n\n{table}")
    report = {"env_id": ENV_ID, **dict(summary),
              "rows": [{"label": r.label, "theta": r.theta, "guided": r.guided, "metrics": r.metrics,
                        "guidance_ms_per_tick": r.guidance_ms_per_tick,
                        "samples": [{k_: v for k_, v in s.items() if k_ != "xy"} for s in r.samples]} for r in rows]}
    from stlflow.control.evaluate import json_default
    paths["json"].write_text(json.dumps(report, indent=1, default=json_default))

    vmax = sorted({r.theta.get("v_max", 0.0) for r in rows})
    cmap = plt.get_cmap("viridis")
    colour = {v: cmap(i / max(len(vmax) - 1, 1)) for i, v in enumerate(vmax)}
    guided_cols = sorted({r.guided for r in rows})
    fig, axes = plt.subplots(1, len(guided_cols), figsize=(7 * len(guided_cols), 3.6), squeeze=False)
    for ax, g in zip(axes[0], guided_cols):
        for r in rows:
            if r.guided != g:
                continue
            for i, s in enumerate(r.samples):
                ax.plot(s["xy"][:, 0], s["xy"][:, 1], color=colour[r.theta.get("v_max", 0.0)], lw=1, alpha=0.8,
                        label=f"v_max={r.theta.get('v_max', 0.0):.2f}" if i == 0 else None)
        ax.axhline(2.0, color="k", lw=1)
        ax.axhline(-2.0, color="k", lw=1)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax.set_title(f"closed-loop trajectories by requested θ (guidance {'on' if g else 'off'})")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    fig.savefig(paths["trajectories"], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    labels = [r.label for r in rows]
    x = np.arange(len(rows))
    for ax, key, name in zip(axes, ("stl_satisfaction_rate", "diversity_m", "modes_per_start",
                                    "valid_modes_per_start"),
                             ("STL satisfaction at requested θ", "diversity: mean pairwise distance (m)",
                              "distinct modes per start state", "modes among rule-keeping samples")):
        ax.bar(x, [r.metrics[key] for r in rows], color=[colour[r.theta.get("v_max", 0.0)] for r in rows],
               hatch=None, edgecolor=["k" if r.guided else "none" for r in rows])
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["bars"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    lat = [np.asarray(r.latency_ms, dtype=np.float64) for r in rows]
    pos = np.concatenate([v[v > 0] for v in lat]) if lat else np.array([])
    if pos.size:
        bins = np.logspace(math.log10(pos.min()), math.log10(pos.max() * 1.01), 40)
        for r, v in zip(rows, lat):
            ax.hist(np.clip(v, pos.min(), None), bins=bins, histtype="step", label=r.label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("per-tick latency of act() (ms), RTI controller")
    ax.set_ylabel("ticks")
    fig.tight_layout()
    fig.savefig(paths["latency"], dpi=110)
    plt.close(fig)

    if video_episodes > 0 and policy is not None and rows:
        from stlflow.control.evaluate import write_videos

        first = rows[-1] if rows[-1].guided else rows[0]
        kw: dict[str, Any] = {"k": int(k), "params": {n: first.theta[n] for n in policy.param_names} or None}
        if first.guided:
            gopts = {k_: v for k_, v in dict(guidance or {}).items() if k_ != "enabled"}
            kw["guidance"] = crossing_guidance(first.theta, **gopts)
        seeds = [int(summary.get("eval_seed", 1000)) + i for i in range(int(video_episodes))]
        videos = write_videos(policy, ENV, seeds, out / "videos", controller="rti", controller_kw=kw,
                              max_steps=video_max_steps)
        for i, p in enumerate(videos):
            paths[f"video{i}"] = p
    return paths


# ============================================================================================ the demo
def run_demo(cfg: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage of ``stlflow demo`` with the composed ``demo`` config; returns the summary (also in report.json).

    Raises :class:`StageError` naming the failing stage.
    """
    import torch
    from omegaconf import OmegaConf

    torch.set_num_threads(int(cfg.threads))
    c = OmegaConf.to_container(cfg, resolve=True)
    if c["budget"] not in c["budgets"]:
        raise StageError("config", f"budget={c['budget']!r} is not one of {sorted(c['budgets'])}")
    b = c["budgets"][c["budget"]]
    out = Path(c["out"])
    out.mkdir(parents=True, exist_ok=True)
    progress = bool(c["progress"])
    seed = int(c["seed"])
    workers = int(c["workers"] if c.get("workers") is not None else b.get("workers", 1))
    summary: dict[str, Any] = {"budget": c["budget"], "budget_settings": b, "seed": seed, "stages": {},
                               "eval_seed": int(c["eval_seed"])}
    total = 6
    t_start = time.perf_counter()
    demos, augmented = out / "data" / "demos.zarr", out / "data" / "augmented.zarr"

    with stage("collect demonstrations (scripted expert)", 1, total, log) as info:
        stage_collect(demos, b["demos"], seed=seed, workers=workers, progress=progress)
    summary["stages"]["collect"] = {"seconds": info["seconds"], "episodes": b["demos"]}

    with stage("calibrate θ on the demonstrations", 2, total, log) as info:
        cal = stage_calibrate(demos, q=float(c["calibrate_q"]), log=log)
    summary["stages"]["calibrate"] = {"seconds": info["seconds"], **{k: v for k, v in cal.items() if k != "table"}}

    with stage("augment (trajectory optimisation + MuJoCo replay)", 3, total, log) as info:
        aug = stage_augment(demos, augmented, b["per_demo"], b["augment_demos"], workers=workers, seed=seed,
                            opt=b.get("augment_opt"), modes=b.get("augment_modes"), progress=progress)
        log(aug["text"])
    summary["stages"]["augment"] = {"seconds": info["seconds"], **{k: v for k, v in aug.items() if k != "text"}}

    train_threads = int(c.get("train_threads") or c["threads"])  # training runs alone: it may use every core
    with stage("train a θ-conditioned flow policy", 4, total, log) as info:
        policy = stage_train([demos, augmented], out / "data" / "train.zarr", out / "policy",
                             list(c["cond_params"]), b["train_steps"], b["batch_size"], net=b.get("net"),
                             seed=seed, threads=train_threads, progress=progress)
    torch.set_num_threads(int(c["threads"]))  # the trainer set its own count; latency is measured on `threads`
    summary["stages"]["train"] = {"seconds": info["seconds"], "steps": b["train_steps"],
                                  "parameters": policy.num_parameters(), "threads": train_threads}

    dataset_theta = {k: float(v) for k, v in cal["dataset_theta"].items()}
    thetas = [{**dataset_theta, **dict(c.get("theta") or {}), "v_max": float(v)} for v in c["v_max_sweep"]]
    with stage(f"evaluate closed loop (RTI k={c['k']}) at {len(thetas)} requested θ", 5, total, log) as info:
        rows = stage_evaluate(policy, thetas, b["eval_episodes"], seed=int(c["eval_seed"]), k=int(c["k"]),
                              guidance=c["guidance"], compare_guidance=True,
                              diversity_starts=b["diversity_starts"], diversity_samples=b["diversity_samples"],
                              max_steps=b.get("max_steps"), workers=workers, progress=progress, log=log)
    summary["stages"]["evaluate"] = {"seconds": info["seconds"]}

    with stage("report (table, JSON, plots, video)", 6, total, log) as info:
        summary["total_seconds"] = time.perf_counter() - t_start
        paths = write_demo_outputs(out, rows, summary, policy=policy, video_episodes=b["video_episodes"],
                                   video_max_steps=b.get("video_max_steps"), k=int(c["k"]), guidance=c["guidance"])
    summary["stages"]["report"] = {"seconds": info["seconds"]}
    summary["total_seconds"] = time.perf_counter() - t_start
    summary["table"] = results_table(rows)
    summary["paths"] = {k: str(v) for k, v in paths.items()}
    data = json.loads(paths["json"].read_text())
    data.update({k: summary[k] for k in ("stages", "total_seconds", "paths")})
    from stlflow.control.evaluate import json_default
    paths["json"].write_text(json.dumps(data, indent=1, default=json_default))
    return summary
