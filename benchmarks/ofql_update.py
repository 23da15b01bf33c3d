"""Cost of one OFQL update and of one action, on one torch thread: the hand-written JVP against torch.func.jvp.

    python benchmarks/ofql_update.py [--updates 200] [--dims 11x3,4x2] [--target-ms 12]

Networks of Diffusion-QL's size (actor and twin critics: 3 hidden layers of 256, Mish), batch 256 and batch 1,
random data of the given observation x action dimensions (11x3: Hopper; 4x2: maze2d). An update is everything
``OFQLAgent.update`` does: critic step (EMA actor's next actions, target critics), actor step (MeanFlow loss with
its JVP on the r < t rows, one-step actions scored by a critic), EMA and target updates. "per action" is
``agent.act`` (one network call, EMA actor) per action: at batch 1, and at batch 256 divided by 256.

Timing: updates are timed in blocks of 10 after a warm-up; the median block gives "ms/update" (p50), the fastest
block "min". The machine's load average is printed: on a shared machine other processes slow every figure.
The target (one update at batch 256 in at most ``--target-ms``) is judged on the median: ok / MISSED. The last
lines give the update's matmul GFLOP (``torch.utils.flop_counter``) and the time those matmuls alone take at
the float32 rate one thread reaches now on a 256 x 256 x 256 product: a floor no eager implementation beats.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from stlflow.policy.agents import OFQLAgent, Transitions


def _data(obs_dim: int, action_dim: int, n: int = 20000) -> Transitions:
    rng = np.random.default_rng(0)
    return Transitions({"observations": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-1, 1, (n, action_dim)),
                        "rewards": rng.uniform(size=n), "next_observations": rng.normal(size=(n, obs_dim)),
                        "terminals": rng.uniform(size=n) < 0.01})


def time_updates(agent: OFQLAgent, data: Transitions, batch: int, updates: int, block: int = 10) -> tuple[float, float]:
    """(median, min) milliseconds per update over blocks of ``block`` updates."""
    for _ in range(2 * block):
        agent.update(data.sample(batch, agent.generator))
    blocks = []
    for _ in range(max(1, updates // block)):
        batches = [data.sample(batch, agent.generator) for _ in range(block)]
        t0 = time.perf_counter()
        for b in batches:
            agent.update(b)
        blocks.append((time.perf_counter() - t0) / block * 1e3)
    return float(np.median(blocks)), float(np.min(blocks))


def time_act(agent: OFQLAgent, obs: np.ndarray, calls: int) -> float:
    """Median milliseconds per action of ``agent.act(obs)`` (obs (B, Do) or (Do,))."""
    per = obs.shape[0] if obs.ndim == 2 else 1
    for _ in range(10):
        agent.act(obs)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        agent.act(obs)
        times.append((time.perf_counter() - t0) / per * 1e3)
    return float(np.median(times))


def matmul_gflops(size: int = 256, calls: int = 300) -> float:
    """Single-thread float32 matmul rate (GFLOP/s) at ``size`` x ``size`` x ``size``, the shape of the updates."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(20):
        a @ b
    t0 = time.perf_counter()
    for _ in range(calls):
        a @ b
    return 2 * size**3 * calls / (time.perf_counter() - t0) / 1e9


def update_gflop(agent: OFQLAgent, data: Transitions, batch: int = 256) -> float:
    """Matmul GFLOP of one update (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        agent.update(data.sample(batch, agent.generator))
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=200, help="timed updates per row (batch 256)")
    ap.add_argument("--dims", default="11x3,4x2", help="observation x action sizes, comma separated")
    ap.add_argument("--target-ms", type=float, default=12.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.2f} "
          f"(on {os.cpu_count()} CPUs) at the start")
    print(f"{'dims':>5}  {'jvp':>5}  {'batch':>5}  {'ms/update p50':>13}  {'min':>6}  {'ms/action':>9}  target")
    verdicts = []
    for spec in args.dims.split(","):
        obs_dim, action_dim = (int(x) for x in spec.lower().split("x"))
        data = _data(obs_dim, action_dim)
        for jvp in ("hand", "func"):
            agent = OFQLAgent(obs_dim, action_dim, seed=0)
            agent.actor.jvp = "auto" if jvp == "hand" else "func"
            agent.ema_actor.jvp = agent.actor.jvp
            agent.prepare(data)
            for batch in (256, 1):
                n = args.updates if batch == 256 else max(20, args.updates // 2)
                p50, best = time_updates(agent, data, batch, n)
                obs = data.obs[:batch].numpy() if batch > 1 else data.obs[0].numpy()
                act_ms = time_act(agent, obs, 200 if batch == 1 else 20)
                verdict = ""
                if batch == 256:
                    ok = p50 <= args.target_ms
                    verdict = f"{'ok' if ok else 'MISSED'} (<= {args.target_ms:g} ms)"
                    verdicts.append((spec, jvp, ok))
                print(f"{spec:>5}  {jvp:>5}  {batch:>5}  {p50:13.2f}  {best:6.2f}  {act_ms:9.4f}  {verdict}",
                      flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    for spec in args.dims.split(","):
        obs_dim, action_dim = (int(x) for x in spec.lower().split("x"))
        gflop, rate = update_gflop(OFQLAgent(obs_dim, action_dim), _data(obs_dim, action_dim)), matmul_gflops()
        print(f"{spec}: {gflop:.3f} GFLOP of matmuls per update (batch 256); at this thread's float32 matmul rate "
              f"now ({rate:.0f} GFLOP/s at 256^3) the matmuls alone take {gflop / rate * 1e3:.1f} ms")
    hand = [ok for _, jvp, ok in verdicts if jvp == "hand"]
    print(f"target: one OFQL update (batch 256, 3 x 256 networks, hand-written JVP) <= {args.target_ms:g} ms: "
          f"{'ok' if all(hand) else 'MISSED'}")


if __name__ == "__main__":
    main()
