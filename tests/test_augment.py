"""STL augmentation (stlflow.datasets.augment): building blocks, optimisation through a dynamics model, replay check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from stlflow.datasets.augment_optim import knot_matrix
from stlflow.datasets.augment_select import farthest_point_selection, mean_pairwise_distance
from stlflow.datasets.augment_theta import sample_theta

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ building blocks
@given(horizon=st.integers(1, 60), every=st.integers(1, 12))
def test_knot_matrix_interpolates_exactly(horizon, every):
    w = knot_matrix(horizon, every)
    assert w.shape[0] == horizon
    assert torch.allclose(w.sum(1), torch.ones(horizon, dtype=w.dtype))  # a partition of unity
    assert (w >= 0).all()
    # a linear ramp through the knots is reproduced exactly
    knots = [k for k in range(0, horizon, every)]
    if knots[-1] != horizon - 1:
        knots.append(horizon - 1)
    ramp = torch.tensor(knots, dtype=w.dtype)
    assert torch.allclose(w @ ramp, torch.arange(horizon, dtype=w.dtype)) or horizon == 1


@given(
    lo=st.floats(-5, 5),
    width=st.floats(0, 3),
    seed=st.integers(0, 2**31),
    dt=st.sampled_from([0.05, 0.1, 0.5]),
)
def test_sample_theta_within_ranges_and_deterministic(lo, width, seed, dt):
    ranges = {"v_max": (lo, lo + width), "T": (1.0, 3.0)}
    a = sample_theta(ranges, np.random.default_rng(seed), base={"eps": 0.2}, time_params=["T"], dt=dt)
    b = sample_theta(dict(reversed(list(ranges.items()))), np.random.default_rng(seed), base={"eps": 0.2},
                     time_params=["T"], dt=dt)
    assert a == b
    assert lo <= a["v_max"] <= lo + width
    assert a["eps"] == 0.2
    assert math.isclose(a["T"] / dt, round(a["T"] / dt), abs_tol=1e-9)


def test_sample_theta_rejects_empty_range():
    with pytest.raises(ValueError, match="v_max"):
        sample_theta({"v_max": (2.0, 1.0)}, np.random.default_rng(0))


def _brute_fps(points: np.ndarray, k: int) -> list[int]:
    chosen = [0]
    while len(chosen) < min(k, len(points)):
        d = np.array([min(np.linalg.norm(p - points[c]) for c in chosen) for p in points])
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
    return chosen


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 20), k=st.integers(1, 25), seed=st.integers(0, 10_000))
def test_farthest_point_matches_brute_force(n, k, seed):
    pts = np.random.default_rng(seed).normal(size=(n, 3))
    got = farthest_point_selection(torch.as_tensor(pts), k)
    assert got == _brute_fps(pts, k)
    assert len(set(got)) == len(got) == min(n, k)


def test_farthest_point_balances_groups():
    # group 0 is a wide cloud, group 1 a tight one: unbalanced FPS would take only group 0 first
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(0, 10, size=(20, 2)), rng.normal(0, 0.01, size=(20, 2))])
    groups = [0] * 20 + [1] * 20
    got = farthest_point_selection(torch.as_tensor(pts), 8, groups)
    assert sorted(groups[i] for i in got) == [0] * 4 + [1] * 4


def test_mean_pairwise_distance():
    a = torch.zeros(1, 4, 2)
    assert mean_pairwise_distance(a) == 0.0
    two = torch.stack([torch.zeros(4, 2), torch.ones(4, 2) * torch.tensor([3.0, 4.0])])
    assert math.isclose(mean_pairwise_distance(two), 5.0, rel_tol=1e-9)  # RMS over time of a constant 5 m gap


# ------------------------------------------------------------------------------------------------ Crossing, for real
CROSSING = "stlflow/Crossing-v0"
FRONT_ONLY = {
    # one mode, narrow ranges: a fast problem (the full configuration lives in conf/stl/crossing.yaml)
    "param_ranges": {"v_max": [1.2, 1.6], "d_safe": [0.2, 0.4], "w": [1.5, 1.75]},
    "time_params": ["T"],
    "init_low": [0.6, -0.3],
    "init_high": [1.6, 0.3],
    "modes": {"front": {"formula": "G((abs(ped_dx) <= 0.5) -> (ped_ahead >= {d_pass}))",
                        "param_ranges": {"d_pass": [0.3, 0.5]}}},
}
SMALL = dict(per_demo=2, n_theta=1, n_init=6, iters=60, lr=0.03, smooth=30.0, margin=0.02, knot_every=5, max_replays=6)


def replay_crossing(env, seed: int, actions):
    """Replay ``actions`` in the Crossing ``env`` from ``reset(seed)``, stepping MuJoCo: (first observation, the
    observations after each step (T, Do), the signals plus the mode signals, whether it collided)."""
    from stlflow.control.tasks.crossing import CrossingAugmentation

    first, _ = env.reset(seed=seed)
    sig, collided, nxt = {}, False, []
    for a in actions:
        obs, _, _, _, info = env.step(a)
        nxt.append(obs)
        collided |= bool(info["collision"])
        for k, v in info["signals"].items():
            sig.setdefault(k, []).append(v)
    sig = {k: np.asarray(v) for k, v in sig.items()}
    nxt = np.asarray(nxt)
    sig.update(CrossingAugmentation.mode_signals_from_obs(nxt, float(np.sign(env.unwrapped.peds.direction[0, 1]))))
    return first, nxt, sig, collided


def calibrated_demos(path, episodes: int = 3):
    """``episodes`` real expert episodes of Crossing collected into an EpisodeStore at ``path``, each with its
    calibrated θ in its attrs; returns the calibration."""
    from stlflow.control.collect import collect
    from stlflow.control.jobs import CollectJob
    from stlflow.datasets import EpisodeStore
    from stlflow.datasets.calibration import calibrate_store
    from stlflow.envs.crossing import RULE_DEFAULTS, RULE_LIST

    store = collect(CollectJob("crossing", episodes, path, seed=0, progress=False))
    cal = calibrate_store(store, RULE_LIST, ["v_max", "d_safe", "w", "T"], RULE_DEFAULTS,
                          margin={"v_max": 0.05, "d_safe": 0.05, "w": 0.05, "T": 1.0})
    with EpisodeStore.open(path, mode="a") as writable:
        for i, theta in enumerate(cal.per_episode):
            writable.set_episode_attrs(i, {"stl_params": {**RULE_DEFAULTS, **theta}})
    return cal


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Three real expert episodes of Crossing in an EpisodeStore, calibrated."""
    path = tmp_path_factory.mktemp("aug") / "demos.zarr"
    return path, calibrated_demos(path)


def test_rules_as_one_text_calibrate_each_parameter_with_the_others_at_their_defaults(demos):
    """The rules given as one conjunction (a task without a rule list): every parameter is calibrated, each with
    the others held at their defaults, and each demo satisfies its own θ."""
    from stlflow.datasets import EpisodeStore
    from stlflow.datasets.calibration import calibrate_store
    from stlflow.envs.crossing import RULE_DEFAULTS, RULES

    path, by_rule = demos
    cal = calibrate_store(EpisodeStore.open(path), RULES, ["v_max", "d_safe"], RULE_DEFAULTS, margin=0.05)
    assert cal.satisfied.all() and not [n for n in cal.notes if "not calibrated" in n]
    for theta, own in zip(cal.per_episode, by_rule.per_episode):
        assert theta["v_max"] == pytest.approx(own["v_max"]) and theta["v_max"] < RULE_DEFAULTS["v_max"]


def test_calibrated_theta_makes_each_demo_satisfy_its_rules(demos):
    from stlflow.datasets import EpisodeStore
    from stlflow.envs.crossing import RULES
    from stlflow.stl import parse

    path, cal = demos
    store = EpisodeStore.open(path)
    spec = parse(RULES)
    assert cal.satisfied.all()
    for i in range(store.n_episodes):
        ep, theta = store.episode(i), store.episode_attrs(i)["stl_params"]
        sig = {k: torch.as_tensor(ep[f"signal_{k}"], dtype=torch.float64) for k in spec.signals}
        assert float(spec.robustness(sig, dt=store.dt, params=theta)) >= 0
        # tightest + margin: the speed limit is the demo's own top speed plus 0.05 m/s
        assert theta["v_max"] == pytest.approx(float(ep["signal_speed"].max()) + 0.05, abs=1e-6)
        # and the time bound is the first time the goal is reached (post-action samples, k*dt) plus 1 s
        k = int(np.argmax(ep["signal_dist_goal"] <= theta["eps"]))
        assert theta["T"] == pytest.approx(k * store.dt + 1.0, abs=1e-9)
        # a tighter speed limit than the demo's own fails
        assert float(spec.robustness(sig, dt=store.dt, params={**theta, "v_max": theta["v_max"] - 0.06})) < 0


def _task(**over):
    from stlflow.control.stl_data import make_augment_task

    return make_augment_task(CROSSING, {}, {**FRONT_ONLY, **over}, None, "float32")


def _run_demo(task, store, i, seed, **settings):
    from stlflow.datasets.augment import AugmentSettings, augment_demo
    from stlflow.stl import parse

    attrs = store.episode_attrs(i)
    window = task.window(store.episode(i), attrs)
    s = AugmentSettings(**{**SMALL, **settings}, time_params=("T",))
    result = augment_demo(window, task.rules, task.modes, attrs["mode"], {**task.defaults, **attrs["stl_params"]},
                          task.param_ranges, task.control_low, task.control_high, task.dt, s, seed=seed,
                          parse=parse, init_low=task.init_low, init_high=task.init_high)
    return window, result


def test_optimised_trajectory_satisfies_theta_in_model_and_after_replay(demos):
    from stlflow.datasets import EpisodeStore
    from stlflow.datasets.augment_theta import spec_text
    from stlflow.envs import make_env
    from stlflow.stl import parse

    path, _ = demos
    store = EpisodeStore.open(path)
    task = _task()
    window, result = _run_demo(task, store, 0, seed=(0, 0))
    assert result.n_satisfying > 0 and result.n_accepted > 0, result
    spec = parse(spec_text(task.rules, task.modes[0]))
    env = make_env(CROSSING)
    for arrays, attrs in result.episodes:
        theta = attrs["stl_params"]
        # in the model, from the demo's start state
        u = torch.as_tensor(arrays["action"][None], dtype=torch.float32)
        full = torch.zeros(1, window.horizon, 2)
        full[:, : u.shape[1]] = u
        full[:, u.shape[1] :] = u[:, -1:]
        assert attrs["rho_model"] >= SMALL["margin"]
        # after an independent MuJoCo replay of the stored actions
        first, nxt, sig, collided = replay_crossing(env, store.episode_attrs(0)["seed"], arrays["action"])
        assert np.allclose(first, arrays["obs"][0])
        rho = float(spec.robustness({k: torch.as_tensor(sig[k]) for k in spec.signals}, dt=task.dt, params=theta))
        assert not collided and rho >= 0
        assert rho == pytest.approx(attrs["rho_replay"], abs=1e-5)
        for k in ("speed", "clearance", "lateral", "dist_goal"):
            np.testing.assert_allclose(arrays["signals"][k], sig[k], atol=1e-6)
    env.close()


def test_rejected_candidates_are_not_stored(demos):
    """Replays in an env whose time limit (3 s) stops the robot long before the goal: every candidate satisfies
    its θ in the model but not in MuJoCo, so all are replayed and none is kept."""
    from stlflow.control.tasks import get_task
    from stlflow.control.tasks.crossing import CrossingAugmentation
    from stlflow.datasets import EpisodeStore

    path, _ = demos
    store = EpisodeStore.open(path)
    task = _task()
    short = CrossingAugmentation(get_task(CROSSING), {"max_steps": 30})
    long_window = task.window

    def window(episode, attrs):
        w = long_window(episode, attrs)
        w.replay = short.window(episode, attrs, 30).replay
        return w

    task.window = window
    _, result = _run_demo(task, store, 0, seed=(0, 0))
    assert result.n_satisfying > 0
    assert result.n_replayed == min(result.n_satisfying, SMALL["max_replays"])
    assert result.n_accepted == 0 and result.episodes == []


def test_optimisation_is_deterministic_for_a_seed(demos):
    from stlflow.datasets import EpisodeStore
    from stlflow.datasets.augment import AugmentSettings
    from stlflow.datasets.augment_optim import CandidateGroup, optimise_controls
    from stlflow.datasets.augment_theta import spec_text
    from stlflow.stl import parse

    path, _ = demos
    store = EpisodeStore.open(path)
    task = _task()
    window = task.window(store.episode(1), store.episode_attrs(1))
    spec = parse(spec_text(task.rules, task.modes[0]))
    theta = {**task.defaults, **store.episode_attrs(1)["stl_params"], "d_pass": 0.4}
    groups = [CandidateGroup("front", spec, {k: theta[k] for k in spec.params}, 4)]
    s = AugmentSettings(iters=12, check_every=4)
    lo, hi = (torch.as_tensor(x, dtype=torch.float32) for x in (task.control_low, task.control_high))

    def run(seed):
        return optimise_controls(groups, window, lo, hi, task.dt, s, torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    assert ((a[0] >= lo) & (a[0] <= hi)).all()  # returned controls respect the bounds


@pytest.mark.slow
def test_store_output_identical_for_any_worker_count(demos, tmp_path):
    import functools

    from stlflow.control.augment import augment_store
    from stlflow.control.stl_data import make_augment_task
    from stlflow.datasets import EpisodeStore
    from stlflow.datasets.augment import AugmentSettings
    from stlflow.stl import parse

    path, _ = demos
    factory = functools.partial(make_augment_task, CROSSING, {}, FRONT_ONLY, None, "float32")
    s = AugmentSettings(**SMALL, time_params=("T",))
    r1 = augment_store(str(path), str(tmp_path / "a.zarr"), factory, s, parse, seed=7, workers=1, progress=False)
    r2 = augment_store(str(path), str(tmp_path / "b.zarr"), factory, s, parse, seed=7, workers=2, progress=False)
    a, b = EpisodeStore.open(tmp_path / "a.zarr"), EpisodeStore.open(tmp_path / "b.zarr")
    assert r1.n_accepted == r2.n_accepted == a.n_episodes == b.n_episodes > 0
    for i in range(a.n_episodes):
        ea, eb = a.episode(i), b.episode(i)
        assert ea.keys() == eb.keys() == {"obs", "action", "signal_speed", "signal_clearance", "signal_lateral",
                                          "signal_dist_goal"}
        for k in ea:
            np.testing.assert_array_equal(ea[k], eb[k])
        attrs = a.episode_attrs(i)
        assert attrs == b.episode_attrs(i)
        assert attrs["source"] == "augmented" and attrs["mode"] == "front" and attrs["rho_replay"] >= 0
        assert {"stl_params", "seed", "parent_episode"} <= set(attrs)
    merged = EpisodeStore.merge([path, tmp_path / "a.zarr"], tmp_path / "m.zarr")  # same schema as the demos
    assert merged.n_episodes == 3 + a.n_episodes


def test_pickplace_cem_over_mujoco_rollouts(tmp_path):
    """No differentiable model: the cross-entropy method perturbs the demo's targets in MuJoCo itself."""
    from stlflow.control.collect import collect
    from stlflow.control.jobs import CollectJob
    from stlflow.control.stl_data import make_augment_task
    from stlflow.datasets.augment import AugmentSettings, augment_demo
    from stlflow.stl import parse

    store = collect(CollectJob("pickplace", 1, tmp_path / "pp.zarr", seed=3, progress=False))
    task = make_augment_task("stlflow/PickPlace-v0", {}, {"param_ranges": {"v_max": [0.5, 0.6]}, "time_params": ["T"]},
                             None, "float32")
    ep, attrs = store.episode(0), store.episode_attrs(0)
    window = task.window(ep, attrs)
    s = AugmentSettings(per_demo=2, n_theta=1, optimiser="cem", cem_iters=2, cem_samples=3, cem_elites=2,
                        cem_std=(0.004, 0.004, 0.004, 0.0), knot_every=10, margin=0.002, max_replays=3)
    theta = {**task.defaults, "h_min": 0.0, "T": float(len(ep["action"]) * task.dt)}
    r = augment_demo(window, task.rules, task.modes, None, theta, task.param_ranges, task.control_low,
                     task.control_high, task.dt, s, seed=1, parse=parse)
    assert r.n_candidates == 6 and r.n_accepted >= 1
    spec = parse(task.rules)
    for arrays, a in r.episodes:
        assert a["rho_replay"] >= 0 and 0.5 <= a["stl_params"]["v_max"] <= 0.6
        sig = {k: torch.as_tensor(arrays["signals"][k]) for k in spec.signals}
        assert float(spec.robustness(sig, dt=task.dt, params=a["stl_params"])) == pytest.approx(a["rho_replay"])
        assert np.abs(arrays["action"][:, 3] - ep["action"][: len(arrays["action"]), 3]).max() == 0  # gripper kept


def test_pickplace_demo_retargeted_to_the_other_zone_places_there_in_mujoco():
    """The other zone's nominal (a mode the demo did not show) already works when replayed, before any CEM."""
    from stlflow.control.tasks.pickplace import retarget_pick_place
    from stlflow.control.tasks.replay import replay_controls as _replay
    from stlflow.envs import make_env
    from stlflow.envs.pickplace import OBS_INDEX

    env = make_env("stlflow/PickPlace-v0", {})
    for seed in (0, 3, 6):
        obs, _ = env.reset(seed=seed)
        expert = env.unwrapped.make_expert(seed)
        actions = []
        for _ in range(120):
            actions.append(expert.act(obs))
            obs, _, term, trunc, _ = env.step(actions[-1])
            if term or trunc:
                break
        actions = np.asarray(actions)
        obs0, _ = env.reset(seed=seed)
        zones = {s: obs0[OBS_INDEX[f"zone_{s}"]] for s in ("left", "right")}
        other = "right" if expert.mode == "left" else "left"
        moved = retarget_pick_place(actions, zones[expert.mode], zones[other])
        assert moved.shape[1] == 4 and len(moved) >= len(actions)
        grasp = int(np.argmax(actions[:, 3] > 0))
        np.testing.assert_array_equal(moved[:grasp], actions[:grasp])  # approach and grasp unchanged
        result, episode = _replay(env, seed, np.concatenate([moved, np.repeat(moved[-1:], 10, axis=0)]))
        assert episode.success and not episode.collision
        assert result.signals[f"in_{other}"].max() >= 0 and result.signals[f"in_{expert.mode}"].max() < 0
    assert retarget_pick_place(np.zeros((5, 4)) - 1.0, zones["left"], zones["right"]) is None  # never grasps


def test_pickplace_augmentation_places_in_both_zones(tmp_path):
    from stlflow.config import compose
    from stlflow.control.collect import collect
    from stlflow.control.jobs import CollectJob
    from stlflow.control.stl_data import make_augment_task
    from stlflow.datasets.augment import AugmentSettings, augment_demo
    from stlflow.stl import parse

    stl_cfg = OmegaConf.to_container(compose("augment", ["env=pickplace"]).stl, resolve=True)
    assert {m for m in stl_cfg["modes"]} == {"left", "right"}
    store = collect(CollectJob("pickplace", 1, tmp_path / "pp.zarr", seed=3, progress=False))
    task = make_augment_task("stlflow/PickPlace-v0", {}, stl_cfg, None, "float32")
    ep, attrs = store.episode(0), store.episode_attrs(0)
    window = task.window(ep, attrs)
    assert set(window.nominal) == {"*", "right" if attrs["mode"] == "left" else "left"}
    s = AugmentSettings(per_demo=4, n_theta=1, optimiser="cem", cem_iters=2, cem_samples=3, cem_elites=2,
                        cem_std=(0.004, 0.004, 0.004, 0.0), knot_every=10, margin=0.002, max_replays=6)
    theta = {**task.defaults, "h_min": 0.0, "T": 11.0}
    r = augment_demo(window, task.rules, task.modes, attrs["mode"], theta, {**task.param_ranges, "T": (11.0, 11.0)},
                     task.control_low, task.control_high, task.dt, s, seed=1, parse=parse)
    modes = {a["mode"] for _, a in r.episodes}
    assert modes == {"left", "right"}
    for arrays, a in r.episodes:
        assert a["rho_replay"] >= 0 and arrays["signals"][f"in_{a['mode']}"].max() >= 0


@settings(max_examples=40, deadline=None)
@given(st.floats(0.4, 2.5), st.integers(0, 10_000))
def test_retime_pick_place_changes_the_pace_not_the_path(scale, seed):
    from stlflow.control.tasks.pickplace import retime_pick_place

    rng = np.random.default_rng(seed)
    # moving segments (2 cm steps), a grasp wait (target still, gripper switches), a carry, a release
    path = np.cumsum(rng.normal(0, 0.02, size=(30, 3)), axis=0)
    a = np.concatenate([np.c_[path[:12], -np.ones(12)], np.c_[np.repeat(path[11:12], 4, 0), np.ones(4)],
                        np.c_[path[12:], np.ones(18)], np.c_[path[-1:], -np.ones(1)]])
    start = path[0] - 0.02
    out = retime_pick_place(a, scale, start=start)
    np.testing.assert_allclose(out[-1], a[-1])  # the release is kept
    # the gripper commands keep their order (runs), and the wait keeps its length
    runs = lambda g: [int(v) for i, v in enumerate(g) if i == 0 or v != g[i - 1]]  # noqa: E731
    assert runs(out[:, 3]) == runs(a[:, 3])
    closed_still = [i for i in range(1, len(out)) if out[i, 3] > 0 and np.allclose(out[i, :3], out[i - 1, :3])]
    assert len(closed_still) >= 2
    # every new target lies on the old polyline (the path is kept), and the top speed scales with `scale`
    full = np.concatenate([start[None], a[:, :3]])
    seg_d = np.linalg.norm(np.diff(full, axis=0), axis=1)
    new_d = np.linalg.norm(np.diff(np.concatenate([start[None], out[:, :3]]), axis=0), axis=1)
    assert new_d.max() <= scale * seg_d.max() * (1 + 1e-9) + 1e-12
    assert new_d.max() >= 0.5 * scale * np.median(seg_d[seg_d > 1e-4])
    assert abs(len(out) - (len(a) - 5) / scale - 5) <= 3


def test_retimed_pickplace_demo_succeeds_at_the_new_pace_in_mujoco(tmp_path):
    """Re-timing is what lets PickPlace augmentation reach speeds its demo did not show (controllability)."""
    from stlflow.config import compose
    from stlflow.control.collect import collect
    from stlflow.control.jobs import CollectJob
    from stlflow.control.stl_data import make_augment_task
    from stlflow.control.tasks import get_task
    from stlflow.control.tasks.pickplace import PickPlaceAugmentation
    from stlflow.control.tasks.replay import replay_controls as _replay

    stl_cfg = OmegaConf.to_container(compose("augment", ["env=pickplace"]).stl, resolve=True)
    assert stl_cfg["retime"]["speed_fraction"] == pytest.approx(0.85)
    store = collect(CollectJob("pickplace", 1, tmp_path / "pp.zarr", seed=0, progress=False))
    ep, attrs = store.episode(0), store.episode_attrs(0)
    demo_speed = float(np.linalg.norm(ep["obs"][:, 3:6], axis=-1).max())
    window = make_augment_task("stlflow/PickPlace-v0", {}, stl_cfg, None, "float32").window(ep, attrs)
    assert window.horizon == min(120, int(np.ceil(len(ep["action"]) / 0.5)))
    env = PickPlaceAugmentation(get_task("stlflow/PickPlace-v0")).env
    for v_max in (0.6 * demo_speed, 1.6 * demo_speed):
        nominal = window.nominal_for(attrs["mode"], {"v_max": v_max})
        result, episode = _replay(env, int(attrs["seed"]), nominal)
        assert episode.success and not episode.collision
        realised = float(np.max(result.signals["ee_speed"]))
        assert realised <= v_max and realised == pytest.approx(0.85 * v_max, rel=0.2), (v_max, realised)
    env.close()
    # without θ (or with a θ that has no v_max) the nominal is the demo itself
    n = len(ep["action"])
    np.testing.assert_allclose(window.nominal_for(attrs["mode"])[:n], ep["action"], atol=1e-6)
    np.testing.assert_allclose(window.nominal_for(attrs["mode"], {"h_min": 0.04})[:n], ep["action"], atol=1e-6)
