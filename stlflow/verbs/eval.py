"""Closed-loop evaluation of a checkpoint: success, STL satisfaction, collisions, per-tick latency and NFE.

    stlflow eval ckpt=DIR env=crossing controller=rti k=2 episodes=100 [workers=2] [delay=2] [videos=3] [out=DIR]
    stlflow eval ckpt=DIR env=pickplace +stl_params.v_max=0.3 guidance.enabled=true guidance.particles=8 cfg_scale=1.25

`controller` picks a variant in conf/control/ (receding, full, cold, onestep, rti, expert) and `k` sets its solver
steps per tick; other options are `control.<key>=...` (e.g. control.t_start=0.3 control.renoise=false).
The env steps in lock-step with the controller at its control rate; episode i uses seed `seed+i`.
`guidance.enabled=true` steers every plan toward the task's rules at `stl_params` (STL guidance through the task's
robot model; `guidance.particles=N` adds particle selection); `cfg_scale` sets a θ-conditioned policy's
classifier-free guidance scale.
Writes OUT/report.json, OUT/report.md (the table), OUT/success_vs_nfe.png, OUT/latency_hist.png and, with
videos=N, N MP4 files (imageio + ffmpeg, off-screen MuJoCo rendering).
"""

from __future__ import annotations

from stlflow.config import controller_options, plain, run_job, verb_config


def main(argv: list[str]) -> int:
    # `controller=NAME` is the user-facing alias of the Hydra group choice `control=NAME`
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("controller=")]
    cfg = verb_config("eval", [*argv, *(f"control={c}" for c in chosen[-1:])], __doc__)
    if cfg is None:
        return 0
    return run_job("eval", lambda: evaluate_from_config(cfg))


def evaluate_from_config(cfg) -> int:
    import torch

    from stlflow.control.controllers import EXPERT, ControllerSpec
    from stlflow.control.evaluate import evaluate, write_report, write_videos
    from stlflow.control.jobs import EvalJob
    from stlflow.control.tasks import get_task

    torch.set_num_threads(1)  # per-tick latency is measured on one thread
    control = controller_options(cfg)
    task = get_task(str(cfg.env.name))
    params = plain(cfg.stl_params) or {}
    policy = None if control["name"] == EXPERT else str(cfg.ckpt)
    if cfg.cfg_scale is not None and policy is not None:
        from stlflow.policy import Policy

        policy = Policy.load(policy)
        policy.guidance_scale = float(cfg.cfg_scale)
    guidance = None
    if cfg.guidance.enabled:
        opts = {"t_max": float(cfg.guidance.t_max), "particles": int(cfg.guidance.particles)}
        if cfg.guidance.scale is not None:
            opts["scale"] = float(cfg.guidance.scale)
        guidance = task.guidance(params, **opts)
    job = EvalJob(task.name, policy, ControllerSpec.from_dict(control, guidance=guidance), int(cfg.episodes),
                  seed=int(cfg.seed), workers=int(cfg.workers), delay=int(cfg.delay), max_steps=cfg.max_steps,
                  stl_params=params, env_kwargs=plain(cfg.env.get("kwargs") or {}), progress=bool(cfg.progress))
    report = evaluate(job)
    report.extra["ckpt"] = None if cfg.ckpt is None else str(cfg.ckpt)
    paths = write_report([report], cfg.out, title=f"stlflow eval {cfg.ckpt or EXPERT}")
    if int(cfg.videos) > 0:
        seeds = [int(cfg.seed) + i for i in range(min(int(cfg.videos), int(cfg.episodes)))]
        print("videos: " + ", ".join(str(p) for p in write_videos(job, seeds, cfg.out)))
    print(paths["markdown"].read_text())
    print(f"report: {paths['json']}  plots: {paths['success_vs_nfe']}, {paths['latency_hist']}")
    return 0
