"""D4RL maze2d rebuilt: layouts, model parameters, step/reset semantics, the waypoint expert, STL signals."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import stlflow.envs  # noqa: F401  (registers the ids)
from stlflow.envs.maze2d import (
    MAZE2D_TASKS,
    MAZE_LAYOUTS,
    Maze2dEnv,
    Maze2dSim,
    gym_id,
    reward,
    signals,
    start_cells,
)
from stlflow.envs.maze2d_expert import Maze2dExpert, shortest_path
from stlflow.stl import parse


def test_tasks_ids_and_time_limits():
    assert sorted(MAZE2D_TASKS) == sorted(
        f"maze2d-{m}{d}-v1" for m in ("umaze", "medium", "large") for d in ("", "-dense")
    )
    for task, (maze, kind, steps) in MAZE2D_TASKS.items():
        spec = gym.spec(gym_id(task))
        assert spec.max_episode_steps == steps == {"umaze": 300, "medium": 600, "large": 800}[maze]
        assert spec.kwargs == {"maze": maze, "reward_type": kind}
    assert gym_id("maze2d-umaze-dense-v1") == "stlflow/Maze2d-umaze-dense-v1"
    with pytest.raises(ValueError, match="maze2d-umaze-v1"):
        gym_id("maze2d-open-v0")


def test_layouts_and_goals():
    goals = {"umaze": (1, 1), "medium": (6, 6), "large": (7, 9)}
    for maze, rows in MAZE_LAYOUTS.items():
        assert len({len(r) for r in rows}) == 1 and "".join(rows).count("G") == 1
        assert set(rows[0] + rows[-1]) == {"#"}  # closed border
        np.testing.assert_array_equal(Maze2dSim(maze).goal, goals[maze])
        starts = start_cells(maze)
        assert len(starts) == "".join(rows).count("O") + 1 and tuple(starts[-1]) == goals[maze]


def test_model_parameters():
    sim = Maze2dSim("umaze")
    m = sim.model
    assert m.opt.timestep == 0.01 and m.opt.integrator == 0  # mjINT_EULER
    np.testing.assert_allclose(m.dof_damping, [1.0, 1.0])
    np.testing.assert_allclose(m.actuator_gear[:, 0], [100.0, 100.0])
    np.testing.assert_allclose(m.actuator_ctrlrange, [[-1, 1], [-1, 1]])
    assert m.body_mass[1] == pytest.approx(4.0 / 3.0 * np.pi * 0.1**3 * 1000)


def test_walls_sit_two_tenths_below_the_grid():
    sim = Maze2dSim("umaze")
    # pushed into the wall past row 3 (+x) and into the border at row 0 (-x): the sphere stops 0.2 short of
    # the cell edge on the + side and 0.2 beyond it on the - side (D4RL's placement), radius 0.1
    sim.set_state(np.array([3.0, 1.0]), np.zeros(2))
    for _ in range(300):
        obs = sim.step((1.0, 0.0))
    assert obs[0] == pytest.approx(3.2, abs=0.01)
    sim.set_state(np.array([1.0, 1.0]), np.zeros(2))
    for _ in range(300):
        obs = sim.step((-1.0, 0.0))
    assert obs[0] == pytest.approx(0.4, abs=0.01)


def test_never_terminates_and_truncates_at_the_limit():
    env = gym.make("stlflow/Maze2d-umaze-v1")
    obs, info = env.reset(seed=3)
    assert obs.shape == (4,) and env.observation_space.contains(obs) and "signals" in info
    env.action_space.seed(3)
    for t in range(1, 301):
        obs, r, terminated, truncated, info = env.step(env.action_space.sample())
        assert not terminated and truncated == (t == 300)
    assert not env.unwrapped.step(np.zeros(2))[2]  # the bare env never ends either


def test_goal_threshold_and_dense_reward():
    env = Maze2dEnv("umaze", "sparse")
    dense = Maze2dEnv("umaze", "dense")
    for offset, expected in ((0.49, 1.0), (0.51, 0.0)):
        for e in (env, dense):
            e.reset(seed=0)
            e.sim.set_state(np.array([1.0, 1.0 + offset]), np.zeros(2))
        obs, r, *_ = env.step(np.zeros(2))  # no force, no velocity: the point stays put
        assert obs[1] == pytest.approx(1.0 + offset) and r == expected
        assert dense.step(np.zeros(2))[1] == pytest.approx(np.exp(-offset))
    np.testing.assert_array_equal(reward(np.array([[1.0, 1.5], [1.0, 1.5001]]), np.array([1.0, 1.0]), "sparse"), [1, 0])


def test_velocity_is_clipped_before_each_step():
    sim = Maze2dSim("umaze")
    sim.set_state(np.array([1.0, 2.0]), np.array([20.0, -30.0]))
    obs = sim.step((0.0, 0.0))
    # clipped to +-5, then one 0.01 s Euler step with damping 1 on 4.19 kg: |v| just below 5
    assert 4.95 < obs[2] < 5.0 and -5.0 < obs[3] < -4.95
    assert obs[0] == pytest.approx(1.0 + 0.01 * obs[2])


def test_reset_distribution():
    env = Maze2dEnv("umaze")
    env.reset(seed=0)
    starts = start_cells("umaze")
    pos, vel = [], []
    for _ in range(3000):
        obs = env.sim.reset(env.np_random)
        pos.append(obs[:2])
        vel.append(obs[2:])
    pos, vel = np.array(pos), np.array(vel)
    cell = np.rint(pos)
    assert np.all(np.abs(pos - cell) <= 0.1)
    counts = [(cell == s).all(axis=1).sum() for s in starts]  # every open cell and the goal cell, uniformly
    assert len(counts) == 7 and min(counts) > 3000 / 7 * 0.8 and sum(counts) == 3000
    assert np.std(pos - cell) == pytest.approx(0.2 / np.sqrt(12), rel=0.1)
    assert np.std(vel) == pytest.approx(0.1, rel=0.1) and abs(np.mean(vel)) < 0.01


def test_same_seed_same_episode():
    a, b = Maze2dEnv("medium"), Maze2dEnv("medium")
    np.testing.assert_array_equal(a.reset(seed=7)[0], b.reset(seed=7)[0])
    assert not np.array_equal(a.reset(seed=8)[0], b.reset(seed=7)[0])


def test_shortest_path_and_tie_break():
    grid = Maze2dSim("umaze").open_cells
    assert shortest_path(grid, (3, 1), (1, 1)) == [(3, 2), (3, 3), (2, 3), (1, 3), (1, 2), (1, 1)]
    assert shortest_path(grid, (1, 1), (1, 1)) == [(1, 1)]
    open_grid = np.ones((3, 3), dtype=bool)
    assert shortest_path(open_grid, (0, 0), (1, 1)) == [(0, 1), (1, 1)]  # "down" (+y) before "right" (+x)
    with pytest.raises(ValueError, match="wall"):
        shortest_path(grid, (3, 1), (0, 0))


@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_expert_reaches_the_goal_from_every_open_cell(maze):
    sim = Maze2dSim(maze)
    steps = {"umaze": 300, "medium": 600, "large": 800}[maze]
    for k, cell in enumerate(start_cells(maze)):
        expert = Maze2dExpert(sim.open_cells, sim.goal, seed=k)
        obs = sim.set_state(cell, np.zeros(2))
        dist = []
        for _ in range(steps):
            obs = sim.step(expert.act(obs))
            dist.append(np.linalg.norm(obs[:2] - sim.goal))
        assert dist[-1] <= 0.1, f"{maze}: from cell {cell} the expert ends {dist[-1]:.2f} from the goal"


def test_reference_procedure_plans_once():
    sim = Maze2dSim("umaze")
    expert = Maze2dExpert(sim.open_cells, sim.goal, seed=0, replan_each_episode=False)
    expert.act(sim.set_state(np.array([3.0, 1.0]), np.zeros(2)))
    plan = list(expert.controller.waypoints)
    expert.reset(seed=1)
    expert.act(sim.set_state(np.array([1.0, 3.0]), np.zeros(2)))
    assert expert.controller.waypoints == plan  # D4RL's reference script kept one controller
    replan = Maze2dExpert(sim.open_cells, sim.goal, seed=0)
    replan.act(sim.set_state(np.array([3.0, 1.0]), np.zeros(2)))
    replan.reset()
    replan.act(sim.set_state(np.array([1.0, 3.0]), np.zeros(2)))
    assert len(replan.controller.waypoints) == 2


def test_signals_and_rules():
    env = Maze2dEnv("umaze")
    obs = np.array([[[1.0, 1.0, 3.0, 4.0], [3.0, 3.0, 0.0, 0.0]]])  # (B=1, T=2, 4)
    sig = env.signals(obs)
    assert {k: v.shape for k, v in sig.items()} == {"dist_goal": (1, 2), "clearance": (1, 2), "speed": (1, 2)}
    np.testing.assert_allclose(sig["dist_goal"], [[0.0, np.hypot(2, 2)]])
    # at (1, 1) the nearest wall face is row 2's at x = 1.3; at (3, 3) column 4's at y = 3.3
    np.testing.assert_allclose(sig["clearance"], [[0.2, 0.2]])
    np.testing.assert_allclose(sig["speed"], [[5.0, 0.0]])
    spec = parse(env.rules)
    assert spec.signals == {"dist_goal", "clearance", "speed"} and spec.params == set(env.rule_defaults)
    with pytest.raises(ValueError, match="4"):
        signals(np.zeros((3, 5)), "umaze")


def test_env_checker_passes():
    from gymnasium.utils.env_checker import check_env

    check_env(Maze2dEnv("large", "dense"), skip_render_check=True)
