"""One trainer for every head and network: AdamW, warm-up + cosine LR, EMA, exact resume, DDP.

Reproducibility: all training randomness (the data order and the heads' noise/times, the θ dropout) is a
function of ``(seed, step)``: the data order comes from a seeded ``DistributedSampler`` per epoch, and the
noise for the *global* batch of step s is drawn from a generator seeded with ``(seed, s)``; each rank takes
its rows. A run stopped and resumed therefore reproduces the uninterrupted run's losses, and a distributed
run with N processes sees exactly the samples and noise of a single-process run with the same global batch.
(The global RNG states are saved and restored too, for anything else that draws from them.)

Output directory layout::

    out/                      final EMA policy: policy.yaml, model.safetensors, normalizer.safetensors
    out/metrics.csv           per step: step, loss, lr, grad_norm, ema_decay, samples_per_s
    out/val.csv               per validation: step, val_loss, and the eval callback's metrics
    out/checkpoints/step_XXXXXXXX/   live policy + ema.safetensors + training_state.pt (keep-last-K)
    out/checkpoints/latest    name of the newest checkpoint
    out/tb/                   TensorBoard events, when tensorboard is installed

Checkpoints (periodic, latest, final) are written atomically and verified (:mod:`stlflow.policy.checkpoint`):
each ``step_XXXXXXXX`` folder is built in a temporary sibling and renamed into place, its ``policy.yaml``
records the sha256 of all four files, and ``latest`` is replaced atomically once the folder is in place; the
final policy replaces the one in ``out/`` through an atomic swap of ``out/policy.yaml``. ``resume=True``
verifies the checkpoint ``latest`` names; when ``latest`` or its training state is missing, empty, truncated
or corrupted it falls back to the newest intact kept checkpoint with a warning naming both, and raises
:class:`~stlflow.policy.checkpoint.CheckpointError` when no kept checkpoint is intact. Keeping, pruning, reading
back and the resume fallback: :mod:`stlflow.policy.train_checkpoints`.

Distributed: launch with ``torchrun --nproc_per_node=N -m stlflow train ...``; the process group is
initialised from the environment (gloo on CPU, NCCL on GPU). ``batch_size`` is the global batch. Rank 0
logs, validates, evaluates and writes checkpoints.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from stlflow.policy.checkpoint import atomic_write_text, clean_stale
from stlflow.policy.distill import Distiller
from stlflow.policy.policy import Policy
from stlflow.policy.train_checkpoints import (
    EMA_FILE,
    LATEST_FILE,
    STATE_FILE,
    find_resume_point,
    prune_checkpoints,
    rng_state,
    set_rng_state,
)

__all__ = ["TrainConfig", "Trainer", "EMA", "adamw", "ema_decay", "lr_lambda"]

EvalFn = Callable[[Policy, int], dict[str, float]]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # train.precision -> autocast dtype (None: no autocast)


@dataclass
class TrainConfig:
    """Training hyper-parameters (``conf/train/*.yaml``)."""

    steps: int = 20000  # optimiser steps
    batch_size: int = 256  # global batch (divided across DDP ranks)
    lr: float | None = None  # peak learning rate; None: the head's ``default_lr`` (3e-4 DDPM / flow, 1e-3 MeanFlow)
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = 500
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    ema_power: float = 0.75  # EMA decay 1 - (1 + step / inv_gamma)^-power, clipped to [ema_min, ema_max]
    ema_inv_gamma: float = 1.0
    ema_min: float = 0.0
    ema_max: float = 0.9999
    val_every: int = 1000  # steps between validation losses (0 = only at the end)
    val_batches: int = 8
    eval_every: int = 0  # steps between closed-loop evaluations (0 = only at the end, when eval_fn is set)
    ckpt_every: int = 1000  # steps between checkpoints (the final step is always saved)
    keep_last: int = 3  # periodic checkpoints kept
    seed: int = 0
    threads: int = 1  # torch threads on CPU (0 = leave torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    tensorboard: bool = True
    teacher: str | None = None  # a flow policy checkpoint to distil a meanflow policy from (distill.Distiller)
    distil: str = "velocity"  # velocity (teacher velocity in the MeanFlow loss) | trajectory (flow-map regression)
    distil_pairs: int = 4  # trajectory: grid pairs per teacher path (batch_size // distil_pairs paths per step)
    distil_steps: int = 0  # trajectory: teacher solver steps per path (0: the teacher's default)
    # fp32 | bf16: bfloat16 autocast over the training forward and loss; weights, gradients, AdamW, EMA, validation
    # and checkpoints stay fp32 (benchmarks/train_throughput.py measures each against Diffusion Policy's step)
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown train options {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(float(b) for b in d["betas"])
        return cls(**d)


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def ema_decay(step: int, power: float = 0.75, inv_gamma: float = 1.0, lo: float = 0.0, hi: float = 0.9999) -> float:
    """EMA decay at optimiser step ``step`` (power schedule of Diffusion Policy / diffusers): 0 at step 0."""
    if step <= 0:
        return 0.0
    return float(min(hi, max(lo, 1.0 - (1.0 + step / inv_gamma) ** -power)))


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.cfg = cfg
        self.decay = 0.0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        c = self.cfg
        self.decay = d = ema_decay(step, c.ema_power, c.ema_inv_gamma, c.ema_min, c.ema_max)
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.mul_(d).add_(p.detach(), alpha=1 - d)
        for be, b in zip(self.model.buffers(), model.buffers()):
            be.copy_(b)


def adamw(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters) where the parameters' device supports it.

    On CPU the default per-tensor loop costs ~3x the fused step for the 1.2M-parameter MLP (6.2 against 2.1 ms in
    ``benchmarks/train_throughput.py --kernels``); the update is the same AdamW (tests/test_trainer.py).
    """
    params = list(params)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if params and params[0].device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):  # a dtype or device without a fused kernel
            pass
    return torch.optim.AdamW(params, **kw)


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def init_distributed() -> tuple[int, int]:
    """Initialise the process group from torchrun's environment when WORLD_SIZE > 1; return (rank, world)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Train a :class:`Policy` on batches from ``train_data`` (``len()`` and ``batch(indices) -> dict``).

    Args:
        policy: the policy to train (its normaliser already fitted).
        train_data, val_data: e.g. :class:`stlflow.policy.data.ChunkData`.
        cfg: :class:`TrainConfig`.
        out_dir: output directory (layout in the module docstring).
        eval_fn: ``eval_fn(ema_policy, step) -> {metric: value}``, closed-loop evaluation (rank 0 only).
        resume: continue from ``out_dir/checkpoints/latest`` when it exists (verified; the newest intact kept
            checkpoint when that one is damaged, with a warning; a ``CheckpointError`` when none is intact).
    """

    def __init__(
        self,
        policy: Policy,
        train_data: Any,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        val_data: Any = None,
        eval_fn: EvalFn | None = None,
        resume: bool = False,
    ):
        self.cfg, self.out = cfg, Path(out_dir)
        self.rank, self.world = init_distributed()
        self.device = _device(cfg.device)
        if self.device.type == "cpu" and cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"train.precision={cfg.precision!r} is not one of {sorted(PRECISIONS)}")
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes {self.world}")
        self.local_batch = cfg.batch_size // self.world
        if len(train_data) < cfg.batch_size:
            raise ValueError(
                f"the training set has {len(train_data)} windows, fewer than batch_size={cfg.batch_size}; "
                f"lower train.batch_size"
            )
        self.train_data, self.val_data, self.eval_fn = train_data, val_data, eval_fn
        self.policy = policy.to(self.device)
        if cfg.lr is None:  # the head's own default (Head.default_lr); the resolved value is what is saved
            cfg = self.cfg = replace(cfg, lr=float(self.policy.head.default_lr))
        self.ema = EMA(self.policy, cfg)
        # The training loss of the live and of the EMA policy: the policies themselves, or their distillers.
        self.loss_fn: Policy | Distiller = self.policy
        self.ema_loss_fn: Policy | Distiller = self.ema.model
        if cfg.teacher:
            teacher = Policy.load(cfg.teacher, map_location=self.device)  # one teacher object for both
            kw = dict(mode=cfg.distil, pairs=cfg.distil_pairs, steps=cfg.distil_steps or None)
            self.loss_fn = Distiller(self.policy, teacher, **kw)
            self.ema_loss_fn = Distiller(self.ema.model, teacher, **kw)
        self.model: nn.Module = self.loss_fn
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.loss_fn, device_ids=ids)
        self.opt = adamw(self.policy.parameters(), cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_lambda(s, max(1, cfg.warmup_steps), cfg.steps))
        self.sampler = torch.utils.data.distributed.DistributedSampler(
            range(len(train_data)), num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed,
            drop_last=True)
        self.batches_per_epoch = len(self.sampler) // self.local_batch
        self._epoch_cache: tuple[int, list[int]] | None = None
        self.step = 0
        self.history: list[dict[str, float]] = []
        if resume:
            self._resume()
        self._writer = None

    def autocast(self) -> torch.autocast:
        """The training forward's autocast context (``train.precision``; disabled for fp32)."""
        dtype = PRECISIONS[self.cfg.precision]
        return torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    # ------------------------------------------------------------------ data and noise
    def _indices(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._epoch_cache = (epoch, list(iter(self.sampler)))
        return self._epoch_cache[1][j * self.local_batch : (j + 1) * self.local_batch]

    def _noise(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        noise = self.loss_fn.draw_noise(self.cfg.batch_size, generator=g)
        return {k: v[self.rank :: self.world].to(self.device) for k, v in noise.items()}

    # ------------------------------------------------------------------ logging
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _tb(self):
        if self._writer is None and self.cfg.tensorboard and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tb"))
            except ImportError:  # tensorboard not installed: CSV only
                self._writer = False
        return self._writer or None

    def _append_csv(self, name: str, row: dict[str, Any]) -> None:
        path = self.out / name
        new = not path.exists()
        fields = list(row)
        if not new:
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
            if header and set(fields) <= set(header):
                fields = header
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def _truncate_csv(self, name: str, step: int) -> None:
        """Drop rows at or after ``step`` (written by an interrupted run after its last checkpoint)."""
        path = self.out / name
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) < step]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_XXXXXXXX`` atomically (rank 0), point ``latest`` at it, prune to ``keep_last``."""
        root = self._ckpt_root()
        d = root / f"step_{self.step:08d}"
        if self.is_main:
            from safetensors.torch import save_file

            ema = {k: v.detach().cpu().contiguous() for k, v in self.ema.model.state_dict().items()}
            state = {"step": self.step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                     "ema_decay": self.ema.decay, "rng": rng_state(), "config": asdict(self.cfg),
                     "world_size": self.world}
            self.policy.save(d, extra_files={EMA_FILE: lambda p: save_file(ema, str(p)),
                                             STATE_FILE: lambda p: torch.save(state, p)})
            clean_stale(root, (f".{LATEST_FILE}.tmp-", ".trash-"))
            atomic_write_text(root / LATEST_FILE, d.name)
            prune_checkpoints(root, d, self.step, self.cfg.keep_last)
        if self.world > 1:
            dist.barrier()
        return d

    def _resume(self) -> None:
        """Continue from the newest intact checkpoint (:func:`~stlflow.policy.train_checkpoints.find_resume_point`),
        warning when that is not the one ``latest`` names."""
        root = self._ckpt_root()
        found = find_resume_point(root, self.policy)
        if found is None:
            if self.is_main:
                print(f"stlflow train: no checkpoint in {root}, starting from step 0")
            return
        d, state = found.path, found.state
        self.policy.load_state_dict(found.model)
        self.ema.model.load_state_dict(found.ema)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ema.decay = state["ema_decay"]
        self.step = int(state["step"])
        set_rng_state(state["rng"])
        if self.is_main:
            if found.problems:
                warnings.warn(f"stlflow train: the latest checkpoint {found.wanted} is not usable "
                              f"({'; '.join(found.problems)}); "
                              f"resuming from the newest intact checkpoint {d} (step {self.step})",
                              RuntimeWarning, stacklevel=3)
            for name in ("metrics.csv", "val.csv"):
                self._truncate_csv(name, self.step)
            print(f"stlflow train: resumed from {d} at step {self.step}")

    # ------------------------------------------------------------------ validation / eval
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss of the EMA policy over up to ``val_batches`` validation batches (fixed noise)."""
        if self.val_data is None or len(self.val_data) == 0:
            return None
        n = len(self.val_data)
        b = min(self.cfg.batch_size, n)
        losses = []
        for i in range(min(self.cfg.val_batches, max(1, n // b))):
            idx = np.arange(i * b, (i + 1) * b) % n
            g = torch.Generator().manual_seed(self.cfg.seed + 7919 * (i + 1))
            batch = {k: v.to(self.device) for k, v in self.val_data.batch(idx).items()}
            noise = {k: v.to(self.device) for k, v in self.ema_loss_fn.draw_noise(len(idx), generator=g).items()}
            losses.append(float(self.ema_loss_fn.compute_loss(batch, noise)))
        return float(np.mean(losses))

    def _validate_and_eval(self, do_eval: bool) -> dict[str, float]:
        row: dict[str, Any] = {"step": self.step}
        val = self.validate()
        if val is not None:
            row["val_loss"] = val
        if do_eval and self.eval_fn is not None:
            row.update({f"eval/{k}": float(v) for k, v in self.eval_fn(self.ema.model, self.step).items()})
        if len(row) > 1:
            self._append_csv("val.csv", row)
            tb = self._tb()
            if tb:
                for k, v in row.items():
                    if k != "step":
                        tb.add_scalar(k, v, self.step)
        return row

    # ------------------------------------------------------------------ loop
    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train from the current step to ``until`` (default ``cfg.steps``); returns the last metrics.

        Writes a checkpoint at ``until``; at ``cfg.steps`` also the final EMA policy in ``out_dir``.
        """
        cfg = self.cfg
        until = cfg.steps if until is None else min(int(until), cfg.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        self.policy.train()
        bar = None
        if self.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        last: dict[str, Any] = {}
        t_last = time.perf_counter()
        while self.step < until:
            batch = {k: v.to(self.device) for k, v in self.train_data.batch(self._indices(self.step)).items()}
            noise = self._noise(self.step)
            with self.autocast():
                loss = self.model(batch, noise)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
            self.opt.step()
            lr = self.sched.get_last_lr()[0]
            self.sched.step()
            self.step += 1
            self.ema.update(self.policy, self.step)
            loss_v = loss.detach()
            if self.world > 1:
                dist.all_reduce(loss_v)
                loss_v /= self.world
            now = time.perf_counter()
            row = {"step": self.step - 1, "loss": float(loss_v), "lr": lr, "grad_norm": float(gn),
                   "ema_decay": self.ema.decay, "samples_per_s": cfg.batch_size / max(now - t_last, 1e-9)}
            t_last = now
            self.history.append(row)
            if self.is_main:
                self._append_csv("metrics.csv", row)
                tb = self._tb()
                if tb:
                    for k in ("loss", "lr", "grad_norm"):
                        tb.add_scalar(f"train/{k}", row[k], row["step"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            final = self.step == cfg.steps
            if self.is_main and ((cfg.val_every and self.step % cfg.val_every == 0) or
                                 (cfg.eval_every and self.step % cfg.eval_every == 0) or final):
                do_eval = final or bool(cfg.eval_every and self.step % cfg.eval_every == 0)
                res = self._validate_and_eval(do_eval)
                if bar is not None and "val_loss" in res:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{res['val_loss']:.4f}")
                last.update(res)
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == until:
                self.save_checkpoint()
            last.update(row)
        if bar is not None:
            bar.close()
        if self.step == cfg.steps and self.is_main:
            self.policy.save(self.out, state_dict=self.ema.model.state_dict())
        if self.world > 1:
            dist.barrier()
        if self._writer:
            self._writer.flush()
        return last
