"""Cost of one OFQL update and of one action on one torch thread: float32 against bfloat16 matmuls, side by side.

    python benchmarks/ofql_update.py [--updates 200] [--dims 4x2,11x3] [--target-ms 12] [--no-compile]

Networks of Diffusion-QL's size (actor and twin critics: 3 hidden layers of 256, Mish), batch 256 and batch 1,
random data of the given observation x action dimensions (4x2: maze2d; 11x3: Hopper). An update is everything
``OFQLAgent.update`` does: critic step (EMA actor's next actions, target critics), actor step (one pass of the
actor over the MeanFlow rows, with the hand-written JVP on the r < t rows, and the one-step rows; the new actions
scored by one critic), EMA and target updates. Rows: ``precision=fp32`` (the reference), ``bf16`` (bfloat16
autocast of the matmuls), and ``bf16+compile`` (also the activation fused by ``torch.compile``; the first call
compiles, untimed). "per action" is ``agent.act`` (one float32 network call, EMA actor) per action: at batch 1,
and at batch 256 divided by 256.

Timing: the variants' updates are interleaved in blocks of 10 (so a load change hits them alike); per variant the
median block gives "p50" and the fastest "min", in wall time and in this thread's CPU time (``time.thread_time``:
what the update costs the core, less the time other processes held it). The load average is printed: on a
shared machine other processes slow every wall-time figure. The target (one update at batch 256 in at most
``--target-ms``) is judged on the fastest variant's median: ok / MISSED, in wall and in CPU time. The last lines
give the update's matmul GFLOP (``torch.utils.flop_counter``) and the time those matmuls alone take at the rate
one thread reaches now on 256 x 256 x 256 products, float32 and bfloat16, and the time the update's own matmuls take
at their real shapes (profiled): floors no rewrite of the rest of the update beats.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from stlflow.policy.agents import OFQLAgent, Transitions

VARIANTS = {"fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"},
            "bf16+compile": {"precision": "bf16", "compile": True}}


def _data(obs_dim: int, action_dim: int, n: int = 20000) -> Transitions:
    rng = np.random.default_rng(0)
    return Transitions({"observations": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-1, 1, (n, action_dim)),
                        "rewards": rng.uniform(size=n), "next_observations": rng.normal(size=(n, obs_dim)),
                        "terminals": rng.uniform(size=n) < 0.01})


def time_updates(agents: dict[str, OFQLAgent], data: Transitions, batch: int, updates: int, block: int = 10
                 ) -> dict[str, dict[str, float]]:
    """Per agent ``{"p50", "min", "cpu_p50", "cpu_min"}`` milliseconds per update over interleaved blocks."""
    from stlflow.policy.agents.base import use_compiled_mish

    blocks: dict[str, list[tuple[float, float]]] = {k: [] for k in agents}
    for rep in range(2 + max(1, updates // block)):
        for name, agent in agents.items():
            use_compiled_mish(bool(agent.config.get("compile")))
            batches = [data.sample(batch, agent.generator) for _ in range(block)]
            t0, c0 = time.perf_counter(), time.thread_time()
            for b in batches:
                agent.update(b)
            if rep >= 2:  # two warm-up blocks
                blocks[name].append(((time.perf_counter() - t0) / block * 1e3, (time.thread_time() - c0) / block * 1e3))
    use_compiled_mish(False)
    out = {}
    for name, rows in blocks.items():
        wall, cpu = np.array(rows).T
        out[name] = {"p50": float(np.median(wall)), "min": float(wall.min()), "cpu_p50": float(np.median(cpu)),
                     "cpu_min": float(cpu.min())}
    return out


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


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 256, calls: int = 300) -> float:
    """Single-thread matmul rate (GFLOP/s of CPU time) at ``size`` x ``size`` x ``size``, the shape of the updates."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(20):
        a @ b
    t0 = time.thread_time()
    for _ in range(calls):
        a @ b
    return 2 * size**3 * calls / (time.thread_time() - t0) / 1e9


def update_gflop(agent: OFQLAgent, data: Transitions, batch: int = 256) -> float:
    """Matmul GFLOP of one update (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        agent.update(data.sample(batch, agent.generator))
    return counter.get_total_flops() / 1e9


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_ms_in_update(agent: OFQLAgent, data: Transitions, batch: int = 256, updates: int = 20) -> float:
    """Milliseconds per update that the update's own matrix products take (``torch.profiler``, self CPU time of
    the mm / addmm / bmm / baddbmm kernels, averaged over ``updates`` updates): the floor at these shapes, below
    which no rewrite of the surrounding work can bring an update."""
    from torch.profiler import ProfilerActivity, profile

    batches = [data.sample(batch, agent.generator) for _ in range(updates)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches:
            agent.update(b)
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS)
    return total_us / updates / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=200, help="timed updates per variant (batch 256)")
    ap.add_argument("--dims", default="4x2,11x3", help="observation x action sizes, comma separated")
    ap.add_argument("--target-ms", type=float, default=12.0)
    ap.add_argument("--no-compile", action="store_true", help="skip the bf16+compile variant (no C++ compiler)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_compile and v.get("compile"))}
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.2f} "
          f"(on {os.cpu_count()} CPUs) at the start")
    print(f"{'dims':>5}  {'variant':>12}  {'batch':>5}  {'wall p50':>8}  {'min':>6}  {'cpu p50':>7}  {'min':>6}  "
          f"{'ms/action':>9}")
    best: dict[str, tuple[str, dict[str, float]]] = {}
    floors: dict[str, dict[str, float]] = {}
    for spec in args.dims.split(","):
        obs_dim, action_dim = (int(x) for x in spec.lower().split("x"))
        data = _data(obs_dim, action_dim)
        agents = {name: OFQLAgent(obs_dim, action_dim, seed=0, **settings) for name, settings in variants.items()}
        for agent in agents.values():
            agent.prepare(data)
        for batch in (256, 1):
            n = args.updates if batch == 256 else max(20, args.updates // 2)
            times = time_updates(agents, data, batch, n)
            for name, agent in agents.items():
                obs = data.obs[:batch].numpy() if batch > 1 else data.obs[0].numpy()
                act_ms = time_act(agent, obs, 200 if batch == 1 else 20)
                t = times[name]
                print(f"{spec:>5}  {name:>12}  {batch:>5}  {t['p50']:8.2f}  {t['min']:6.2f}  {t['cpu_p50']:7.2f}  "
                      f"{t['cpu_min']:6.2f}  {act_ms:9.4f}", flush=True)
            if batch == 256:
                best[spec] = min(times.items(), key=lambda kv: kv[1]["p50"])
                for name, agent in agents.items():
                    from stlflow.policy.agents.base import use_compiled_mish

                    use_compiled_mish(bool(agent.config.get("compile")))
                    floors.setdefault(spec, {})[name] = matmul_ms_in_update(agent, data)
                use_compiled_mish(False)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    f32, b16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    for spec in args.dims.split(","):
        obs_dim, action_dim = (int(x) for x in spec.lower().split("x"))
        gflop = update_gflop(OFQLAgent(obs_dim, action_dim), _data(obs_dim, action_dim))
        print(f"{spec}: {gflop:.3f} GFLOP of matmuls per update (batch 256); at this thread's matmul rate now "
              f"(256^3, CPU time: float32 {f32:.0f}, bfloat16 {b16:.0f} GFLOP/s) they alone take "
              f"{gflop / f32 * 1e3:.1f} ms in float32, {gflop / b16 * 1e3:.1f} ms in bfloat16")
    for spec, per in floors.items():
        parts = ", ".join(f"{name} {ms:.1f} ms" for name, ms in per.items())
        print(f"{spec}: the matmuls inside one update (batch 256, torch.profiler self CPU time): {parts}")
    for spec, (name, t) in best.items():
        wall_ok, cpu_ok = t["p50"] <= args.target_ms, t["cpu_p50"] <= args.target_ms
        print(f"target: one OFQL update ({spec}, batch 256, 3 x 256 networks) <= {args.target_ms:g} ms, fastest "
              f"variant {name}: wall p50 {t['p50']:.1f} ms {'ok' if wall_ok else 'MISSED'}; CPU-time p50 "
              f"{t['cpu_p50']:.1f} ms {'ok' if cpu_ok else 'MISSED'}")


if __name__ == "__main__":
    main()
