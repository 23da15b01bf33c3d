"""Learning on maze2d-umaze: OFQL against bc-flow and TD3+BC for a fixed training time per seed, CORL beside them.

    python benchmarks/d4rl_learning.py --minutes 120 --seeds 0,1,2 [--data umaze.hdf5] [--out runs/learning]
    python benchmarks/d4rl_learning.py --minutes 3 --seeds 0 --eval-every 2000 --samples 200000   (a smoke run)
    python benchmarks/d4rl_learning.py --steps 24000 --minutes 600 --seeds 0 --agents ofql,bc-flow \
        --set ofql.precision="'bf16'"   (a fixed number of updates, whatever the machine's load)

Each agent trains through ``stlflow.control.d4rl_run.run`` (one process per seed, one torch thread each,
``--workers`` at a time) for ``--minutes`` of training time per seed (``max_minutes``; evaluations are not
counted), evaluating every ``--eval-every`` updates and once at the end on ``--episodes`` episodes (100, as CORL
and D4RL do for maze2d). Without ``--data`` a D4RL-protocol dataset of ``--samples`` steps is generated first
(``stlflow d4rl generate``; 1M steps as D4RL's maze2d-umaze-v1).

Printed: agent, "last" and "best" normalised scores (mean ± std over seeds), updates done per seed, and CORL's
published "last" scores (BC, TD3+BC, IQL, CQL, EDAC), then two verdicts on "last" scores:
OFQL at least 20 points above bc-flow, and OFQL above CORL's IQL (42.1).
"""

from __future__ import annotations

import argparse
import ast
import os
from pathlib import Path

from stlflow.control.d4rl_report import CORL_LAST
from stlflow.control.d4rl_run import D4RLRunJob, run

TASK = "maze2d-umaze-v1"
AGENTS = ("ofql", "bc-flow", "td3bc")


def _pm(stat) -> str:
    return "n/a" if stat is None else f"{stat['mean']:6.1f} ± {stat['std']:4.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=120.0, help="training minutes per seed and agent")
    ap.add_argument("--steps", type=int, default=10**9, help="at most this many updates per seed and agent")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--agents", default=",".join(AGENTS))
    ap.add_argument("--data", default=None, help="a maze2d-umaze-v1 HDF5 file (default: generate one)")
    ap.add_argument("--samples", type=int, default=1_000_000, help="steps to generate when --data is not given")
    ap.add_argument("--out", default="d4rl_learning")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="AGENT.KEY=VALUE",
                    help="agent settings, e.g. ofql.eta=0.5 (values parsed as Python literals)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / f"umaze_{args.samples}.hdf5"
    if not data.exists():
        from stlflow.control.d4rl_data import generate

        generate(TASK, data, args.samples, seed=0)
    settings: dict[str, dict] = {a: {} for a in AGENTS}
    for item in args.set:
        key, value = item.split("=", 1)
        agent, name = key.split(".", 1)
        settings.setdefault(agent, {})[name] = ast.literal_eval(value)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    reports = {}
    for agent in args.agents.split(","):
        job = D4RLRunJob(task=TASK, data=str(data), out=str(out / agent), agent=agent, steps=args.steps,
                         eval_every=args.eval_every, eval_episodes=args.episodes, seeds=seeds, workers=args.workers,
                         agent_settings=settings.get(agent, {}), max_minutes=args.minutes,
                         resume=(out / agent).exists())
        reports[agent] = run(job)
    budget = f"{args.minutes:g} training minutes" + (f" or {args.steps} updates" if args.steps < 10**9 else "")
    print(f"\nmaze2d-umaze-v1, {len(seeds)} seeds, at most {budget} per seed (whichever comes first), "
          f"{args.episodes} evaluation episodes; data {data} (load average {os.getloadavg()[0]:.1f})")
    print(f"{'agent':<18} {'last':>14} {'best':>14}  updates per seed      ms/update")
    for agent, rep in reports.items():
        ms = "n/a" if rep["ms_per_update"] is None else f"{rep['ms_per_update']['mean']:.1f}"
        print(f"{agent:<18} {_pm(rep['last']):>14} {_pm(rep['best']):>14}  {str(rep['steps']):<20} {ms}")
    for name, value in CORL_LAST[TASK].items():
        print(f"{'CORL ' + name:<18} {value:>14.1f} {'':>14}  (published, 1M updates, 4 seeds)")
    if "ofql" in reports:
        ofql = reports["ofql"]["last"]["mean"]
        if "bc-flow" in reports:
            bc = reports["bc-flow"]["last"]["mean"]
            print(f"OFQL last {ofql:.1f} >= bc-flow last {bc:.1f} + 20: {'ok' if ofql >= bc + 20 else 'MISSED'}")
        iql = CORL_LAST[TASK]["IQL"]
        print(f"OFQL last {ofql:.1f} > CORL IQL last {iql:.1f}: {'ok' if ofql > iql else 'MISSED'}")


if __name__ == "__main__":
    main()
