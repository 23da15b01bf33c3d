"""The task registry: a third task added through it in a test (not shipped) runs collect -> calibrate -> train ->
eval through the public job functions; θ resolution; the registry is the only place that names an env id."""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from gymnasium.envs.registration import register, registry

from stlflow.control.controllers import ControllerSpec
from stlflow.control.jobs import CalibrateJob, CollectJob, EvalJob, TrainJob, policy_config
from stlflow.control.tasks import TASKS, Task, get_task, register_task, unregister_task

REACH_XML = """
<mujoco>
  <option timestep="0.01"/>
  <worldbody>
    <body name="puck" pos="0 0 0.05">
      <joint name="x" type="slide" axis="1 0 0" damping="2"/>
      <joint name="y" type="slide" axis="0 1 0" damping="2"/>
      <geom type="sphere" size="0.05" mass="1"/>
    </body>
  </worldbody>
  <actuator>
    <motor joint="x" gear="1" ctrlrange="-4 4"/>
    <motor joint="y" gear="1" ctrlrange="-4 4"/>
  </actuator>
</mujoco>
"""


class ReachEnv(gym.Env):
    """A puck on a plane pushed toward a goal: obs (x, y, vx, vy, gx - x, gy - y), action force (2,) in N."""

    dt = 0.1
    rule_list = {"speed": "G(speed <= {v_max})", "reach": "F[0,{T}](dist_goal <= 0.1)"}
    rules = " & ".join(rule_list.values())
    rule_defaults = {"v_max": 1.0, "T": 4.0}
    discrete_action_mask = np.zeros(2, bool)

    def __init__(self, max_steps: int = 40) -> None:
        self.model = mujoco.MjModel.from_xml_string(REACH_XML)
        self.data = mujoco.MjData(self.model)
        self.max_steps = max_steps
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (6,), np.float32)
        self.action_space = gym.spaces.Box(-4.0, 4.0, (2,), np.float32)

    def _obs(self) -> np.ndarray:
        q, v = self.data.qpos, self.data.qvel
        return np.array([q[0], q[1], v[0], v[1], self.goal[0] - q[0], self.goal[1] - q[1]], np.float32)

    def signals(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        obs = np.asarray(obs)
        return {"speed": np.linalg.norm(obs[..., 2:4], axis=-1), "dist_goal": np.linalg.norm(obs[..., 4:6], axis=-1)}

    def _info(self, obs: np.ndarray) -> dict:
        sig = self.signals(obs[None])
        return {"signals": {k: float(v[0]) for k, v in sig.items()}, "success": bool(sig["dist_goal"][0] <= 0.1),
                "collision": False}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        self.goal = self.np_random.uniform(-1.0, 1.0, 2)
        self.t = 0
        mujoco.mj_forward(self.model, self.data)
        obs = self._obs()
        return obs, self._info(obs)

    def step(self, action):
        self.data.ctrl[:] = np.clip(action, -4.0, 4.0)
        mujoco.mj_step(self.model, self.data, nstep=10)
        self.t += 1
        obs = self._obs()
        info = self._info(obs)
        return obs, float(info["success"]), info["success"], self.t >= self.max_steps and not info["success"], info

    def make_expert(self, seed: int):
        return ReachExpert(seed)


class ReachExpert:
    """PD toward the goal with a per-episode gain."""

    def __init__(self, seed: int) -> None:
        self.gain = float(np.random.default_rng(seed).uniform(3.0, 5.0))
        self.mode, self.style = "direct", {"gain": self.gain}

    def reset(self, seed=None, obs=None) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.clip(self.gain * obs[4:6] - 2.0 * obs[2:4], -4.0, 4.0).astype(np.float32)


class ReachTask(Task):
    name = "reach"
    env_id = "stlflow-test/Reach-v0"
    path = slice(0, 2)
    speed_signal = "speed"
    speed_rule = "speed"
    sweep = (0.5, 1.0)

    def mode(self, obs: np.ndarray) -> str:
        return "left" if float(np.asarray(obs)[-1, 0]) < 0 else "right"


@pytest.fixture()
def reach_task():
    if ReachTask.env_id not in registry:
        register(id=ReachTask.env_id, entry_point=ReachEnv)
    task = register_task(ReachTask())
    yield task
    unregister_task(task.name)


def test_a_third_task_runs_collect_calibrate_train_eval_through_the_registry(reach_task, tmp_path):
    from stlflow.control.collect import collect
    from stlflow.control.evaluate import evaluate
    from stlflow.control.samples import closed_loop_samples
    from stlflow.control.stl_data import calibrate
    from stlflow.control.training import train_policy

    assert get_task("reach") is reach_task and get_task(ReachTask.env_id) is reach_task
    store = collect(CollectJob("reach", 6, tmp_path / "reach.zarr", seed=0, progress=False))
    assert store.n_episodes == 6 and store.attrs["env_id"] == ReachTask.env_id
    assert sum(store.episode_attrs(i)["success"] for i in range(6)) >= 5  # the PD expert reaches its goal
    cal = calibrate(CalibrateJob(tmp_path / "reach.zarr", params=["v_max"], margin=0.05))
    assert cal.params == ["v_max"] and cal.own_theta_satisfied == 6
    assert set(cal.dataset_theta) == {"v_max", "T"} and cal.dataset_theta["T"] == 4.0
    policy = train_policy(TrainJob(
        "reach", tmp_path / "reach.zarr", tmp_path / "ckpt",
        policy=policy_config("flow", "mlp", {"horizon": 8, "n_action_steps": 4, "cond_params": ["v_max"]},
                             net_overrides={"width": 32, "n_blocks": 1, "time_embed_dim": 16}),
        train={"steps": 20, "batch_size": 16, "warmup_steps": 2, "val_every": 10, "ckpt_every": 20,
               "tensorboard": False, "progress": False}, log=lambda _msg: None))
    assert (tmp_path / "ckpt" / "policy.yaml").exists() and policy.param_names == ["v_max"]
    report = evaluate(EvalJob("reach", policy, ControllerSpec.create("rti", k=2), episodes=2, seed=100,
                              max_steps=10, stl_params={"v_max": 0.8}))
    assert report.env_id == ReachTask.env_id and report.metrics["episodes"] == 2
    assert set(report.episodes[0]["rule_robustness"]) == {"speed", "reach"}
    assert report.ticks["nfe"][:2] == [policy.nfe(), policy.nfe(2, 0.2)]
    samples = closed_loop_samples(policy, [100], 2, {"v_max": 0.8}, max_steps=10, task="reach")
    assert [s["mode"] in ("left", "right") for s in samples] == [True, True]
    assert samples[0]["xy"].shape == (11, 2)
    with pytest.raises(ValueError, match="no STL guidance model"):
        reach_task.guidance({"v_max": 0.5})


def test_theta_resolution_refuses_unknown_names_and_fills_defaults():
    task = get_task("crossing")
    theta = task.resolve_theta({"v_max": 0.8})
    assert theta["v_max"] == 0.8 and theta["d_safe"] == task.info.rule_defaults["d_safe"]
    assert set(theta) == set(task.theta_names)
    with pytest.raises(ValueError, match=r"unknown θ name\(s\) \['vmax'\].*'v_max'"):
        task.resolve_theta({"vmax": 0.8})
    with pytest.raises(ValueError, match="not a number"):
        task.resolve_theta({"v_max": "fast"})
    with pytest.raises(ValueError, match="unknown task 'walker'"):
        get_task("walker")
    with pytest.raises(ValueError, match="registered already"):
        register_task(type(task)())


def test_only_the_registry_names_an_env_id():
    """Verbs, pipeline, benchmarks, configs and the control layer reach env ids through the registry."""
    root = Path(__file__).resolve().parents[1]
    names = "|".join(re.escape(t.env_id.split("/")[1][:-3]) for t in TASKS.values())
    pattern = re.compile(rf"stlflow/({names})-v0")
    offenders = []
    for folder in ("stlflow", "control", "benchmarks", "conf"):
        for path in (root / folder).rglob("*"):
            if path.suffix not in (".py", ".yaml") or path.parent.name == "tasks":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
