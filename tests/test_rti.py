"""RTIController on real (tiny, randomly initialised) stlflow Policies: NFE accounting, shift, discrete channels,
fallbacks, reset, determinism, telemetry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stlflow.datasets import Normalizer
from stlflow.policy import Policy
from stlflow.policy.rti import DEFAULT_K, RTIController

torch.set_num_threads(1)
DO, TO, TP = 5, 2, 8


def tiny_policy(kind: str = "flow", da: int = 2, discrete: bool = False, seed: int = 0, discrete_scale: float = 1.0,
                **head) -> Policy:
    """A randomly initialised small policy with a min-max normaliser fitted on random data."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-2.0, 3.0, size=(200, da))
    mask = np.zeros(da, bool)
    if discrete:
        mask[-1] = True
        actions[:, -1] = rng.choice([-1.0, 1.0], size=200)
    norm = Normalizer.fit({"obs": rng.normal(size=(200, DO)), "action": actions})
    return Policy(DO, da, n_obs_steps=TO, horizon=TP, n_action_steps=4, head={"kind": kind, **head},
                  net={"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16},
                  discrete_action_mask=mask, normalizer=norm, discrete_scale=discrete_scale).eval()


def observations(n: int, seed: int = 0, step: float = 0.05) -> np.ndarray:
    """A smooth random walk of n observations (Do,)."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(scale=step, size=(n, DO)), axis=0).astype(np.float32)


class NetCalls:
    """Counts real forward passes of the policy's network (a forward hook; batch-2 CFG calls count once)."""

    def __init__(self, policy: Policy) -> None:
        self.n = 0
        policy.head.net.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


class Spy:
    """Records the keyword arguments of every ``policy.sample_normalized`` call and its result."""

    def __init__(self, policy: Policy) -> None:
        self.calls: list[dict] = []
        self._orig = policy.sample_normalized
        policy.sample_normalized = self  # instance attribute shadows the method

    def __call__(self, cond, **kw):
        out = self._orig(cond, **kw)
        self.calls.append({**kw, "out": out.clone()})
        return out


@pytest.mark.parametrize(("kind", "head", "k"), [
    ("flow", {}, 1), ("flow", {}, 3), ("flow", {"solver": "midpoint"}, 2), ("ddpm", {}, 2), ("meanflow", {}, 1),
])
def test_first_tick_cold_later_ticks_exactly_k(kind, head, k):
    policy = tiny_policy(kind, **head)
    calls = NetCalls(policy)
    ctrl = RTIController(policy, k=k, t_start=0.5)
    ctrl.reset(seed=0)
    per_tick = []
    for obs in observations(6):
        before = calls.n
        ctrl.act(obs)
        per_tick.append((ctrl.last_nfe, calls.n - before))
    full, warm = policy.nfe(), policy.nfe(k, 0.5)
    assert full == policy.head.default_steps * (2 if head.get("solver") == "midpoint" else 1)
    assert per_tick[0] == (full, full)
    assert warm == k * (2 if head.get("solver") == "midpoint" else 1)
    assert all(t == (warm, warm) for t in per_tick[1:])
    assert ctrl.stats["cold_ticks"] == 1 and ctrl.stats["nfe_per_tick"] == pytest.approx((full + 5 * warm) / 6)


def test_reset_forces_cold_and_nothing_leaks_across_episodes():
    policy = tiny_policy("flow")
    a = RTIController(policy, k=2)
    a.reset(seed=3)
    for obs in observations(5, seed=1):
        a.act(obs)
    a.reset(seed=4)
    first = a.act(observations(1, seed=2)[0])
    assert a.last_cold and a.last_nfe == policy.nfe()
    fresh = RTIController(policy, k=2)
    fresh.reset(seed=4)
    np.testing.assert_array_equal(first, fresh.act(observations(1, seed=2)[0]))


def test_plan_at_reset_moves_the_cold_plan_out_of_the_ticks():
    policy = tiny_policy("flow")
    calls, spy = NetCalls(policy), Spy(policy)
    ctrl = RTIController(policy, k=2, t_start=0.3, renoise=False, plan_at_reset=True)
    obs = observations(4)
    ctrl.reset(seed=0, obs=obs[0])
    full, warm = policy.nfe(), policy.nfe(2, 0.3)
    assert calls.n == full and ctrl.last_reset_nfe == full and ctrl.last_reset_latency_s > 0
    plan = spy.calls[0]["out"]
    per_tick = []
    for o in obs:
        before = calls.n
        ctrl.act(o)
        per_tick.append((ctrl.last_nfe, calls.n - before, ctrl.last_cold))
    assert per_tick == [(warm, warm, False)] * 4
    # tick 0 starts from the plan itself (it was made for tick 0's time), not from the plan shifted by one
    torch.testing.assert_close(spy.calls[1]["x_init"], plan)
    st_ = ctrl.stats
    assert st_["cold_ticks"] == 0 and st_["reset"]["plans"] == 1 and st_["reset"]["nfe"] == full
    assert st_["nfe_per_action"] == pytest.approx((full + 4 * warm) / 4)


def test_plan_at_reset_needs_the_observation_and_the_option():
    policy = tiny_policy("flow")
    for ctrl, kw in ((RTIController(policy, plan_at_reset=True), {}),
                     (RTIController(policy, plan_at_reset=False), {"obs": observations(1)[0]})):
        ctrl.reset(seed=0, **kw)
        assert ctrl.last_reset_nfe == 0
        ctrl.act(observations(1)[0])
        assert ctrl.last_cold and ctrl.last_nfe == policy.nfe()


def test_shift_semantics_in_the_loop():
    policy = tiny_policy("flow")
    spy = Spy(policy)
    ctrl = RTIController(policy, k=2, t_start=0.3, renoise=False)
    ctrl.reset(seed=0)
    obs = observations(3)
    ctrl.act(obs[0])
    ctrl.act(obs[1])
    prev, warm = spy.calls[0]["out"], spy.calls[1]
    assert spy.calls[0].get("x_init") is None  # cold: from noise
    expected = torch.cat([prev[:, 1:], prev[:, -1:]], dim=1)
    torch.testing.assert_close(warm["x_init"], expected, rtol=0, atol=0)
    assert warm["t_start"] == 0.3 and warm["steps"] == 2
    # the executed action is chunk[To-1] of the newest chunk, in physical units
    np.testing.assert_allclose(ctrl.act(obs[2]), policy.unnormalize_action(spy.calls[2]["out"][0, TO - 1]).numpy(),
                               rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(shift=st.integers(1, TP - 1), seed=st.integers(0, 10_000))
def test_warm_start_is_the_shifted_chunk_with_the_last_action_repeated(shift, seed):
    ctrl = RTIController(_SHARED_POLICY, shift=shift, discrete_mode="scale")
    chunk = torch.randn((1, TP, 2), generator=torch.Generator().manual_seed(seed))
    guess = ctrl.warm_start(chunk)
    torch.testing.assert_close(guess[:, : TP - shift], chunk[:, shift:], rtol=0, atol=0)
    for j in range(TP - shift, TP):
        torch.testing.assert_close(guess[:, j], chunk[:, -1], rtol=0, atol=0)


_SHARED_POLICY = tiny_policy("flow")


def test_renoise_option_renoises_the_shifted_chunk_to_t_start():
    policy = tiny_policy("flow")
    spy = Spy(policy)
    ctrl = RTIController(policy, k=1, t_start=0.4, renoise=True)
    ctrl.reset(seed=0)
    for obs in observations(2):
        ctrl.act(obs)
    prev, x_init = spy.calls[0]["out"], spy.calls[1]["x_init"]
    guess = torch.cat([prev[:, 1:], prev[:, -1:]], dim=1)
    eps = (x_init - 0.6 * guess) / 0.4  # flow path: x_t = (1 - t) x0 + t eps
    assert not torch.allclose(x_init, guess)
    assert 0.5 < float(eps.std()) < 1.6  # the added part is standard normal noise


@pytest.mark.parametrize("factor", [1.0, 10.0])
def test_discrete_channels_clip_mode(factor):
    policy = tiny_policy("flow", da=3, discrete=True)
    spy = Spy(policy)
    ctrl = RTIController(policy, k=2, renoise=False, discrete_mode="clip", clip_factor=factor)
    ctrl.reset(seed=1)
    actions = [ctrl.act(obs) for obs in observations(8)]
    assert all(a[-1] in (-1.0, 1.0) for a in actions)  # executed gripper thresholded to its discrete values
    assert len({round(float(a[0]), 6) for a in actions}) > 1  # continuous channels are not thresholded
    zero, one = (policy.normalize_action(torch.tensor([[0.0] * 3, [1.0] * 3]))[:, -1]).tolist()
    for call in spy.calls[1:]:
        g = call["x_init"][0, :, -1]
        assert torch.allclose(torch.abs(g - zero), torch.full_like(g, abs(one - zero) / factor), atol=1e-6)


def test_discrete_channels_scale_mode_leaves_the_warm_start():
    with pytest.raises(ValueError, match="discrete_scale > 1"):
        RTIController(tiny_policy("flow", da=3, discrete=True), discrete_mode="scale")
    policy = tiny_policy("flow", da=3, discrete=True, discrete_scale=4.0)
    spy = Spy(policy)
    ctrl = RTIController(policy, k=2, renoise=False, discrete_mode="scale")
    ctrl.reset(seed=1)
    actions = [ctrl.act(obs) for obs in observations(4)]
    assert all(a[-1] in (-1.0, 1.0) for a in actions)
    prev = spy.calls[0]["out"]
    torch.testing.assert_close(spy.calls[1]["x_init"], torch.cat([prev[:, 1:], prev[:, -1:]], 1), rtol=0, atol=0)


def test_fallback_to_cold_on_an_observation_jump():
    policy = tiny_policy("flow")
    ctrl = RTIController(policy, k=1, obs_jump=1.0)
    ctrl.reset(seed=0)
    obs = observations(6, step=0.05)
    obs[4:] += 5.0  # the world jumps between ticks 3 and 4
    cold = []
    for o in obs:
        ctrl.act(o)
        cold.append((ctrl.last_cold, ctrl.last_nfe))
    full, warm = policy.nfe(), policy.nfe(1, ctrl.t_start)
    assert cold == [(True, full), (False, warm), (False, warm), (False, warm), (True, full), (False, warm)]
    assert ctrl.stats["fallbacks"] == {"obs_jump": 1, "residual": 0}
    assert ctrl.log["reason"][4] == "obs_jump"


def test_fallback_on_residual_growth_and_residuals_logged():
    policy = tiny_policy("flow")
    never = RTIController(policy, k=2, residual_max=None)
    always = RTIController(policy, k=2, residual_max=0.0)
    for ctrl in (never, always):
        ctrl.reset(seed=0)
        for o in observations(5):
            ctrl.act(o)
    res = never.stats["residuals"]
    assert np.isnan(res[0]) and all(np.isfinite(r) and r > 0 for r in res[1:])
    assert never.stats["fallbacks"]["residual"] == 0
    assert always.stats["fallbacks"]["residual"] == 4
    assert always.log["nfe"][1:] == [policy.nfe(2, always.t_start) + policy.nfe()] * 4
    # a threshold between the smallest and the largest residual triggers on exactly the larger ones
    mid = float(np.median(res[1:]))
    some = RTIController(policy, k=2, residual_max=mid)
    some.reset(seed=0)
    for o in observations(2):
        some.act(o)
    assert some.stats["fallbacks"]["residual"] == int(res[1] > mid)


@pytest.mark.parametrize("renoise", [False, True])
def test_same_seed_same_actions(renoise):
    policy = tiny_policy("ddpm")
    obs = observations(6)

    def run(seed):
        ctrl = RTIController(policy, k=2, renoise=renoise)
        ctrl.reset(seed=seed)
        return np.stack([ctrl.act(o) for o in obs])

    np.testing.assert_array_equal(run(5), run(5))
    assert not np.array_equal(run(5), run(6))


def test_stats_and_validation():
    policy = tiny_policy("flow")
    ctrl = RTIController(policy, k=2)
    ctrl.reset(seed=0)
    for o in observations(10):
        ctrl.act(o)
    s = ctrl.stats
    lat = s["latency"]
    assert s["ticks"] == 10 and 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert s["nfe_per_action"] == pytest.approx(np.mean(ctrl.log["nfe"]))
    with pytest.raises(ValueError, match=r"k \(solver steps per warm tick\) must be >= 1"):
        RTIController(policy, k=0)
    with pytest.raises(TypeError, match="steps_per_tick"):  # one name for it: k
        RTIController(policy, steps_per_tick=2)
    with pytest.raises(TypeError, match="params"):  # θ is stl_params
        RTIController(policy, params={"v_max": 1.0})
    with pytest.raises(ValueError, match="discrete_mode"):
        RTIController(policy, discrete_mode="round")
    with pytest.raises(ValueError, match="t_start"):
        RTIController(policy, t_start=0.0)
    with pytest.raises(ValueError, match="obs_dim"):
        ctrl.act(np.zeros(DO + 1))


def test_lookahead_executes_a_later_action_of_the_same_chunk():
    policy = tiny_policy("flow")
    spy = Spy(policy)
    ctrl = RTIController(policy, k=2, lookahead=2)
    ctrl.reset(seed=0)
    a = ctrl.act(observations(1)[0])
    np.testing.assert_allclose(a, policy.unnormalize_action(spy.calls[0]["out"][0, TO - 1 + 2]).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="lookahead"):
        RTIController(policy, lookahead=TP)


def conditioned_policy(names=("v_max", "d_safe"), seed: int = 0) -> Policy:
    """A tiny flow policy conditioned on θ = ``names``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    norm = Normalizer.fit({"obs": rng.normal(size=(200, DO)), "action": rng.uniform(-2.0, 3.0, size=(200, 2)),
                           "params": rng.uniform(0.5, 1.5, size=(200, len(names)))})
    return Policy(DO, 2, n_obs_steps=TO, horizon=TP, n_action_steps=4, head={"kind": "flow"},
                  net={"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16}, param_names=list(names),
                  normalizer=norm).eval()


class CountCalls:
    """Wraps a bound method of ``obj`` (instance attribute) and records the positional arguments of each call."""

    def __init__(self, obj, name: str) -> None:
        self.calls: list[tuple] = []
        self._orig = getattr(obj, name)
        setattr(obj, name, self)

    def __call__(self, *args, **kw):
        self.calls.append(args)
        return self._orig(*args, **kw)


@pytest.mark.parametrize("plan_at_reset", [False, True])
def test_theta_tensor_is_built_once_per_episode_not_per_tick(plan_at_reset):
    policy = conditioned_policy()
    built, conds = CountCalls(policy, "theta_tensor"), CountCalls(policy, "condition")
    theta = {"v_max": 1.2, "d_safe": 0.7}
    ctrl = RTIController(policy, k=2, stl_params=theta, plan_at_reset=plan_at_reset)
    assert len(built.calls) == 1 and ctrl.theta.shape == (1, 2)
    obs = observations(10)
    ctrl.reset(seed=0, obs=obs[0])
    actions = [ctrl.act(o) for o in obs]
    assert len(built.calls) == 1  # 10 ticks (and the plan made in reset), one θ tensor
    assert len(conds.calls) == 10 + plan_at_reset and all(c[1] is ctrl.theta for c in conds.calls)
    # a second episode with the same θ builds nothing; asking for other values builds once more
    ctrl.reset(seed=0, obs=obs[0])
    assert np.array_equal(np.stack([ctrl.act(o) for o in obs]), np.stack(actions)) and len(built.calls) == 1
    ctrl.stl_params = {"v_max": 0.6, "d_safe": 0.7}
    assert len(built.calls) == 2
    ctrl.reset(seed=0, obs=obs[0])
    assert not np.array_equal(np.stack([ctrl.act(o) for o in obs]), np.stack(actions)) and len(built.calls) == 2
    with pytest.raises(TypeError):  # kept read-only: an in-place change could not reach the built tensor
        ctrl.stl_params["v_max"] = 2.0  # type: ignore[index]
    # the prepared tensor conditions exactly as the mapping did when it was rebuilt on every tick
    hist = np.stack([obs[0], obs[1]])[None]
    torch.testing.assert_close(policy.condition(hist, ctrl.theta), policy.condition(hist, ctrl.stl_params),
                               rtol=0, atol=0)


def test_unknown_or_missing_theta_names_are_refused_with_the_known_names():
    policy = conditioned_policy()
    with pytest.raises(ValueError, match=r"\['v_max', 'd_safe'\]; missing \['d_safe'\], unknown \['speed'\]"):
        RTIController(policy, stl_params={"v_max": 1.0, "speed": 2.0})
    with pytest.raises(ValueError, match=r"\['v_max', 'd_safe'\]; missing \['d_safe'\], unknown \[\]"):
        RTIController(policy, stl_params={"v_max": 1.0})
    ctrl = RTIController(policy, stl_params={"v_max": 1.0, "d_safe": 0.5})
    with pytest.raises(ValueError, match="unknown \\['x'\\]"):
        ctrl.stl_params = {"v_max": 1.0, "d_safe": 0.5, "x": 0.0}
    assert dict(ctrl.stl_params) == {"v_max": 1.0, "d_safe": 0.5}  # a refused θ leaves the old one in place
    with pytest.raises(ValueError, match="trained without θ"):
        RTIController(tiny_policy("flow"), stl_params={"v_max": 1.0})
    assert RTIController(tiny_policy("flow")).theta is None


def test_default_k():
    policy = tiny_policy("flow")
    assert DEFAULT_K == 2 and RTIController(policy).k == DEFAULT_K
    assert "k=3" in repr(RTIController(policy, k=3))


# ---------------------------------------------------------------------------------------------- elapsed ticks
def test_default_elapsed_is_one_tick_and_bit_identical():
    policy = tiny_policy("ddpm")
    obs = observations(6)
    for plan_at_reset in (False, True):
        a, b = (RTIController(policy, k=2, plan_at_reset=plan_at_reset) for _ in range(2))
        a.reset(seed=3, obs=obs[0])
        b.reset(seed=3, obs=obs[0])
        legacy = np.stack([a.act(o) for o in obs])
        explicit = np.stack([b.act(o, elapsed=0 if (i == 0 and plan_at_reset) else 1) for i, o in enumerate(obs)])
        np.testing.assert_array_equal(legacy, explicit)
        assert a.log["nfe"] == b.log["nfe"] and a.log["cold"] == b.log["cold"]
        np.testing.assert_array_equal(a.log["residual"], b.log["residual"])


def test_elapsed_two_shifts_the_warm_start_by_two_ticks():
    policy = tiny_policy("flow")
    spy = Spy(policy)
    obs = observations(3)
    ctrl = RTIController(policy, k=2, t_start=0.3, renoise=False)
    ctrl.reset(seed=0)
    ctrl.act(obs[0])
    a = ctrl.act(obs[2], elapsed=2)  # tick 1 was skipped: its observation never reached the controller
    prev, warm = spy.calls[0]["out"], spy.calls[1]
    torch.testing.assert_close(warm["x_init"], torch.cat([prev[:, 2:], prev[:, -1:], prev[:, -1:]], dim=1),
                               rtol=0, atol=0)
    assert not ctrl.last_cold and ctrl.last_nfe == policy.nfe(2, 0.3)
    # the same as one call of a controller that shifts by two actions per tick (the shifted chunk's plan)
    other = RTIController(policy, k=2, t_start=0.3, renoise=False, shift=2)
    other.reset(seed=0)
    other.act(obs[0])
    np.testing.assert_array_equal(a, other.act(obs[2]))
    np.testing.assert_array_equal(ctrl.plan().actions, other.plan().actions)


@pytest.mark.parametrize("renoise", [False, True])
def test_elapsed_beyond_the_chunk_falls_back_to_a_cold_plan(renoise):
    policy = tiny_policy("flow")
    obs = observations(3)
    ctrl = RTIController(policy, k=2, renoise=renoise)
    ctrl.reset(seed=0)
    ctrl.act(obs[0])
    ctrl.act(obs[1], elapsed=TP - 1)  # the last action of the chunk is still there to start from
    assert not ctrl.last_cold and ctrl.last_nfe == policy.nfe(2, ctrl.t_start)
    a = ctrl.act(obs[2], elapsed=TP)  # nothing of the chunk is left
    assert ctrl.last_cold and ctrl.last_nfe == policy.nfe() and ctrl.log["reason"][-1] == "expired"
    assert ctrl.stats["expired_ticks"] == 1 and ctrl.stats["fallbacks"] == {"obs_jump": 0, "residual": 0}
    # a cold plan is a cold plan: the same action as a fresh controller whose generator is in the same state
    fresh = RTIController(policy, k=2, renoise=renoise)
    fresh.reset(seed=0)
    fresh.act(obs[0])
    fresh.act(obs[1], elapsed=TP - 1)
    fresh.reset(seed=None)  # keeps the generator's state, forgets the chunk and the history
    fresh.history.push(obs[1])
    np.testing.assert_array_equal(a, fresh.act(obs[2]))
    with pytest.raises(ValueError, match="elapsed"):
        ctrl.act(obs[2], elapsed=-1)
    with pytest.raises(ValueError, match="elapsed"):
        ctrl.act(obs[2], elapsed=1.5)


def test_plan_reads_the_chunk_with_its_tick_and_timestamp():
    policy = tiny_policy("flow", da=3, discrete=True)
    spy = Spy(policy)
    ctrl = RTIController(policy, k=2, lookahead=1)
    ctrl.reset(seed=0)
    assert ctrl.plan() is None
    obs = observations(3)
    a0 = ctrl.act(obs[0], t=10.0)
    p0 = ctrl.plan()
    assert p0.actions.shape == (TP - TO, 3) and p0.tick == 0 and p0.t == 10.0 and p0.cold
    assert p0.nfe == policy.nfe() and not p0.actions.flags.writeable
    np.testing.assert_array_equal(p0.actions[0], a0)  # actions[0] is what act returned
    want = policy.threshold_discrete(policy.unnormalize_action(spy.calls[0]["out"][0, TO:])).numpy()
    np.testing.assert_array_equal(p0.actions, want)
    assert set(np.unique(p0.actions[:, -1])) <= {-1.0, 1.0}
    a2 = ctrl.act(obs[2], elapsed=2, t=10.2)
    p2 = ctrl.plan()
    assert (p2.tick, p2.t, p2.cold, p2.nfe) == (2, 10.2, False, policy.nfe(2, ctrl.t_start))
    np.testing.assert_array_equal(p2.actions[0], a2)
    ctrl.reset(seed=0, obs=obs[0])
    assert ctrl.plan() is None  # plan_at_reset is off: reset planned nothing
