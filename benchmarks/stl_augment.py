"""STL augmentation, controllable policies and STL guidance: the issue #7 evaluation table, per task.

    python benchmarks/stl_augment.py [--env crossing|pickplace] [--episodes 100] [--from demo_out]
        [--out bench_out/stl_augment] ...

Rows (same evaluation seeds for every row, closed loop):
  expert                         the scripted expert (reference; deterministic per start state)
  demos, no θ                    flow policy trained on the demonstrations without θ
  θ on demos                     θ-conditioned flow policy on the demonstrations
  θ on demos+aug                 θ-conditioned flow policy on demonstrations + augmented episodes
  θ on demos+aug + guidance      the same with inference-time STL guidance
  θ on demos+aug + guidance, RTI the same under the real-time-iteration controller (k = 2)
Rows 2-5 use Diffusion Policy's receding-horizon controller (full flow schedule, Ta = 8).
PickPlace guidance steers the speed rule through the arm's set-point model (``stlflow.envs.pickplace_dynamics``;
``--rows aug_rti`` adds the unguided RTI row); its diversity compares TCP paths (xyz) and its modes are the zones the
cube ends in; its sweep is over the arm's
``v_max`` from 0.2 to 0.5 m/s (the demonstrations' calibrated range is about 0.17-0.37 m/s; the augmentation
re-times each demo to its sampled v_max, conf/stl/pickplace.yaml ``retime``, up to about 0.5 m/s) and the other θ
are the dataset's.

Columns: STL satisfaction of all rules at the requested θ, collision rate, success; diversity = mean pairwise RMS
distance (m) of closed-loop xy trajectories from the same start state (time-indexed: differences in pace count),
the same between routes (each path resampled evenly along its arc length: pace does not count) and distinct
behaviour modes reached per start state (``--div-starts`` x ``--div-samples`` episodes at the dataset θ); the valid
columns count only the samples that satisfy the rules without colliding, as the STL-diffusion paper does: their
mean pairwise distance (0 where fewer than two), distinct modes among them and the xy area their paths cover on a
fixed grid (Crossing 0.1 m, PickPlace 0.02 m cells), per start state (crashes in varied directions raise the first
three columns, not these);
controllability = Spearman correlation of the realised max speed with the requested v_max over a sweep, and the
fraction of episodes whose max speed is within the request (+ ``--meet-tol``); time = per-tick latency p50/p99 (ms)
and the guidance's share. Episode i of a row requests v_max = sweep[i mod len(sweep)] (other θ: the
demonstrations' dataset-level calibration) with seed ``--eval-seed + i``. Also prints the augmentation throughput
(replay-verified satisfying trajectories per second) from the augmentation report.

``--relabel`` trains the demos+aug policy on augmented episodes labelled the way the demonstrations are (their
tightest θ + the calibration margin, by ``stlflow calibrate``) instead of the θ they were optimised for: an episode
optimised for v_max = 0.6 that never exceeds 0.45 then teaches "v_max = 0.45 + margin", as a demonstration would.

With ``--from DIR`` (an ``stlflow demo`` output folder) the demonstrations, the augmented store and the θ-conditioned
demos+aug policy are reused; the two other policies are trained here with the same settings (``--train-steps``).
Timings are on one torch thread (``limit_threads(1)``, done here); evaluation workers add contention to the latency
figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.controllers import ControllerSpec
from stlflow.control.evaluate import evaluate
from stlflow.control.jobs import EvalJob
from stlflow.control.samples import closed_loop_samples, sample_metrics, spearman
from stlflow.control.tasks import TASKS, get_task
from stlflow.control.workers import limit_threads
from stlflow.pipeline import stage_augment, stage_calibrate, stage_collect, stage_train


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="crossing", choices=sorted(TASKS), help="task")
    ap.add_argument("--out", default="bench_out/stl_augment", help="working and output folder")
    ap.add_argument("--from", dest="from_dir", default=None, help="reuse data and policy of an `stlflow demo` folder")
    ap.add_argument("--episodes", type=int, default=100, help="closed-loop episodes per row")
    ap.add_argument("--sweep", type=float, nargs="+", default=None,
                    help="requested v_max (m/s); default Crossing 0.9 1.1 1.3 1.5, PickPlace 0.2 0.3 0.4 0.5")
    ap.add_argument("--div-starts", type=int, default=20, help="start states for the diversity columns")
    ap.add_argument("--div-samples", type=int, default=8, help="episodes per start state for diversity")
    ap.add_argument("--eval-seed", type=int, default=5000)
    ap.add_argument("--demos", type=int, default=100)
    ap.add_argument("--aug-demos", type=int, default=40)
    ap.add_argument("--per-demo", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (collection, augmentation, evaluation)")
    ap.add_argument("--k", type=int, default=2, help="RTI steps per tick")
    ap.add_argument("--meet-tol", type=float, default=0.05, help="max speed may exceed the request by this (m/s)")
    ap.add_argument("--guidance-t-max", type=float, default=0.25, help="guide at noise levels t <= this")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="gradient guidance step (default: the task's, Crossing 1.0, PickPlace 0.01; 0 = no gradient: "
                         "with --guidance-particles, selection alone)")
    ap.add_argument("--guidance-particles", type=int, default=1,
                    help="chunks sampled per policy call, one kept: uniformly among those that satisfy the rules "
                         "(exact robustness >= margin), else the most robust (1 = no selection)")
    ap.add_argument("--cfg-scale", type=float, default=None,
                    help="classifier-free guidance scale on θ for the θ-conditioned policies (policy.guidance_scale; "
                         "default: the checkpoint's, 1 = plain conditional)")
    ap.add_argument("--rows", default="all", help="comma-separated row keys to run (default all)")
    ap.add_argument("--reuse-data", action="store_true",
                    help="reuse the demonstrations and augmented store already in --out (skip collect/augment)")
    ap.add_argument("--relabel", action="store_true",
                    help="label the augmented episodes as the demonstrations are (stlflow calibrate: tightest θ + "
                         "margin of the replayed trajectory) instead of the θ they were optimised for, before "
                         "training the demos+aug policy")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


ROWS = [  # key, label, policy key, controller, guided
    ("expert", "expert", None, "expert", False),
    ("notheta", "demos, no θ", "notheta", "receding", False),
    ("theta", "θ on demos", "theta", "receding", False),
    ("aug", "θ on demos+aug", "aug", "receding", False),
    ("aug_g", "θ on demos+aug + guidance", "aug", "receding", True),
    ("aug_g_rti", "θ on demos+aug + guidance, RTI k=2", "aug", "rti", True),
    ("aug_rti", "θ on demos+aug, RTI k=2", "aug", "rti", False),  # instead of the guided rows without a model
]


def controller_spec(controller: str, k: int, guidance: Any = None) -> ControllerSpec:
    """The row's controller: ``k`` solver steps per tick for ``rti``, the head's defaults otherwise."""
    return ControllerSpec.create(controller, guidance=guidance, k=int(k) if controller == "rti" else None)


def evaluate_row(policy: Any, controller: str, guided: bool, thetas: list[dict[str, float]], episodes: int,
                 args: argparse.Namespace, guidance_opts: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop metrics of one row over the θ sweep (episode i: sweep[i mod n], seed eval_seed + i)."""
    task = get_task(args.env)
    records, lat, requested = [], [], []
    t0 = time.perf_counter()
    gsec = 0.0
    for j, theta in enumerate(thetas):
        idx = [i for i in range(episodes) if i % len(thetas) == j]
        if not idx:
            continue
        guidance = task.guidance(theta, **guidance_opts) if guided else None
        spec = controller_spec(controller, args.k, guidance)
        # evaluate() runs consecutive seeds; the sweep's episodes use seeds eval_seed + i with i = j (mod n)
        for i in idx:
            rep = evaluate(EvalJob(task.name, None if controller == "expert" else policy, spec, 1,
                                   seed=args.eval_seed + i, workers=1, stl_params=theta))
            ep = rep.episodes[0]
            records.append(ep)
            lat.extend(rep.ticks["latency_ms"])
            requested.append(theta["v_max"])
        if guidance is not None:
            gsec += guidance.seconds
    wall = time.perf_counter() - t0
    n = len(records)
    max_speed = [theta_v - ep["rule_robustness"][task.speed_rule] for theta_v, ep in zip(requested, records)]
    lat_a = np.asarray(lat)
    return {
        "episodes": n,
        "stl_satisfaction": float(np.mean([ep["robustness"] >= 0 for ep in records])),
        "collision": float(np.mean([ep["collision"] for ep in records])),
        "success": float(np.mean([ep["success"] for ep in records])),
        "spearman_vmax": spearman(requested, max_speed),
        "meets_vmax": float(np.mean([m <= r + args.meet_tol for m, r in zip(max_speed, requested)])),
        "max_speed_by_request": {str(v): float(np.mean([m for m, r in zip(max_speed, requested) if r == v]))
                                 for v in sorted(set(requested))},
        "latency_p50_ms": float(np.percentile(lat_a, 50)) if lat_a.size else float("nan"),
        "latency_p99_ms": float(np.percentile(lat_a, 99)) if lat_a.size else float("nan"),
        "guidance_ms_per_tick": 1e3 * gsec / max(lat_a.size, 1) if guided else 0.0,
        "ticks": int(lat_a.size),
        "wall_s": wall,
    }


def main() -> int:
    """The whole benchmark, top to bottom (data, policies, rows, tables, plots): kept as one function because each
    step feeds the next and a reader follows it as a script."""
    args = _parse()
    limit_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.from_dir) if args.from_dir else out
    demos, augmented = src / "data" / "demos.zarr", src / "data" / "augmented.zarr"
    task = get_task(args.env)
    cond = list(task.stl_config().get("calibrate_params") or [])
    sweep = list(args.sweep or task.sweep)
    t_all = time.perf_counter()
    aug_report: dict[str, Any] = {}
    if args.from_dir is None and not (args.reuse_data and augmented.exists()):
        print(f"collect {args.demos} demos ...", flush=True)
        stage_collect(demos, args.demos, seed=args.seed, workers=args.workers, task=task.name)
        stage_calibrate(demos, log=lambda s: None, task=task.name)
        print(f"augment {args.aug_demos} demos x {args.per_demo} ...", flush=True)
        aug_report = stage_augment(demos, augmented, args.per_demo, args.aug_demos, workers=args.workers,
                                   seed=args.seed, task=task.name)
    else:
        from stlflow.datasets import EpisodeStore

        aug_report = dict(EpisodeStore.open(augmented).attrs.get("augment_report") or {})
    from stlflow.datasets import EpisodeStore
    from stlflow.policy import Policy

    dataset_theta = {k: float(v) for k, v in EpisodeStore.open(demos).attrs["stl_params_dataset"].items()}
    policies: dict[str, Any] = {}
    guided_ok = bool(task.guided_rules)
    default_rows = {r[0] for r in ROWS if r[0] != "aug_rti"} if guided_ok else {r[0] for r in ROWS if not r[4]}
    wanted = default_rows if args.rows == "all" else set(args.rows.split(","))
    if not guided_ok and any(r[4] for r in ROWS if r[0] in wanted):
        raise SystemExit(f"{args.env} has no differentiable model for STL guidance: drop the guided rows")
    need = {r[2] for r in ROWS if r[0] in wanted and r[2]}
    if "aug" in need:
        ckpt = out / ("policy_aug_relabel" if args.relabel else "policy_aug")
        if args.from_dir and (src / "policy").exists() and not args.relabel:
            policies["aug"] = Policy.load(src / "policy")
        elif (ckpt / "policy.yaml").exists():
            policies["aug"] = Policy.load(ckpt)
        else:
            aug_data = augmented
            if args.relabel:  # hindsight labels: the θ each replayed trajectory satisfies tightly (+ margin)
                import shutil

                aug_data = out / "data" / "augmented_relabelled.zarr"
                shutil.rmtree(aug_data, ignore_errors=True)
                shutil.copytree(augmented, aug_data)
                stage_calibrate(aug_data, log=lambda s: None, task=task.name)
            policies["aug"] = stage_train([demos, aug_data], out / "data" / "train.zarr", ckpt, cond,
                                          args.train_steps, args.batch_size, seed=args.seed, task=task.name)
    for key, names in (("theta", cond), ("notheta", [])):
        if key in need:
            ckpt = out / f"policy_{key}"
            policies[key] = Policy.load(ckpt) if (ckpt / "policy.yaml").exists() else stage_train(
                [demos], out / "data" / "unused.zarr", ckpt, names, args.train_steps, args.batch_size,
                seed=args.seed, task=task.name)
    if args.cfg_scale is not None:
        for key in ("theta", "aug"):
            if key in policies:
                policies[key].guidance_scale = float(args.cfg_scale)
    thetas = [{**dataset_theta, "v_max": float(v)} for v in sweep]
    gopts = {"t_max": args.guidance_t_max, "particles": args.guidance_particles}
    if args.guidance_scale is not None:
        gopts["scale"] = args.guidance_scale
    results: dict[str, Any] = {}
    for key, label, pkey, controller, guided in ROWS:
        if key not in wanted:
            continue
        if args.relabel and pkey == "aug":
            label = label.replace("demos+aug", "demos+aug (θ relabelled)")
        print(f"row {label} ...", flush=True)
        policy = policies.get(pkey) if pkey else None
        m = evaluate_row(policy, controller, guided, thetas, args.episodes, args, gopts)
        spec = controller_spec(controller, args.k, task.guidance(dataset_theta, **gopts) if guided else None)
        samples = closed_loop_samples(
            policy, [args.eval_seed + 100000 + i for i in range(args.div_starts)],
            1 if controller == "expert" else args.div_samples, dataset_theta, controller=spec, task=task.name)
        m.update(sample_metrics(samples, cell=task.cell))
        results[key] = {"label": label, **m}
        print(f"  {json.dumps({k: v for k, v in m.items() if not isinstance(v, dict)})}", flush=True)

    head = ("| row | STL sat. @θ | collision | success | diversity (m) | route div. (m) | modes/start | "
            "valid div. (m) | valid modes/start | valid area (m²) | "
            "Spearman(v_max) | meets v_max | p50 ms | p99 ms | guidance ms/tick | episodes |")
    lines = [head, "|" + "---|" * 16]
    for r in results.values():
        lines.append(
            f"| {r['label']} | {r['stl_satisfaction']:.1%} | {r['collision']:.1%} | {r['success']:.1%} | "
            f"{r['diversity_m']:.3f} | {r['path_diversity_m']:.3f} | {r['modes_per_start']:.2f} | "
            f"{r['valid_diversity_m']:.3f} | {r['valid_modes_per_start']:.2f} | {r['valid_area_m2']:.3f} | "
            f"{r['spearman_vmax']:.3f} | "
            f"{r['meets_vmax']:.1%} | {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | "
            f"{r['guidance_ms_per_tick']:.2f} | {r['episodes']} |")
    table = "\n".join(lines)
    print()
    print(table)
    if aug_report:
        print(f"\naugmentation: {aug_report.get('n_accepted')} accepted of {aug_report.get('n_replayed')} replayed "
              f"(acceptance {aug_report.get('acceptance_rate', float('nan')):.1%}); throughput "
              f"{aug_report.get('satisfying_per_second', float('nan')):.2f} replay-verified satisfying trajectories/s "
              f"wall, {aug_report.get('model_satisfying_per_second', float('nan')):.1f} model-satisfying/s; diversity "
              f"per start state: random subset {aug_report.get('div_random', float('nan')):.3f} m -> selected "
              f"{aug_report.get('div_selected', float('nan')):.3f} m")
    others = {k: round(v, 3) for k, v in dataset_theta.items() if k != "v_max"}
    print(f"{args.env}: sweep v_max={sweep}; other θ={others}; "
          f"total {time.perf_counter() - t_all:.0f} s")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": results, "augment": aug_report,
                                                  "dataset_theta": dataset_theta, "table": table}, indent=1,
                                                 default=str))
    (out / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
