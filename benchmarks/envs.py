"""Benchmark the MuJoCo tasks: env steps/s, scripted-expert success and mode frequencies, collection speed.

    MUJOCO_GL=egl python benchmarks/envs.py [--episodes 200] [--collect 40] [--out bench_out/envs]

Prints, per task:
- env steps/s with uniformly random actions (one process, resets included);
- the scripted expert over ``--episodes`` seeds (0 ..): success rate, collision rate, STL satisfaction of the
  task's rules at the default parameters, mean length, and how often each behaviour mode was drawn;
- collection episodes/s of ``stlflow collect`` (expert + recorder + EpisodeStore writes) with 1 and 2 workers;
and writes one rendered frame per task as ``<out>/<task>.png`` (off-screen rendering; not committed).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

from stlflow.control.collect import collect
from stlflow.control.controllers import ControllerSpec
from stlflow.control.evaluate import evaluate
from stlflow.control.jobs import CollectJob, EvalJob
from stlflow.control.tasks import TASKS, Task, get_task
from stlflow.control.workers import limit_threads


def env_steps_per_second(task: Task, steps: int, seed: int = 0) -> float:
    env = task.make_env()
    env.action_space.seed(seed)
    env.reset(seed=seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def expert_summary(task: Task, episodes: int) -> dict:
    report = evaluate(EvalJob(task.name, None, ControllerSpec.create("expert"), episodes, seed=0,
                              keep_ticks=False))
    env = task.make_env()
    modes = collections.Counter(env.unwrapped.make_expert(s).mode for s in range(episodes))
    env.close()
    return {"metrics": report.metrics, "modes": dict(sorted(modes.items()))}


def collection_rate(task: Task, episodes: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        collect(CollectJob(task.name, episodes, Path(tmp) / "d.zarr", workers=workers, progress=False))
        return episodes / (time.perf_counter() - t0)


def render_frame(task: Task, path: Path, seed: int = 0, steps: int = 15) -> tuple[int, ...]:
    """Run the expert a few steps so that the scene is mid-task, then save one RGB frame as PNG."""
    import imageio.v2 as imageio

    env = task.make_env(render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    expert = env.unwrapped.make_expert(seed)
    expert.reset()
    for _ in range(steps):
        obs, _, term, trunc, _ = env.step(expert.act(obs))
        if term or trunc:
            break
    frame = env.render()
    env.close()
    imageio.imwrite(path, frame)
    return tuple(frame.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(TASKS),
                    help="task names (default: all)")
    ap.add_argument("--episodes", type=int, default=200, help="expert episodes per task")
    ap.add_argument("--steps", type=int, default=2000, help="random-action env steps for the steps/s figure")
    ap.add_argument("--collect", type=int, default=100, help="episodes per collection-speed run")
    ap.add_argument("--out", default="bench_out/envs", help="directory of the rendered PNG frames")
    args = ap.parse_args()
    limit_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:
        task = get_task(name)
        print(f"== {task.env_id}")
        print(f"env steps/s (random actions, 1 process): {env_steps_per_second(task, args.steps):.0f}")
        t0 = time.perf_counter()
        summary = expert_summary(task, args.episodes)
        elapsed = time.perf_counter() - t0
        m = summary["metrics"]
        print(f"expert over {args.episodes} seeds: success {m['success_rate']:.1%}, collision "
              f"{m['collision_rate']:.1%}, STL satisfied at defaults {m['stl_satisfaction_rate']:.1%}, "
              f"mean length {m['mean_length']:.1f} steps ({args.episodes / elapsed:.1f} episodes/s incl. STL)")
        rules = {k: v for k, v in m.items() if k.startswith("stl_") and k.endswith("_rate")
                 and k != "stl_satisfaction_rate"}
        print("  per rule: " + ", ".join(f"{k[4:-5]} {v:.1%}" for k, v in rules.items()))
        print("  modes: " + ", ".join(f"{k} {v / args.episodes:.1%}" for k, v in summary["modes"].items()))
        for workers in (1, 2):
            rate = collection_rate(task, args.collect, workers)
            print(f"collection ({args.collect} episodes, workers={workers}): {rate:.1f} episodes/s")
        png = out / f"{task.name}.png"
        shape = render_frame(task, png)
        print(f"frame {shape} -> {png}")


if __name__ == "__main__":
    main()
