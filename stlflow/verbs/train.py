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

import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from stlflow.config import verb_config


def _discrete_mask(env_id: str, action_dim: int) -> np.ndarray:
    """The env's ``discrete_action_mask`` (all False when the env cannot be built here)."""
    try:
        import gymnasium as gym

        import stlflow.envs  # noqa: F401  (registers the ids)

        env = gym.make(env_id)
        mask = np.asarray(getattr(env.unwrapped, "discrete_action_mask", np.zeros(action_dim, bool)), bool)
        env.close()
    except Exception as err:  # noqa: BLE001 - report and carry on without discrete channels
        print(f"stlflow train: could not read the discrete action mask of {env_id} ({err}); using none")
        return np.zeros(action_dim, bool)
    if mask.shape != (action_dim,):
        raise SystemExit(f"stlflow train: env {env_id} has {mask.shape[0]} action channels, the data {action_dim}")
    return mask


def _eval_fn(cfg: Any):
    """Closed-loop evaluation callback (stlflow.control.evaluate), or None when unavailable/disabled."""
    if int(cfg.eval_episodes) <= 0:
        return None
    try:
        from stlflow.control.evaluate import evaluate_policy
    except ImportError as err:
        print(f"stlflow train: periodic closed-loop evaluation skipped ({err})")
        return None

    def eval_fn(policy, step: int) -> dict[str, float]:
        metrics = evaluate_policy(policy, cfg.env.id, episodes=int(cfg.eval_episodes), seed=int(cfg.eval_seed),
                                  workers=int(cfg.eval_workers))
        out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number))}
        print(f"stlflow train: step {step} closed-loop success {out.get('success_rate', float('nan')):.3f}")
        return out

    return eval_fn


def main(argv: list[str]) -> int:
    cfg = verb_config("train", argv, __doc__)
    if cfg is None:
        return 0
    from stlflow.datasets import EpisodeStore, split_episodes
    from stlflow.policy import Policy
    from stlflow.policy.data import ChunkData, episode_params
    from stlflow.policy.trainer import TrainConfig, Trainer, init_distributed, seed_everything

    train_cfg = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))
    pc = OmegaConf.to_container(cfg.policy, resolve=True)
    rank, _ = init_distributed()
    path = Path(cfg.data)
    if not path.exists():
        print(f"stlflow train: data store {path} does not exist (make one with `stlflow collect out={path}`)",
              file=sys.stderr)
        return 2
    store = EpisodeStore.open(path)
    names = [str(n) for n in pc.get("cond_params") or []]
    params = episode_params(store, names) if names else None
    train_idx, val_idx = split_episodes(store.n_episodes, float(cfg.val_ratio), seed=train_cfg.seed)
    win = dict(horizon=int(pc["horizon"]), n_obs_steps=int(pc["n_obs_steps"]), n_action_steps=int(pc["n_action_steps"]))
    pad_after = cfg.get("pad_after")  # None: ChunkData's default, Tp - To
    train_data = ChunkData(store, episodes=train_idx, params=params, pad_after=pad_after, **win)
    val_data = ChunkData(store, episodes=val_idx, params=params, pad_after=pad_after, **win) if len(val_idx) else None
    normalizer = train_data.fit_normalizer()
    if train_cfg.teacher:  # distillation: the student shares the teacher's normalised space (Policy.set_teacher)
        if pc["head"].get("kind") != "meanflow":
            print("stlflow train: train.teacher distils a policy=meanflow student from a flow policy",
                  file=sys.stderr)
            return 2
        try:
            normalizer = Policy.load(train_cfg.teacher).normalizer
        except (FileNotFoundError, ValueError) as err:
            print(f"stlflow train: train.teacher: {err}", file=sys.stderr)
            return 2
    obs_dim, action_dim = store.key_shape("obs")[-1], store.key_shape("action")[-1]

    seed_everything(train_cfg.seed)
    policy = Policy(
        obs_dim, action_dim, head=pc["head"], net=pc["net"], param_names=names,
        discrete_action_mask=_discrete_mask(cfg.env.id, action_dim), normalizer=normalizer,
        cfg_dropout=float(pc.get("cfg_dropout", 0.1)), guidance_scale=float(pc.get("guidance_scale", 1.0)),
        discrete_scale=float(pc.get("discrete_scale", 1.0)), **win,
    )
    trainer = Trainer(policy, train_data, train_cfg, cfg.out, val_data=val_data,
                      eval_fn=_eval_fn(cfg) if rank == 0 else None, resume=bool(cfg.resume))
    if rank == 0:
        print(f"stlflow train: {store.n_episodes} episodes ({len(train_idx)} train, {len(val_idx)} val), "
              f"{len(train_data)} windows; {pc['head']['kind']} head on {pc['net']['name']} "
              f"({policy.num_parameters() / 1e6:.2f}M parameters), lr {trainer.cfg.lr:g} -> {cfg.out}")
    last = trainer.fit()
    if rank == 0:
        shown = {k: round(v, 5) for k, v in last.items() if isinstance(v, float)}
        print(f"stlflow train: done at step {trainer.step}: {shown}; policy saved to {cfg.out}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0
