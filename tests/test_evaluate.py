"""Evaluation runner: metrics against a direct computation, worker-count independence, reports, the eval CLI."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import stlflow.envs  # noqa: F401
from stlflow.control.controllers import ControllerSpec
from stlflow.control.evaluate import aggregate, evaluate, evaluation_callback, write_report
from stlflow.control.jobs import EvalJob
from stlflow.datasets import Normalizer
from stlflow.policy import Policy
from stlflow.stl import parse

torch.set_num_threads(1)
ENV_ID = "stlflow/PickPlace-v0"


def tiny_pickplace_policy(seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    acts = np.concatenate([rng.uniform([-0.3, -0.4, 0.0], [0.3, 0.4, 0.35], (100, 3)),
                           rng.choice([-1.0, 1.0], (100, 1))], axis=1)
    norm = Normalizer.fit({"obs": rng.normal(size=(100, 22)), "action": acts})
    return Policy(22, 4, n_obs_steps=2, horizon=8, n_action_steps=4, head={"kind": "flow", "default_steps": 4},
                  net={"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16},
                  discrete_action_mask=[False, False, False, True], normalizer=norm).eval()


def test_expert_metrics_match_a_direct_computation():
    seeds = range(20, 24)
    report = evaluate(EvalJob("pickplace", None, ControllerSpec.create("expert"), len(seeds), seed=20,
                              stl_params={"v_max": 0.3}))
    env = gym.make(ENV_ID)
    u = env.unwrapped
    params = {**u.rule_defaults, "v_max": 0.3}
    spec, rules = parse(u.rules), {name: parse(text) for name, text in u.rule_list.items()}
    success, collision, sat, lengths, per_rule = [], [], [], [], {name: [] for name in rules}
    for s in seeds:
        obs, _ = env.reset(seed=s)
        expert = u.make_expert(s)
        expert.reset()
        traj, hit, done = [obs], False, False
        while not done:
            obs, _, term, trunc, info = env.step(expert.act(obs))
            traj.append(obs)
            hit |= info["collision"]
            done = term or trunc
        signals = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in u.signals(np.stack(traj)).items()}

        def rho(f, signals=signals):
            return float(f.robustness({k: signals[k] for k in f.signals}, dt=u.dt,
                                      params={k: v for k, v in params.items() if k in f.params}))

        success.append(info["success"])
        collision.append(hit)
        sat.append(rho(spec) >= 0)
        lengths.append(len(traj) - 1)
        for name, f in rules.items():
            per_rule[name].append(rho(f) >= 0)
    m = report.metrics
    assert m["success_rate"] == np.mean(success)
    assert m["collision_rate"] == np.mean(collision)
    assert m["stl_satisfaction_rate"] == np.mean(sat)
    assert m["mean_length"] == np.mean(lengths)
    for name in rules:
        assert m[f"stl_{name}_rate"] == np.mean(per_rule[name])
    assert m["nfe_per_action"] == 0.0 and m["episodes"] == 4.0
    assert [e["seed"] for e in report.episodes] == list(seeds)
    assert len(report.ticks["latency_ms"]) == sum(lengths)


def test_aggregate_latency_and_nfe_figures():
    recs = [
        {"success": True, "collision": False, "robustness": 0.1, "rule_robustness": {"a": 1.0}, "length": 3,
         "latency_s": [0.010, 0.001, 0.002], "nfe": [10, 2, 2]},
        {"success": False, "collision": True, "robustness": -0.2, "rule_robustness": {"a": -1.0}, "length": 2,
         "latency_s": [0.020, 0.003], "nfe": [10, 0]},
    ]
    m = aggregate(recs)
    lat = np.array([10.0, 1.0, 2.0, 20.0, 3.0])
    assert m["success_rate"] == 0.5 and m["collision_rate"] == 0.5 and m["stl_satisfaction_rate"] == 0.5
    assert m["stl_a_rate"] == 0.5
    assert m["latency_p50_ms"] == pytest.approx(np.percentile(lat, 50))
    assert m["latency_p99_ms"] == pytest.approx(np.percentile(lat, 99))
    assert m["latency_max_ms"] == pytest.approx(20.0)
    assert m["latency_warm_max_ms"] == pytest.approx(3.0)  # each episode's first tick left out
    assert m["nfe_per_action"] == pytest.approx(24 / 5)
    assert m["nfe_per_call"] == pytest.approx(24 / 4)
    assert m["nfe_per_tick_max"] == 10
    with pytest.raises(ValueError):
        aggregate([])


def test_worker_count_does_not_change_results_and_policy_mode_is_restored():
    policy = tiny_pickplace_policy()
    policy.train()
    kw = {"controller": ControllerSpec.create("rti", k=2), "max_steps": 8, "seed": 3, "episodes": 3}
    one = evaluate(EvalJob("pickplace", policy, workers=1, **kw))
    assert policy.training  # the trainer's policy is handed back in training mode
    two = evaluate(EvalJob("pickplace", policy, workers=2, **kw))
    assert one.episodes == two.episodes
    for key in ("success_rate", "stl_satisfaction_rate", "collision_rate", "nfe_per_action", "nfe_per_call"):
        assert one.metrics[key] == two.metrics[key]
    assert one.ticks["nfe"] == ([policy.nfe()] + [policy.nfe(2, 0.2)] * 7) * 3
    callback = evaluation_callback("stlflow/PickPlace-v0", 2, controller=ControllerSpec.create("cold", k=1),
                                   max_steps=5)
    metrics = callback(policy, 0)
    assert "success_rate" in metrics and metrics["nfe_per_action"] == 1.0


def test_a_plan_made_in_reset_is_reported_apart_from_the_ticks():
    policy = tiny_pickplace_policy()
    kw = {"max_steps": 6, "seed": 5, "episodes": 2}
    cold = evaluate(EvalJob("pickplace", policy, ControllerSpec.create("rti", k=2, t_start=0.4), **kw))
    planned = evaluate(EvalJob("pickplace", policy, ControllerSpec.create("rti", k=2, t_start=0.4, plan_at_reset=True),
                               **kw))
    warm = policy.nfe(2, 0.4)
    assert cold.ticks["nfe"] == ([policy.nfe()] + [warm] * 5) * 2
    assert planned.ticks["nfe"] == [warm] * 12  # the loop handed reset the first observation
    assert [e["reset_nfe"] for e in planned.episodes] == [policy.nfe()] * 2
    m = planned.metrics
    assert m["nfe_per_action"] == pytest.approx((2 * policy.nfe() + 12 * warm) / 12)
    assert m["reset_plan_max_ms"] == pytest.approx(1e3 * max(e["reset_latency_s"] for e in planned.episodes))
    assert "reset_plan_p99_ms" not in cold.metrics


def test_reports_plots_and_the_eval_cli(tmp_path, capsys):
    from stlflow.verbs.eval import main

    policy = tiny_pickplace_policy()
    ckpt = tmp_path / "ckpt"
    policy.save(ckpt)
    out = tmp_path / "ev"
    rc = main([f"ckpt={ckpt}", "env=pickplace", "controller=rti", "k=3", "episodes=2", "max_steps=6", f"out={out}",
               "progress=false", "delay=1", "videos=1", "control.interval=1"])
    assert rc == 0
    reports = json.loads((out / "report.json").read_text())
    assert len(reports) == 1 and reports[0]["controller"]["name"] == "rti" and reports[0]["controller"]["k"] == 3
    assert reports[0]["delay"] == 1
    # under a delay the executor plans the first chunk in reset (reported apart), then a warm plan every 2 d ticks
    assert reports[0]["ticks"]["nfe"][:5] == [0, 0, policy.nfe(3, 0.6), 0, policy.nfe(3, 0.6)]
    assert [e["reset_nfe"] for e in reports[0]["episodes"]] == [policy.nfe()] * 2
    assert "| rti " in (out / "report.md").read_text() and "| rti " in capsys.readouterr().out
    for png in ("success_vs_nfe.png", "latency_hist.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    videos = list(out.glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000
    import imageio.v2 as imageio

    with imageio.get_reader(videos[0]) as reader:  # the reset frame and one per step
        assert reader.count_frames() == 7
    again = evaluate(EvalJob("pickplace", str(ckpt), ControllerSpec.create("rti", k=3), 1, max_steps=3))
    paths = write_report([again, again], tmp_path / "two")
    assert (tmp_path / "two" / "report.md").read_text().count("| rti ") == 2 and paths["json"].exists()
    assert main(["env=pickplace", "controller=rti", "episodes=1", f"out={out}"]) == 2  # no checkpoint
    assert main(["env=pickplace", "controller=expert", "k=2", "episodes=1", f"out={out}"]) == 2  # expert takes no k


def test_eval_cli_turns_on_stl_guidance_with_one_flag(tmp_path):
    """`guidance.enabled=true` guides every plan toward the rules at `params` (the report says with what), a guided
    run differs from the unguided one on the same seeds."""
    from stlflow.verbs.eval import main

    ckpt = tmp_path / "ckpt"
    tiny_pickplace_policy().save(ckpt)
    common = [f"ckpt={ckpt}", "env=pickplace", "episodes=2", "max_steps=8", "progress=false", "+stl_params.v_max=0.05"]
    assert main([*common, f"out={tmp_path / 'plain'}"]) == 0
    assert main([*common, f"out={tmp_path / 'guided'}", "guidance.enabled=true", "guidance.particles=4",
                 "guidance.t_max=1.0", "cfg_scale=1.0"]) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())[0]
    guided = json.loads((tmp_path / "guided" / "report.json").read_text())[0]
    assert plain["controller"]["guidance"] is None
    assert "STLGuidance" in guided["controller"]["guidance"] and "particles=4" in guided["controller"]["guidance"]
    speeds = [[ep["rule_robustness"]["speed_limit"] for ep in r["episodes"]] for r in (plain, guided)]
    assert speeds[0] != speeds[1]  # the guidance changed the plans (its effect: test_guidance.py, the benchmark)


def test_rti_start_level_comes_from_the_task_config():
    """`stlflow eval controller=rti` warm-starts at the task's measured level unless control.t_start overrides it."""
    from omegaconf import OmegaConf

    from stlflow.config import compose

    def t_start(*overrides):
        return OmegaConf.to_container(compose("eval", ["control=rti", *overrides]).control, resolve=True)["t_start"]

    assert t_start("env=crossing") == 0.4
    assert t_start("env=pickplace") == 0.6
    assert t_start("env=pickplace", "control.t_start=0.3") == 0.3


def test_unknown_controller_options_and_theta_names_are_refused_in_the_callers_process():
    """Bad options fail where the job is made, with the known names, before any worker starts."""
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['t_strat'\].*t_start"):
        ControllerSpec.create("rti", t_strat=0.3)
    with pytest.raises(ValueError, match="takes no option"):
        ControllerSpec.create("receding", k=2)
    with pytest.raises(ValueError, match="unknown controller"):
        ControllerSpec.create("fastest")
    with pytest.raises(ValueError, match=r"unknown θ name\(s\) \['vmax'\].*v_max"):
        evaluate(EvalJob("pickplace", None, ControllerSpec.create("expert"), 1, workers=2, stl_params={"vmax": 0.3}))
