"""Training throughput of the policy networks, side by side in one run (samples/s of full training steps).

Compares the 1-D temporal U-Net at Diffusion Policy's low-dim default (down_dims 256/512/1024, time
embedding 256, ~65M parameters) with our CPU-sized configurations (U-Net 32/64/128 and the residual MLP), each
as a flow policy on random data with the task's dimensions (Crossing: Do = 20, Da = 2; To = 2, Tp = 16).
A training step is the trainer's: normalisation, condition, loss, backward, grad clipping, AdamW, EMA update.

    python benchmarks/train_throughput.py                     # 20 s per configuration, batch 256, 1 thread
    python benchmarks/train_throughput.py --seconds 5 --threads 2 --configs unet_dp,unet
    python benchmarks/train_throughput.py --kernels           # MeanFlow's JVP and AdamW: the two implementations
    python benchmarks/train_throughput.py --vs-dp             # DP's U-Net: our step per option vs DP's step

``--vs-dp`` times, interleaved round by round at 1 and 2 threads, whole training steps at Diffusion Policy's low-dim
U-Net configuration (``unet_dp``, DDPM ε-loss, batch 256, Push-T dimensions Do = 20, Da = 2). The anchor is DP's
training step re-implemented here in plain eager fp32 PyTorch as DP's code runs it on a CPU (:class:`DPReferenceStep`:
its layer structure, DDPM noising, masked MSE, per-tensor AdamW, cosine LR, its per-module EMA). Against it: our
trainer's step with each training option, i.e. torch's own convolution backward (our step before the GEMM weight
gradient), the default fp32 step, and ``train.precision=bf16``. It prints each one's median step time and the median
over rounds of its per-round speed-up over the anchor, then the issue's target line (>= 1.3x).

``--kernels`` times, side by side, the two pieces of a MeanFlow training step the trainer implements two ways:
du/dt over a quarter of the batch (the r < t rows) by the MLP's hand-written ``forward_jvp`` and by
``torch.func.jvp``, and the AdamW step fused and per-tensor; then whole MeanFlow steps (MLP) with either JVP.

Figures depend on the machine and its load; the script prints them, nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stlflow.control.workers import limit_threads
from stlflow.policy import Policy
from stlflow.policy.heads import squared_cosine_alphas_cumprod
from stlflow.policy.nets import Conv1d
from stlflow.policy.trainer import TrainConfig, Trainer

CONFIGS = {
    "unet_dp": {"name": "unet", "down_dims": [256, 512, 1024], "time_embed_dim": 256},
    "unet_64": {"name": "unet", "down_dims": [64, 128, 256], "time_embed_dim": 64},
    "unet": {"name": "unet", "down_dims": [32, 64, 128], "time_embed_dim": 64},
    "mlp": {"name": "mlp", "width": 256, "n_blocks": 4, "time_embed_dim": 64},
}


class _OwnBatches:
    """Stands in for the trainer's dataset: :func:`measure` feeds one random batch itself (no data loading)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, indices):
        raise NotImplementedError("measure() feeds its own batch")


def build_trainer(policy: Policy, batch: int, lr: float, precision: str = "fp32") -> Trainer:
    """The trainer for ``policy`` (its optimiser, EMA, autocast; on the CPU, torch's thread count kept)."""
    cfg = TrainConfig(lr=lr, batch_size=batch, device="cpu", threads=0, progress=False, tensorboard=False,
                      precision=precision)
    with tempfile.TemporaryDirectory(prefix="stlflow_throughput_") as tmp:  # the trainer writes nothing until fit
        return Trainer(policy, _OwnBatches(batch), cfg, tmp)


def set_conv_weight_grad(module: nn.Module, kind: str) -> None:
    """``auto`` (the default), ``gemm`` or ``aten`` (torch's own backward) weight gradient for every :class:`Conv1d`."""
    for m in module.modules():
        if isinstance(m, Conv1d):
            m.weight_grad = kind


def trainer_step(net: dict, head: str | dict, obs_dim: int, action_dim: int, batch: int):
    """(policy, trainer, step(precision) -> seconds): one of the trainer's training steps on a fixed random batch.

    A step is the trainer's: the loss under ``train.precision``'s autocast, backward, grad clipping, fused AdamW,
    EMA update; ``precision`` is switched per call on the same policy, optimiser and EMA.
    """
    torch.manual_seed(0)
    policy = Policy(obs_dim, action_dim, 2, 16, 8, head=head if isinstance(head, dict) else {"kind": head}, net=net)
    trainer = build_trainer(policy, batch, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b = {"obs": torch.randn(batch, 2, obs_dim, generator=g), "action": torch.rand(batch, 16, action_dim, generator=g)}

    def step(precision: str = "fp32") -> float:
        t0 = time.perf_counter()
        trainer.cfg = replace(trainer.cfg, precision=precision)
        with trainer.autocast():
            loss = policy.compute_loss(b, policy.draw_noise(batch, generator=g))
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        trainer.opt.step()
        trainer.step += 1
        trainer.ema.update(policy, trainer.step)
        return time.perf_counter() - t0

    return policy, trainer, step


def measure(net: dict, head: str | dict, obs_dim: int, action_dim: int, batch: int, seconds: float, warmup: int = 2,
            precision: str = "fp32"):
    """(parameters, samples/s, ms/step) of the trainer's step, timed for ``seconds`` after ``warmup`` steps."""
    policy, _, step = trainer_step(net, head, obs_dim, action_dim, batch)
    for _ in range(warmup):
        step(precision)
    steps, elapsed = 0, 0.0
    while elapsed < seconds or steps < 3:
        elapsed += step(precision)
        steps += 1
    return policy.num_parameters(), steps * batch / elapsed, 1000 * elapsed / steps


# ---------------------------------------------------------------------------------------------- the DP anchor
# Diffusion Policy's training step, re-implemented for this benchmark from its published configuration and training
# loop (not DP's code): the anchor of --vs-dp. It is deliberately independent of stlflow.policy.nets, so that
# optimising our U-Net cannot move the anchor.
def _dp_conv_block(c_in: int, c_out: int, k: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.GroupNorm(groups, c_out), nn.Mish())


class _DPResidualBlock(nn.Module):
    """Two (Conv1d, GroupNorm, Mish) blocks, FiLM (scale, bias) from Mish -> Linear of the condition after the
    first, a 1x1 convolution on the residual path when the channel count changes."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, k: int, groups: int):
        super().__init__()
        self.blocks = nn.ModuleList([_dp_conv_block(c_in, c_out, k, groups), _dp_conv_block(c_out, c_out, k, groups)])
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.residual_conv = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, bias = self.cond_encoder(cond).view(x.shape[0], 2, -1, 1).unbind(1)
        return self.blocks[1](scale * self.blocks[0](x) + bias) + self.residual_conv(x)


class DPUNetReference(nn.Module):
    """DP's ConditionalUnet1D layer structure (global condition, FiLM scale and bias): ``(B, Tp, Da) -> (B, Tp, Da)``,
    integer DDPM steps ``(B,)`` through a sinusoidal embedding and a Linear-Mish-Linear MLP."""

    def __init__(self, action_dim: int, global_cond_dim: int, down_dims=(256, 512, 1024), step_dim: int = 256,
                 k: int = 5, groups: int = 8):
        super().__init__()
        half = step_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1)), persistent=False)
        self.step_mlp = nn.Sequential(nn.Linear(step_dim, 4 * step_dim), nn.Mish(), nn.Linear(4 * step_dim, step_dim))
        cond = step_dim + global_cond_dim
        dims = [action_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:]))

        def res(c_in: int, c_out: int) -> _DPResidualBlock:
            return _DPResidualBlock(c_in, c_out, cond, k, groups)

        last = len(pairs) - 1
        self.down = nn.ModuleList(
            nn.ModuleList([res(ci, co), res(co, co), nn.Conv1d(co, co, 3, 2, 1) if i < last else nn.Identity()])
            for i, (ci, co) in enumerate(pairs))
        self.mid = nn.ModuleList([res(dims[-1], dims[-1]), res(dims[-1], dims[-1])])
        self.up = nn.ModuleList(nn.ModuleList([res(2 * co, ci), res(ci, ci), nn.ConvTranspose1d(ci, ci, 4, 2, 1)])
                                for ci, co in reversed(pairs[1:]))
        self.final = nn.Sequential(_dp_conv_block(dims[1], dims[1], k, groups), nn.Conv1d(dims[1], action_dim, 1))

    def forward(self, sample: Tensor, steps: Tensor, global_cond: Tensor) -> Tensor:
        arg = steps[:, None] * self.freqs[None, :]
        feat = torch.cat([self.step_mlp(torch.cat([arg.sin(), arg.cos()], -1)), global_cond], -1)
        x, skips = sample.transpose(1, 2), []
        for res1, res2, down in self.down:
            x = res2(res1(x, feat), feat)
            skips.append(x)
            x = down(x)
        for res in self.mid:
            x = res(x, feat)
        for res1, res2, up in self.up:
            x = up(res2(res1(torch.cat([x, skips.pop()], 1), feat), feat))
        return self.final(x).transpose(1, 2)


class DPReferenceStep:
    """One DP low-dim training step per call, in plain eager fp32 as DP's code runs it on a CPU.

    Per call: min-max normalisation (x * scale + offset), the flattened To-step observation as global condition,
    DP's inpainting mask (nothing visible under global conditioning), DDPM noising on 100 squared-cosine steps,
    ε-MSE masked and averaged per sample, backward, ``torch.optim.AdamW`` as DP configures it (lr 1e-4, betas 0.95 /
    0.999, weight decay 1e-6; on CPU tensors torch's default is the per-tensor loop), zero_grad, the cosine LR
    schedule with 500 warm-up steps, then DP's EMA (power 0.75), which walks the modules and updates each
    parameter in place, and ``loss.item()``.
    """

    def __init__(self, obs_dim: int, action_dim: int, n_obs_steps: int = 2, num_steps: int = 100):
        torch.manual_seed(0)
        self.net = DPUNetReference(action_dim, n_obs_steps * obs_dim)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-6)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: (s + 1) / 500 if s < 500 else 0.5 * (1 + math.cos(math.pi * (s - 500) / 100_000)))
        abar = squared_cosine_alphas_cumprod(num_steps).float()
        self.sqrt_abar, self.sqrt_1m_abar, self.num_steps = abar.sqrt(), (1 - abar).sqrt(), num_steps
        self.obs_scale, self.obs_offset = torch.full((obs_dim,), 0.5), torch.zeros(obs_dim)
        self.act_scale, self.act_offset = torch.full((action_dim,), 2.0), torch.full((action_dim,), -1.0)
        self.n_obs_steps, self.optimization_step = n_obs_steps, 0

    def __call__(self, obs: Tensor, action: Tensor) -> float:
        """``obs`` (B, To, Do), ``action`` (B, Tp, Da) in physical units -> the step's loss."""
        nobs, traj = obs * self.obs_scale + self.obs_offset, action * self.act_scale + self.act_offset
        cond = nobs[:, : self.n_obs_steps].reshape(len(obs), -1)
        mask = torch.zeros_like(traj, dtype=torch.bool)
        noise = torch.randn(traj.shape)
        steps = torch.randint(0, self.num_steps, (len(traj),))
        noisy = self.sqrt_abar[steps, None, None] * traj + self.sqrt_1m_abar[steps, None, None] * noise
        noisy[mask] = traj[mask]
        pred = self.net(noisy, steps, cond)
        loss = (F.mse_loss(pred, noise, reduction="none") * (~mask).to(pred.dtype)).reshape(len(traj), -1).mean(1)
        loss = loss.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        self._ema_step()
        return loss.item()

    @torch.no_grad()
    def _ema_step(self) -> None:
        step = max(0, self.optimization_step - 1)
        decay = 0.0 if step <= 0 else min(0.9999, max(0.0, 1 - (1 + step) ** -0.75))
        for module, ema_module in zip(self.net.modules(), self.ema.modules()):
            for p, pe in zip(module.parameters(recurse=False), ema_module.parameters(recurse=False)):
                pe.mul_(decay)
                pe.add_(p.data, alpha=1 - decay)
        self.optimization_step += 1


def _per_call_ms(fn, seconds: float) -> float:
    for _ in range(3):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 5:
        fn()
        n += 1
    return 1000 * (time.perf_counter() - t0) / n


def kernels(args) -> None:
    """MeanFlow's JVP (hand-written vs torch.func) and AdamW (fused vs per-tensor), side by side."""
    from stlflow.policy.heads import MeanFlowHead
    from stlflow.policy.nets import ResidualMLP

    torch.manual_seed(0)
    net = ResidualMLP(args.action_dim, 16, 2 * args.obs_dim, n_times=2, time_scale=10.0)
    rows = max(1, args.batch // 4)
    z, v, cond = torch.randn(rows, 16, args.action_dim), torch.randn(rows, 16, args.action_dim), \
        torch.randn(rows, 2 * args.obs_dim)
    t = torch.rand(rows)
    r = t * torch.rand(rows)
    sec = max(1.0, args.seconds / 4)
    heads = {jvp: MeanFlowHead(net, 16, args.action_dim, jvp=jvp) for jvp in ("func", "auto")}  # same net
    ms = {jvp: _per_call_ms(lambda h=h: h.u_and_total_derivative(z, v, r, t, cond), sec) for jvp, h in heads.items()}
    fwd = _per_call_ms(lambda: net(z, torch.stack([t, t - r], -1), cond), sec)
    print(f"MeanFlow du/dt over {rows} rows (MLP): torch.func.jvp {ms['func']:.2f} ms, hand-written forward_jvp "
          f"{ms['auto']:.2f} ms ({ms['func'] / ms['auto']:.1f}x); the forward alone {fwd:.2f} ms")
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    cfg = TrainConfig(lr=3e-4)
    per_tensor = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    # the trainer's optimiser on the CPU is the fused one (one kernel over all parameters, same hyper-parameters)
    fused = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                              fused=True)
    opt_ms = {"per-tensor": _per_call_ms(per_tensor.step, sec), "fused": _per_call_ms(fused.step, sec)}
    print(f"AdamW step ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters): per-tensor "
          f"{opt_ms['per-tensor']:.2f} ms, fused {opt_ms['fused']:.2f} ms "
          f"({opt_ms['per-tensor'] / opt_ms['fused']:.1f}x)")
    sps = {}
    for jvp in ("func", "auto"):
        head = {"kind": "meanflow", "ratio_r_neq_t": 0.25, "adaptive_p": 1.0, "jvp": jvp}
        _, sps[jvp], step_ms = measure(CONFIGS["mlp"] | {"time_scale": 10.0}, head, args.obs_dim, args.action_dim,
                                       args.batch, args.seconds)
        print(f"MeanFlow training step (MLP, ratio_r_neq_t 0.25, batch {args.batch}), jvp={jvp}: "
              f"{sps[jvp]:.0f} samples/s, {step_ms:.1f} ms/step", flush=True)
    print(f"hand-written JVP speed-up of a whole MeanFlow step: {sps['auto'] / sps['func']:.2f}x")


# Our step's options timed against the anchor: name -> (Conv1d weight gradient, train.precision).
VARIANTS = {
    "ours, torch's conv backward, fp32": ("aten", "fp32"),
    "ours, fp32 (default)": ("auto", "fp32"),
    "ours, train.precision=bf16": ("auto", "bf16"),
}
TARGET = 1.3  # the target: our step at DP's configuration >= 1.3x DP's, at 1 and 2 threads


def vs_dp(args) -> None:
    """Our trainer's step per option against :class:`DPReferenceStep`, interleaved, at each thread count."""
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(args.batch, 2, args.obs_dim, generator=g)
    action = torch.rand(args.batch, 16, args.action_dim, generator=g)
    anchor = DPReferenceStep(args.obs_dim, args.action_dim)
    policy, _, ours = trainer_step(CONFIGS["unet_dp"], "ddpm", args.obs_dim, args.action_dim, args.batch)
    n_dp = sum(p.numel() for p in anchor.net.parameters())
    print(f"anchor: DP's training step re-implemented here at DP's shapes (not DP's code), {n_dp / 1e6:.2f}M "
          f"parameters; ours: the trainer's step, ddpm head, net=unet_dp, {policy.num_parameters() / 1e6:.2f}M")

    def timed(name: str) -> float:
        if name == "DP (anchor)":
            t0 = time.perf_counter()
            anchor(obs, action)
            return time.perf_counter() - t0
        weight_grad, precision = VARIANTS[name]
        set_conv_weight_grad(policy, weight_grad)
        return ours(precision)

    names = ["DP (anchor)", *VARIANTS]
    best: dict[int, tuple[str, float]] = {}
    for n_threads in [int(t) for t in args.vs_threads.split(",")]:
        torch.set_num_threads(n_threads)
        for name in names:  # warm-up
            timed(name)
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):  # A B C D A B C D ...: load drifts hit every configuration alike
            for name in names:
                times[name].append(timed(name))
        print(f"\n{n_threads} thread(s), batch {args.batch}, {args.rounds} interleaved rounds (medians)")
        print(f"{'step':<36} {'ms/step':>9} {'samples/s':>10} {'vs DP':>7}")
        for name in names:
            med = statistics.median(times[name])
            ratio = statistics.median(a / b for a, b in zip(times["DP (anchor)"], times[name]))
            print(f"{name:<36} {1000 * med:>9.0f} {args.batch / med:>10.1f} {ratio:>6.2f}x", flush=True)
            if name != "DP (anchor)" and ratio > best.get(n_threads, ("", 0.0))[1]:
                best[n_threads] = (name, ratio)
    ok = all(r >= TARGET for _, r in best.values())
    print(f"\ntarget: our step >= {TARGET}x DP's at every thread count: {'ok' if ok else 'MISSED'} ("
          + "; ".join(f"{n} thread(s): {r:.2f}x by {name}" for n, (name, r) in best.items()) + ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="unet_dp,unet_64,unet,mlp", help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--head", default="flow", choices=["ddpm", "flow", "meanflow"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per configuration")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--obs-dim", type=int, default=20)
    ap.add_argument("--action-dim", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="train.precision of the table")
    ap.add_argument("--kernels", action="store_true",
                    help="time MeanFlow's JVP and AdamW, each implementation side by side, instead of the networks")
    ap.add_argument("--vs-dp", action="store_true",
                    help="our step per training option against DP's step at DP's U-Net configuration, interleaved")
    ap.add_argument("--vs-threads", default="1,2", help="--vs-dp: comma list of thread counts")
    ap.add_argument("--rounds", type=int, default=5, help="--vs-dp: interleaved rounds (one step of each per round)")
    args = ap.parse_args()
    if args.vs_dp:
        limit_threads(max(int(t) for t in args.vs_threads.split(",")))
        print(f"torch {torch.__version__}, Do={args.obs_dim} Da={args.action_dim} To=2 Tp=16")
        vs_dp(args)
        return
    limit_threads(args.threads)
    if args.kernels:
        print(f"torch {torch.__version__}, {args.threads} thread(s), Do={args.obs_dim} Da={args.action_dim}")
        kernels(args)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, head {args.head}, "
          f"precision {args.precision}, Do={args.obs_dim} Da={args.action_dim} To=2 Tp=16, {args.seconds:.0f} s per "
          f"configuration")
    print(f"{'config':<10} {'network':<62} {'params':>10} {'samples/s':>10} {'ms/step':>9}")
    rows = []
    for name in args.configs.split(","):
        net = CONFIGS[name]
        params, sps, ms = measure(net, args.head, args.obs_dim, args.action_dim, args.batch, args.seconds,
                                  precision=args.precision)
        rows.append((name, sps))
        desc = ", ".join(f"{k}={v}" for k, v in net.items())
        print(f"{name:<10} {desc:<62} {params / 1e6:>9.2f}M {sps:>10.0f} {ms:>9.1f}", flush=True)
    base = dict(rows).get("unet_dp")
    if base:
        print("speed-up over Diffusion Policy's low-dim default: "
              + ", ".join(f"{n} {s / base:.1f}x" for n, s in rows if n != "unet_dp"))


if __name__ == "__main__":
    main()
