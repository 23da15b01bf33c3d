"""EpisodeStore append throughput and SequenceSampler + DataLoader samples/s on a 1M-step store.

    python benchmarks/sampler.py                      # 1M steps, 500-step episodes
    python benchmarks/sampler.py --steps 200000       # quicker

Prints: append throughput (one atomic ``add_episode`` per episode), size on disk, sampler build time
(reading the store into memory), and windows/s through ``SequenceDataset`` + ``DataLoader`` with 0, 1
and 2 worker processes (each worker one torch thread), with Diffusion Policy's low-dim shapes
(To = 2, Ta = 8, Tp = 16, observation windows of To frames).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stlflow.control.workers import limit_threads
from stlflow.datasets import EpisodeStore, SequenceDataset, SequenceSampler


def _one_thread(_: int) -> None:
    """DataLoader worker set-up (``worker_init_fn(worker_id)``): one compute thread."""
    limit_threads(1)


def build_store(path: Path, steps: int, episode_len: int, obs_dim: int, action_dim: int) -> tuple[EpisodeStore, float]:
    store = EpisodeStore.create(path, dt=0.1, attrs={"benchmark": "sampler"})
    rng = np.random.default_rng(0)
    n_ep = steps // episode_len
    t0 = time.perf_counter()
    for i in range(n_ep):
        store.add_episode(
            {
                "obs": rng.normal(size=(episode_len, obs_dim)).astype(np.float32),
                "action": rng.uniform(-1, 1, size=(episode_len, action_dim)).astype(np.float32),
                "signal_speed": rng.uniform(0, 2, size=episode_len).astype(np.float32),
            },
            attrs={"seed": i, "mode": "yield"},
        )
    return store, time.perf_counter() - t0


def loader_rate(dataset: SequenceDataset, workers: int, batch_size: int, batches: int, batched: bool) -> float:
    """Windows/s through a shuffling DataLoader; ``batched``: the dataset gathers whole batches itself."""
    common = dict(num_workers=workers, worker_init_fn=_one_thread if workers else None)
    generator = torch.Generator().manual_seed(0)
    if batched:
        batch_sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(dataset, generator=generator), batch_size, drop_last=False
        )
        loader = torch.utils.data.DataLoader(dataset, sampler=batch_sampler, batch_size=None, **common)
    else:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, generator=generator, **common
        )
    it = iter(loader)
    next(it)  # worker start-up and first batch are not counted
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["action"])
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--episode-len", type=int, default=500)
    parser.add_argument("--obs-dim", type=int, default=20)
    parser.add_argument("--action-dim", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=100, help="timed batches per DataLoader setting")
    parser.add_argument("--dir", default=None, help="where to build the store (default: a temporary folder)")
    args = parser.parse_args()
    limit_threads(1)

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="stlflow-bench-"))
    path = tmp / "bench.zarr"
    if path.exists():
        shutil.rmtree(path)
    try:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch threads 1")
        store, t_append = build_store(path, args.steps, args.episode_len, args.obs_dim, args.action_dim)
        n = store.n_steps
        print(
            f"append: {store.n_episodes} episodes x {args.episode_len} steps = {n} steps "
            f"(obs {args.obs_dim}, action {args.action_dim}, 1 signal; float32) in {t_append:.1f} s: "
            f"{n / t_append:,.0f} steps/s, {store.n_episodes / t_append:,.1f} episodes/s "
            f"({1000 * t_append / store.n_episodes:.1f} ms per atomic add_episode)"
        )
        raw = n * 4 * (args.obs_dim + args.action_dim + 1)
        size = store.nbytes_on_disk()
        print(f"size on disk: {size / 2**20:.1f} MiB (raw {raw / 2**20:.1f} MiB, random data hardly compresses)")

        t0 = time.perf_counter()
        reader = EpisodeStore.open(path)
        sampler = SequenceSampler(
            reader, horizon=16, n_obs_steps=2, n_action_steps=8, keys=["obs", "action"], key_horizons={"obs": 2}
        )
        print(
            f"sampler build (read {n} steps into memory, index windows): {time.perf_counter() - t0:.2f} s, "
            f"{len(sampler):,} windows"
        )
        idx = np.random.default_rng(0).integers(0, len(sampler), size=(args.batches, args.batch_size))
        t0 = time.perf_counter()
        for row in idx:
            sampler.sample_batch(row)
        rate = idx.size / (time.perf_counter() - t0)
        print(f"sampler.sample_batch (numpy, batch {args.batch_size}): {rate:,.0f} windows/s")
        dataset = SequenceDataset(sampler)
        for batched in (False, True):
            for workers in (0, 1, 2):
                rate = loader_rate(dataset, workers, args.batch_size, args.batches, batched)
                how = "BatchSampler, batch_size=None" if batched else f"batch_size={args.batch_size}, shuffle"
                print(f"DataLoader({how}, workers={workers}): {rate:,.0f} windows/s")
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
