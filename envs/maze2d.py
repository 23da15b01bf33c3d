"""D4RL's maze2d, rebuilt: a force-actuated point mass in a grid maze (``stlflow/Maze2d-<maze>[-dense]-v1``).

A re-implementation of the environment behind D4RL's ``maze2d-{umaze,medium,large}[-dense]-v1`` datasets
and reference scores, from its published parameters (the maze layouts are D4RL's, Apache-2.0; see NOTICE):

- MuJoCo model: a sphere (radius 0.1, density 1000, so 4.19 kg) on two slide joints (damping 1, unlimited),
  two motors with gear 100 and controls in [-1, 1], timestep 0.01 s, Euler, no gravity, 20 solver
  iterations, frictionless contacts (condim 1, margin 0.002) with 1 x 1 wall boxes.
- Frames: the observation is in maze coordinates, ``x`` along the layout's rows and ``y`` along its
  columns, cell ``(i, j)`` at ``(i, j)``. As in D4RL, the walls sit 0.2 lower in both axes than the cell
  grid (the particle body is placed at (1.2, 1.2) and wall ``(i, j)`` at (i + 1, j + 1)), so the free space
  of an open cell ``(i, j)`` spans ``[i - 0.7, i + 0.3] x [j - 0.7, j + 0.3]`` for the centre of the
  sphere, shrunk by its radius.
- Step (``dt`` = 0.01 s, one MuJoCo step): clip the action to [-1, 1]; clip each joint velocity to [-5, 5];
  step; observe ``(x, y, vx, vy)`` (float64: qpos ⊕ qvel); reward on that new observation: sparse
  ``1 if |xy - goal| <= 0.5 else 0``, dense ``exp(-|xy - goal|)``.
- Reset: a cell drawn uniformly from the open cells and the goal cell, plus U(-0.1, 0.1) per axis; velocity
  N(0, 0.1^2) per axis. The goal is the layout's ``G`` cell, fixed for every episode.
- Episodes never terminate; the registered ids truncate after 300 / 600 / 800 steps (umaze / medium /
  large) through gymnasium's ``TimeLimit``. ``info``: ``success`` (within 0.5 of the goal now),
  ``signals``.

STL rules (``rules``, ``rule_defaults``; signals from :func:`signals`): ``dist_goal`` = distance to the goal,
``clearance`` = gap between the sphere and the nearest wall box (negative when pressed into it within the
contact margin), ``speed`` = |velocity|::

    F[0,{T}](dist_goal <= {eps}) & G(clearance >= {d_safe}) & G(speed <= {v_max})

Not to be confused with gymnasium-robotics' PointMaze (goal threshold 0.45, reset noise 0.25, a goal drawn
per episode, dict observations) or Minari's regenerated pointmaze datasets (their own reference scores).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from stlflow.envs.base import OffscreenRenderer
from stlflow.envs.maze2d_expert import Maze2dExpert

# D4RL's layouts: one string per row, '#' wall, 'O' open, 'G' goal (open). Row index = x, column index = y.
MAZE_LAYOUTS: dict[str, tuple[str, ...]] = {
    "umaze": ("#####", "#GOO#", "###O#", "#OOO#", "#####"),
    "medium": ("########", "#OO##OO#", "#OO#OOO#", "##OOO###", "#OO#OOO#", "#O#OO#O#", "#OOO#OG#", "########"),
    "large": (
        "############", "#OOOO#OOOOO#", "#O##O#O#O#O#", "#OOOOOO#OOO#", "#O####O###O#", "#OO#O#OOOOO#",
        "##O#O#O#O###", "#OO#OOO#OGO#", "############",
    ),
}
MAX_STEPS = {"umaze": 300, "medium": 600, "large": 800}
# D4RL task name -> (maze, reward type, episode steps).
MAZE2D_TASKS: dict[str, tuple[str, str, int]] = {
    f"maze2d-{maze}{'-dense' if reward == 'dense' else ''}-v1": (maze, reward, MAX_STEPS[maze])
    for maze in MAZE_LAYOUTS
    for reward in ("sparse", "dense")
}

DT = 0.01  # seconds per step (one MuJoCo step)
VEL_CLIP = 5.0  # |joint velocity| bound applied before each step
GOAL_RADIUS = 0.5  # sparse reward / success radius (maze units)
RESET_NOISE = 0.1  # reset position: cell + U(-0.1, 0.1) per axis; velocity N(0, 0.1^2)
RADIUS = 0.1  # the sphere (maze units)
WALL_OFFSET = -0.2  # wall boxes sit 0.2 lower than the cell grid in both axes (D4RL's placement)

RULE_LIST = {
    "reach": "F[0,{T}](dist_goal <= {eps})",
    "clearance": "G(clearance >= {d_safe})",
    "speed": "G(speed <= {v_max})",
}
RULES = " & ".join(RULE_LIST.values())
SIGNAL_NAMES = ("dist_goal", "clearance", "speed")


def gym_id(task: str) -> str:
    """The gymnasium id of a D4RL maze2d task: ``maze2d-umaze-dense-v1`` -> ``stlflow/Maze2d-umaze-dense-v1``."""
    if task not in MAZE2D_TASKS:
        raise ValueError(f"unknown maze2d task {task!r}; known: {sorted(MAZE2D_TASKS)}")
    return "stlflow/M" + task[1:]


def rule_defaults(maze: str) -> dict[str, float]:
    """Default rule parameters: reach the goal disc within the episode (T = the last step's time, s), keep
    ``d_safe`` = 0.05 between the sphere and every wall, stay under ``v_max`` = 6 maze units/s (each velocity
    component is clipped to 5, so |v| can reach 7.07). The re-planning expert satisfies all three from every
    start (measured clearance >= 0.10, speed <= 5.3); pressing into a wall or cutting corners does not."""
    return {"T": round((MAX_STEPS[maze] - 1) * DT, 6), "eps": GOAL_RADIUS, "d_safe": 0.05, "v_max": 6.0}


def _check_maze(maze: str) -> tuple[str, ...]:
    if maze not in MAZE_LAYOUTS:
        raise ValueError(f"unknown maze {maze!r}; known: {sorted(MAZE_LAYOUTS)}")
    return MAZE_LAYOUTS[maze]


def open_cells(maze: str) -> np.ndarray:
    """(rows, cols) bool: True at open and goal cells."""
    return np.array([[c != "#" for c in row] for row in _check_maze(maze)])


def goal_cell(maze: str) -> np.ndarray:
    """The goal ``(x, y)`` (float64, maze units): the layout's ``G`` cell."""
    rows = _check_maze(maze)
    (i, j), = [(i, row.index("G")) for i, row in enumerate(rows) if "G" in row]
    return np.array([i, j], dtype=np.float64)


def start_cells(maze: str) -> np.ndarray:
    """(K, 2) reset cells in D4RL's order: the open cells sorted, then the goal cell."""
    rows = _check_maze(maze)
    empty = sorted((i, j) for i, row in enumerate(rows) for j, c in enumerate(row) if c == "O")
    return np.array(empty + [tuple(goal_cell(maze).astype(int))], dtype=np.float64)


def mjcf(maze: str) -> str:
    """The MuJoCo model of ``maze`` as MJCF text (module docstring)."""
    rows = _check_maze(maze)
    walls = "\n".join(
        f'    <geom name="wall_{i}_{j}" type="box" pos="{i + 1} {j + 1} 0" size="0.5 0.5 0.2" conaffinity="1" '
        'material="wall"/>'
        for i, row in enumerate(rows) for j, c in enumerate(row) if c == "#"
    )
    cx, cy = (len(rows) + 1) / 2, (len(rows[0]) + 1) / 2
    return f"""<mujoco model="maze2d_{maze}">
  <compiler inertiafromgeom="true" angle="radian"/>
  <option timestep="{DT}" gravity="0 0 0" iterations="20" integrator="Euler"/>
  <default>
    <joint damping="1" limited="false"/>
    <geom friction=".5 .1 .1" density="1000" margin="0.002" condim="1" contype="2" conaffinity="1"/>
  </default>
  <asset>
    <texture type="2d" name="groundplane" builtin="checker" rgb1="0.2 0.3 0.4" rgb2="0.1 0.2 0.3" width="100"
      height="100"/>
    <material name="groundplane" texture="groundplane" texrepeat="20 20"/>
    <material name="wall" rgba=".7 .5 .3 1"/>
    <material name="target" rgba=".6 .3 .3 1"/>
  </asset>
  <worldbody>
    <camera name="top" pos="{cx} {cy} {1.4 * max(len(rows), len(rows[0]))}" xyaxes="0 -1 0 1 0 0"/>
    <geom name="ground" type="plane" size="40 40 0.25" pos="0 0 -0.1" contype="1" conaffinity="0"
      material="groundplane"/>
    <body name="particle" pos="1.2 1.2 0">
      <geom name="particle_geom" type="sphere" size="{RADIUS}" rgba="0 0 1 1" contype="1"/>
      <joint name="ball_x" type="slide" pos="0 0 0" axis="1 0 0"/>
      <joint name="ball_y" type="slide" pos="0 0 0" axis="0 1 0"/>
    </body>
    <site name="target_site" pos="0 0 0" size="0.2" material="target"/>
{walls}
  </worldbody>
  <actuator>
    <motor joint="ball_x" ctrlrange="-1 1" ctrllimited="true" gear="100"/>
    <motor joint="ball_y" ctrlrange="-1 1" ctrllimited="true" gear="100"/>
  </actuator>
</mujoco>
"""


def reward(xy: np.ndarray, goal: np.ndarray, reward_type: str) -> np.ndarray:
    """Per-step reward of positions ``xy`` (..., 2+): sparse ``|xy - goal| <= 0.5`` (0/1), dense
    ``exp(-|xy - goal|)``."""
    dist = np.linalg.norm(np.asarray(xy)[..., :2] - goal, axis=-1)
    if reward_type == "sparse":
        return (dist <= GOAL_RADIUS).astype(np.float64)
    if reward_type == "dense":
        return np.exp(-dist)
    raise ValueError(f"unknown reward type {reward_type!r}; use 'sparse' or 'dense'")


def wall_boxes(maze: str) -> np.ndarray:
    """(K, 2) centres of the wall boxes in maze coordinates (half size 0.5)."""
    rows = _check_maze(maze)
    return np.array([(i, j) for i, row in enumerate(rows) for j, c in enumerate(row) if c == "#"], float) + WALL_OFFSET


def signals(obs: np.ndarray, maze: str) -> dict[str, np.ndarray]:
    """STL signals of observations ``obs`` (..., 4) in ``maze`` -> ``{dist_goal, clearance, speed}`` each (...,).

    ``clearance`` is the distance from the sphere's surface to the nearest wall box (maze units).
    """
    obs = np.asarray(obs, dtype=np.float64)
    if obs.shape[-1] != 4:
        raise ValueError(f"maze2d observations are (..., 4) (x, y, vx, vy); got shape {obs.shape}")
    xy = obs[..., :2]
    nearest = np.full(obs.shape[:-1], np.inf)
    for cx, cy in wall_boxes(maze):  # one pass per wall keeps memory at the size of the input
        gap = np.hypot(np.maximum(np.abs(xy[..., 0] - cx) - 0.5, 0.0), np.maximum(np.abs(xy[..., 1] - cy) - 0.5, 0.0))
        np.minimum(nearest, gap, out=nearest)
    return {
        "dist_goal": np.linalg.norm(xy - goal_cell(maze), axis=-1),
        "clearance": nearest - RADIUS,
        "speed": np.linalg.norm(obs[..., 2:4], axis=-1),
    }


class Maze2dSim:
    """The MuJoCo model and data of one maze with D4RL's step and reset (no gymnasium overhead; used by the env,
    the data generator and the benchmarks)."""

    def __init__(self, maze: str) -> None:
        import mujoco  # here, so that registering the ids (importing stlflow.envs) does not load MuJoCo

        self._mujoco = mujoco
        self.maze = maze
        self.model = mujoco.MjModel.from_xml_string(mjcf(maze))
        self.data = mujoco.MjData(self.model)
        self.goal = goal_cell(maze)
        self.starts = start_cells(maze)
        self.open_cells = open_cells(maze)

    def random_cell_point(self, rng: np.random.Generator) -> np.ndarray:
        """A start cell drawn uniformly plus U(-0.1, 0.1) per axis (D4RL's reset position and random target)."""
        cell = self.starts[rng.integers(len(self.starts))]
        return cell + rng.uniform(-RESET_NOISE, RESET_NOISE, size=2)

    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """Put the point at ``qpos`` (2,) with ``qvel`` (2,); return the observation (4,)."""
        self._mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:] = qpos
        self.data.qvel[:] = qvel
        self._mujoco.mj_forward(self.model, self.data)
        return self.obs()

    def reset(self, rng: np.random.Generator) -> np.ndarray:
        """D4RL's reset: a random start cell + U(-0.1, 0.1), velocity N(0, 0.1^2); the observation (4,)."""
        qpos = self.random_cell_point(rng)
        return self.set_state(qpos, rng.normal(0.0, RESET_NOISE, size=2))

    def step(self, action: Any) -> np.ndarray:
        """One step of 0.01 s: clip the action and the velocity, integrate; the new observation (4,)."""
        d = self.data
        np.clip(d.qvel, -VEL_CLIP, VEL_CLIP, out=d.qvel)
        d.ctrl[0] = min(max(float(action[0]), -1.0), 1.0)
        d.ctrl[1] = min(max(float(action[1]), -1.0), 1.0)
        self._mujoco.mj_step(self.model, d)
        return self.obs()

    def obs(self) -> np.ndarray:
        """``(x, y, vx, vy)`` float64."""
        return np.concatenate([self.data.qpos, self.data.qvel])


class Maze2dEnv(gym.Env):
    """D4RL maze2d as a gymnasium env (module docstring). ``maze``: umaze | medium | large; ``reward_type``:
    sparse | dense. Never terminates or truncates by itself: the registered ids add the time limit."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 100}
    dt = DT
    rules = RULES
    discrete_action_mask = np.zeros(2, dtype=bool)

    def __init__(self, maze: str = "umaze", reward_type: str = "sparse", render_mode: str | None = None) -> None:
        _check_maze(maze)
        if reward_type not in ("sparse", "dense"):
            raise ValueError(f"unknown reward_type {reward_type!r}; use 'sparse' or 'dense'")
        self.maze, self.reward_type, self.render_mode = maze, reward_type, render_mode
        self.sim = Maze2dSim(maze)
        self.goal = self.sim.goal
        self.max_steps = MAX_STEPS[maze]
        self.rule_defaults = rule_defaults(maze)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float64)
        self._renderer: OffscreenRenderer | None = None

    def signals(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        """STL signals from observations (..., 4) -> {name: (...)} (see :func:`signals`)."""
        return signals(obs, self.maze)

    def make_expert(self, seed: int, replan_each_episode: bool = True) -> Maze2dExpert:
        """D4RL's noise-free waypoint controller driving to the goal; ``replan_each_episode=False`` is D4RL's
        reference-score procedure (see :class:`~stlflow.envs.maze2d_expert.Maze2dExpert`)."""
        return Maze2dExpert(self.sim.open_cells, self.goal, seed, replan_each_episode)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        obs = self.sim.reset(self.np_random)
        return obs, self._info(obs)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs = self.sim.step(action)
        return obs, float(reward(obs, self.goal, self.reward_type)), False, False, self._info(obs)

    def _info(self, obs: np.ndarray) -> dict[str, Any]:
        sig = signals(obs, self.maze)
        return {"success": bool(sig["dist_goal"] <= GOAL_RADIUS), "signals": {k: float(v) for k, v in sig.items()}}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            self._renderer = OffscreenRenderer(self.sim.model)
        target = self.sim.model.site("target_site").id
        self.sim.data.site_xpos[target] = [self.goal[0] + 1.2, self.goal[1] + 1.2, 0.0]
        return self._renderer.render(self.sim.data, camera="top")

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
