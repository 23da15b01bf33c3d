"""Closed-loop evaluation of a checkpoint: success, STL satisfaction, collisions, per-tick latency and NFE.

    stlflow eval ckpt=DIR env=crossing controller=rti k=2 episodes=100 [workers=2] [delay=2] [videos=3] [out=DIR]
    stlflow eval ckpt=DIR env=pickplace +params.v_max=0.3 guidance.enabled=true guidance.particles=8 cfg_scale=1.25

`controller` picks a variant in conf/control/ (receding, full, cold, onestep, rti, expert) and `k` sets its solver
steps per tick; other options are `control.<key>=...` (e.g. control.t_start=0.3 control.renoise=false).
The env steps in lock-step with the controller at its control rate; episode i uses seed `seed+i`.
`guidance.enabled=true` steers every plan toward the task's rules at `params` (STL guidance through the task's
robot model; `guidance.particles=N` adds particle selection); `cfg_scale` sets a θ-conditioned policy's
classifier-free guidance scale.
Writes OUT/report.json, OUT/report.md (the table), OUT/success_vs_nfe.png, OUT/latency_hist.png and, with
videos=N, N MP4 files (imageio + ffmpeg, off-screen MuJoCo rendering).
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from stlflow.config import verb_config


def main(argv: list[str]) -> int:
    # `controller=NAME` is the user-facing alias of the Hydra group choice `control=NAME`
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("controller=")]
    cfg = verb_config("eval", [*argv, *(f"control={c}" for c in chosen[-1:])], __doc__)
    if cfg is None:
        return 0
    import torch

    from stlflow.control.evaluate import EXPERT, evaluate, write_report, write_videos

    torch.set_num_threads(1)  # per-tick latency is measured on one thread (see DESIGN.md findings)
    control = OmegaConf.to_container(cfg.control, resolve=True)
    name = control.pop("name")
    if cfg.k is not None:
        if "k" not in control:
            print(f"stlflow eval: controller {name!r} takes no k", file=sys.stderr)
            return 2
        control["k"] = int(cfg.k)
    if name != EXPERT and cfg.ckpt is None:
        print("stlflow eval: ckpt=DIR is required (or controller=expert)", file=sys.stderr)
        return 2
    policy = None if name == EXPERT else str(cfg.ckpt)
    params = OmegaConf.to_container(cfg.params, resolve=True) or {}
    try:
        if cfg.cfg_scale is not None and policy is not None:
            from stlflow.policy import Policy

            policy = Policy.load(policy)
            policy.guidance_scale = float(cfg.cfg_scale)
        if cfg.guidance.enabled:
            control["guidance"] = _guidance(cfg, params)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"stlflow eval: {err}", file=sys.stderr)
        return 2
    try:
        report = evaluate(policy, cfg.env.id, int(cfg.episodes), seed=int(cfg.seed), workers=int(cfg.workers),
                          controller=name, controller_kw=control, delay=int(cfg.delay), max_steps=cfg.max_steps,
                          stl_params=params, env_kwargs=dict(cfg.env.get("kwargs") or {}),
                          progress=bool(cfg.progress))
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"stlflow eval: {err}", file=sys.stderr)
        return 2
    report["ckpt"] = None if cfg.ckpt is None else str(cfg.ckpt)
    if "guidance" in control:
        report["guidance"] = repr(control["guidance"])
    paths = write_report([report], cfg.out, title=f"stlflow eval {cfg.ckpt or EXPERT}")
    if int(cfg.videos) > 0:
        seeds = [int(cfg.seed) + i for i in range(min(int(cfg.videos), int(cfg.episodes)))]
        paths_v = write_videos(policy, cfg.env.id, seeds, cfg.out, controller=name, controller_kw=control,
                               delay=int(cfg.delay), max_steps=cfg.max_steps,
                               env_kwargs=dict(cfg.env.get("kwargs") or {}))
        print("videos: " + ", ".join(str(p) for p in paths_v))
    print(paths["markdown"].read_text())
    print(f"report: {paths['json']}  plots: {paths['success_vs_nfe']}, {paths['latency_hist']}")
    return 0


def _guidance(cfg, params: dict):
    """The task's STL guidance at the requested θ (unrequested rule parameters: the env's defaults)."""
    from stlflow.pipeline import TASKS

    task = str(cfg.env.name)
    if task not in TASKS or TASKS[task].guidance is None:
        raise ValueError(f"no STL guidance model for env {task!r}; tasks with one: "
                         f"{sorted(k for k, w in TASKS.items() if w.guidance is not None)}")
    opts = {"t_max": float(cfg.guidance.t_max), "particles": int(cfg.guidance.particles)}
    if cfg.guidance.scale is not None:
        opts["scale"] = float(cfg.guidance.scale)
    return TASKS[task].guidance({k: float(v) for k, v in params.items()}, **opts)
