"""Offline-RL agents (stlflow.policy.agents): OFQL's MeanFlow target against finite differences, the fused actor pass
against the head's loss, the bfloat16 update against the float32 one, the activation and critic building blocks,
checkpoints with exact resume, the one-step actions held inside the action bounds, and the two-armed toy problem
(OFQL picks the better arm, bc-flow covers both)."""

import numpy as np
import pytest
import torch

from stlflow.policy.agents import (
    AGENTS,
    BCFlowAgent,
    OFQLAgent,
    TD3BCAgent,
    Transitions,
    load_agent,
    make_agent,
    save_agent,
)
from stlflow.policy.agents.base import EnsembleMLP, FastMish, mish_and_slope
from stlflow.policy.checkpoint import CheckpointError

SMALL = {"width": 64, "layers": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the D4RL harness gives each seed (two threads on a busy 2-core machine ran ~10x
    slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

SMALL_Q = {**SMALL, "critic_width": 64, "critic_layers": 2}


def _random_data(n=2000, do=3, da=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"observations": rng.normal(size=(n, do)), "actions": rng.uniform(-1, 1, (n, da)),
            "rewards": rng.uniform(size=n), "next_observations": rng.normal(size=(n, do)),
            "terminals": rng.uniform(size=n) < 0.05}


def test_meanflow_target_matches_finite_differences():
    """du/dt from the hand-written JVP, and the loss built on u_tgt = v - (t - r) du/dt, against central
    differences of u along the path (float64)."""
    torch.manual_seed(0)
    agent = OFQLAgent(5, 3, seed=0, adaptive_p=0.0)
    head = agent.actor.double()
    b = 16
    a = torch.rand(b, 1, 3, dtype=torch.float64) * 2 - 1
    eps = torch.randn(b, 1, 3, dtype=torch.float64)
    cond = torch.randn(b, 5, dtype=torch.float64)
    t = torch.rand(b, dtype=torch.float64) * 0.8 + 0.2
    r = t * torch.rand(b, dtype=torch.float64) * 0.9
    z, v = (1 - t)[:, None, None] * a + t[:, None, None] * eps, eps - a
    u, dudt = head.u_and_total_derivative(z, v, r, t, cond)
    h = 1e-6
    fd = (head.u(z + h * v, r, t + h, cond) - head.u(z - h * v, r, t - h, cond)) / (2 * h)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(u, head.u(z, r, t, cond))
    # the loss the agent trains on: every row has r < t, so every row takes the JVP path
    loss = head.loss(a, cond, noise={"t": t, "r": r, "eps": eps})
    target = v - (t - r)[:, None, None] * fd
    torch.testing.assert_close(loss, (head.u(z, r, t, cond) - target).pow(2).flatten(1).mean(1).mean())
    # the same pair from forward-mode AD
    head.jvp = "func"
    u2, dudt2 = head.u_and_total_derivative(z, v, r, t, cond)
    torch.testing.assert_close(dudt2, dudt)
    torch.testing.assert_close(u2, u)


def test_fast_mish_matches_torch():
    x = torch.randn(2000, dtype=torch.float64) * 8
    x[:3] = torch.tensor([40.0, -40.0, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(FastMish(), (x.clone().requires_grad_(),))
    xf = torch.randn(256, 256) * 6
    torch.testing.assert_close(FastMish()(xf), torch.nn.functional.mish(xf), rtol=1e-5, atol=1e-5)
    assert isinstance(FastMish(), torch.nn.Mish)  # the JVP rules of policy/nets.py accept it


def test_ensemble_member_is_that_network():
    net = EnsembleMLP(2, 4, 1, (16, 16))
    x = torch.randn(7, 4)
    both = net(x)
    assert both.shape == (2, 7, 1)
    for i in range(2):
        torch.testing.assert_close(net(x, member=i), both[i])
    assert not torch.allclose(both[0], both[1])  # independent initialisation


def test_one_step_action_is_one_network_call_and_differentiable():
    agent = OFQLAgent(3, 2, seed=0, **SMALL_Q)
    obs = torch.randn(5, 3)
    calls = []
    hook = agent.actor.net.register_forward_hook(lambda *a: calls.append(1))
    act = agent.one_step(agent.actor, obs)
    hook.remove()
    assert calls == [1] and act.shape == (5, 2) and act.abs().max() <= 1
    agent.critic(torch.cat([obs, act], -1), member=0).sum().backward()
    assert all(p.grad is not None for p in agent.actor.net.parameters())


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_update_and_act_shapes(name):
    data = Transitions(_random_data())
    agent = make_agent(name, 3, 2, seed=1, **({} if name == "td3bc" else SMALL))
    agent.prepare(data)
    for _ in range(4):
        out = agent.update(data.sample(32, agent.generator))
    assert out and all(np.isfinite(v) for v in out.values())
    assert agent.steps == 4
    one, many = agent.act(np.zeros(3)), agent.act(np.zeros((6, 3)))
    assert one.shape == (2,) and many.shape == (6, 2)
    assert np.all(np.abs(many) <= 1)
    with pytest.raises(ValueError, match="obs must have shape"):
        agent.act(np.zeros(4))


def test_bad_settings_and_names():
    with pytest.raises(ValueError, match="unknown settings"):
        OFQLAgent(3, 2, etaa=1.0)
    with pytest.raises(ValueError, match="unknown agent 'sac'; known agents: ofql, bc-flow, td3bc"):
        make_agent("sac", 3, 2)
    with pytest.raises(ValueError, match="flow_ratio"):
        OFQLAgent(3, 2, flow_ratio=1.5)
    assert not hasattr(BCFlowAgent(3, 2, **SMALL), "critic")
    with pytest.raises(ValueError, match="transitions lack"):
        Transitions({"observations": np.zeros((3, 2))})


def _train(agent, data, n):
    for _ in range(n):
        agent.update(data.sample(32, agent.generator))


@pytest.mark.parametrize("name", ["ofql", "td3bc"])
def test_checkpoint_resume_is_exact(tmp_path, name):
    data = Transitions(_random_data())
    settings = SMALL_Q if name == "ofql" else {"width": 32}
    straight = make_agent(name, 3, 2, seed=3, **settings)
    straight.prepare(data)
    _train(straight, data, 12)
    resumed = make_agent(name, 3, 2, seed=3, **settings)
    resumed.prepare(data)
    _train(resumed, data, 6)
    save_agent(resumed, tmp_path / "ck", {"task": "toy"})
    back, cfg = load_agent(tmp_path / "ck")
    assert cfg["agent"] == name and cfg["task"] == "toy" and back.steps == 6
    _train(back, data, 6)
    for (k, v), (k2, v2) in zip(straight.state_dict().items(), back.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=0, atol=0, msg=k)


def test_checkpoint_corruption_is_detected(tmp_path):
    agent = TD3BCAgent(3, 2, width=16)
    save_agent(agent, tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_agent(tmp_path / "ck")


def _two_armed(n=4000, seed=0):
    """One-step episodes from one state: half the actions near -0.6 (reward 0), half near +0.6 (reward 1)."""
    rng = np.random.default_rng(seed)
    arm = rng.uniform(size=n) < 0.5
    actions = np.where(arm, 0.6, -0.6) + rng.normal(0, 0.05, n)
    obs = rng.normal(0, 0.01, (n, 1))
    return {"observations": obs, "actions": actions[:, None], "rewards": arm.astype(float),
            "next_observations": obs, "terminals": np.ones(n, bool)}


def test_two_armed_ofql_picks_better_arm_bc_flow_covers_both():
    """Same actor, same data: the Q term moves OFQL's one-step samples onto the rewarded arm; without it (bc-flow)
    the samples keep both arms. MeanFlow's adaptive loss weight (adaptive_p=1) fits the bimodal one-step map in a
    few hundred updates; with the plain loss the one-step samples fall between the arms for longer."""
    data = Transitions(_two_armed())
    obs = np.zeros((400, 1))
    fractions = {}
    for name in ("bc-flow", "ofql"):
        extra = {"critic_width": 64, "critic_layers": 2, "eta": 1.0} if name == "ofql" else {}
        agent = make_agent(name, 1, 1, seed=0, width=64, layers=2, lr=1e-3, ema_start=10**9, adaptive_p=1.0, **extra)
        agent.prepare(data)
        for _ in range(300):
            agent.update(data.sample(128, agent.generator))
        agent.reset_act_noise(0)
        a = agent.act(obs)[:, 0]
        fractions[name] = (float(np.mean(a > 0.3)), float(np.mean(a < -0.3)))
    good, bad = fractions["bc-flow"]
    assert good > 0.15 and bad > 0.15, fractions  # both arms
    good, bad = fractions["ofql"]
    assert good > 0.9 and bad < 0.05, fractions  # the better arm only


def test_task_defaults_follow_diffusion_ql_where_published():
    assert OFQLAgent.task_defaults("hopper-medium-v2") == {"grad_norm": 9.0}
    assert BCFlowAgent.task_defaults("walker2d-medium-v2") == {"grad_norm": 1.0}
    assert OFQLAgent.task_defaults("maze2d-umaze-v1") == {} and TD3BCAgent.task_defaults("hopper-medium-v2") == {}


def test_fused_actor_pass_equals_head_loss_and_one_step():
    """flow_and_one_step (one network pass over the JVP rows, the r = t rows and the one-step rows) gives the
    head's MeanFlow loss, its gradients, and the one-step actions of separate calls (float32)."""
    torch.manual_seed(0)
    agent = OFQLAgent(4, 2, seed=0, **SMALL_Q)
    obs, act = torch.randn(64, 4), torch.rand(64, 2) * 2 - 1
    noise = agent.actor.draw_noise(64, generator=torch.Generator().manual_seed(3))
    assert 0 < int((noise["r"] < noise["t"]).sum()) < 64  # both kinds of rows
    eps = torch.randn(64, 1, 2)
    fused, raw = agent.flow_and_one_step(obs, act, noise, eps)
    ref = agent.actor.loss(act[:, None], obs, noise=noise)
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(raw, (eps - agent.actor.u(eps, torch.zeros(64), torch.ones(64), obs)).squeeze(1))
    params = list(agent.actor.parameters())
    for g1, g2 in zip(torch.autograd.grad(fused, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    # no r < t row at all (flow_ratio 1) and no one-step rows (bc-flow)
    flat = {**noise, "r": noise["t"].clone()}
    loss, none = agent.flow_and_one_step(obs, act, flat)
    assert none is None
    torch.testing.assert_close(loss, agent.actor.loss(act[:, None], obs, noise=flat))


def test_mish_and_slope_is_the_derivative():
    x = torch.randn(300, dtype=torch.float64) * 6
    y, slope = mish_and_slope(x.clone().requires_grad_())
    torch.testing.assert_close(y.detach(), torch.nn.functional.mish(x))
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(torch.nn.functional.mish(xg).sum(), xg)
    torch.testing.assert_close(slope, g)


def _grads(agent, batch):
    """(losses, critic gradients, actor gradients) of one update's two steps, without stepping."""
    for opt in agent.optimizers.values():  # capture the gradients the steps would apply
        opt.step = lambda *a, **k: None
    out = agent.update(batch)
    grads = {n: torch.cat([p.grad.flatten() for p in getattr(agent, n).parameters() if p.grad is not None])
             for n in ("critic", "actor")}
    return out, grads


def test_bf16_update_agrees_with_fp32():
    """The bfloat16-autocast update (precision="bf16") against the float32 reference on one small batch, same
    weights and random draws: losses within 3%, gradients within 10% in norm and pointing the same way."""
    data = Transitions(_random_data(do=4))
    batch = data.sample(64, torch.Generator().manual_seed(0))
    results = {}
    for precision in ("fp32", "bf16"):
        agent = OFQLAgent(4, 2, seed=0, precision=precision, grad_norm=0.0)
        agent.prepare(data)
        results[precision] = _grads(agent, batch)
    (out32, g32), (out16, g16) = results["fp32"], results["bf16"]
    for key in ("critic_loss", "flow_loss", "q_loss", "q_mean"):
        assert out16[key] == pytest.approx(out32[key], rel=0.03, abs=1e-3), key
    for name in ("critic", "actor"):
        a, b = g32[name], g16[name]
        assert torch.linalg.norm(a - b) < 0.1 * torch.linalg.norm(a), name
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, name
    with pytest.raises(ValueError, match="precision must be one of"):
        OFQLAgent(4, 2, precision="fp16")


def _ramp(n=4000, seed=0):
    """One state; actions uniform in [-0.9, 0.9]²; reward a_1 + a_2: the Q term pushes towards the (1, 1) corner."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.9, 0.9, (n, 2))
    obs = rng.normal(0, 0.01, (n, 1))
    return {"observations": obs, "actions": a, "rewards": a.sum(1), "next_observations": obs,
            "terminals": np.ones(n, bool)}


def test_one_step_actions_stay_inside_the_action_bounds():
    """The maze2d collapse in small: a Q term that rises towards the bounds drove the one-step actions beyond
    [-1, 1], where the clamp gives them no gradient and the flow loss (trained at logit-normal (r, t), almost never
    at the one-step pair (0, 1)) did not pull them back; the policy then sat in a corner. With the one-step pair in
    the flow loss and the clip penalty (the defaults) they stay inside; without both, nearly all leave."""
    data = Transitions(_ramp())
    eps = torch.randn(400, 1, 2, generator=torch.Generator().manual_seed(1))
    outside = {}
    for label, extra in (("defaults", {}), ("neither", {"one_step_ratio": 0.0, "clip_penalty": 0.0})):
        agent = OFQLAgent(1, 2, seed=0, **SMALL_Q, lr=1e-3, ema_start=10**9, **extra)
        agent.prepare(data)
        for _ in range(150):
            agent.update(data.sample(64, agent.generator))
        with torch.no_grad():
            raw = (eps - agent.actor.net(eps, agent.ONE_STEP_TIMES, torch.zeros(400, 1))).squeeze(1)
        outside[label] = float((raw.abs() > 1.1).float().mean())
    assert outside["defaults"] < 0.05, outside
    assert outside["neither"] > 0.5, outside


def test_act_picks_the_best_of_its_samples_by_the_critics():
    """``act_samples=N`` (default 50, Diffusion-QL's selection): the action is the candidate with the highest
    twin-minimum Q among the N one-step samples drawn with the same noise; ``act_samples=1`` is one sample."""
    assert OFQLAgent.defaults["act_samples"] == 50 and "act_samples" not in BCFlowAgent.defaults
    data = Transitions(_random_data())
    agent = OFQLAgent(3, 2, seed=2, act_samples=8, **SMALL_Q)
    agent.prepare(data)
    _train(agent, data, 5)
    obs = np.random.default_rng(1).normal(size=(4, 3))
    agent.reset_act_noise(7)
    chosen = agent.act(obs)
    agent.reset_act_noise(7)
    with torch.no_grad():
        rep = agent.obs_norm(torch.as_tensor(obs, dtype=torch.float32)).repeat_interleave(8, 0)
        cands = agent.one_step(agent.ema_actor, rep, agent.act_generator)
        q = agent.q_values(agent.critic, rep, cands).min(0).values.view(4, 8)
    best = cands.view(4, 8, 2)[torch.arange(4), q.argmax(1)]
    np.testing.assert_allclose(chosen, best.numpy(), rtol=0, atol=0)
    assert (q.max(1).values > q.median(1).values).all()  # the candidates differ: a choice was made
    agent.config["act_samples"] = 1
    agent.reset_act_noise(7)
    single = agent.act(obs)
    agent.reset_act_noise(7)
    with torch.no_grad():
        one = agent.one_step(agent.ema_actor, agent.obs_norm(torch.as_tensor(obs, dtype=torch.float32)),
                             agent.act_generator)
    np.testing.assert_allclose(single, one.numpy(), rtol=0, atol=0)
