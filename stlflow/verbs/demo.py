"""The whole pipeline on one task in minutes on a CPU: demos -> calibrate -> augment -> train -> closed loop.

    stlflow demo [env=crossing|pickplace] [out=demo_out] [budget=tiny|default] [guidance.enabled=false] [workers=2]

Stages (each prints its progress; a failing stage is named with its cause and the exit status is 1):
collect expert demonstrations, calibrate the rules' parameters θ per demonstration, augment with diverse
rule-satisfying synthetic episodes (trajectory optimisation, MuJoCo replay check), train a θ-conditioned flow
policy on demos + augmented data, evaluate it in closed loop with the real-time-iteration controller at a few
requested θ (speed limit sweep) without and with STL guidance. Prints the results table and the stage times and
writes ``out/``: results.md (what was run, the columns, the table with 95% intervals), report.json (configuration,
versions, metrics, one record per episode), trajectories.png (one panel per requested θ: the scene, the paths,
collisions and rule violations), satisfaction_diversity.png, latency_hist.png, videos/grid.mp4 (a success and a
failure per requested θ, labelled, with the planned chunk drawn) and one MP4 per tile (plus data/ and policy/).
env=pickplace runs the same pipeline on PickPlace (its settings: tasks.pickplace in conf/demo.yaml).
budget=tiny runs every stage with tiny numbers (seconds); budget=default is the full demo.
"""

from __future__ import annotations

import sys

from stlflow.config import verb_config


def main(argv: list[str]) -> int:
    cfg = verb_config("demo", argv, __doc__)
    if cfg is None:
        return 0
    from stlflow.config import INPUT_ERRORS, debugging
    from stlflow.pipeline import StageError, run_demo

    try:
        summary = run_demo(cfg)
    except StageError as err:
        if debugging():
            raise
        print(f"stlflow demo: {err}", file=sys.stderr)
        # a stage refused its input (a setting): 2, as every verb; a stage that broke: 1
        return 2 if err.stage == "config" or isinstance(err.cause, INPUT_ERRORS) else 1
    print()
    print(summary["table"])
    print(summary["stage_times"])
    print(f"total {summary['total_seconds']:.0f} s; results in {cfg.out}/ (report.json, results.md, plots, videos/)")
    return 0
