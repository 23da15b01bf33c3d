"""D4RL maze2d fidelity: does the rebuilt environment reproduce D4RL's reference scores?

D4RL's references are the mean returns of its waypoint controller (max) and of uniform random actions (min),
100 episodes each. This script re-runs both procedures on stlflow's rebuild (``--episodes`` per maze; one
rollout per maze and policy gives both the sparse and the dense return) and normalises with D4RL's numbers:
a faithful environment scores about 100 (expert) and 0 (random). Gate: expert 100 +- 15 and random 0 +- 10 on
every maze and reward. The "expert" row is D4RL's procedure (one controller for all episodes, planned once);
"expert-replan" (planning each episode, for information) is the stronger expert the data generator uses.

It also times ``generate`` (``--generate-samples`` umaze steps, target under 5 minutes for 1M) and imports the
file with :func:`stlflow.datasets.importers.import_d4rl`.

    python benchmarks/d4rl_fidelity.py --episodes 1000 --generate-samples 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from stlflow.control.d4rl_data import generate, reference_policy, rollout_returns
from stlflow.datasets.d4rl_refs import normalized_score
from stlflow.datasets.importers import import_d4rl, qlearning_dataset
from stlflow.envs.maze2d import MAZE_LAYOUTS

TARGETS = {"expert": (100.0, 15.0), "random": (0.0, 10.0)}
POLICIES = ("expert", "random", "expert-replan")


def score_rows(maze: str, episodes: int, seed: int) -> list[dict]:
    """Rows ``{task, policy, mean, se, stl, seconds}`` for both reward types of ``maze``."""
    rows = []
    for policy in POLICIES:
        start = time.perf_counter()
        task = f"maze2d-{maze}-v1"
        result = rollout_returns(task, reference_policy(task, policy, seed), episodes, seed)
        seconds = time.perf_counter() - start
        for kind, name in (("sparse", task), ("dense", f"maze2d-{maze}-dense-v1")):
            score = normalized_score(name, result[f"returns_{kind}"], strict=True)
            rows.append({
                "task": name, "policy": policy, "mean": float(np.mean(score)),
                "se": float(np.std(score, ddof=1) / np.sqrt(len(score))),
                "stl": float(np.mean(result["stl_satisfied"])), "reached": float(np.mean(result["reached"])),
                "seconds": seconds,
            })
    return rows


def print_table(rows: list[dict]) -> bool:
    """Print the score table; True when every gated row is inside its target."""
    ok_all = True
    print(f"{'task':<24} {'policy':<14} {'normalised':>16} {'target':>9} {'verdict':>7} {'reached':>8} {'STL ok':>7}")
    for r in rows:
        target = TARGETS.get(r["policy"])
        if target is None:
            verdict, tgt = "info", "-"
        else:
            ok = abs(r["mean"] - target[0]) <= target[1]
            ok_all &= ok
            verdict, tgt = ("ok" if ok else "MISSED"), f"{target[0]:.0f}+-{target[1]:.0f}"
        print(f"{r['task']:<24} {r['policy']:<14} {r['mean']:>8.1f} +- {r['se']:>4.1f} {tgt:>9} {verdict:>7} "
              f"{r['reached']:>8.0%} {r['stl']:>7.0%}")
    return ok_all


def time_generation(samples: int, seed: int) -> None:
    """Generate ``samples`` umaze steps, import the file, build the Q-learning transitions; print the timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "maze2d-umaze-v1.hdf5"
        start = time.perf_counter()
        generate("maze2d-umaze-v1", out, samples, seed=seed, progress=False)
        gen_s = time.perf_counter() - start
        start = time.perf_counter()
        store = import_d4rl(out, Path(tmp) / "umaze.zarr", dt=0.01, progress=False)
        imp_s = time.perf_counter() - start
        q = qlearning_dataset(out, ignore_terminals=True)
        print(f"generate maze2d-umaze-v1: {samples} steps in {gen_s:.1f} s ({samples / gen_s:,.0f} steps/s; "
              f"target for 1M: < 300 s), {out.stat().st_size / 1e6:.1f} MB")
        print(f"import_d4rl: {store.n_steps} steps in {store.n_episodes} segments, {imp_s:.1f} s; qlearning_dataset "
              f"(ignore_terminals): {len(q['rewards'])} transitions, {int(q['terminals'].sum())} terminals")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1000, help="episodes per maze and policy (default 1000)")
    parser.add_argument("--mazes", "--tasks", nargs="+", default=list(MAZE_LAYOUTS), choices=list(MAZE_LAYOUTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generate-samples", type=int, default=0, help="also time generating this many umaze steps")
    args = parser.parse_args(argv)
    rows = []
    for maze in args.mazes:
        rows += score_rows(maze, args.episodes, args.seed)
        print(f"# {maze}: " + ", ".join(f"{r['policy']} {r['seconds']:.0f} s" for r in rows[-6::2]), flush=True)
    print(f"\nD4RL maze2d fidelity, {args.episodes} episodes per maze and policy (mean +- standard error)")
    ok = print_table(rows)
    print("gate:", "PASSED" if ok else "MISSED")
    if args.generate_samples:
        time_generation(args.generate_samples, args.seed)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
