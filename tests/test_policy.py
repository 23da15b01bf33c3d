"""Policy: shapes, normalisation round trip, θ conditioning and CFG, discrete channels, save/load, golden."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stlflow.datasets import Normalizer
from stlflow.policy import Policy

torch.set_num_threads(1)

GOLDEN = Path(__file__).parent / "data" / "golden"
TINY_NET = {"name": "mlp", "width": 32, "n_blocks": 1, "time_embed_dim": 16}


def _normalizer(do=3, da=2, p=0, seed=0):
    rng = np.random.default_rng(seed)
    data = {"obs": rng.normal(5.0, 2.0, (500, do)), "action": rng.uniform([-3, 10], [1, 20], (500, da))}
    if p:
        data["params"] = rng.uniform(0.5, 1.5, (50, p))
    return Normalizer.fit(data, modes={"obs": "gaussian", "action": "minmax", "params": "minmax"})


def _policy(kind="flow", net=None, p=0, **kw):
    torch.manual_seed(0)
    return Policy(3, 2, 2, 8, 4, head={"kind": kind}, net=net or TINY_NET, normalizer=_normalizer(p=p),
                  param_names=[f"p{i}" for i in range(p)], **kw)


@pytest.mark.parametrize("kind", ["ddpm", "flow", "meanflow"])
@pytest.mark.parametrize("net", [TINY_NET, {"name": "unet", "down_dims": [8, 16], "time_embed_dim": 8}])
def test_predict_shapes_and_training_loss(kind, net):
    policy = _policy(kind, net)
    chunk = policy.predict(np.zeros((5, 2, 3)), generator=torch.Generator().manual_seed(0))
    assert isinstance(chunk, np.ndarray) and chunk.shape == (5, 8, 2) and np.isfinite(chunk).all()
    assert policy.predict(np.zeros((2, 3))).shape == (1, 8, 2)  # a single (To, Do) history
    loss = policy.compute_loss({"obs": torch.randn(4, 2, 3), "action": torch.randn(4, 8, 2)})
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"obs_history must have shape \(B, To=2, Do=3\)"):
        policy.predict(np.zeros((5, 3, 3)))


@given(a=arrays(np.float64, (4, 8, 2), elements=st.floats(-100, 100)))
@settings(max_examples=30, deadline=None)
def test_action_normalisation_round_trip(a):
    policy = _policy()
    x = torch.as_tensor(a)
    torch.testing.assert_close(policy.unnormalize_action(policy.normalize_action(x)), x, atol=1e-9, rtol=1e-9)


def test_actions_are_in_physical_units():
    # A perfect-range check: the normalised chunk x = ±1 maps to the fitted min / max.
    policy = _policy()
    lo, hi = policy.normalizer.stats("action")["min"], policy.normalizer.stats("action")["max"]
    np.testing.assert_allclose(policy.unnormalize_action(torch.tensor([[-1.0, -1.0], [1.0, 1.0]])).numpy(),
                               np.stack([lo, hi]), rtol=1e-5)


def test_discrete_scale_shrinks_only_the_discrete_channels(tmp_path):
    plain, scaled = _policy(discrete_action_mask=[False, True]), _policy(discrete_action_mask=[False, True],
                                                                          discrete_scale=4.0)
    a = torch.tensor([[0.5, 12.0], [-2.0, 19.0]], dtype=torch.float64)
    x0, x4 = plain.normalize_action(a), scaled.normalize_action(a)
    torch.testing.assert_close(x4[:, 0], x0[:, 0])  # the continuous channel is untouched
    torch.testing.assert_close(x4[:, 1], x0[:, 1] / 4.0)
    torch.testing.assert_close(scaled.unnormalize_action(x4), a)
    scaled.save(tmp_path / "ckpt")
    assert Policy.load(tmp_path / "ckpt").discrete_scale == 4.0
    with pytest.raises(ValueError, match="discrete_scale must be >= 1"):
        _policy(discrete_scale=0.5)


def test_threshold_discrete_channels():
    policy = _policy(discrete_action_mask=[False, True])
    a = np.array([[[0.3, 0.2], [-0.7, -0.01]]])
    out = policy.threshold_discrete(a)
    np.testing.assert_array_equal(out, [[[0.3, 1.0], [-0.7, -1.0]]])
    torch.testing.assert_close(policy.threshold_discrete(torch.tensor(a)), torch.tensor(out))
    chunk = policy.predict(np.zeros((16, 2, 3)))
    assert set(np.unique(chunk[..., 1])) <= {-1.0, 1.0}
    assert len(np.unique(chunk[..., 0])) > 2


def test_theta_conditioning_forms_and_errors():
    policy = _policy(p=2)
    obs = np.zeros((3, 2, 3))
    c_dict = policy.condition(obs, {"p0": 1.0, "p1": np.array([0.6, 0.7, 0.8])})
    c_arr = policy.condition(obs, np.array([[1.0, 0.6], [1.0, 0.7], [1.0, 0.8]]))
    torch.testing.assert_close(c_dict, c_arr)
    assert c_dict.shape == (3, 2 * 3 + 2 + 1) and torch.all(c_dict[:, -1] == 1)
    unc = policy.condition(obs, None)
    assert torch.all(unc[:, -3:] == 0)
    torch.testing.assert_close(policy.unconditional(c_dict), unc)
    with pytest.raises(ValueError, match=r"param_names \['p0', 'p1'\]; missing \['p1'\], unknown \[\]"):
        policy.condition(obs, {"p0": 1.0})
    with pytest.raises(ValueError, match="trained without θ"):
        _policy().condition(obs, {"p0": 1.0})


def test_theta_tensor_is_built_once_and_condition_uses_it_as_it_is():
    policy = _policy(p=2)
    theta = policy.theta_tensor({"p1": 0.6, "p0": 1.0})  # any key order: columns in param_names order
    assert theta.shape == (1, 2) and theta.dtype == policy.dtype == torch.float32 and theta.device == policy.device
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0.6]]))
    torch.testing.assert_close(policy.theta_tensor(torch.tensor([1.0, 0.6], dtype=torch.float64)), theta)
    torch.testing.assert_close(policy.theta_tensor(np.array([[1.0, 0.6]])), theta)
    assert policy.theta_tensor({"p0": 1.0, "p1": np.array([0.6, 0.7, 0.8])}).shape == (3, 2)
    assert policy.theta_tensor(None) is None and _policy().theta_tensor(None) is None
    obs = np.random.default_rng(0).normal(size=(3, 2, 3))
    calls = []
    build = policy.theta_tensor
    policy.theta_tensor = lambda v: calls.append(v) or build(v)  # instance attribute: counts the builds
    cond = policy.condition(obs, theta)
    assert calls == []  # the prepared tensor is used as it is (expanded over the batch), nothing rebuilt
    torch.testing.assert_close(cond, policy.condition(obs, {"p0": 1.0, "p1": 0.6}), rtol=0, atol=0)
    assert len(calls) == 1  # a mapping is still accepted, and built on the spot
    with pytest.raises(ValueError, match="1 or 3 rows"):
        policy.condition(obs, torch.zeros(2, 2))


def test_theta_tensor_errors_name_the_policys_param_names():
    policy = _policy(p=2)
    with pytest.raises(ValueError, match=r"param_names \['p0', 'p1'\]; missing \[\], unknown \['v_max'\]"):
        policy.theta_tensor({"p0": 1.0, "p1": 0.5, "v_max": 0.3})
    with pytest.raises(ValueError, match=r"param_names \['p0', 'p1'\]; missing \['p0'\], unknown \['q'\]"):
        policy.theta_tensor({"q": 1.0, "p1": 0.5})
    with pytest.raises(ValueError, match=r"shape \(P,\) or \(N, P\) with P = 2 \(param_names \['p0', 'p1'\]\)"):
        policy.theta_tensor(np.zeros(3))
    with pytest.raises(ValueError, match="scalars or all of one length"):
        policy.theta_tensor({"p0": np.zeros(2), "p1": np.zeros(3)})
    with pytest.raises(ValueError, match="trained without θ"):
        _policy().theta_tensor({"p0": 1.0})
    with pytest.raises(ValueError, match="unknown"):
        policy.predict(np.zeros((2, 3)), stl_params={"p0": 1.0, "p1": 1.0, "p2": 1.0})


def test_classifier_free_guidance_combines_predictions_and_doubles_nfe():
    policy = _policy("flow", p=1)
    assert policy.nfe(10) == 10
    policy.guidance_scale = 2.0
    assert policy.nfe(10) == 20
    obs, theta = np.random.default_rng(0).normal(size=(4, 2, 3)), np.full((4, 1), 1.2)
    cond = policy.condition(obs, theta)
    # scale 0 is the unconditional model, scale 1 the conditional one
    policy.guidance_scale = 0.0
    got = policy.sample_normalized(cond, generator=torch.Generator().manual_seed(0))
    want = policy.head.sample(policy.unconditional(cond), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want)
    policy.guidance_scale = 1.0
    got = policy.sample_normalized(cond, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, policy.head.sample(cond, generator=torch.Generator().manual_seed(0)))


def test_theta_dropout_in_training_noise():
    policy = _policy(p=1, cfg_dropout=0.3)
    keep = policy.draw_noise(10000, generator=torch.Generator().manual_seed(0))["cfg_keep"]
    assert abs(keep.mean().item() - 0.7) < 0.02


@pytest.mark.parametrize("kind", ["ddpm", "flow", "meanflow"])
def test_save_load_gives_identical_actions(tmp_path, kind):
    policy = _policy(kind, net={"name": "unet", "down_dims": [8, 16], "time_embed_dim": 8}, p=1,
                     discrete_action_mask=[True, False], guidance_scale=1.5)
    with torch.no_grad():  # move away from the initialisation so that loading has something to restore
        for prm in policy.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    policy.save(tmp_path)
    loaded = Policy.load(tmp_path)
    assert loaded.config() == policy.config() and loaded.device.type == "cpu"
    obs = np.random.default_rng(1).normal(size=(3, 2, 3))
    a = policy.predict(obs, {"p0": 1.1}, generator=torch.Generator().manual_seed(5))
    b = loaded.predict(obs, {"p0": 1.1}, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(a, b)


def test_ddpm_schedule_is_restored_from_the_checkpoint(tmp_path):
    policy = Policy(3, 2, 2, 8, 4, head={"kind": "ddpm", "num_train_steps": 50}, net=TINY_NET)
    assert policy.head.alphas_cumprod.shape == (50,)
    # A checkpoint samples with the schedule it holds, not with one recomputed by the current code.
    custom = torch.linspace(0.999, 0.01, 50)
    policy.head.alphas_cumprod.copy_(custom)
    policy.save(tmp_path)
    loaded = Policy.load(tmp_path)
    torch.testing.assert_close(loaded.head.alphas_cumprod, custom)
    obs = np.zeros((2, 2, 3))
    np.testing.assert_array_equal(policy.predict(obs, generator=torch.Generator().manual_seed(0)),
                                  loaded.predict(obs, generator=torch.Generator().manual_seed(0)))


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="policy.yaml is missing"):
        Policy.load(tmp_path)
    with pytest.raises(ValueError, match="n_action_steps=8 must be <= horizon - n_obs_steps"):
        Policy(3, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="normalizer lacks keys"):
        Policy(3, 2, 2, 8, 4, param_names=["a"], normalizer=_normalizer())


# ---------------------------------------------------------------------------------------------- golden
GOLDEN_SPECS = {
    "ddpm": dict(head={"kind": "ddpm"}, discrete_action_mask=[False, True]),
    "flow": dict(head={"kind": "flow", "solver": "midpoint"}, param_names=["p0"], guidance_scale=1.5),
    "meanflow": dict(head={"kind": "meanflow"}),
}


def _golden_inputs(policy: Policy) -> tuple[np.ndarray, np.ndarray | None]:
    obs = np.random.default_rng(123).normal(5.0, 2.0, size=(4, 2, 3))
    params = np.full((4, 1), 1.1) if policy.param_names else None
    return obs, params


def make_golden(directory: Path = GOLDEN) -> None:
    """Regenerate the committed golden checkpoints and actions (STLFLOW_REGEN_GOLDEN=1 pytest ...)."""
    from safetensors.torch import save_file

    for kind, spec in GOLDEN_SPECS.items():
        p = len(spec.get("param_names", []))
        torch.manual_seed(0)
        policy = Policy(3, 2, 2, 8, 4, net=TINY_NET, normalizer=_normalizer(p=p), **spec)
        opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(30):  # a few steps so that the weights are not the initialisation
            obs = torch.randn(32, 2, 3, generator=g) * 2 + 5
            act = torch.stack([obs[:, -1, 0] * 0.5 - 1, obs[:, -1, 1] + 10], -1)[:, None].expand(32, 8, 2)
            batch = {"obs": obs, "action": act, "params": torch.rand(32, 1, generator=g) + 0.5}
            loss = policy.compute_loss(batch, policy.draw_noise(32, generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
        policy.save(directory / kind)
        obs, params = _golden_inputs(policy)
        actions = policy.predict(obs, params, generator=torch.Generator().manual_seed(7))
        save_file({"obs": torch.tensor(obs), "actions": torch.tensor(actions)},
                  str(directory / f"{kind}_actions.safetensors"))


@pytest.mark.skipif(os.environ.get("STLFLOW_REGEN_GOLDEN") != "1", reason="only when regenerating golden files")
def test_regenerate_golden():
    make_golden()


@pytest.mark.parametrize("kind", sorted(GOLDEN_SPECS))
def test_golden_actions(kind):
    from safetensors.torch import load_file

    policy = Policy.load(GOLDEN / kind)
    ref = load_file(str(GOLDEN / f"{kind}_actions.safetensors"))
    obs, params = _golden_inputs(policy)
    np.testing.assert_array_equal(obs, ref["obs"].numpy())
    actions = policy.predict(obs, params, generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(actions, ref["actions"].numpy(), atol=1e-5, rtol=1e-5)


def test_golden_checkpoints_are_small():
    total = sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file())
    assert 0 < total < 200_000
