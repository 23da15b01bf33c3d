"""stlflow/Crossing-v0: the env, its signals and rules, the scripted expert, the torch dynamics model."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gymnasium.utils.env_checker import check_env  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import stlflow.envs  # noqa: E402,F401  (registers the ids)
from stlflow.envs import crossing as cx  # noqa: E402
from stlflow.envs.crossing_dynamics import (  # noqa: E402
    TRACKING_TOL_POS,
    TRACKING_TOL_YAW,
    CrossingDynamics,
)
from stlflow.envs.crossing_expert import MODES  # noqa: E402

torch.set_num_threads(1)
ENV_ID = "stlflow/Crossing-v0"


def run_expert(seed: int, **kwargs):
    """One expert episode -> (env, expert, obs (T+1, Do), actions (T, 2), infos (T+1))."""
    env = gym.make(ENV_ID, **kwargs)
    expert = env.unwrapped.make_expert(seed)
    obs, info = env.reset(seed=seed)
    expert.reset()
    observations, actions, infos = [obs], [], [info]
    while True:
        action = expert.act(obs)
        obs, _, terminated, truncated, info = env.step(action)
        observations.append(obs), actions.append(action), infos.append(info)
        if terminated or truncated:
            return env, expert, np.array(observations), np.array(actions), infos


def seeds_by_mode(n: int = 2, limit: int = 60) -> dict[str, list[int]]:
    env = gym.make(ENV_ID)
    found: dict[str, list[int]] = {m: [] for m in MODES}
    for seed in range(limit):
        mode = env.unwrapped.make_expert(seed).mode
        if len(found[mode]) < n:
            found[mode].append(seed)
    return found


SEEDS_BY_MODE = seeds_by_mode()


@pytest.fixture(scope="module")
def expert_episodes():
    """One expert episode per mode (the first seed of each mode)."""
    return {mode: run_expert(seeds[0]) for mode, seeds in SEEDS_BY_MODE.items()}


# ------------------------------------------------------------------ env contract
def test_check_env_passes():
    env = gym.make(ENV_ID)
    check_env(env.unwrapped, skip_render_check=True)


def test_public_attributes():
    env = gym.make(ENV_ID).unwrapped
    assert env.dt == pytest.approx(0.1)
    assert env.max_steps == 300
    np.testing.assert_array_equal(env.discrete_action_mask, [False, False])
    assert env.rules == " & ".join(env.rule_list.values())
    assert set(env.rule_list) == {"speed", "clearance", "corridor", "reach"}
    assert set(env.rule_defaults) == {"v_max", "d_safe", "w", "T", "eps"}
    np.testing.assert_allclose(env.action_space.low, [-0.5, -2.0])
    np.testing.assert_allclose(env.action_space.high, [1.6, 2.0])
    assert env.observation_space.shape == (cx.OBS_DIM,)


def test_deterministic_for_a_seed():
    def rollout(seed):
        env = gym.make(ENV_ID)
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(123)
        out = [obs]
        for _ in range(40):
            obs, *_ = env.step(np.array([rng.uniform(0, 1.2), rng.uniform(-1, 1)], np.float32))
            out.append(obs)
        return np.array(out)

    np.testing.assert_array_equal(rollout(7), rollout(7))
    assert not np.array_equal(rollout(7), rollout(8))


def test_time_limit_truncates():
    env = gym.make(ENV_ID, max_steps=5)
    env.reset(seed=0)
    flags = [env.step(np.zeros(2, np.float32))[2:4] for _ in range(5)]
    assert flags[:4] == [(False, False)] * 4 and flags[4] == (False, True)


def test_bad_inputs_are_named():
    env = gym.make(ENV_ID).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="obs must be shaped"):
        env.signals(np.zeros((4, 7)))
    with pytest.raises(ValueError, match="render_mode"):
        cx.CrossingEnv(render_mode="human")


def test_acceleration_limits_hold():
    env = gym.make(ENV_ID).unwrapped
    obs, _ = env.reset(seed=1)
    v, w = [obs[cx.I_V]], [obs[cx.I_W]]
    for u in [(1.6, 2.0)] * 5 + [(-0.5, -2.0)] * 5:
        obs, *_ = env.step(np.array(u, np.float32))
        v.append(obs[cx.I_V]), w.append(obs[cx.I_W])
    assert np.abs(np.diff(v)).max() <= cx.ACCEL_V * cx.DT + 1e-5
    assert np.abs(np.diff(w)).max() <= cx.ACCEL_W * cx.DT + 1e-5
    assert np.abs(np.diff(v)).max() > 0.9 * cx.ACCEL_V * cx.DT  # the limit is reached, not just respected


def test_pedestrian_contact_is_a_collision():
    env = gym.make(ENV_ID, second_pedestrian_prob=0.0).unwrapped
    env.reset(seed=0)
    # Drive straight at the pedestrian's crossing point and stop on its path: it walks into the robot.
    start, u = env.peds.start[0], env.peds.direction[0]
    x_c = start[0] + u[0] * (-start[1] / u[1])  # where the walk crosses the centre line
    for _ in range(env.max_steps):
        x = env.data.qpos[0]
        _, reward, terminated, _, info = env.step(np.array([1.0 if x < x_c - 0.2 else 0.0, 0.0], np.float32))
        if terminated:
            break
    assert info["collision"] and not info["success"] and reward < -5
    assert info["signals"]["clearance"] <= 0.0


def test_render_rgb_array():
    env = gym.make(ENV_ID, render_mode="rgb_array")
    env.reset(seed=0)
    if not os.environ.get("MUJOCO_GL"):  # without a back-end the error must say what to do
        with pytest.raises(RuntimeError, match="MUJOCO_GL"):
            env.render()
        return
    frame = env.render()  # MUJOCO_GL is set (as the README's test command does): rendering must work
    assert frame.shape == (360, 480, 3) and frame.dtype == np.uint8
    assert frame.std() > 10  # not a blank image
    env.close()
    headless = gym.make(ENV_ID)
    headless.reset(seed=0)
    assert headless.render() is None


# ------------------------------------------------------------------ signals
def test_info_signals_agree_with_signals(expert_episodes):
    for _, _, obs, _, infos in expert_episodes.values():
        sig = gym.make(ENV_ID).unwrapped.signals(obs)
        assert set(sig) == set(cx.SIGNAL_NAMES)
        for name, values in sig.items():
            assert values.shape == (len(obs),)
            np.testing.assert_allclose(values, [i["signals"][name] for i in infos], rtol=0, atol=1e-6)


def test_info_signals_match_the_simulator_state():
    """Each step's info["signals"] against values computed here from MuJoCo's state and the pedestrian script,
    not from the observation: speed = |qvel . heading|, lateral = y, dist_goal = |goal - xy|, clearance = the
    smallest centre distance to a present pedestrian minus the contact distance (capped)."""
    env = gym.make(ENV_ID).unwrapped
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(60):
        _, _, term, trunc, info = env.step(np.array([rng.uniform(0.3, 1.5), rng.uniform(-0.5, 0.5)], np.float32))
        q, qv = env.data.qpos, env.data.qvel
        xy = np.array(q[:2])
        peds = env.peds.position(env.time)[env.peds.present]
        clearance = min(float(np.min(np.hypot(*(peds - xy).T))) - 0.55, 10.0) if len(peds) else 10.0
        sig = info["signals"]
        assert sig["speed"] == pytest.approx(abs(qv[0] * np.cos(q[2]) + qv[1] * np.sin(q[2])), abs=1e-5)
        assert sig["lateral"] == pytest.approx(q[1], abs=1e-5)
        assert sig["dist_goal"] == pytest.approx(np.hypot(*(env.goal - xy)), abs=1e-5)
        assert sig["clearance"] == pytest.approx(clearance, abs=1e-4)
        if term or trunc:
            break


def test_signals_batched_shapes():
    _, _, obs, _, _ = run_expert(0)
    batch = np.stack([obs[:20], obs[-20:]])
    sig = cx.signals_from_obs(batch)
    for name in cx.SIGNAL_NAMES:
        assert sig[name].shape == (2, 20)
        np.testing.assert_allclose(sig[name][1], cx.signals_from_obs(obs[-20:])[name])


def test_absent_pedestrian_is_ignored():
    obs = np.zeros((1, cx.OBS_DIM), np.float32)
    obs[0, cx.I_PEDS : cx.I_PEDS + 5] = (1.0, 3.0, 4.0, 0.0, 0.0)  # present, 5 m away; slot 1 all zeros
    assert cx.signals_from_obs(obs)["clearance"][0] == pytest.approx(5.0 - cx.CONTACT_DISTANCE)
    obs[0, cx.I_PEDS] = 0.0
    assert cx.signals_from_obs(obs)["clearance"][0] == cx.CLEARANCE_CAP


# ------------------------------------------------------------------ expert
@pytest.mark.parametrize("mode", MODES)
def test_expert_succeeds_in_every_mode(mode):
    assert SEEDS_BY_MODE[mode], f"no seed in 0..59 drew mode {mode}"
    for seed in SEEDS_BY_MODE[mode]:
        env, expert, obs, _, infos = run_expert(seed)
        assert expert.mode == mode
        assert infos[-1]["success"] and not infos[-1]["collision"], (seed, mode)
        assert env.unwrapped.signals(obs)["clearance"].min() > 0.3


def test_expert_mode_and_style_come_from_the_seed_alone():
    a = gym.make(ENV_ID).unwrapped.make_expert(11)
    env_b = gym.make(ENV_ID)
    env_b.reset(seed=999)
    b = env_b.unwrapped.make_expert(11)
    assert (a.mode, a.style) == (b.mode, b.style)
    assert a.mode in MODES
    styles = {tuple(gym.make(ENV_ID).unwrapped.make_expert(s).style.values()) for s in range(5)}
    assert len(styles) == 5


def test_expert_modes_behave_differently(expert_episodes):
    sig = {m: cx.signals_from_obs(ep[2]) for m, ep in expert_episodes.items()}
    assert sig["yield"]["speed"][20:-5].min() < 0.05  # it stops and waits
    assert sig["behind"]["speed"][10:].min() > 0.05  # it slows without stopping
    assert sig["front"]["speed"].max() > sig["behind"]["speed"].max()
    assert sig["left"]["lateral"].max() > 0.7 and sig["right"]["lateral"].min() < -0.7
    assert len(sig["front"]["speed"]) < len(sig["yield"]["speed"])


# ------------------------------------------------------------------ STL rules
def _stl():
    from stlflow.stl import parse

    return parse


def test_rules_parse(expert_episodes):
    parse = _stl()
    env = gym.make(ENV_ID).unwrapped
    spec = parse(env.rules)
    assert set(spec.signals) == set(cx.SIGNAL_NAMES)
    assert set(spec.params) == set(env.rule_defaults)
    for name, text in env.rule_list.items():
        assert set(parse(text).params) <= set(env.rule_defaults), name


def test_rules_evaluate_on_expert_trajectories(expert_episodes):
    parse = _stl()
    env = gym.make(ENV_ID).unwrapped
    spec = parse(env.rules)
    parts = {name: parse(text) for name, text in env.rule_list.items()}
    for mode, (_, _, obs, _, _) in expert_episodes.items():
        sig = {k: torch.as_tensor(v) for k, v in env.signals(obs).items()}
        rho = float(spec.robustness(sig, dt=env.dt, params=env.rule_defaults).reshape(-1)[0])
        rho_parts = {
            n: float(p.robustness(sig, dt=env.dt, params=env.rule_defaults).reshape(-1)[0]) for n, p in parts.items()
        }
        assert rho == pytest.approx(min(rho_parts.values()), abs=1e-5), mode
        # Hand-computed robustness of each rule from the signals.
        d = env.rule_defaults
        assert rho_parts["speed"] == pytest.approx(d["v_max"] - sig["speed"].max().item(), abs=1e-5)
        assert rho_parts["clearance"] == pytest.approx(sig["clearance"].min().item() - d["d_safe"], abs=1e-5)
        assert rho_parts["corridor"] == pytest.approx(d["w"] - sig["lateral"].abs().max().item(), abs=1e-5)
        assert rho_parts["reach"] == pytest.approx(d["eps"] - sig["dist_goal"].min().item(), abs=1e-5)
        assert rho_parts["reach"] >= 0 and rho_parts["clearance"] > 0, mode


# ------------------------------------------------------------------ dynamics model
def _tracking_run(seed: int, steps: int = 50):
    env = gym.make(ENV_ID, second_pedestrian_prob=0.0).unwrapped
    obs0, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    # Random-ish controls: slow, wiggling, with both saturated and small command changes.
    v = np.clip(np.cumsum(rng.normal(0, 0.25, steps)) * 0.3 + 0.3, -0.5, 0.7)
    w = np.clip(1.8 * np.sin(np.arange(steps) * rng.uniform(0.1, 0.4)) + rng.normal(0, 0.3, steps), -2, 2)
    controls = np.stack([v, w], 1).astype(np.float32)
    ctx = env.pedestrian_context(steps)
    observed = []
    for u in controls:
        obs, _, terminated, truncated, info = env.step(u)
        observed.append(obs)
        assert not (terminated or truncated), f"seed {seed}: the tracking run hit something ({info})"
    return obs0, controls, np.array(observed), ctx


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamics_tracks_mujoco_over_50_steps(seed):
    obs0, controls, observed, ctx = _tracking_run(seed)
    dyn = gym.make(ENV_ID).unwrapped.dynamics_model()
    states = dyn.rollout(dyn.state_from_obs(obs0[None]), torch.as_tensor(controls)[None])[0]
    truth = dyn.state_from_obs(observed)
    assert (states[:, :2] - truth[:, :2]).norm(dim=-1).max() < TRACKING_TOL_POS
    assert (states[:, 2] - truth[:, 2]).abs().max() < TRACKING_TOL_YAW
    assert (states[:, 3:] - truth[:, 3:]).abs().max() < 1e-3
    # The model's signals equal the env's, with privileged or observation-derived context.
    env_sig = cx.signals_from_obs(observed)
    for context in (ctx, CrossingDynamics.context_from_obs(observed[None])):
        model_sig = dyn.signals(states[None], context)
        for name in cx.SIGNAL_NAMES:
            np.testing.assert_allclose(model_sig[name][0].numpy(), env_sig[name], atol=2e-3, err_msg=name)


def test_dynamics_step_equals_rollout_and_is_differentiable():
    dyn = CrossingDynamics()
    torch.manual_seed(0)
    state = torch.tensor([[0.0, 0.2, 0.1, 0.5, 0.0], [1.0, -0.3, -0.2, 0.0, 0.5]], dtype=torch.float64)
    controls = (torch.rand(2, 6, 2, dtype=torch.float64) * 2 - 0.5).requires_grad_(True)
    rolled = dyn.rollout(state, controls)
    s = state
    for k in range(6):
        s = dyn.step(s, controls[:, k])
        torch.testing.assert_close(s, rolled[:, k])
    ctx = gym.make(ENV_ID, second_pedestrian_prob=1.0).unwrapped
    ctx.reset(seed=0)
    context = ctx.pedestrian_context(6)
    assert torch.autograd.gradcheck(
        lambda u: dyn.signals(dyn.rollout(state, u), context)["clearance"], (controls,), eps=1e-6, atol=1e-4
    )


@settings(max_examples=40, deadline=None)
@given(
    v=st.floats(-0.5, 1.6),
    w=st.floats(-2.0, 2.0),
    u_v=st.floats(-5.0, 5.0),
    u_w=st.floats(-5.0, 5.0),
)
def test_dynamics_acceleration_bounded_and_monotone(v, w, u_v, u_w):
    dyn = CrossingDynamics()
    state = torch.tensor([[0.0, 0.0, 0.0, v, w]], dtype=torch.float64)
    nxt = dyn.step(state, torch.tensor([[u_v, u_w]], dtype=torch.float64))[0]
    u_v, u_w = np.clip(u_v, *cx.V_BOUNDS), np.clip(u_w, *cx.W_BOUNDS)
    dv, dw = float(nxt[3]) - v, float(nxt[4]) - w
    assert abs(dv) <= cx.ACCEL_V * cx.DT + 1e-12 and abs(dw) <= cx.ACCEL_W * cx.DT + 1e-12
    # Speeds move towards the command and never overshoot it.
    assert dv * (u_v - v) >= 0 and abs(dv) <= abs(u_v - v) + 1e-12
    assert dw * (u_w - w) >= 0 and abs(dw) <= abs(u_w - w) + 1e-12


def test_dynamics_rejects_bad_shapes():
    dyn = CrossingDynamics()
    with pytest.raises(ValueError, match="state0"):
        dyn.rollout(torch.zeros(2, 4), torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="controls"):
        dyn.rollout(torch.zeros(2, 5), torch.zeros(3, 3, 2))


@pytest.mark.slow
def test_expert_succeeds_on_98_percent_of_200_seeds_and_mostly_keeps_the_rules():
    env = gym.make(ENV_ID)
    success, rules_kept, modes = [], [], set()
    d = env.unwrapped.rule_defaults
    for seed in range(200):
        _, expert, obs, _, infos = run_expert(seed)
        modes.add(expert.mode)
        success.append(infos[-1]["success"])
        s = cx.signals_from_obs(obs)
        reached = np.flatnonzero(s["dist_goal"] <= d["eps"])
        rules_kept.append(
            s["speed"].max() <= d["v_max"]
            and s["clearance"].min() >= d["d_safe"]
            and np.abs(s["lateral"]).max() <= d["w"]
            and len(reached) > 0
            and reached[0] * env.unwrapped.dt <= d["T"]
        )
    assert np.mean(success) >= 0.98
    assert np.mean(rules_kept) >= 0.9
    assert modes == set(MODES)
