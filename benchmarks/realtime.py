"""Per-tick control under inference delay: every chunk controller on the same policies and seeds, d = 0..3 ticks.

    MUJOCO_GL=egl python benchmarks/realtime.py --ckpt crossing:ddpm=DIR --ckpt crossing:flow=DIR \
        --ckpt pickplace:ddpm=DIR --ckpt pickplace:flow=DIR [--ckpt crossing:meanflow=DIR] \
        --episodes 100 --delays 0 1 2 3 --workers 2 --out bench_out/realtime

Each checkpoint is a policy of ``benchmarks/policies.py`` (``--ckpt TASK:HEAD=DIR``). Every row runs on the seeds
``--seed .. --seed + episodes - 1`` in lock-step with an injected inference delay of d ticks, modelled by one
inference worker whose plan from the observation of tick s acts from tick s + d on
(:mod:`stlflow.control.async_exec`; every plan reads only observations up to its own tick). Rows:

- ``sync``: Diffusion Policy's synchronous receding horizon (Ta = the policy's n_action_steps, head's full schedule);
  the robot holds its last action for the d ticks each chunk takes. At d = 0 this is the receding-horizon reference;
- ``async``: naive asynchronous receding horizon (the next chunk starts d ticks early, switched to on arrival);
- ``ensemble``: temporal ensembling (ACT, m = 0.01), a chunk whenever the worker is free;
- ``rtc``: real-time chunking (soft-mask inpainting with vector-Jacobian guidance, beta = 5), every ``--rtc-interval``
  ticks (at least d);
- ``rti``: the warm-started RTI controller as shipped (``conf/control/rti.yaml`` with the task's ``rti_k``,
  ``rti_t_start`` and ``rti_interval``), a plan every max(interval, 2 d) ticks, the d actions that run while a plan
  is computed kept fixed, with a budget of ``nfe_per_tick`` = 1 network evaluation per tick (the issue's "RTI at
  k = 1"; 0.5 for a DDPM head, ``ddpm_nfe_per_tick``) spent as one plan of budget x interval solver steps every
  interval ticks; ``rti:nfe_per_tick=x``: a budget of x for every head (2: the issue's "k = 2");
  ``rti:nfe_per_tick=null``: a fixed k a plan instead (the task's ``rti_k``, 2 on Crossing, 4 on PickPlace: the
  default before the per-tick budget);
- ``--variant 'rti:k=2,commit=2'``: more rows (any controller, ``name:opt=value,...``) for the design search.

Columns per row and delay: success, collisions, STL satisfaction, network evaluations per executed action (the
first plan, made in reset, included), p50 / p99 wall time of a tick (the work of a plan is charged to the tick it
starts on; one torch thread per worker process), and smoothness: the mean and the (episode-mean) max of the
per-tick change of the executed continuous actions (physical units). The checks of the per-tick control issue are
printed under the tables (check 2 on the rates as measured, and seed by seed: every row runs the same seeds, so
McNemar's exact test on the seeds only one of two rows solves says whether a rival's lead is more than seed
noise), and ``success_vs_delay.png`` (one line per controller, one panel per task and head) is
written to ``--out``, with ``report.json``.

``--timing-ticks N`` (default 3000): the steady tick of RTI k=1 (default MLP, one thread) timed apart, on a quiet
pass over recorded observations of the first checkpoint, p50 / p99 printed against the 1 ms bar, with the same
tick through torch's batch-1 network call beside it (interleaved blocks, the anchor).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.clock import host_steal_seconds
from stlflow.control.controllers import RTI_ASYNC_OPTIONS, ControllerSpec
from stlflow.control.evaluate import Report, evaluate, load_policy
from stlflow.control.intervals import format_rate, paired_better_p
from stlflow.control.jobs import EvalJob, controller_defaults
from stlflow.control.tasks import TASKS, get_task
from stlflow.control.workers import limit_threads

BASE_ROWS = ("sync", "async", "ensemble", "rtc", "rti:nfe_per_tick=null", "rti:nfe_per_tick=2", "rti")
OURS = "rti"  # the shipped RTI controller (conf/control/rti.yaml for the task), which the delay checks hold to account


def parse_row(text: str, task: str, delay: int, rtc_interval: int) -> ControllerSpec:
    """``name[:opt=value,...]`` -> a spec: the shipped options of the controller for ``task`` (``stlflow eval``'s
    defaults, e.g. the task's RTI t_start), overridden by the row's; rtc's interval defaults to max(d, rtc_interval)
    and rti always runs through the asynchronous executor (at d = 0 too, so every column is the same controller)."""
    name, _, rest = text.partition(":")
    opts = controller_defaults(name, task)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        opts[key] = json.loads(value) if value not in ("true", "false") else value == "true"
    if "nfe_per_tick" in rest and "ddpm_nfe_per_tick" not in rest:
        opts.pop("ddpm_nfe_per_tick", None)  # a row's own budget holds for every head
    if name == "rtc":
        opts.setdefault("interval", rtc_interval)
    if name == "rti":
        opts.setdefault("interval", 1)
    if name in ("rtc", "rti"):  # the executor raises it to at least max(1, 2 d); printed as run
        opts["interval"] = max(2 * delay, int(opts["interval"]))
    return ControllerSpec.create(name, **opts)


def run_cell(task: str, ckpt: str, row: str, delay: int, args: argparse.Namespace) -> Report:
    t = get_task(task)
    spec = parse_row(row, task, delay, args.rtc_interval)
    return evaluate(EvalJob(t.name, ckpt, spec, args.episodes, seed=args.seed, workers=args.workers, delay=delay,
                            keep_ticks=False))


def cell(report: Report) -> dict[str, Any]:
    """The cell's rates, and ``outcomes``: success per episode in seed order (for the paired comparison)."""
    m = report.metrics
    keys = ("success_rate", "collision_rate", "stl_satisfaction_rate", "nfe_per_action", "latency_p50_ms",
            "latency_p99_ms", "action_change_mean", "action_change_max", "episodes")
    out: dict[str, Any] = {k: float(m.get(k, float("nan"))) for k in keys}
    out["outcomes"] = [int(r["success"]) for r in sorted(report.episodes, key=lambda r: r["seed"])]
    return out


def paired_line(results: dict, task: str, head: str, rows: list[str], d: int) -> str | None:
    """Check 2 seed by seed: per rival with recorded outcomes on the same seeds, McNemar's one-sided p that it
    succeeds more often than ours (small p: a real gap, not seed noise); None when no cell holds outcomes."""
    ours = results.get((task, head, OURS, d), {}).get("outcomes")
    if not ours:
        return None
    ps = {r: paired_better_p(ours, results[(task, head, r, d)]["outcomes"]) for r in rows
          if r != OURS and len(results.get((task, head, r, d), {}).get("outcomes") or []) == len(ours)}
    if not ps:
        return None
    worst = min(ps, key=ps.get)
    verdict = "ok (no rival significantly better)" if ps[worst] >= 0.05 else f"MISSED ({worst} significantly better)"
    return (f"  [2'] {task}/{head} d={d}, paired on the same {len(ours)} seeds (McNemar, one-sided): smallest p "
            f"{ps[worst]:.3f} ({worst}): {verdict}")


def table(results: dict, task: str, head: str, rows: list[str], delays: list[int]) -> str:
    lines = [f"### {task}, {head} head\n",
             "| controller | d | success | collision | STL sat. | NFE/action | p50 ms | p99 ms | Δa mean | Δa max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for d in delays:
            c = results.get((task, head, row, d))
            if c is None:
                continue
            lines.append(f"| {row} | {d} | {c['success_rate']:.0%} | {c['collision_rate']:.0%} | "
                         f"{c['stl_satisfaction_rate']:.0%} | {c['nfe_per_action']:.2f} | {c['latency_p50_ms']:.2f} | "
                         f"{c['latency_p99_ms']:.2f} | {c['action_change_mean']:.3f} | {c['action_change_max']:.3f} |")
    pivot = ["", "| success | " + " | ".join(f"d={d}" for d in delays) + " |", "|---|" + "---|" * len(delays)]
    for row in rows:
        cells = [results.get((task, head, row, d)) for d in delays]
        pivot.append(f"| {row} | " + " | ".join("-" if c is None else f"{c['success_rate']:.0%}" for c in cells)
                     + " |")
    return "\n".join(lines + pivot) + "\n"


def _per_tick_budget(row: str, task: str, head: str) -> float | None:
    """The network evaluations per tick an RTI row is given (``rti:nfe_per_tick=x``, or the shipped ``rti`` with its
    task's ``nfe_per_tick``, ``ddpm_nfe_per_tick`` for a DDPM head: the issue's "k network evaluations per tick",
    spent as one plan of k x interval solver steps every interval ticks); None otherwise."""
    name, _, rest = row.partition(":")
    opts = dict(item.partition("=")[::2] for item in filter(None, rest.split(",")))
    if name != "rti" or set(opts) - {"nfe_per_tick"}:
        return None
    shipped = controller_defaults("rti", task)
    if head == "ddpm" and shipped.get("nfe_per_tick") is not None and shipped.get("ddpm_nfe_per_tick") is not None:
        shipped["nfe_per_tick"] = shipped["ddpm_nfe_per_tick"]
    value = opts.get("nfe_per_tick", shipped.get("nfe_per_tick"))
    return None if value in (None, "null") else float(value)


def checks(results: dict, combos: list[tuple[str, str]], rows: list[str], delays: list[int]) -> str:
    """The issue's bars: (1) d = 0: RTI k <= 2 within 2 points of receding (sync d = 0); (2) d >= 1: ours at least
    every other row; d = 3: ours within 5 points of its own d = 0. The rates of (2) carry their 95% Wilson
    intervals (the verdict is on the rates themselves: the intervals only show how far apart they are)."""
    out = ["checks:"]
    for task, head in combos:
        ref = results.get((task, head, "sync", 0))
        for row in rows:
            c = results.get((task, head, row, 0))
            budget = _per_tick_budget(row, task, head)
            if budget is not None and budget <= 2 and ref and c:
                gap = round((c["success_rate"] - ref["success_rate"]) * 100, 6)
                out.append(f"  [1] {task}/{head} {row} d=0: {c['success_rate']:.0%} vs receding "
                           f"{ref['success_rate']:.0%} ({gap:+.0f} pts): {'ok' if gap >= -2 else 'MISSED'}")
        ours0 = results.get((task, head, OURS, 0))
        for d in delays:
            ours = results.get((task, head, OURS, d))
            if d == 0 or ours is None:
                continue
            others = {r: results[(task, head, r, d)]["success_rate"] for r in rows
                      if r != OURS and (task, head, r, d) in results}
            best_row = max(others, key=others.get) if others else None
            verdict = "ok" if not others or ours["success_rate"] >= max(others.values()) else "MISSED"
            n = int(ours["episodes"])
            best = format_rate(others[best_row], n) if best_row else "-"
            out.append(f"  [2] {task}/{head} d={d}: {OURS} {format_rate(ours['success_rate'], n)}, best other "
                       f"{best_row} {best}: {verdict}")
            paired = paired_line(results, task, head, rows, d)
            if paired:
                out.append(paired)
            if d == 3 and ours0 is not None:
                loss = (ours0["success_rate"] - ours["success_rate"]) * 100
                out.append(f"  [2] {task}/{head} d=3 vs its own d=0: {ours['success_rate']:.0%} vs "
                           f"{ours0['success_rate']:.0%} ({-loss:+.0f} pts; at most 5 lost): "
                           f"{'ok' if loss <= 5 else 'MISSED'}")
    return "\n".join(out)


def steady_tick(ckpt: str, task: str, ticks: int) -> dict[str, float]:
    """p50 / p99 of RTI k=1 warm ticks (default options, one thread) over recorded observations of the task; beside
    them, interleaved in blocks of 250 ticks on the same controller, the same tick with the network called through
    torch (``forward_inference``, the batch-1 path before the numpy one) as the anchor."""
    from stlflow.control.evaluate import run_episode
    from stlflow.policy.rti import RTIController

    limit_threads(1)
    policy = load_policy(ckpt)
    t = get_task(task)
    env = t.make_env({})
    try:
        obs = run_episode(env, ControllerSpec.create("rti", k=1).build(policy, seed=0), 0).obs
    finally:
        env.close()
    opts = {k: v for k, v in controller_defaults("rti", task).items() if k not in RTI_ASYNC_OPTIONS}
    ctrl = RTIController(policy, **{**opts, "k": 1}, seed=0)
    ctrl.reset(seed=0)
    net = policy.head.net
    paths = ["shipped", "torch"] if hasattr(net, "forward_single") else ["shipped"]
    lat: dict[str, list[float]] = {p: [] for p in paths}
    for i in range(20):
        ctrl.act(obs[i % len(obs)])
    i, steal0, t_start = 0, host_steal_seconds(), time.perf_counter()
    while len(lat["shipped"]) < ticks:
        for path in paths:
            if path == "torch":
                net.forward_single = net.forward_inference  # this instance only, for this block
            for _ in range(250):
                t0 = time.perf_counter()
                ctrl.act(obs[i % len(obs)])
                i += 1
                if not ctrl.last_cold:
                    lat[path].append(time.perf_counter() - t0)
            net.__dict__.pop("forward_single", None)
    steal = (host_steal_seconds() - steal0) * 1e3 / (time.perf_counter() - t_start)
    out = {"ticks": len(lat["shipped"]), "load": os.getloadavg()[0], "steal_ms_per_s": steal}
    for path, values in lat.items():
        ms = 1e3 * np.asarray(values)
        key = "" if path == "shipped" else "torch_"
        out[f"{key}p50_ms"], out[f"{key}p99_ms"] = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    return out


def plot(results: dict, combos: list[tuple[str, str]], rows: list[str], delays: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.6), squeeze=False, sharey=True)
    for ax, (task, head) in zip(axes[0], combos):
        for row in rows:
            ys = [results.get((task, head, row, d), {}).get("success_rate", np.nan) * 100 for d in delays]
            ax.plot(delays, ys, marker="o", label=row, lw=2.5 if row == OURS else 1.2)
        ax.set_title(f"{task}, {head}")
        ax.set_xlabel("inference delay d (ticks)")
        ax.set_xticks(delays)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("success (%)")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", action="append", default=[], metavar="TASK:HEAD=DIR", required=True)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", nargs="+", default=list(BASE_ROWS), help="rows (name[:opt=value,...])")
    ap.add_argument("--variant", action="append", default=[], help="extra rows, e.g. 'rti:k=2,commit=2'")
    ap.add_argument("--rtc-interval", type=int, default=4, help="rtc plans every max(d, this) ticks")
    ap.add_argument("--timing-ticks", type=int, default=3000)
    ap.add_argument("--timing-only", action="store_true", help="only the steady-tick timing (no closed-loop rows)")
    ap.add_argument("--out", default="bench_out/realtime")
    ap.add_argument("--resume", action="store_true", help="keep the cells of --out/cells.jsonl (same episodes, seed)")
    args = ap.parse_args()
    limit_threads(1)
    ckpts: list[tuple[str, str, str]] = []
    for text in args.ckpt:
        key, _, path = text.partition("=")
        task, _, head = key.partition(":")
        if task not in TASKS or not head or not path:
            raise SystemExit(f"--ckpt takes TASK:HEAD=DIR with TASK in {sorted(TASKS)}, got {text!r}")
        ckpts.append((task, head, path))
    rows = [] if args.timing_only else list(args.rows) + list(args.variant)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    partial = out / "cells.jsonl"  # one line per finished cell: an interrupted run resumes with --resume
    if args.resume and partial.exists():
        for line in partial.read_text().splitlines():
            rec = json.loads(line)
            if rec["episodes"] == args.episodes and rec["seed"] == args.seed:
                results[(rec["task"], rec["head"], rec["row"], rec["delay"])] = rec["cell"]
    elif partial.exists():
        partial.unlink()
    for task, head, path in ckpts:
        for row in rows:
            for d in args.delays:
                if (task, head, row, d) in results:
                    continue
                t0 = time.perf_counter()
                c = cell(run_cell(task, path, row, d, args))
                results[(task, head, row, d)] = c
                with open(partial, "a") as f:
                    f.write(json.dumps({"task": task, "head": head, "row": row, "delay": d, "episodes": args.episodes,
                                        "seed": args.seed, "cell": c}) + "\n")
                print(f"{task:9s} {head:8s} {row:28s} d={d}  success {c['success_rate']:.0%}  collision "
                      f"{c['collision_rate']:.0%}  NFE/action {c['nfe_per_action']:.2f}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    combos = [(t, h) for t, h, _ in ckpts] if rows else []
    print()
    for task, head in combos:
        print(table(results, task, head, rows, args.delays))
    timing = steady_tick(ckpts[0][2], ckpts[0][0], args.timing_ticks) if args.timing_ticks else None
    if timing:
        print(f"steady tick, RTI k=1, {ckpts[0][0]}/{ckpts[0][1]}, one thread, {timing['ticks']} warm ticks: "
              f"p50 {timing['p50_ms']:.3f} ms, p99 {timing['p99_ms']:.3f} ms (bar: p99 < 1 ms: "
              f"{'ok' if timing['p99_ms'] < 1 else 'MISSED'}; load average {timing['load']:.1f}, host steal "
              f"{timing['steal_ms_per_s']:.1f} ms/s)")
        if "torch_p50_ms" in timing:
            print(f"  anchor, interleaved: the same tick with torch's network call (forward_inference, before): "
                  f"p50 {timing['torch_p50_ms']:.3f} ms, p99 {timing['torch_p99_ms']:.3f} ms")
    if not rows:
        return
    print(checks(results, combos, rows, args.delays))
    plot(results, combos, rows, args.delays, out / "success_vs_delay.png")
    (out / "report.json").write_text(json.dumps(
        {"episodes": args.episodes, "seed": args.seed, "rows": rows, "timing": timing,
         "cells": [{"task": t, "head": h, "row": r, "delay": d, **c} for (t, h, r, d), c in results.items()]},
        indent=1))
    print(f"wrote {out / 'report.json'} and {out / 'success_vs_delay.png'}")


if __name__ == "__main__":
    main()
