"""STL guidance (stlflow.policy.guidance) on real tiny policies and the real Crossing dynamics model."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from stlflow.datasets import Normalizer
from stlflow.policy import Policy
from stlflow.policy.guidance import STLGuidance
from stlflow.policy.rti import RTIController

torch.set_num_threads(1)


def crossing_policy(kind: str = "flow", seed: int = 0) -> Policy:
    """A randomly initialised small Crossing-shaped policy (Do = 20, Da = 2, To = 2, Tp = 16)."""
    from stlflow.envs.crossing import OBS_DIM, V_BOUNDS, W_BOUNDS

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    actions = np.stack([rng.uniform(*V_BOUNDS, 500), rng.uniform(*W_BOUNDS, 500)], axis=1)
    norm = Normalizer.fit({"obs": rng.normal(size=(500, OBS_DIM)), "action": actions})
    return Policy(OBS_DIM, 2, n_obs_steps=2, horizon=16, n_action_steps=8, head={"kind": kind},
                  net={"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16}, normalizer=norm).eval()


@pytest.fixture(scope="module")
def crossing_obs() -> np.ndarray:
    """(2, Do) observation history at a real Crossing reset."""
    import gymnasium as gym

    import stlflow.envs  # noqa: F401

    env = gym.make("stlflow/Crossing-v0")
    obs, _ = env.reset(seed=5)
    env.close()
    return np.stack([obs, obs])


def speed_guidance(v_max: float, **kw) -> STLGuidance:
    from stlflow.control.tasks import get_task

    return get_task("crossing").guidance({"v_max": v_max}, rules=("speed",), **kw)


@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_guidance_raises_robustness(kind, crossing_obs):
    """Same noise, same network: the guided samples satisfy a tight speed limit far more often."""
    policy = crossing_policy(kind)
    g = speed_guidance(0.6)
    b = 32
    cond = policy.condition(np.repeat(crossing_obs[None], b, 0))
    fn = g.bind(policy, crossing_obs)
    plain = policy.sample_normalized(cond, generator=torch.Generator().manual_seed(0))
    guided = policy.sample_normalized(cond, generator=torch.Generator().manual_seed(0), guidance_fn=fn)
    rho_plain = g.robustness(policy, plain, crossing_obs)
    rho_guided = g.robustness(policy, guided, crossing_obs)
    assert (rho_plain < 0).float().mean() > 0.5  # the toy case is hard without guidance
    assert g.calls == policy.head.nfe()  # one guidance evaluation per solver step
    if kind == "flow":  # the last Euler step lands exactly on the guided x0_hat
        assert rho_guided.mean() > rho_plain.mean() + 0.2
        assert (rho_guided >= 0).float().mean() >= (rho_plain >= 0).float().mean() + 0.3
    else:  # DDIM re-predicts x0 from the network at every step: a smaller, still clear gain
        assert rho_guided.mean() > rho_plain.mean() + 0.03


def test_guidance_leaves_satisfying_samples_alone(crossing_obs):
    """Hinge: with a limit no sample can break (v <= 5 m/s), every correction is exactly zero."""
    policy = crossing_policy()
    g = speed_guidance(5.0, scale=10.0)
    fn = g.bind(policy, crossing_obs)
    x0 = torch.randn(8, 16, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fn(x0, 0.5), torch.zeros_like(x0))


def test_gradient_points_uphill(crossing_obs):
    """One small correction raises the smooth robustness of every violating sample (first-order check)."""
    policy = crossing_policy()
    g = speed_guidance(0.6, scale=0.05, max_step=1.0, margin=10.0)  # large margin: every sample is corrected
    x0 = torch.randn(16, 16, 2, generator=torch.Generator().manual_seed(2))
    fn = g.bind(policy, crossing_obs)
    with torch.no_grad():
        x1 = x0 + fn(x0, 0.5)
    r0 = g.robustness(policy, x0, crossing_obs, smooth=g.smooth)
    r1 = g.robustness(policy, x1, crossing_obs, smooth=g.smooth)
    assert bool((r1 >= r0 - 1e-6).all()) and bool((r1 > r0).any())


def test_off_by_default_identical_actions(crossing_obs):
    """No guidance given and guidance=None give bit-identical RTI actions; a guided controller differs."""
    from stlflow.control.controllers import ControllerSpec

    policy = crossing_policy()
    obs = [crossing_obs[0] + 0.01 * i for i in range(6)]

    def run(ctrl):
        ctrl.reset(seed=3)
        return np.stack([ctrl.act(o) for o in obs])

    default = run(RTIController(policy, k=2, seed=3))
    explicit = run(RTIController(policy, k=2, seed=3, guidance=None))
    factory = run(ControllerSpec.create("rti", k=2).build(policy, seed=3))
    chunk = run(ControllerSpec.create("cold", k=2).build(policy, seed=3))
    chunk_none = run(ControllerSpec.create("cold", k=2, guidance=None).build(policy, seed=3))
    assert np.array_equal(default, explicit) and np.array_equal(default, factory)
    assert np.array_equal(chunk, chunk_none)
    guided = run(RTIController(policy, k=2, seed=3, guidance=speed_guidance(0.3, scale=2.0)))
    assert not np.array_equal(default, guided)


def _tick_robustness(controllers: dict, g: STLGuidance, policy: Policy, obs: np.ndarray, ticks: int) -> dict:
    """Step each RTI controller ``ticks`` times on ``obs[0]``; the robustness (under ``g``) of every tick's chunk."""
    rho = {name: [] for name in controllers}
    for _ in range(ticks):
        for name, ctrl in controllers.items():
            ctrl.act(obs[0])
            assert ctrl._chunk.shape == (1, policy.horizon, policy.action_dim)  # one chunk per tick (particles too)
            rho[name].append(float(g.robustness(policy, ctrl._chunk, obs)))
    return rho


def test_rti_with_guidance_obeys_requested_limit(crossing_obs):
    """Inside the RTI controller, every tick's chunk is steered toward a tight requested speed limit."""
    policy = crossing_policy()
    g = speed_guidance(0.5, scale=2.0, iters=3)
    plain = RTIController(policy, k=2, seed=0)
    guided = RTIController(policy, k=2, seed=0, guidance=g)
    rho = _tick_robustness({"plain": plain, "guided": guided}, g, policy, crossing_obs, ticks=12)
    assert np.mean(rho["guided"]) > np.mean(rho["plain"])  # robustness of the speed rule at v_max = 0.5
    assert sum(a > b for a, b in zip(rho["guided"], rho["plain"])) >= 9  # tick by tick, not only on average
    assert plain.last_nfe == guided.last_nfe  # guidance costs no extra network evaluations


def test_guidance_pickles_and_validates(crossing_obs):
    g = speed_guidance(0.8)
    g2 = pickle.loads(pickle.dumps(g))
    policy = crossing_policy()
    x0 = torch.zeros(2, 16, 2)
    assert torch.equal(g.robustness(policy, x0, crossing_obs), g2.robustness(policy, x0, crossing_obs))
    with pytest.raises(ValueError, match="rules"):
        STLGuidance("", g.dynamics, g.model_inputs, 0.1)
    with pytest.raises(TypeError, match="rollout"):
        STLGuidance("G(speed <= 1)", object(), g.model_inputs, 0.1)
    with pytest.raises(KeyError, match="v_max"):
        STLGuidance("G(speed <= {v_max})", g.dynamics, g.model_inputs, 0.1).robustness(policy, x0, crossing_obs)


def test_model_inputs_match_privileged_context():
    """The observation-only pedestrian prediction agrees with the env's script while the pedestrians walk."""
    import gymnasium as gym

    import stlflow.envs  # noqa: F401
    from stlflow.control.tasks import get_task
    from stlflow.envs.crossing_dynamics import CrossingDynamics

    env = gym.make("stlflow/Crossing-v0")
    obs, _ = env.reset(seed=7)
    u = env.unwrapped
    for _ in range(40):  # until pedestrian 0 walks
        obs, *_ = env.step(np.array([0.3, 0.0], np.float32))
        if np.abs(obs[13:15]).sum() > 0.1:
            break
    state0, ctx = get_task("crossing").model_inputs(np.stack([obs, obs]), 5)
    ref = u.pedestrian_context(5)
    assert torch.allclose(state0, CrossingDynamics.state_from_obs(torch.as_tensor(obs[None])))
    assert torch.allclose(ctx.goal, ref.goal, atol=1e-4)
    assert torch.equal(ctx.ped_present, ref.ped_present)
    assert torch.allclose(ctx.ped_pos[0, :, 0], ref.ped_pos[0, :, 0], atol=0.05)
    env.close()


def test_policy_predict_takes_guidance(crossing_obs):
    policy = crossing_policy()
    g = speed_guidance(0.5)
    plain = policy.predict(crossing_obs, generator=torch.Generator().manual_seed(4))
    again = policy.predict(crossing_obs, generator=torch.Generator().manual_seed(4), guidance=None)
    guided = policy.predict(crossing_obs, generator=torch.Generator().manual_seed(4), guidance=g)
    assert np.array_equal(plain, again)
    x_plain = policy.normalize_action(torch.as_tensor(plain))
    x_guided = policy.normalize_action(torch.as_tensor(guided))
    assert g.robustness(policy, x_guided, crossing_obs) > g.robustness(policy, x_plain, crossing_obs)


def test_particle_selection_keeps_one_of_the_samples_and_it_satisfies(crossing_obs):
    """Selection moves no sample: the chunk returned is one of the N unguided particles, a satisfying one."""
    policy = crossing_policy()
    cond1 = policy.condition(crossing_obs)
    n = 8
    plain_all = policy.sample_normalized(cond1.expand(64, -1), generator=torch.Generator().manual_seed(0))
    probe = speed_guidance(1.0)
    rho_all = probe.robustness(policy, plain_all, crossing_obs)
    v_max = float(np.quantile(1.0 - rho_all.numpy(), 0.3))  # a limit about 30% of unguided chunks meet
    g = speed_guidance(v_max, scale=0.0, particles=n, margin=0.0)
    picked = []
    for seed in range(12):
        particles = policy.sample_normalized(cond1.expand(n, -1), generator=torch.Generator().manual_seed(seed))
        chosen = policy.sample_normalized(cond1, generator=torch.Generator().manual_seed(seed),
                                          guidance_fn=g.bind(policy, crossing_obs))
        assert chosen.shape == (1, 16, 2)
        match = [i for i in range(n) if torch.equal(particles[i], chosen[0])]
        assert len(match) == 1  # one of the particles, untouched
        rho = g.robustness(policy, particles, crossing_obs)
        if bool((rho >= 0).any()):
            assert float(g.robustness(policy, chosen, crossing_obs)[0]) >= 0
        else:
            assert match[0] == int(torch.argmax(rho))  # none qualifies: the most robust
        picked.append(match[0])
    assert g.selections == 12 and 0 < g.selections_ok <= 12
    assert len(set(picked)) > 1


def test_particle_selection_is_uniform_among_the_satisfying(crossing_obs):
    policy = crossing_policy()
    x = policy.sample_normalized(policy.condition(crossing_obs).expand(6, -1),
                                 generator=torch.Generator().manual_seed(4))
    probe = speed_guidance(1.0)
    top = 1.0 - probe.robustness(policy, x, crossing_obs)  # each particle's max speed
    v_max = float(torch.sort(top).values[3])  # exactly the 4 slowest particles satisfy (margin 0)
    g = speed_guidance(v_max + 1e-4, scale=0.0, particles=6, margin=0.0)
    fn = g.bind(policy, crossing_obs)
    counts = {}
    for s in range(400):
        c = fn.select(x, torch.Generator().manual_seed(s))
        i = next(i for i in range(6) if torch.equal(x[i], c[0]))
        counts[i] = counts.get(i, 0) + 1
    assert set(counts) == set(torch.argsort(top)[:4].tolist())
    assert min(counts.values()) > 60  # ~100 each


def test_rti_with_particle_selection(crossing_obs):
    policy = crossing_policy()
    g = speed_guidance(0.6, scale=0.0, particles=8, margin=0.0)
    plain = RTIController(policy, k=2, seed=0)
    sel = RTIController(policy, k=2, seed=0, guidance=g)
    rho = _tick_robustness({"plain": plain, "sel": sel}, g, policy, crossing_obs, ticks=10)
    assert plain._chunk.shape == sel._chunk.shape == (1, 16, 2)  # selection keeps one chunk
    assert np.mean(rho["sel"]) > np.mean(rho["plain"])
    assert plain.last_nfe == sel.last_nfe and g.selections == 10
    with pytest.raises(ValueError, match="particles"):
        speed_guidance(0.6, particles=0)


def test_pickplace_guidance_slows_planned_targets_and_selection_keeps_a_slow_plan():
    """PickPlace guidance (the speed rule through the set-point model) on a small random policy at a real reset:
    the gradient lowers the planned top speed and raises robustness; selection alone returns one of the particles,
    a satisfying one whenever there is one."""
    import gymnasium as gym

    import stlflow.envs  # noqa: F401
    from stlflow.control.tasks import get_task
    from stlflow.envs.pickplace import OBS_DIM, WORKSPACE_HIGH, WORKSPACE_LOW

    env = gym.make("stlflow/PickPlace-v0")
    obs, _ = env.reset(seed=3)
    env.close()
    history = np.stack([obs, obs])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # actions spread over a 6 cm box around the set-point: chunks step up to ~0.5 m/s between targets
    centre = obs[18:21]
    acts = np.concatenate([centre + rng.uniform(-0.03, 0.03, (500, 3)), rng.choice([-1.0, 1.0], (500, 1))], 1)
    assert (acts[:, :3] > WORKSPACE_LOW).all() and (acts[:, :3] < WORKSPACE_HIGH).all()
    norm = Normalizer.fit({"obs": rng.normal(size=(500, OBS_DIM)), "action": acts})
    policy = Policy(OBS_DIM, 4, n_obs_steps=2, horizon=16, n_action_steps=8, head={"kind": "flow"},
                    net={"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16}, normalizer=norm,
                    discrete_action_mask=np.array([False, False, False, True])).eval()
    g = get_task("pickplace").guidance({"v_max": 0.3}, t_max=1.0, scale=0.5, max_step=0.2)
    b = 16
    cond = policy.condition(np.repeat(history[None], b, 0))
    plain = policy.sample_normalized(cond, generator=torch.Generator().manual_seed(0))
    guided = policy.sample_normalized(cond, generator=torch.Generator().manual_seed(0),
                                      guidance_fn=g.bind(policy, history))
    rho_plain, rho_guided = g.robustness(policy, plain, history), g.robustness(policy, guided, history)
    assert (rho_plain < 0).float().mean() > 0.5  # too fast without guidance
    assert rho_guided.mean() > rho_plain.mean() + 0.1  # at least 0.1 m/s slower at the top, on average
    assert (rho_guided >= rho_plain - 1e-6).all()
    torch.testing.assert_close(guided[..., 3], plain[..., 3], rtol=0.0, atol=0.2)  # the gripper is barely moved

    with pytest.raises(ValueError, match="models only the rules"):  # the set-point model decides no clearance
        get_task("pickplace").guidance({"v_max": 0.3}, rules=("clearance",))

    sel = get_task("pickplace").guidance({"v_max": 0.45}, scale=0.0, particles=16)
    fn = sel.bind(policy, history)
    cond1 = policy.condition(history[None])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    particles = policy.sample_normalized(cond1.expand(16, -1), generator=g1)
    kept = policy.sample_normalized(cond1, generator=g2, guidance_fn=fn)
    assert any(torch.equal(kept[0], p) for p in particles)
    rho = sel.robustness(policy, particles, history)
    if bool((rho >= sel.margin).any()):
        assert float(sel.robustness(policy, kept, history)[0]) >= sel.margin
