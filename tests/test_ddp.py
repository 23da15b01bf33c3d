"""DistributedDataParallel on CPU (gloo): 2 torchrun processes against 1 process with the same global batch."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap

import numpy as np
import pytest

WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from stlflow.policy import Policy
    from stlflow.policy.data import ChunkData
    from stlflow.policy.trainer import TrainConfig, Trainer

    out, kind = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    n_ep, length = 8, 20
    t = np.arange(n_ep * length)
    obs = np.stack([np.sin(0.1 * t), np.cos(0.13 * t), rng.normal(size=t.size)], -1)
    act = np.stack([np.sin(0.1 * t + 0.3), rng.normal(size=t.size)], -1)
    data = ChunkData({"obs": obs, "action": act}, 8, 2, 4, episode_ends=np.arange(1, n_ep + 1) * length)
    torch.manual_seed(0)
    policy = Policy(3, 2, 2, 8, 4, head={"kind": kind}, net={"name": "mlp", "width": 32, "n_blocks": 1},
                    normalizer=data.fit_normalizer())
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=2, progress=False, val_every=0,
                      ckpt_every=0, tensorboard=False)
    tr = Trainer(policy, data, cfg, out)
    tr.fit()
    # one more backward on this rank's share of the global batch of step 6: DDP must all-reduce the gradients
    tr.opt.zero_grad()
    batch = tr.train_data.batch(tr._indices(6))
    tr.model(batch, tr._noise(6)).backward()
    grads = torch.cat([p.grad.flatten() for p in policy.parameters()]).numpy()
    params = torch.cat([p.detach().flatten() for p in policy.parameters()]).numpy()
    np.savez(os.path.join(out, f"rank{tr.rank}_of{tr.world}.npz"), losses=np.array([h["loss"] for h in tr.history]),
             grads=grads, params=params, n_local=len(batch["obs"]))
    # tear the process group down as `stlflow train` does (control.training): a process that exits with gloo's
    # threads still running can abort in C++ teardown ("terminate called without an active exception")
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    """
)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.parametrize("kind", ["flow"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, monkeypatch, kind):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(ddp), kind],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # the single-process reference runs here meanwhile (same script, no process group)
    monkeypatch.setattr(sys, "argv", [str(script), str(single), kind])
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    try:
        runpy.run_path(str(script), run_name="__main__")
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    ref = np.load(single / "rank0_of1.npz")
    r0, r1 = np.load(ddp / "rank0_of2.npz"), np.load(ddp / "rank1_of2.npz")
    assert int(ref["n_local"]) == 16 and int(r0["n_local"]) == int(r1["n_local"]) == 8
    # gradients are synchronised: both ranks hold the same (averaged) gradient, although their data differ
    np.testing.assert_array_equal(r0["grads"], r1["grads"])
    np.testing.assert_array_equal(r0["params"], r1["params"])
    # ... and it equals the single-process gradient of the whole global batch
    np.testing.assert_allclose(r0["grads"], ref["grads"], rtol=1e-4, atol=1e-6)
    # the logged (all-reduced) losses and the trained weights match the single-process run
    np.testing.assert_allclose(r0["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r0["params"], ref["params"], rtol=1e-4, atol=1e-5)
    assert np.abs(r0["grads"]).max() > 0
