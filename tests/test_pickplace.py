"""stlflow/PickPlace-v0: gymnasium contract, physics, expert, STL signals and rules, state round trip, rendering."""

from __future__ import annotations

import json
import os
import warnings

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stlflow.envs  # noqa: F401  (registers the ids)
from stlflow.envs.pickplace import (
    CUBE_HALF,
    NEAR_RADIUS,
    OBS_DIM,
    OBS_INDEX,
    ON_TABLE_TOL,
    RELEASE_HEIGHT,
    ZONE_RADIUS,
    PickPlaceEnv,
    PickPlaceExpert,
    pickplace_signals,
)

ENV_ID = "stlflow/PickPlace-v0"


def make(**kwargs) -> gym.Env:
    return gym.make(ENV_ID, **kwargs)


def run_expert(env: gym.Env, seed: int):
    """One expert episode -> (obs (T+1, 22), actions (T, 4), infos (T+1 incl. reset's), expert)."""
    expert = env.unwrapped.make_expert(seed)
    obs, info = env.reset(seed=seed)
    expert.reset()
    observations, actions, infos = [obs], [], [info]
    done = False
    while not done:
        action = expert.act(obs)
        obs, _, terminated, truncated, info = env.step(action)
        observations.append(obs), actions.append(action), infos.append(info)
        done = terminated or truncated
    return np.array(observations), np.array(actions), infos, expert


def seeds_by_mode(n_per_mode: int) -> dict[str, list[int]]:
    env, out, seed = make(), {"left": [], "right": []}, 0
    while min(len(v) for v in out.values()) < n_per_mode:
        mode = env.unwrapped.make_expert(seed).mode
        if len(out[mode]) < n_per_mode:
            out[mode].append(seed)
        seed += 1
    return out


def rules_hold_numpy(sig: dict[str, np.ndarray], params: dict[str, float], dt: float) -> bool:
    """The three rules at t = 0 evaluated by hand (G = all samples, F[0,T] = samples 0..T/dt)."""
    n_window = int(round(params["T"] / dt)) + 1
    return bool(
        np.all(sig["ee_speed"] <= params["v_max"])
        and np.all(sig["ee_height_clear"] >= params["h_min"])
        and np.any(sig["in_target"][:n_window] >= 0)
    )


# ---------------------------------------------------------------- gymnasium contract
def test_check_env_passes():
    from gymnasium.utils.env_checker import check_env

    env = make()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*infinity.*")  # unbounded velocity components, by design
        check_env(env.unwrapped)


def test_task_attributes():
    u = make().unwrapped
    assert u.dt == pytest.approx(0.1) and u.max_steps == 120
    assert u.discrete_action_mask.tolist() == [False, False, False, True]
    assert u.action_space.shape == (4,) and u.observation_space.shape == (OBS_DIM,)
    assert set(u.rule_list) == {"speed_limit", "clearance", "place"}
    assert u.rules == " & ".join(u.rule_list.values())
    assert set(u.rule_defaults) == {"v_max", "h_min", "T"}


def test_reset_is_deterministic_and_seed_dependent():
    a, b = make(), make()
    obs_a, _ = a.reset(seed=7)
    obs_b, _ = b.reset(seed=7)
    np.testing.assert_array_equal(obs_a, obs_b)
    rng = np.random.default_rng(0)
    for _ in range(15):
        action = rng.uniform(a.action_space.low, a.action_space.high)
        np.testing.assert_array_equal(a.step(action)[0], b.step(action)[0])
    obs_c, _ = b.reset(seed=8)
    assert not np.array_equal(obs_a, obs_c)


def test_time_limit_truncates_at_max_steps():
    env = make(max_steps=5)
    obs, _ = env.reset(seed=0)
    hold = np.append(obs[OBS_INDEX["ee_pos"]], -1.0)
    flags = [env.step(hold)[2:4] for _ in range(5)]
    assert flags[:4] == [(False, False)] * 4 and flags[4] == (False, True)


def test_bad_action_is_rejected_with_a_clear_error():
    env = make()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must be 4 finite numbers"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="action must be 4 finite numbers"):
        env.step(np.array([0.0, 0.0, np.nan, 1.0]))


# ---------------------------------------------------------------- physics: gripper, collision, state
def test_gripper_channel_is_thresholded_at_zero():
    env = make()
    results = {}
    for grip in (1.0, 0.3, 1e-6, 0.0, -0.2, -1.0):
        obs, _ = env.reset(seed=1)
        target = obs[OBS_INDEX["ee_pos"]]
        for _ in range(3):
            obs = env.step(np.append(target, grip))[0]
        results[grip] = obs
    for closed in (0.3, 1e-6):
        np.testing.assert_array_equal(results[closed], results[1.0])
    for opened in (0.0, -0.2):
        np.testing.assert_array_equal(results[opened], results[-1.0])
    # closing on nothing brings the pads together; open keeps them 9 cm apart
    assert results[1.0][OBS_INDEX["grip"]][0] < 0.005 < 0.085 < results[-1.0][OBS_INDEX["grip"]][0]


def test_touching_the_table_away_from_the_cube_is_a_collision():
    env = make()
    obs, info = env.reset(seed=2)
    assert not info["collision"]
    cube = obs[OBS_INDEX["cube_pos"]]
    far = np.array([cube[0], cube[1] - 0.15 if cube[1] > 0 else cube[1] + 0.15, obs[2]])
    for _ in range(15):  # travel high, away from the cube
        obs, _, _, _, info = env.step(np.append(far, -1.0))
    assert not info["collision"] and info["n_collisions"] == 0
    for _ in range(8):  # then press down on the table
        obs, _, _, _, info = env.step(np.array([far[0], far[1], 0.0, -1.0]))
    assert info["collision"] and info["n_collisions"] >= 1
    assert info["signals"]["ee_height_clear"] < env.unwrapped.rule_defaults["h_min"]


def test_get_set_state_round_trip_reproduces_the_rollout():
    env = make()
    seed = 4
    expert = env.unwrapped.make_expert(seed)
    obs, _ = env.reset(seed=seed)
    expert.reset()
    for _ in range(12):  # into the grasp, so contacts and the closed gripper are part of the state
        obs = env.step(expert.act(obs))[0]
    state = env.unwrapped.get_state()
    assert state.dtype == np.float64 and state.ndim == 1
    actions = [expert.act(obs)]
    first = [env.step(actions[0])]
    for _ in range(10):
        actions.append(expert.act(first[-1][0]))
        first.append(env.step(actions[-1]))
    other = make()
    other.reset(seed=123)  # a different episode, overwritten by set_state
    other.unwrapped.set_state(state)
    np.testing.assert_array_equal(other.unwrapped.get_state(), state)
    for action, ref in zip(actions, first):
        again = other.step(action)
        np.testing.assert_array_equal(again[0], ref[0])
        assert again[1:4] == ref[1:4] and again[4]["step"] == ref[4]["step"]
    with pytest.raises(ValueError, match="state must have"):
        other.unwrapped.set_state(state[:-1])


# ---------------------------------------------------------------- expert
def test_expert_mode_and_style_depend_on_seed_only():
    env_a, env_b = make(), make()
    a, b = env_a.unwrapped.make_expert(5), env_b.unwrapped.make_expert(5)
    assert a.mode == b.mode and a.style == b.style
    json.dumps(a.style)  # JSON-able
    assert isinstance(a, stlflow.envs.Expert) and isinstance(a, PickPlaceExpert)
    modes = {env_a.unwrapped.make_expert(s).mode for s in range(20)}
    assert modes == {"left", "right"}
    speeds = {round(env_a.unwrapped.make_expert(s).style["speed"], 6) for s in range(20)}
    assert len(speeds) == 20


def test_expert_succeeds_in_both_modes_within_the_rules():
    env = make()
    u = env.unwrapped
    for mode, seeds in seeds_by_mode(3).items():
        for seed in seeds:
            obs, actions, infos, expert = run_expert(env, seed)
            assert expert.mode == mode
            assert infos[-1]["success"], f"seed {seed} ({mode}) failed in phase {expert.phase}"
            assert not any(i["collision"] for i in infos), f"seed {seed} collided"
            assert actions[-1][3] == -1.0  # released
            cube = obs[-1, OBS_INDEX["cube_pos"]]
            zone = obs[-1, OBS_INDEX[f"zone_{mode}"]]
            assert np.linalg.norm(cube[:2] - zone) < ZONE_RADIUS  # in the zone of its mode
            sig = u.signals(obs)
            assert rules_hold_numpy(sig, u.rule_defaults, u.dt)
            # the style drives the tightest speed limit (what calibration will recover per demo)
            assert sig["ee_speed"].max() == pytest.approx(expert.style["speed"], abs=0.005)
            assert u.action_space.contains(actions.min(0)) and u.action_space.contains(actions.max(0))


def test_expert_opens_on_the_cube_height_not_on_the_servo_settling():
    """The release is gated by an observable coarse condition (cube bottom within RELEASE_HEIGHT of the table) while
    the lowering target is still below the table, so an imitating policy that keeps lowering reaches it."""
    env = make()
    for seed in (0, 1, 2, 3):
        obs, actions, infos, expert = run_expert(env, seed)
        grip = actions[:, 3]
        opens = [t for t in range(1, len(grip)) if grip[t - 1] > 0 and grip[t] < 0]
        assert len(opens) == 1, f"seed {seed}: one release expected, got steps {opens}"
        t = opens[0]  # first open command; the release was decided one step earlier (that step stops the TCP)
        cube_bottom = obs[t - 1, OBS_INDEX["cube_pos"]][2] - CUBE_HALF
        assert cube_bottom <= RELEASE_HEIGHT + 1e-9
        assert actions[t - 1][2] == pytest.approx(obs[t - 1, OBS_INDEX["ee_pos"]][2])  # stopped where the TCP was
        # the last lowering command aimed the cube below its resting height: the target had not settled
        ee, cube = obs[t - 2, OBS_INDEX["ee_pos"]], obs[t - 2, OBS_INDEX["cube_pos"]]
        assert actions[t - 2][2] - (ee[2] - cube[2]) < CUBE_HALF
        assert infos[-1]["success"] and not any(i["collision"] for i in infos)


def test_holding_the_cube_in_the_zone_is_not_success_until_released():
    env = make()
    expert = env.unwrapped.make_expert(0)
    obs, _ = env.reset(seed=0)
    expert.reset()
    while expert.phase != "release":
        action = expert.act(obs)
        obs, _, terminated, _, info = env.step(action)
        assert not terminated
    hold = np.append(action[:3], 1.0)
    for _ in range(5):  # in the zone, on the table, but still gripped
        obs, reward, terminated, _, info = env.step(hold)
        assert info["signals"]["in_target"] >= 0 and not info["success"] and not terminated and reward == 0.0
    for _ in range(3):
        obs, reward, terminated, _, info = env.step(np.append(action[:3], -1.0))
        if terminated:
            break
    assert info["success"] and terminated and reward == 1.0


# ---------------------------------------------------------------- STL signals and rules
def test_info_signals_agree_with_signals_of_the_observations():
    env = make()
    obs, _, infos, _ = run_expert(env, 3)
    sig = env.unwrapped.signals(obs)
    assert set(sig) == set(infos[0]["signals"]) == {"ee_speed", "ee_height_clear", "in_target", "in_left", "in_right"}
    for name, values in sig.items():
        assert values.shape == (len(obs),)
        np.testing.assert_allclose(values, [i["signals"][name] for i in infos], rtol=0, atol=1e-12)
    batched = env.unwrapped.signals(np.stack([obs, obs[::-1]]))
    for name, values in sig.items():
        assert batched[name].shape == (2, len(obs))
        np.testing.assert_array_equal(batched[name][0], values)
        np.testing.assert_array_equal(batched[name][1], values[::-1])
    with pytest.raises(ValueError, match="expects observations shaped"):
        env.unwrapped.signals(obs[0])


def _obs(ee=(0.0, 0.0, 0.1), vel=(0.0, 0.0, 0.0), cube=(0.1, 0.0, CUBE_HALF), left=(0.0, 0.22), right=(0.0, -0.22)):
    o = np.zeros(OBS_DIM)
    o[OBS_INDEX["ee_pos"]], o[OBS_INDEX["ee_vel"]], o[OBS_INDEX["cube_pos"]] = ee, vel, cube
    o[OBS_INDEX["cube_quat"]] = (1, 0, 0, 0)
    o[OBS_INDEX["zone_left"]], o[OBS_INDEX["zone_right"]] = left, right
    return o[None]


def test_signal_values_by_hand():
    s = pickplace_signals(_obs(vel=(0.3, -0.4, 0.0)))
    assert s["ee_speed"][0] == pytest.approx(0.5)
    assert s["ee_height_clear"][0] == pytest.approx(0.1)  # 10 cm from the cube: no bonus
    assert s["in_target"][0] == pytest.approx(ZONE_RADIUS - np.hypot(0.1, 0.22))  # outside: minus the gap
    over = pickplace_signals(_obs(ee=(0.1, 0.0, 0.03)))
    assert over["ee_height_clear"][0] == pytest.approx(0.03 + 1.0)  # right over the cube: +1 m
    half = pickplace_signals(_obs(ee=(0.1 + NEAR_RADIUS / 2, 0.0, 0.03)))
    assert half["ee_height_clear"][0] == pytest.approx(0.03 + 0.5)
    placed = pickplace_signals(_obs(cube=(0.01, -0.22, CUBE_HALF)))
    assert placed["in_target"][0] == pytest.approx(min(ZONE_RADIUS - 0.01, ON_TABLE_TOL))
    lifted = pickplace_signals(_obs(cube=(0.0, 0.22, CUBE_HALF + 0.05)))
    assert lifted["in_target"][0] == pytest.approx(ON_TABLE_TOL - 0.05)


@settings(max_examples=60, deadline=None)
@given(
    ee=st.tuples(st.floats(-0.3, 0.3), st.floats(-0.4, 0.4), st.floats(0.0, 0.35)),
    cube=st.tuples(st.floats(-0.3, 0.3), st.floats(-0.4, 0.4), st.floats(0.0, 0.3)),
    zx=st.floats(-0.1, 0.1),
)
def test_signal_properties(ee, cube, zx):
    s = pickplace_signals(_obs(ee=ee, cube=cube, left=(zx, 0.22), right=(-zx, -0.22)))
    d_cube = np.hypot(ee[0] - cube[0], ee[1] - cube[1])
    # the clearance signal never lies below the TCP height, and equals it away from the cube
    assert s["ee_height_clear"][0] >= ee[2] - 1e-12
    if d_cube >= NEAR_RADIUS:
        assert s["ee_height_clear"][0] == pytest.approx(ee[2])
    # in_target >= 0  <=>  centre within a zone's radius and the cube's bottom within ON_TABLE_TOL of the table
    d_zone = min(np.hypot(cube[0] - zx, cube[1] - 0.22), np.hypot(cube[0] + zx, cube[1] + 0.22))
    inside = d_zone <= ZONE_RADIUS and cube[2] - CUBE_HALF <= ON_TABLE_TOL
    if abs(d_zone - ZONE_RADIUS) > 1e-9 and abs(cube[2] - CUBE_HALF - ON_TABLE_TOL) > 1e-9:
        assert (s["in_target"][0] >= 0) == inside
    assert s["in_target"][0] == max(s["in_left"][0], s["in_right"][0])
    d_left = np.hypot(cube[0] - zx, cube[1] - 0.22)  # the left zone is the one at +y
    assert s["in_left"][0] == pytest.approx(min(ZONE_RADIUS - d_left, ON_TABLE_TOL - (cube[2] - CUBE_HALF)))


def _stl_parse():
    from stlflow.stl import parse

    return parse


def test_rules_parse_with_the_expected_signals_and_parameters():
    parse = _stl_parse()
    u = make().unwrapped
    spec = parse(u.rules)
    assert set(spec.signals) == {"ee_speed", "ee_height_clear", "in_target"}
    assert set(spec.params) == set(u.rule_defaults)
    for text in u.rule_list.values():
        parse(text)


def test_rules_evaluate_on_expert_trajectories():
    parse = _stl_parse()
    env = make()
    u = env.unwrapped
    spec = parse(u.rules)
    episodes = [run_expert(env, seed)[0] for seed in range(4)]
    for obs in episodes:
        sig = u.signals(obs)
        rho = float(np.asarray(spec.robustness(sig, dt=u.dt, params=u.rule_defaults)).reshape(-1)[0])
        # the exact robustness of the conjunction, computed by hand
        n_window = int(round(u.rule_defaults["T"] / u.dt)) + 1
        expected = min(
            u.rule_defaults["v_max"] - sig["ee_speed"].max(),
            sig["ee_height_clear"].min() - u.rule_defaults["h_min"],
            sig["in_target"][:n_window].max(),
        )
        assert rho == pytest.approx(expected, abs=1e-5)
        assert rho > 0


# ---------------------------------------------------------------- rendering
def test_render_rgb_array_shape():
    if not os.environ.get("MUJOCO_GL"):  # without a back-end the error must say what to do
        env = make(render_mode="rgb_array", width=160, height=120)
        env.reset(seed=0)
        with pytest.raises(RuntimeError, match="MUJOCO_GL"):
            env.render()
        return
    env = make(render_mode="rgb_array", width=160, height=120)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
    assert frame.std() > 5  # not a blank image
    env.close()
    assert make().unwrapped.render() is None  # render_mode=None renders nothing


def test_unknown_render_mode_and_camera_are_rejected():
    with pytest.raises(ValueError, match="render_mode"):
        PickPlaceEnv(render_mode="human")
    with pytest.raises(ValueError, match="camera"):
        PickPlaceEnv(camera="side")


def test_setpoint_model_tracks_mujoco_speeds():
    """The guidance's set-point model (stlflow.envs.pickplace_dynamics): its set-points are the env's; the TCP's
    realised top speed is the commanded one within 5% (+1 cm/s) on scripted episodes, and on jittery target streams
    (a planner's chunks) the servo smooths the jitter, so the model over-estimates by a bounded amount: bounding the
    model's speed bounds the arm's."""
    import torch

    from stlflow.envs.pickplace_dynamics import DT, PickPlaceKinematics

    env = make()
    assert env.unwrapped.dt == pytest.approx(DT)
    model = PickPlaceKinematics()

    def compare(obs, actions, smooth=False):
        states = model.rollout(torch.as_tensor(obs[:1, OBS_INDEX["ee_target"]], dtype=torch.float64),
                               torch.as_tensor(actions[None], dtype=torch.float64))
        np.testing.assert_allclose(states[0, :, :3].numpy(), obs[1:, OBS_INDEX["ee_target"]], atol=1e-6)
        cmd = model.signals(states)["ee_speed"][0].numpy()
        real = pickplace_signals(obs[1:])["ee_speed"]
        if smooth:
            assert 0.7 * cmd.max() <= real.max() <= 1.05 * cmd.max() + 0.01, (real.max(), cmd.max())
        else:
            assert real.max() == pytest.approx(cmd.max(), rel=0.05, abs=0.01), (real.max(), cmd.max())

    for seed in (0, 1, 2):
        obs, actions, _, _ = run_expert(env, seed)
        compare(obs, actions)
    rng = np.random.default_rng(0)
    for seed in (3, 4):
        obs0, _ = env.reset(seed=seed)
        steps = np.cumsum(rng.normal(0.0, 0.02, size=(40, 3)) + np.array([0.01, 0.0, 0.0]), axis=0)
        targets = obs0[OBS_INDEX["ee_target"]] + steps
        actions = np.concatenate([targets, -np.ones((40, 1))], axis=1).astype(np.float32)
        observations = [obs0]
        for a in actions:
            observations.append(env.step(a)[0])
        compare(np.array(observations), actions, smooth=True)
    env.close()
