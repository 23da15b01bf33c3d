"""Train a diffusion / flow / one-step flow policy on an EpisodeStore.

  stlflow train env=crossing policy=flow data=demos.zarr out=ckpt [train.steps=N] [net=unet] [train=tiny]
  torchrun --nproc_per_node=2 -m stlflow train ...      (DistributedDataParallel; train.batch_size is global)

policy=ddpm|flow|meanflow picks the head, net=mlp|unet|unet_dp the network, train=default|tiny the trainer
settings. The final EMA policy is written to out/ (``Policy.load(out)``); training state, periodic checkpoints
(keep-last-K) and metrics to out/checkpoints, out/metrics.csv and out/val.csv. resume=true continues from
out/checkpoints/latest. train.teacher=DIR (with policy=meanflow) distils the one-step policy from a trained
flow policy DIR: the teacher's velocity replaces the noisy per-sample target (same data and window as the
teacher's; the student takes the teacher's normaliser); train.distil=trajectory instead regresses the student on
the teacher's own sampling paths (flow-map distillation, no JVP). With policy.cond_params=[v_max,...] the policy is
conditioned on the episodes' calibrated STL parameters (attribute stl_params, from `stlflow calibrate`).
Closed-loop evaluation on the env's task runs every train.eval_every steps and at the end (eval_episodes
episodes; 0 turns it off).
"""

from __future__ import annotations

from stlflow.config import plain, run_job, verb_config


def main(argv: list[str]) -> int:
    cfg = verb_config("train", argv, __doc__)
    if cfg is None:
        return 0
    from stlflow.control.jobs import TrainJob
    from stlflow.control.training import train_policy

    def run() -> int:
        job = TrainJob(str(cfg.env.name), cfg.data, cfg.out, policy=plain(cfg.policy), train=plain(cfg.train),
                       val_ratio=float(cfg.val_ratio), pad_after=cfg.get("pad_after"),
                       eval_episodes=int(cfg.eval_episodes), eval_seed=int(cfg.eval_seed),
                       eval_workers=int(cfg.eval_workers), resume=bool(cfg.resume))
        train_policy(job)
        return 0

    return run_job("train", run)
