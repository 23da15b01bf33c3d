"""The lock-step control loop on real MuJoCo tasks: alignment of obs/actions/signals, injected delay, hooks."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import stlflow.envs  # noqa: F401
from stlflow.control.controllers import ChunkController, ControllerSpec
from stlflow.control.loop import run_episode

torch.set_num_threads(1)


class TickController:
    """Records what it saw; returns a different, valid PickPlace action each tick (x target moves 1 cm/tick)."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []
        self.last_nfe = 0
        self.resets: list[int | None] = []

    def reset(self, seed: int | None = None, obs=None) -> None:
        self.seen, self.t = [], 0
        self.resets.append(seed)

    def act(self, obs):
        self.seen.append(np.array(obs))
        self.t += 1
        self.last_nfe = self.t % 3
        return np.array([-0.1 + 0.01 * self.t, 0.0, 0.15, -1.0], dtype=np.float32)


class Hook:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.steps: list[tuple] = []

    def begin(self, seed, obs, info):
        self.events.append(f"begin{seed}")

    def step(self, obs, action, next_obs, info):
        self.steps.append((obs, action, next_obs, dict(info["signals"])))

    def end(self, result):
        self.events.append(f"end{result.length}")


@pytest.fixture(scope="module")
def env():
    e = gym.make("stlflow/PickPlace-v0")
    yield e
    e.close()


def test_alignment_of_observations_actions_and_signals(env):
    ctrl, hook = TickController(), Hook()
    res = run_episode(env, ctrl, seed=4, max_steps=12, hook=hook)
    assert ctrl.resets == [4] and hook.events == ["begin4", "end12"]
    assert res.length == 12 and res.obs.shape == (13, 22) and res.action.shape == (12, 4)
    np.testing.assert_array_equal(np.stack(ctrl.seen), res.obs[:-1])  # act saw obs[t] at tick t
    np.testing.assert_array_equal(res.action, res.chosen)  # no delay: the chosen action is executed
    assert res.nfe.tolist() == [t % 3 for t in range(1, 13)]
    assert (res.latency_s > 0).all()
    sig = env.unwrapped.signals(res.obs[1:])  # info["signals"] after step t == signals of obs[t+1]
    for name, values in res.signals.items():
        np.testing.assert_allclose(values, sig[name], rtol=1e-6, atol=1e-6)
    for t, (obs, action, next_obs, _) in enumerate(hook.steps):
        np.testing.assert_array_equal(obs, res.obs[t])
        np.testing.assert_array_equal(action, res.action[t])
        np.testing.assert_array_equal(next_obs, res.obs[t + 1])


@pytest.mark.parametrize("delay", [0, 1, 2, 4])
def test_injected_delay_executes_the_action_chosen_delay_ticks_earlier(env, delay):
    res = run_episode(env, TickController(), seed=1, delay=delay, max_steps=10)
    for t in range(10):
        np.testing.assert_array_equal(res.action[t], res.chosen[max(t - delay, 0)])


def test_delay_changes_the_closed_loop_and_runs_are_deterministic(env):
    def expert_run(delay):
        return run_episode(env, env.unwrapped.make_expert(2), seed=2, delay=delay)

    a, b, c = expert_run(0), expert_run(0), expert_run(3)
    np.testing.assert_array_equal(a.obs, b.obs)
    assert a.success  # the expert solves seed 2
    assert c.length != a.length or not np.array_equal(c.obs[: a.length], a.obs[: c.length])
    with pytest.raises(ValueError, match="delay"):
        run_episode(env, TickController(), seed=0, delay=-1)


def test_policy_controllers_in_the_loop(env):
    from stlflow.datasets import Normalizer
    from stlflow.policy import Policy

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    acts = np.concatenate([rng.uniform([-0.3, -0.4, 0.0], [0.3, 0.4, 0.35], (100, 3)),
                           rng.choice([-1.0, 1.0], (100, 1))], axis=1)
    norm = Normalizer.fit({"obs": rng.normal(size=(100, 22)), "action": acts})
    policy = Policy(22, 4, n_obs_steps=2, horizon=8, n_action_steps=4, head={"kind": "flow"},
                    net={"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16},
                    discrete_action_mask=env.unwrapped.discrete_action_mask, normalizer=norm).eval()
    full = policy.nfe()
    rti = run_episode(env, ControllerSpec.create("rti", k=2).build(policy, seed=0), seed=0, max_steps=9)
    assert rti.nfe.tolist() == [full] + [policy.nfe(2, 0.2)] * 8
    assert set(np.unique(rti.action[:, 3])) <= {-1.0, 1.0}
    rec = run_episode(env, ControllerSpec.create("receding").build(policy, seed=0), seed=0, max_steps=9)
    assert rec.nfe.tolist() == [full, 0, 0, 0, full, 0, 0, 0, full]  # Ta = policy.n_action_steps = 4
    cold = run_episode(env, ControllerSpec.create("cold", k=3).build(policy), seed=0, max_steps=3)
    assert cold.nfe.tolist() == [3, 3, 3]
    # the receding controller executes chunk[To-1 : To-1+Ta] of each plan
    ctrl = ChunkController(policy, n_action_steps=4, seed=7)
    ctrl.reset(seed=7)
    obs, _ = env.reset(seed=0)
    hist = np.stack([obs, obs])[None]
    chunk = policy.predict(hist, generator=torch.Generator().manual_seed(7))[0]
    np.testing.assert_allclose(ctrl.act(obs), chunk[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ctrl.act(obs), chunk[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="n_action_steps"):
        ChunkController(policy, n_action_steps=8)
    with pytest.raises(ValueError, match="unknown controller"):
        ControllerSpec.create("fastest")
