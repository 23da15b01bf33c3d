"""Training throughput of the policy networks, side by side in one run (samples/s of full training steps).

Compares the 1-D temporal U-Net at Diffusion Policy's low-dim default (down_dims 256/512/1024, time
embedding 256, ~65M parameters) with our CPU-sized configurations (U-Net 32/64/128 and the residual MLP), each
as a flow policy on random data with the task's dimensions (Crossing: Do = 20, Da = 2; To = 2, Tp = 16).
A training step is the trainer's: normalisation, condition, loss, backward, grad clipping, AdamW, EMA update.

    python benchmarks/train_throughput.py                     # 20 s per configuration, batch 256, 1 thread
    python benchmarks/train_throughput.py --seconds 5 --threads 2 --configs unet_dp,unet

Figures depend on the machine and its load; the script prints them, nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import time

import torch

from stlflow.policy import Policy
from stlflow.policy.trainer import EMA, TrainConfig

CONFIGS = {
    "unet_dp": {"name": "unet", "down_dims": [256, 512, 1024], "time_embed_dim": 256},
    "unet_64": {"name": "unet", "down_dims": [64, 128, 256], "time_embed_dim": 64},
    "unet": {"name": "unet", "down_dims": [32, 64, 128], "time_embed_dim": 64},
    "mlp": {"name": "mlp", "width": 256, "n_blocks": 4, "time_embed_dim": 64},
}


def measure(net: dict, head: str, obs_dim: int, action_dim: int, batch: int, seconds: float, warmup: int = 2):
    torch.manual_seed(0)
    policy = Policy(obs_dim, action_dim, 2, 16, 8, head={"kind": head}, net=net)
    ema = EMA(policy, TrainConfig())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="unet_dp,unet_64,unet,mlp", help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--head", default="flow", choices=["ddpm", "flow", "meanflow"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per configuration")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--obs-dim", type=int, default=20)
    ap.add_argument("--action-dim", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
