"""train.precision=bf16: the forward runs in bfloat16, the loss follows fp32's within run-to-run noise, and what is
saved is fp32 and loads like any checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stlflow.policy import Policy
from stlflow.policy.data import ChunkData
from stlflow.policy.trainer import TrainConfig, Trainer

torch.set_num_threads(1)

NETS = {
    "unet": {"name": "unet", "down_dims": [16, 32], "time_embed_dim": 16},
    "mlp": {"name": "mlp", "width": 64, "n_blocks": 2, "time_embed_dim": 32},
}


def _data() -> ChunkData:
    """Smooth, learnable episodes: obs = a point on a circle, action = its next position (scaled)."""
    rng = np.random.default_rng(0)
    n_ep, length = 16, 24
    obs, act = [], []
    for _ in range(n_ep):
        phase = rng.uniform(0, 2 * np.pi) + 0.15 * np.arange(length + 1)
        xy = np.stack([np.cos(phase), np.sin(phase)], -1)
        obs.append(xy[:-1])
        act.append(2.0 * xy[1:])
    return ChunkData({"obs": np.concatenate(obs), "action": np.concatenate(act)}, 8, 2, 4,
                     episode_ends=np.arange(1, n_ep + 1) * length)


def _train(tmp_path, net: str, precision: str, seed: int = 0, steps: int = 120, **kw) -> Trainer:
    data = _data()
    torch.manual_seed(seed)
    policy = Policy(2, 2, 2, 8, 4, head={"kind": "flow"}, net=NETS[net], normalizer=data.fit_normalizer())
    base = dict(steps=steps, batch_size=32, lr=3e-3, warmup_steps=10, progress=False, val_every=0, ckpt_every=0,
                tensorboard=False, seed=seed, precision=precision)
    cfg = TrainConfig(**{**base, **kw})
    trainer = Trainer(policy, data, cfg, tmp_path / f"{net}_{precision}_{seed}")
    trainer.fit()
    return trainer


def _late_loss(trainer: Trainer) -> float:
    return float(np.mean([h["loss"] for h in trainer.history[-30:]]))


# The tiny U-Net's three runs take ~17 s of CPU (per-module overhead); the fast suite checks its first steps below.
@pytest.mark.parametrize("net", [pytest.param("unet", marks=pytest.mark.slow), "mlp"])
def test_bf16_loss_curve_matches_fp32_within_seed_to_seed_noise(tmp_path, net):
    fp32, bf16 = _train(tmp_path, net, "fp32"), _train(tmp_path, net, "bf16")
    other_seed = _train(tmp_path, net, "fp32", seed=1)
    first = np.mean([h["loss"] for h in fp32.history[:10]])
    late = {name: _late_loss(t) for name, t in [("fp32", fp32), ("bf16", bf16), ("fp32 seed 1", other_seed)]}
    assert late["bf16"] < 0.5 * first, late  # bf16 learns
    noise = abs(late["fp32"] - late["fp32 seed 1"])
    # bf16 stays within the fp32 seed-to-seed spread (3x, floored at 10% of the loss: two seeds can agree by luck)
    assert abs(late["bf16"] - late["fp32"]) <= max(3 * noise, 0.1 * late["fp32"]), late
    # the first steps see the same batches and noise: bf16 rounding alone separates the curves there
    early = [(a["loss"], b["loss"]) for a, b in zip(fp32.history[:5], bf16.history[:5])]
    assert all(abs(a - b) <= 0.05 * a for a, b in early), early


def test_a_unets_first_bf16_steps_follow_fp32(tmp_path):
    fp32, bf16 = _train(tmp_path, "unet", "fp32", steps=12), _train(tmp_path, "unet", "bf16", steps=12)
    pairs = [(a["loss"], b["loss"]) for a, b in zip(fp32.history, bf16.history)]
    assert all(abs(a - b) <= 0.05 * a for a, b in pairs), pairs
    assert pairs[-1][1] < pairs[0][1]


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_training_forward_runs_in_the_requested_precision(tmp_path, precision, dtype):
    data = _data()
    policy = Policy(2, 2, 2, 8, 4, head={"kind": "flow"}, net=NETS["unet"], normalizer=data.fit_normalizer())
    seen = []
    conv = policy.head.net.down[0][0].conv1.block[0]
    conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    cfg = TrainConfig(steps=2, batch_size=32, progress=False, val_every=0, ckpt_every=0, tensorboard=False,
                      precision=precision)
    Trainer(policy, data, cfg, tmp_path).fit()
    assert seen[:2] == [dtype, dtype]  # the two training steps (the final validation has no data here)
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_a_bf16_trained_policy_saves_fp32_weights_that_load(tmp_path):
    trainer = _train(tmp_path, "unet", "bf16", steps=6, ckpt_every=3)
    out = trainer.out
    for path in (out / "model.safetensors", out / "checkpoints" / "step_00000006" / "model.safetensors"):
        weights = load_file(str(path))
        assert weights and all(v.dtype == torch.float32 for k, v in weights.items() if v.is_floating_point()), path
    loaded = Policy.load(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trainer.ema.model.state_dict().items())
    chunk = loaded.predict(np.zeros((3, 2, 2)), generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (3, 8, 2) and np.isfinite(chunk).all()


def test_an_unknown_precision_is_refused_with_the_choices(tmp_path):
    data = _data()
    policy = Policy(2, 2, 2, 8, 4, head={"kind": "flow"}, net=NETS["mlp"], normalizer=data.fit_normalizer())
    cfg = TrainConfig(steps=2, batch_size=32, progress=False, tensorboard=False, precision="fp16")
    with pytest.raises(ValueError, match=r"train.precision='fp16' is not one of \['bf16', 'fp32'\]"):
        Trainer(policy, data, cfg, tmp_path)
    assert not any(tmp_path.iterdir())
