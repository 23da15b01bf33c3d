"""The maze2d waypoint controller: D4RL's scripted expert and data-collection policy, re-implemented.

It plans a shortest path over the maze grid from the cell of the point mass to the cell of the target and
tracks it cell by cell with a PD law. The behaviour follows D4RL's published controller:

- **Planning** (on every change of the target *cell*): a shortest path over open cells with 4-connected moves;
  among equally short moves the first of up (-y), down (+y), left (-x), right (+x) is taken (D4RL's
  Q-iteration picks the first best action in that order). Every waypoint except the last is the cell
  centre minus a uniform offset in [0, 0.2] per axis (drawn from ``rng``); the last is the target cell
  itself (its integer coordinates, not the sub-cell target).
- **Tracking**: ``action = clip(P * (waypoint - position) + D * velocity, -1, 1)`` with ``P`` = 10,
  ``D`` = -1. The controller moves on to the next waypoint once the position is within ``SOLVE_THRESH``
  = 0.1 of the current one *and* the point moved less than 0.1 since the previous call (D4RL compares the
  per-call displacement with its "velocity threshold"; the first call after a replan measures it from the
  start cell's integer coordinates).
- **Solved**: within 0.1 of the target cell and moved less than 0.1 since the previous call; the action then
  holds the point at the target cell.

Coordinates are maze coordinates as observed (qpos): ``x`` along the layout's rows, ``y`` along its columns,
cell ``(i, j)`` at ``(i, j)``. The controller only needs the grid of open cells; it knows no MuJoCo.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

P_GAIN = 10.0
D_GAIN = -1.0
SOLVE_THRESH = 0.1  # distance to a waypoint or the target that counts as reached (maze units)
STEP_THRESH = 0.1  # displacement per call below which the point counts as stopped (maze units)
WAYPOINT_JITTER = 0.2  # intermediate waypoints: cell centre minus U(0, 0.2) per axis
# D4RL's grid actions in its tie-break order: up, down, left, right (as (dx, dy) in cells).
MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0))


def grid_distances(open_cells: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Breadth-first move counts from every cell to ``target`` over ``open_cells`` (bool, (rows, cols)); -1 where
    unreachable (walls included)."""
    dist = np.full(open_cells.shape, -1, dtype=np.int64)
    if not open_cells[target]:
        raise ValueError(f"target cell {target} is a wall")
    dist[target] = 0
    queue = deque([target])
    rows, cols = open_cells.shape
    while queue:
        i, j = queue.popleft()
        for di, dj in MOVES:
            a, b = i + di, j + dj
            if 0 <= a < rows and 0 <= b < cols and open_cells[a, b] and dist[a, b] < 0:
                dist[a, b] = dist[i, j] + 1
                queue.append((a, b))
    return dist


def shortest_path(open_cells: np.ndarray, start: tuple[int, int], target: tuple[int, int]) -> list[tuple[int, int]]:
    """The cells after ``start`` up to and including ``target`` (``[target]`` when ``start == target``).

    Each move goes to a neighbour one step closer to the target; ties go to the first of :data:`MOVES`.
    """
    dist = grid_distances(open_cells, target)
    if dist[start] < 0:
        raise ValueError(f"start cell {start} cannot reach target cell {target} (wall or cut off)")
    if start == target:
        return [target]
    path, (i, j) = [], start
    while (i, j) != target:
        for di, dj in MOVES:
            a, b = i + di, j + dj
            if 0 <= a < dist.shape[0] and 0 <= b < dist.shape[1] and dist[a, b] == dist[i, j] - 1:
                i, j = a, b
                break
        path.append((i, j))
    return path


class WaypointController:
    """D4RL's maze2d waypoint controller (see the module docstring).

    Args:
        open_cells: (rows, cols) bool, True where the point may go (open and goal cells).
        rng: draws the waypoint offsets.
    """

    def __init__(self, open_cells: np.ndarray, rng: np.random.Generator, p_gain: float = P_GAIN,
                 d_gain: float = D_GAIN) -> None:
        self.open_cells = np.asarray(open_cells, dtype=bool)
        self.rng = rng
        self.p_gain, self.d_gain = float(p_gain), float(d_gain)
        self._dist_cache: dict[tuple[int, int], np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the plan: the next call plans afresh."""
        self.target_cell: tuple[int, int] | None = None
        self.waypoints: list[tuple[float, float]] = []
        self.index = 0
        self._prev = (0.0, 0.0)

    def _plan(self, x: float, y: float, cell: tuple[int, int]) -> None:
        start = (int(round(x)), int(round(y)))
        path = shortest_path(self.open_cells, start, cell)
        jitter = self.rng.uniform(size=(len(path), 2)) * WAYPOINT_JITTER
        self.waypoints = [(i - jitter[k, 0], j - jitter[k, 1]) for k, (i, j) in enumerate(path[:-1])]
        self.waypoints.append((float(cell[0]), float(cell[1])))
        self.index = 0
        self._prev = (float(start[0]), float(start[1]))
        self.target_cell = cell

    def get_action(self, position: Any, velocity: Any, target: Any) -> tuple[np.ndarray, bool]:
        """``(action (2,) in [-1, 1], solved)`` for the point at ``position`` (2,) moving at ``velocity`` (2,)
        towards the cell of ``target`` (2,); all in maze units."""
        x, y = float(position[0]), float(position[1])
        vx, vy = float(velocity[0]), float(velocity[1])
        cell = (int(round(float(target[0]))), int(round(float(target[1]))))
        if cell != self.target_cell:
            self._plan(x, y, cell)
        tx, ty = self.target_cell  # type: ignore[misc]
        moved = ((self._prev[0] - x) ** 2 + (self._prev[1] - y) ** 2) ** 0.5
        solved = ((x - tx) ** 2 + (y - ty) ** 2) ** 0.5 < SOLVE_THRESH and moved < STEP_THRESH
        wx, wy = (float(tx), float(ty)) if solved else self.waypoints[self.index]
        ax = self.p_gain * (wx - x) + self.d_gain * vx
        ay = self.p_gain * (wy - y) + self.d_gain * vy
        if not solved and ((x - wx) ** 2 + (y - wy) ** 2) ** 0.5 < SOLVE_THRESH and moved < STEP_THRESH:
            self.index = min(self.index + 1, len(self.waypoints) - 1)
        self._prev = (x, y)
        return np.array([min(max(ax, -1.0), 1.0), min(max(ay, -1.0), 1.0)]), solved


class Maze2dExpert:
    """The waypoint controller driving to a fixed goal, as an :class:`stlflow.envs.base.Expert` (noise-free).
    ``act(obs)`` takes the observation ``(x, y, vx, vy)``.

    ``replan_each_episode=True`` (default) plans from the start cell of every episode: the expert that solves the
    maze from anywhere. ``False`` is D4RL's reference-score procedure, which created one controller for all its
    episodes: it plans only when the target cell changes, so with the fixed goal it plans once, from the first
    episode's start, and later episodes reuse the finished plan (head straight for the goal cell and can get
    stuck behind a wall). D4RL's published expert scores (``REF_MAX_SCORE``) come from that procedure.
    """

    mode = "waypoint"

    def __init__(self, open_cells: np.ndarray, goal: np.ndarray, seed: int, replan_each_episode: bool = True) -> None:
        self.open_cells, self.goal = open_cells, np.asarray(goal, dtype=np.float64)
        self.replan_each_episode = replan_each_episode
        self.style: dict[str, Any] = {"replan_each_episode": replan_each_episode}
        self.controller = WaypointController(self.open_cells, np.random.default_rng(seed))

    def reset(self, seed: int | None = None, obs: Any = None) -> None:
        """Start a new episode: with ``replan_each_episode``, forget the plan (and re-seed the waypoint offsets
        when ``seed`` is given); otherwise keep everything (D4RL's reference procedure)."""
        if not self.replan_each_episode:
            return
        if seed is not None:
            self.controller.rng = np.random.default_rng(seed)
        self.controller.reset()

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The action (2,) for observation ``obs`` (4,)."""
        return self.controller.get_action(obs[:2], obs[2:4], self.goal)[0]

    __call__ = act
