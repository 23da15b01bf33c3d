"""Training as a job: :func:`train_policy` (:class:`~stlflow.control.jobs.TrainJob`) -> the trained Policy.

Reads the store, splits episodes into train/validation, builds the chunk datasets (windows of To observations
and Tp actions, Diffusion Policy's padding) and the normaliser, makes the Policy (head and net from the job's
policy block, θ conditioning on ``cond_params``, the task's discrete action channels), and runs the
:class:`~stlflow.policy.trainer.Trainer` with the task's closed-loop evaluation as its callback. Under
``torchrun`` every process calls it; rank 0 logs and evaluates. With ``train.teacher`` (a flow checkpoint) a
``meanflow`` student is distilled and takes the teacher's normaliser (both must share the normalised space).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.control.jobs import JobError, TrainJob, conf_defaults
from stlflow.control.tasks import get_task


def train_config(job: TrainJob) -> Any:
    """:class:`~stlflow.policy.trainer.TrainConfig` of a job: ``conf/train/default.yaml`` with ``job.train`` on top.

    Options whose default is an integer must be integers (``train.steps=2.5`` is refused, ``2000.0`` accepted)."""
    from stlflow.policy.trainer import TrainConfig

    options = {**conf_defaults("train", "default"), **dict(job.train)}
    for name, f in TrainConfig.__dataclass_fields__.items():
        value = options.get(name)
        if isinstance(f.default, bool) or not isinstance(f.default, int) or name not in options:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise JobError(f"train.{name} must be an integer, got {value!r}")
        options[name] = int(value)
    try:
        return TrainConfig.from_dict(options)
    except (TypeError, ValueError) as err:
        raise JobError(f"bad train options: {err}") from err


def check_training_data(store: Any, path: Any, task: Any) -> None:
    """Refuse, before anything is written, a store a policy of ``task`` cannot be trained on: no episodes, no
    ``obs`` or ``action``, dimensions other than the env's, or a non-finite value (named by key and episode)."""
    if store.n_episodes == 0:
        raise JobError(f"{path} holds no episodes; record some with `stlflow collect out={path}`")
    missing = [k for k in ("obs", "action") if k not in store.keys]
    if missing:
        raise JobError(f"{path} has no {missing} arrays (keys: {store.keys}); a policy needs obs and action")
    for key, want in (("obs", task.info.obs_dim), ("action", task.info.action_dim)):
        got = int(np.prod(store.key_shape(key)))
        if got != want:
            raise JobError(f"{path}: {key} has {got} values per step but {task.name} ({task.env_id}) has {want}; "
                           f"was it recorded on another task? (name the task with env=...)")
    for i in range(store.n_episodes):
        episode = store.episode(i, keys=("obs", "action"))
        for key, values in episode.items():
            bad = ~np.isfinite(values)
            if bad.any():
                step = int(np.argwhere(bad)[0][0])
                raise JobError(f"{path}: episode {i} has a non-finite {key} value at step {step} "
                               f"({int(bad.sum())} in all); drop the episode (EpisodeStore.filter) or fix the data")


def train_policy(job: TrainJob) -> Any:
    """Train the policy of ``job`` and return it (the EMA weights, as saved to ``job.out``)."""
    import torch.distributed as dist

    from stlflow.datasets import EpisodeStore, split_episodes
    from stlflow.policy import Policy
    from stlflow.policy.data import ChunkData, episode_params
    from stlflow.policy.trainer import Trainer, init_distributed, seed_everything

    task = get_task(job.task)
    cfg, pc, log = train_config(job), dict(job.policy), job.log
    path = Path(job.data)
    if not path.exists():
        raise JobError(f"data store {path} does not exist (make one with `stlflow collect out={path}`)")
    store = EpisodeStore.open(path)
    check_training_data(store, path, task)
    rank, _ = init_distributed()
    names = [str(n) for n in pc.get("cond_params") or []]
    params = episode_params(store, names) if names else None
    train_idx, val_idx = split_episodes(store.n_episodes, float(job.val_ratio), seed=cfg.seed)
    win = dict(horizon=int(pc["horizon"]), n_obs_steps=int(pc["n_obs_steps"]), n_action_steps=int(pc["n_action_steps"]))
    train_data = ChunkData(store, episodes=train_idx, params=params, pad_after=job.pad_after, **win)
    val_data = (ChunkData(store, episodes=val_idx, params=params, pad_after=job.pad_after, **win)
                if len(val_idx) else None)
    normalizer = train_data.fit_normalizer()
    if cfg.teacher:  # distillation: the student shares the teacher's normalised space
        if pc["head"].get("kind") != "meanflow":
            raise JobError("train.teacher distils a policy=meanflow student from a flow policy")
        try:
            normalizer = Policy.load(cfg.teacher).normalizer
        except (FileNotFoundError, ValueError) as err:
            raise JobError(f"train.teacher: {err}") from err
    obs_dim, action_dim = store.key_shape("obs")[-1], store.key_shape("action")[-1]
    mask = np.asarray(task.info.discrete_action_mask, dtype=bool)  # (Da,): check_training_data matched Da

    seed_everything(cfg.seed)
    policy = Policy(
        obs_dim, action_dim, head=pc["head"], net=pc["net"], param_names=names, discrete_action_mask=mask,
        normalizer=normalizer, cfg_dropout=float(pc.get("cfg_dropout", 0.1)),
        guidance_scale=float(pc.get("guidance_scale", 1.0)), discrete_scale=float(pc.get("discrete_scale", 1.0)),
        **win)
    eval_fn = None
    if rank == 0 and int(job.eval_episodes) > 0:
        from stlflow.control.evaluate import evaluation_callback

        evaluate_policy = evaluation_callback(task.name, int(job.eval_episodes), seed=int(job.eval_seed),
                                              workers=int(job.eval_workers))

        def eval_fn(p: Any, step: int) -> dict[str, float]:
            out = {k: float(v) for k, v in evaluate_policy(p, step).items() if isinstance(v, (int, float, np.number))}
            log(f"stlflow train: step {step} closed-loop success {out.get('success_rate', float('nan')):.3f}")
            return out

    out = Path(job.out)
    created = not out.exists()
    try:
        trainer = Trainer(policy, train_data, cfg, out, val_data=val_data, eval_fn=eval_fn, resume=bool(job.resume))
        _fit(trainer, store, train_idx, val_idx, train_data, pc, policy, job, rank)
    except BaseException:
        if created and rank == 0 and not any(out.glob("checkpoints/*")):  # nothing worth keeping: leave nothing
            shutil.rmtree(out, ignore_errors=True)
        raise
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return Policy.load(job.out)


def _fit(trainer: Any, store: Any, train_idx: Any, val_idx: Any, train_data: Any, pc: dict, policy: Any,
         job: TrainJob, rank: int) -> dict:
    """Run the trainer, logging the set-up first and the result last (rank 0)."""
    log = job.log
    if rank == 0:
        log(f"stlflow train: {store.n_episodes} episodes ({len(train_idx)} train, {len(val_idx)} val), "
            f"{len(train_data)} windows; {pc['head']['kind']} head on {pc['net']['name']} "
            f"({policy.num_parameters() / 1e6:.2f}M parameters), lr {trainer.cfg.lr:g} -> {job.out}")
    last = trainer.fit()
    if rank == 0:
        shown = {k: round(v, 5) for k, v in last.items() if isinstance(v, float)}
        log(f"stlflow train: done at step {trainer.step}: {shown}; policy saved to {job.out}")
    return last
