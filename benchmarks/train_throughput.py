"""Training throughput of the policy networks, side by side in one run (samples/s of full training steps).

Compares the 1-D temporal U-Net at Diffusion Policy's low-dim default (down_dims 256/512/1024, time
embedding 256, ~65M parameters) with our CPU-sized configurations (U-Net 32/64/128 and the residual MLP), each
as a flow policy on random data with the task's dimensions (Crossing: Do = 20, Da = 2; To = 2, Tp = 16).
A training step is the trainer's: normalisation, condition, loss, backward, grad clipping, AdamW, EMA update.

    python benchmarks/train_throughput.py                     # 20 s per configuration, batch 256, 1 thread
    python benchmarks/train_throughput.py --seconds 5 --threads 2 --configs unet_dp,unet
    python benchmarks/train_throughput.py --kernels           # MeanFlow's JVP and AdamW: the two implementations

``--kernels`` times, side by side, the two pieces of a MeanFlow training step the trainer implements two ways:
du/dt over a quarter of the batch (the r < t rows) by the MLP's hand-written ``forward_jvp`` and by
``torch.func.jvp``, and the AdamW step fused and per-tensor; then whole MeanFlow steps (MLP) with either JVP.

Figures depend on the machine and its load; the script prints them, nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from stlflow.control.workers import limit_threads
from stlflow.policy import Policy
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


def trainer_parts(policy: Policy, batch: int, lr: float) -> tuple:
    """(optimiser, EMA) as the trainer builds them for ``policy`` (on the CPU; torch's thread count kept)."""
    cfg = TrainConfig(lr=lr, batch_size=batch, device="cpu", threads=0, progress=False, tensorboard=False)
    with tempfile.TemporaryDirectory(prefix="stlflow_throughput_") as tmp:  # the trainer writes nothing until fit
        trainer = Trainer(policy, _OwnBatches(batch), cfg, tmp)
    return trainer.opt, trainer.ema


def measure(net: dict, head: str | dict, obs_dim: int, action_dim: int, batch: int, seconds: float, warmup: int = 2):
    torch.manual_seed(0)
    policy = Policy(obs_dim, action_dim, 2, 16, 8, head=head if isinstance(head, dict) else {"kind": head}, net=net)
    opt, ema = trainer_parts(policy, batch, lr=1e-4)  # the trainer's optimiser and EMA
    g = torch.Generator().manual_seed(0)
    b = {"obs": torch.randn(batch, 2, obs_dim, generator=g), "action": torch.rand(batch, 16, action_dim, generator=g)}
    steps, elapsed, step = 0, 0.0, 0
    while elapsed < seconds or steps < 3:
        t0 = time.perf_counter()
        loss = policy.compute_loss(b, policy.draw_noise(batch, generator=g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        step += 1
        ema.update(policy, step)
        dt = time.perf_counter() - t0
        if step > warmup:
            steps, elapsed = steps + 1, elapsed + dt
    return policy.num_parameters(), steps * batch / elapsed, 1000 * elapsed / steps


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="unet_dp,unet_64,unet,mlp", help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--head", default="flow", choices=["ddpm", "flow", "meanflow"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per configuration")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--obs-dim", type=int, default=20)
    ap.add_argument("--action-dim", type=int, default=2)
    ap.add_argument("--kernels", action="store_true",
                    help="time MeanFlow's JVP and AdamW, each implementation side by side, instead of the networks")
    args = ap.parse_args()
    limit_threads(args.threads)
    if args.kernels:
        print(f"torch {torch.__version__}, {args.threads} thread(s), Do={args.obs_dim} Da={args.action_dim}")
        kernels(args)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, head {args.head}, "
          f"Do={args.obs_dim} Da={args.action_dim} To=2 Tp=16, {args.seconds:.0f} s per configuration")
    print(f"{'config':<10} {'network':<62} {'params':>10} {'samples/s':>10} {'ms/step':>9}")
    rows = []
    for name in args.configs.split(","):
        net = CONFIGS[name]
        params, sps, ms = measure(net, args.head, args.obs_dim, args.action_dim, args.batch, args.seconds)
        rows.append((name, sps))
        desc = ", ".join(f"{k}={v}" for k, v in net.items())
        print(f"{name:<10} {desc:<62} {params / 1e6:>9.2f}M {sps:>10.0f} {ms:>9.1f}", flush=True)
    base = dict(rows).get("unet_dp")
    if base:
        print("speed-up over Diffusion Policy's low-dim default: "
              + ", ".join(f"{n} {s / base:.1f}x" for n, s in rows if n != "unet_dp"))


if __name__ == "__main__":
    main()
