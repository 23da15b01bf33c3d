"""Offline RL on D4RL-format data: generate maze2d data, train and evaluate agents, normalised scores.

  stlflow d4rl generate task=maze2d-umaze-v1 out=umaze.hdf5 samples=1000000 seed=0
  stlflow d4rl run task=maze2d-umaze-v1 data=umaze.hdf5 agent=ofql steps=100000 eval_every=5000 eval_episodes=100
                   seeds=[0,1,2] workers=2 out=runs/umaze [resume=true] [agent.eta=0.5] [max_minutes=120]
  stlflow d4rl run task=hopper-medium-v2 data=hopper_medium-v2.hdf5 agent=td3bc eval_episodes=10 out=runs/hopper
  stlflow d4rl refs
  stlflow d4rl score task=maze2d-umaze-v1 return=120        (or return=[100,120,140])

generate: D4RL's maze2d data protocol on stlflow's rebuilt maze2d (waypoint controller with noisy actions, one
  continuous stream of `samples` steps), written atomically to `out` (an HDF5 file; overwrite=true replaces one).
run: trains `agent` (ofql: one-step flow Q-learning; bc-flow: its actor without the Q term; td3bc: TD3+BC) on
  `data` for `steps` updates per seed (batch_size), one process per seed (`workers` at a time, one torch thread
  each), evaluating every `eval_every` updates on `eval_episodes` episodes. Writes out/seed_<s>/metrics.csv (one
  row per evaluation, flushed as written), out/seed_<s>/checkpoint (atomic, verified), out/report.json and
  out/report.md: "last" and "best" normalised scores as mean ± std over seeds, CORL's published "last" scores
  beside them, the evaluation env and whether the comparison is exact (maze2d) or approximate (locomotion on
  gymnasium's -v4 envs; env_version=v5 asks for -v5, whose reward differs). maze2d also reports STL rule
  satisfaction. resume=true continues a killed run from its checkpoints, keeping the metrics already written.
  max_minutes=M stops each seed after M minutes of training. env=<gymnasium id> evaluates on another env (a task
  without reference scores reports raw returns, with a warning). agent.KEY=VALUE sets an agent setting (ofql:
  eta, lr, grad_norm, flow_ratio, max_q_backup, act_samples, ...; see stlflow.policy.agents).
refs: D4RL's reference returns (random, expert) of every known task, and CORL's "last" scores where published.
score: D4RL's normalised score 100 (return - random) / (expert - random) of `return` for `task`.

Bad input (unknown task or agent, missing or truncated file, file dimensions that differ from the env's, an
existing output without resume=true) gives one message on stderr and exit status 2, and leaves nothing behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stlflow.config import plain, run_job, verb_config

VERB = "d4rl"
SUBCOMMANDS = ("generate", "run", "refs", "score")


def _overrides(argv: list[str]) -> list[str]:
    """``agent.KEY=VALUE`` -> ``+agent_settings.KEY=VALUE`` (Hydra needs the + for a key the config lacks)."""
    return [f"+agent_settings.{a[len('agent.'):]}" if a.startswith("agent.") and "=" in a else a for a in argv]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        verb_config(f"{VERB} {{{'|'.join(SUBCOMMANDS)}}}", ["--help"], __doc__, config_name=VERB)
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    if sub not in SUBCOMMANDS:
        print(f"stlflow {VERB}: unknown subcommand {sub!r}; use one of {', '.join(SUBCOMMANDS)} (--help explains them)",
              file=sys.stderr)
        return 2
    cfg = verb_config(f"{VERB} {sub}", _overrides(rest), __doc__, config_name=VERB)
    if cfg is None:
        return 0
    return run_job(f"{VERB} {sub}", lambda: {"generate": generate, "run": run, "refs": refs, "score": score}[sub](cfg))


def _required(cfg, key: str, what: str) -> str:
    if cfg.get(key) in (None, ""):
        raise ValueError(f"{key}= is required: {what}")
    return str(cfg[key])


def generate(cfg) -> int:
    from stlflow.control.d4rl_data import generate as generate_data

    out = _required(cfg, "out", "the HDF5 file to write")
    path = generate_data(str(cfg.task), out, int(cfg.samples), seed=int(cfg.seed), progress=bool(cfg.progress),
                         overwrite=bool(cfg.overwrite))
    print(f"wrote {path} ({int(cfg.samples)} steps of {cfg.task}, seed {int(cfg.seed)})")
    return 0


def run(cfg) -> int:
    from stlflow.control.d4rl_run import D4RLRunJob
    from stlflow.control.d4rl_run import run as run_d4rl

    seeds = plain(cfg.seeds)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds or [])
    job = D4RLRunJob(
        task=str(cfg.task), data=_required(cfg, "data", "the D4RL-format HDF5 file to train on"),
        out=_required(cfg, "out", "the output folder"), agent=str(cfg.agent), steps=cfg.steps,
        eval_every=cfg.eval_every, eval_episodes=cfg.eval_episodes, seeds=tuple(seeds), workers=cfg.workers,
        resume=bool(cfg.resume), batch_size=cfg.batch_size, agent_settings=plain(cfg.agent_settings) or {},
        env=None if cfg.env is None else str(cfg.env), env_version=str(cfg.env_version), eval_seed=int(cfg.eval_seed),
        max_minutes=None if cfg.max_minutes is None else float(cfg.max_minutes), progress=bool(cfg.progress))
    rep = run_d4rl(job)
    print((Path(job.out) / "report.md").read_text())
    print(f"report: {Path(job.out) / 'report.json'}")
    return 0 if rep else 1


def refs(cfg) -> int:
    from stlflow.control.d4rl_report import CORL_LAST
    from stlflow.datasets.d4rl_refs import REF_SCORES

    anchors = sorted({name for row in CORL_LAST.values() for name in row})
    width = max(len(t) for t in REF_SCORES)
    print(f"{'task'.ljust(width)}  {'random':>10}  {'expert':>10}  CORL last: {' / '.join(anchors)}")
    for task, (lo, hi) in sorted(REF_SCORES.items()):
        corl = " / ".join(f"{CORL_LAST[task][a]:.1f}" for a in anchors) if task in CORL_LAST else ""
        print(f"{task.ljust(width)}  {lo:10.2f}  {hi:10.2f}  {corl}")
    print("\nnormalised score = 100 (return - random) / (expert - random) (D4RL's reference returns)")
    return 0


def score(cfg) -> int:
    import numpy as np

    from stlflow.datasets.d4rl_refs import normalized_score

    value = plain(cfg["return"])
    if value is None:
        raise ValueError("return= is required: an episode return or a list of them (return=[100,120])")
    try:
        returns = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"return must be a number or a list of numbers, got {value!r}") from None
    s = normalized_score(str(cfg.task), returns, strict=True)
    values = np.atleast_1d(s)
    text = ", ".join(f"{v:.2f}" for v in values)
    extra = f" (mean {values.mean():.2f} ± {values.std():.2f})" if values.size > 1 else ""
    print(f"{cfg.task}: normalised score {text}{extra}")
    return 0
