"""The lock-step asynchronous executor: which plan acts on which tick under an inference delay, no peeking, NFE
accounting, determinism of every controller under a seed on the real Crossing env."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rti import tiny_policy

from stlflow.control.async_exec import AsyncExecutor
from stlflow.control.controllers import ControllerSpec
from stlflow.control.evaluate import evaluate_episode
from stlflow.control.jobs import EvalJob
from stlflow.control.tasks import get_task
from stlflow.policy import Policy

torch.set_num_threads(1)
N_PLAN = 12  # actions per plan of the recording planner


class TickPlanner:
    """A planner whose action j of the plan made from observation o is (o, j): the executed actions show which
    plan acted, from which observation, at which index. It records the observations it was shown."""

    def __init__(self) -> None:
        self.seen: list[float] = []
        self.planned: list[tuple[float, int | None]] = []

    def reset(self, seed=None) -> None:
        self.seen, self.planned = [], []

    def observe(self, obs) -> None:
        self.seen.append(float(obs[0]))

    def plan(self, obs, elapsed):
        self.seen.append(float(obs[0]))
        self.planned.append((float(obs[0]), elapsed))
        return np.stack([np.full(N_PLAN, float(obs[0])), np.arange(N_PLAN, dtype=float)], axis=1), 3


def run(mode: str, delay: int, ticks: int = 30, **kw) -> tuple[np.ndarray, AsyncExecutor]:
    ex = AsyncExecutor(TickPlanner(), mode, delay, **kw)
    ex.reset(seed=0, obs=np.array([0.0]))
    return np.stack([ex.act(np.array([float(t)])) for t in range(ticks)]), ex


@settings(max_examples=40)
@given(mode=st.sampled_from(["sync", "async", "rtc", "rti"]), delay=st.integers(0, 3), ta=st.integers(3, 8))
def test_a_plan_acts_only_after_its_delay_at_its_own_time(mode, delay, ta):
    actions, ex = run(mode, delay, n_action_steps=ta)
    starts = [int(o) for o, _ in ex.planner.planned]
    for t, (source_obs, index) in enumerate(actions):
        if ex.log["source"][t] == "hold":
            continue
        assert source_obs + delay <= t or source_obs == 0  # the reset plan is ready at tick 0
        assert source_obs + index == t  # the action planned for this very tick, not a stale one
    assert ex.planner.seen == [0.0] + [float(t) for t in range(30)]  # every observation once, in order: no peeking
    assert all(b - a >= max(delay, 1) for a, b in zip(starts, starts[1:]))  # one worker: one plan at a time


def test_sync_holds_while_it_waits_and_async_does_not():
    d, ta = 2, 4
    sync, ex_sync = run("sync", d, n_action_steps=ta)
    assert ex_sync.log["source"][:ta] == ["plan"] * ta
    assert ex_sync.log["source"][ta:ta + d] == ["hold"] * d  # waits d ticks holding a_{ta-1}
    assert np.array_equal(sync[ta], sync[ta - 1])
    assert tuple(sync[ta + d]) == (ta, d)  # then the plan from obs_ta, at its index d
    asy, ex_async = run("async", d, n_action_steps=ta)
    assert "hold" not in ex_async.log["source"]
    assert tuple(asy[ta]) == (ta - d, d)  # started d ticks early, switched to on arrival


def test_rti_and_rtc_plan_every_interval_with_elapsed_ticks():
    _, ex = run("rti", 1)
    assert ex.planner.planned[:4] == [(0.0, None), (2.0, 2), (4.0, 2), (6.0, 2)]
    _, ex = run("rtc", 1, interval=3)
    assert ex.planner.planned[:3] == [(0.0, None), (3.0, 3), (6.0, 3)]
    assert AsyncExecutor(TickPlanner(), "rti", 3, interval=2).interval == 6  # at least 2 d
    assert AsyncExecutor(TickPlanner(), "rti", 0, interval=None).interval == 1
    assert AsyncExecutor(TickPlanner(), "rti", 1, interval=5).interval == 5
    with pytest.raises(ValueError, match="interval"):
        AsyncExecutor(TickPlanner(), "rti", 0, interval=0)


def test_ensemble_averages_every_arrived_plan_for_the_tick():
    actions, ex = run("ensemble", 0, ticks=5, ensemble_m=0.0)
    # tick 3: plans from obs 0, 1, 2, 3 all cover it; their actions for tick 3 are all (o, 3 - o): mean of o = 1.5
    assert actions[3, 0] == pytest.approx(1.5)
    assert actions[3, 1] == pytest.approx(np.mean([3, 2, 1, 0]))


def test_nfe_per_tick_is_what_the_plans_cost():
    policy = tiny_policy("ddpm")
    spec = ControllerSpec.create("rti", k=2, t_start=0.4)
    ex = spec.build(policy, seed=0, delay=2)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(20, 5)).astype(np.float32)
    ex.reset(seed=0, obs=obs[0])
    for o in obs:
        ex.act(o)
    per_plan = policy.nfe(2, 0.4)
    assert ex.last_reset_nfe == policy.nfe()
    assert ex.log["nfe"] == [per_plan if t % 4 == 0 and t > 0 else 0 for t in range(20)]  # every 2 d = 4 ticks


@pytest.mark.parametrize("delay,interval,per_tick", [(0, 4, 1), (0, 4, 2), (3, 4, 1), (1, 4, 0.5)])
def test_a_per_tick_budget_sizes_each_plan_by_the_ticks_between_plans(delay, interval, per_tick):
    policy = tiny_policy("flow")
    ex = ControllerSpec.create("rti", k=1, interval=interval, nfe_per_tick=per_tick, t_start=0.4).build(
        policy, seed=0, delay=delay)
    assert ex.interval == max(interval, 2 * delay)
    obs = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    ex.reset(seed=0, obs=obs[0])
    for o in obs:
        ex.act(o)
    plans = [n for n in ex.log["nfe"] if n]
    assert plans and set(plans) == {policy.nfe(round(per_tick * ex.interval), 0.4)}
    assert sum(ex.log["nfe"][1:ex.interval * len(plans) + 1]) / (ex.interval * len(plans)) == pytest.approx(
        per_tick, abs=0.5 / ex.interval)  # the budget per tick, up to rounding k to whole steps
    with pytest.raises(ValueError, match="nfe_per_tick"):
        ControllerSpec.create("rti", nfe_per_tick=0)


def test_the_wall_clock_worker_spends_the_same_budget_per_tick():
    spec = ControllerSpec.create("rti", k=2, interval=4, nfe_per_tick=1, t_start=0.4)
    assert dict(spec.per_tick(1).options) == {"k": 4, "t_start": 0.4}  # a plan every 4 ticks: 4 steps
    assert dict(spec.per_tick(3).options) == {"k": 6, "t_start": 0.4}  # every 2 d = 6 ticks: 6 steps
    assert spec.worker_schedule(3) == (6, 3)


@pytest.mark.parametrize("spec", [ControllerSpec.create("sync"), ControllerSpec.create("async"),
                                  ControllerSpec.create("ensemble"), ControllerSpec.create("rtc", steps=4),
                                  ControllerSpec.create("rti", k=1), ControllerSpec.create("rti", k=2, commit=1)])
def test_every_controller_is_deterministic_under_a_seed_with_delay(spec):
    task = get_task("crossing")
    info = task.info
    policy = Policy(info.obs_dim, info.action_dim, n_obs_steps=2, horizon=8, n_action_steps=4, head={"kind": "flow"},
                    net={"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16}).eval()
    job = EvalJob(task.name, policy, spec, episodes=1, seed=5, delay=2, max_steps=25)
    a, b = (evaluate_episode(job, 5) for _ in range(2))
    assert a["nfe"] == b["nfe"] and a["robustness"] == b["robustness"] and a["length"] == b["length"] == 25
    assert sum(a["nfe"]) > 0


def test_the_wall_clock_spec_drops_the_schedule_options_and_refuses_lockstep_only_controllers():
    from stlflow.control.jobs import JobError
    from stlflow.control.robot_run import RobotJob, check

    spec = ControllerSpec.create("rti", k=2, interval=4, commit=1, t_start=0.4)
    assert spec.asynchronous and not spec.per_tick().asynchronous
    assert dict(spec.per_tick().options) == {"k": 2, "t_start": 0.4}
    for name in ("sync", "async", "ensemble", "rtc"):
        with pytest.raises(JobError, match=f"controller={name} simulates an inference worker"):
            check(RobotJob(task="crossing", robot="sim", policy=None, controller=ControllerSpec.create(name)))


def test_the_k_shortcut_replaces_the_per_tick_budget_and_the_default_keeps_it():
    from stlflow.config import compose, controller_options

    shipped = controller_options(compose("eval", ["ckpt=x"]))
    assert shipped["name"] == "rti" and shipped["nfe_per_tick"] == 1 and shipped["interval"] == 4
    fixed = controller_options(compose("eval", ["ckpt=x", "k=3"]))
    assert fixed["k"] == 3 and "nfe_per_tick" not in fixed
    assert ControllerSpec.from_dict(fixed).build(tiny_policy("flow"), seed=0).planner.ctrl.k == 3


def test_a_ddpm_head_takes_its_own_per_tick_budget():
    from stlflow.control.jobs import controller_defaults

    opts = {**controller_defaults("rti", "crossing"), "interval": 4, "nfe_per_tick": 1, "ddpm_nfe_per_tick": 0.5}
    spec = ControllerSpec.create("rti", **opts)
    ddpm, flow = tiny_policy("ddpm"), tiny_policy("flow")
    assert spec.for_policy(ddpm).get("nfe_per_tick") == 0.5 and spec.for_policy(flow).get("nfe_per_tick") == 1
    assert all("ddpm_nfe_per_tick" not in dict(spec.for_policy(p).options) for p in (ddpm, flow))
    # a plan every 4 ticks: 2 solver steps on the DDPM head's budget, 4 on the flow head's; 6 ticks under d = 3
    assert spec.build(ddpm, seed=0).planner.ctrl.k == 2 and spec.build(flow, seed=0).planner.ctrl.k == 4
    assert spec.build(ddpm, seed=0, delay=3).planner.ctrl.k == 3
    assert ControllerSpec.create("rti", **{**opts, "nfe_per_tick": None}).build(ddpm, seed=0).planner.ctrl.k == \
        opts["k"]  # without a per-tick budget the DDPM budget has nothing to replace: the fixed k
    with pytest.raises(ValueError, match="ddpm_nfe_per_tick"):
        ControllerSpec.create("rti", ddpm_nfe_per_tick=0)


def test_a_one_step_head_plans_cold_one_step_chunks_every_ta_ticks_by_default():
    from stlflow.control.jobs import controller_defaults

    spec = ControllerSpec.create("rti", **controller_defaults("rti", "crossing"))
    assert spec.get("one_step_cold") is True
    one_step, multi_step = tiny_policy("meanflow"), tiny_policy("flow")
    assert one_step.nfe() == 1 and multi_step.nfe() > 1
    resolved = dict(spec.for_policy(one_step).options)
    assert (resolved["k"], resolved["t_start"], resolved["interval"]) == (1, 1.0, max(4, one_step.n_action_steps))
    assert "nfe_per_tick" not in resolved and "one_step_cold" not in resolved
    kept = dict(spec.for_policy(multi_step).options)
    assert kept == {k: v for k, v in spec.options if k not in ("one_step_cold", "ddpm_nfe_per_tick")}
    assert ControllerSpec.create("rti", **{**controller_defaults("rti", "crossing"), "one_step_cold": False}
                                 ).for_policy(one_step).get("t_start") == 0.4
    ex = spec.build(one_step, seed=0, delay=1)  # the executor runs the resolved schedule
    assert (ex.interval, ex.planner.ctrl.k, ex.planner.ctrl.t_start) == (max(4, one_step.n_action_steps), 1, 1.0)
    assert spec.build(multi_step, seed=0).planner.ctrl.t_start == 0.4
