"""STL augmentation throughput: the one-demonstration-at-a-time path against the batched one, side by side.

    python benchmarks/augment_throughput.py [--env crossing pickplace] [--demos 8] [--per-demo 4]
        [--batch-demos 8] [--replay-threads 1] [--workers 1] [--opt n_theta=1 iters=80] [--out bench_out/aug_tp]

For each task: collect and calibrate ``--demos`` expert demonstrations (kept in ``--out`` and reused), then augment
the same demonstrations with the same seed twice:

  old   each demonstration alone (``batch_demos=1``), through the task's own window callables: the robot model's
        ``rollout`` and one control-loop replay in MuJoCo per candidate, with the task's optimiser settings from
        before batching (no pruning; PickPlace: 4 CEM rounds of 12 samples, now 2 of 6) -- the path before;
  new   ``--batch-demos`` demonstrations in one tensor program (the task's ``stack``: Crossing's batched drive
        model) and their replays together (Crossing: MuJoCo's multi-threaded ``mujoco.rollout``, each episode
        verified against the env's own step, else replayed through the env).

Both keep only episodes that, replayed in MuJoCo, satisfy their θ without collision. Printed per path:
replay-verified trajectories stored per second of wall time, model-satisfying candidates per second of
optimisation, the share of candidates that satisfy in the model, the acceptance rate of replays, behaviour modes
per start state, the diversity of the stored episodes (mean pairwise RMS distance of model trajectories, m) and
how many stored episodes the two paths share (same demonstration, mode and θ) with the largest difference of
their actions. Then the targets
(Crossing >= 20/s, PickPlace >= 2/s) marked ok or MISSED, and, for Crossing, the replay alone: the control loop
against ``mujoco.rollout`` (1 and 2 threads) on the stored episodes' controls, with the largest difference of
the replayed signals. ``--opt`` overrides augmentation options of both paths (``conf/augment.yaml`` opt block;
the defaults are the demo's: ``n_theta=1 iters=80``). Timings are on one torch thread per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.tasks import get_task
from stlflow.control.workers import limit_threads

TARGETS = {"crossing": 20.0, "pickplace": 2.0}  # replay-verified trajectories per second (issue targets)
# The old path also runs the task's optimiser settings from before batching (PickPlace: 4 CEM rounds of 12).
OLD_STL_OPT = {"pickplace": {"cem_iters": 4, "cem_samples": 12}}
DEFAULT_DEMOS = {"crossing": 8, "pickplace": 2}


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", nargs="+", default=["crossing", "pickplace"], choices=["crossing", "pickplace"])
    ap.add_argument("--demos", type=int, default=None, help="demonstrations augmented (default Crossing 8, "
                    "PickPlace 2)")
    ap.add_argument("--per-demo", type=int, default=4, help="episodes stored per demonstration (the demo's 4)")
    ap.add_argument("--batch-demos", type=int, default=8, help="demonstrations per batch of the new path")
    ap.add_argument("--replay-threads", type=int, default=1, help="mujoco.rollout threads of the new path")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (both paths)")
    ap.add_argument("--opt", nargs="*", default=["n_theta=1", "iters=80"], help="augmentation options k=v")
    ap.add_argument("--skip-old", action="store_true", help="run the new path only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_out/augment_throughput", help="working folder")
    return ap.parse_args()


def _opt(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for p in pairs:
        k, _, v = p.partition("=")
        out[k] = yaml.safe_load(v)
    return out


def _old_task(name: str, env_kwargs: dict, stl_cfg: dict, modes: Any, dtype: str) -> Any:
    """The task without its batched ``stack``: every window through its own callables (the old path)."""
    from stlflow.control.stl_data import make_augment_task

    return dataclasses.replace(make_augment_task(name, env_kwargs, stl_cfg, modes, dtype), stack=None)


def run_path(task: Any, demos: Path, out: Path, opt: dict[str, Any], args: argparse.Namespace, old: bool) -> Any:
    """One augmentation of the first ``--demos`` demonstrations; returns its AugmentReport."""
    from stlflow import stl
    from stlflow.control.augment import augment_store
    from stlflow.control.jobs import AugmentJob
    from stlflow.control.stl_data import augment_settings, make_augment_task

    stl_cfg = task.stl_config()
    if old and task.name in OLD_STL_OPT:
        stl_cfg["opt"] = {**stl_cfg.get("opt", {}), **OLD_STL_OPT[task.name]}
    settings = augment_settings(AugmentJob(demos, out, task=task.name, per_demo=args.per_demo, opt=opt), stl_cfg)
    settings = dataclasses.replace(settings, batch_demos=1 if old else args.batch_demos,
                                   replay_threads=1 if old else args.replay_threads,
                                   prune_at=0 if old else settings.prune_at)
    factory = functools.partial(_old_task if old else make_augment_task, task.name, {}, stl_cfg, None,
                                settings.dtype)
    return augment_store(str(demos), str(out), factory, settings, stl.parse, seed=args.seed, workers=args.workers,
                         episodes=range(args.demos or DEFAULT_DEMOS[task.name]), overwrite=True, progress=False)


def same_episodes(a: Path, b: Path) -> str:
    """How many stored episodes two augmented stores share, position by position (both are in demonstration order
    and, within a demonstration, in selection order): same demonstration, mode and θ; and the largest difference
    of their actions (float32 round-off differs between the two drive models and grows over the Adam steps)."""
    from stlflow.datasets import EpisodeStore

    sa, sb = EpisodeStore.open(a), EpisodeStore.open(b)
    same, diff = 0, 0.0
    for i in range(min(sa.n_episodes, sb.n_episodes)):
        x, y = sa.episode_attrs(i), sb.episode_attrs(i)
        if (x["parent_episode"], x["mode"], x["stl_params"]) != (y["parent_episode"], y["mode"], y["stl_params"]):
            continue
        same += 1
        ea, eb = sa.episode(i)["action"], sb.episode(i)["action"]
        n = min(len(ea), len(eb))
        diff = max(diff, float(np.abs(ea[:n] - eb[:n]).max()))
    return f"{same} of {sa.n_episodes} / {sb.n_episodes} (same demo, mode, θ); largest action difference {diff:.1e}"


def replay_comparison(demos: Path, augmented: Path) -> list[str]:
    """Crossing: the stored episodes' controls replayed by the control loop and by mujoco.rollout (1, 2 threads)."""
    from stlflow.control.tasks.crossing import CrossingAugmentation
    from stlflow.control.tasks.crossing_replay import replay_batch
    from stlflow.control.tasks.replay import replay_controls
    from stlflow.datasets import EpisodeStore

    store, aug = EpisodeStore.open(demos), EpisodeStore.open(augmented)
    env = get_task("crossing").make_env()
    items = []
    for i in range(aug.n_episodes):
        seed = int(store.episode_attrs(int(aug.episode_attrs(i)["parent_episode"]))["seed"])
        env.reset(seed=seed)
        items.append(((env, seed, float(np.sign(env.unwrapped.peds.direction[0, 1])) or 1.0), aug.episode(i)["action"]))
    t0 = time.perf_counter()
    loop = []
    for (e, seed, dir_y), c in items:
        r, ep = replay_controls(e, seed, c)
        r.signals.update(CrossingAugmentation.mode_signals_from_obs(ep.obs[1:], dir_y))
        loop.append(r)
    lines = [f"  control loop            {len(items) / (time.perf_counter() - t0):8.1f} replays/s"]
    for threads in (1, 2):
        stats: dict[str, int] = {}
        t0 = time.perf_counter()
        batch = replay_batch(items, threads=threads, stats=stats)
        rate = len(items) / (time.perf_counter() - t0)
        diff = max(float(np.abs(a.signals[k] - b.signals[k]).max()) for a, b in zip(batch, loop) for k in b.signals)
        lines.append(f"  mujoco.rollout, {threads} thr.  {rate:8.1f} replays/s  ({stats.get('rollout', 0)} verified "
                     f"rollouts, {stats.get('fallback', 0)} through the env; largest signal difference {diff:.1e})")
    return lines


def main() -> int:
    args = _parse()
    limit_threads(1)
    from stlflow.pipeline import stage_calibrate, stage_collect

    opt = _opt(args.opt)
    summary = []
    for name in args.env:
        task = get_task(name)
        work = Path(args.out) / name
        demos = work / "demos.zarr"
        n = args.demos or DEFAULT_DEMOS[name]
        if not demos.exists():
            stage_collect(demos, max(n, 2), seed=args.seed, workers=1, progress=False, task=name)
            stage_calibrate(demos, log=lambda s: None, task=name)
        paths = [] if args.skip_old else [("old", True)]
        paths.append((f"new (batch {args.batch_demos})", False))
        reports = {}
        for label, old in paths:
            print(f"{name}: {label} ...", flush=True)
            reports[label] = run_path(task, demos, work / f"{'old' if old else 'new'}.zarr", opt, args, old)
        print(f"\n{name}: {n} demonstrations x {args.per_demo}, opt {opt}, seed {args.seed}, workers {args.workers}")
        print("| path | stored/s (replay-verified) | model-satisfying/s | satisfying in model | acceptance | "
              "modes/start | diversity (m) | wall s |")
        print("|---|---|---|---|---|---|---|---|")
        for label, r in reports.items():
            print(f"| {label} | {r.satisfying_per_second:.2f} | {r.model_satisfying_per_second:.1f} | "
                  f"{r.n_satisfying / max(r.n_candidates, 1):.1%} | {r.acceptance_rate:.1%} | "
                  f"{r.modes_per_demo_after:.2f} | {r.div_selected:.3f} | {r.seconds:.1f} |")
        if len(reports) == 2:
            old_r, new_r = reports.values()
            print(f"speed-up {new_r.satisfying_per_second / max(old_r.satisfying_per_second, 1e-9):.2f}x; "
                  f"stored episodes in common: {same_episodes(work / 'old.zarr', work / 'new.zarr')}")
        best = list(reports.values())[-1].satisfying_per_second
        mark = "ok" if best >= TARGETS[name] else "MISSED"
        summary.append(f"target {name}: >= {TARGETS[name]:g}/s replay-verified: {best:.2f}/s  {mark}")
        if name == "crossing":
            print("replay of the stored episodes:")
            print("\n".join(replay_comparison(demos, work / "new.zarr")))
        print()
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
