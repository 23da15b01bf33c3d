"""Networks: shapes, construction-time validation, documented parameter counts, FiLM conditioning."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stlflow.policy.nets import ResidualMLP, SinusoidalEmbedding, UNet1D, build_net, count_parameters

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["unet", "mlp"])
@pytest.mark.parametrize("n_times", [1, 2])
def test_output_shape_matches_input(name, n_times):
    torch.manual_seed(0)
    net = build_net({"name": name}, action_dim=3, horizon=16, cond_dim=7, n_times=n_times)
    x = torch.randn(5, 16, 3)
    y = net(x, torch.rand(5, n_times), torch.randn(5, 7))
    assert y.shape == x.shape and torch.isfinite(y).all()


@given(levels=st.integers(1, 4), mult=st.integers(1, 3))
@settings(max_examples=15, deadline=None)
def test_unet_accepts_every_horizon_divisible_by_its_downsampling(levels, mult):
    dims = [8 * 2**i for i in range(levels)]
    horizon = mult * 2 ** (levels - 1)
    net = UNet1D(2, horizon, 4, down_dims=dims, time_embed_dim=8)
    assert net(torch.randn(2, horizon, 2), torch.rand(2, 1), torch.randn(2, 4)).shape == (2, horizon, 2)


def test_unet_rejects_indivisible_horizon_with_a_clear_message():
    with pytest.raises(ValueError, match=r"horizon=12 must be divisible by 2\*\*\(len\(down_dims\)-1\)=8"):
        UNet1D(2, 12, 4, down_dims=(8, 16, 32, 64))


def test_unet_rejects_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="n_groups"):
        UNet1D(2, 16, 4, down_dims=(12, 24), n_groups=8)


def test_wrong_time_shape_is_reported():
    net = ResidualMLP(2, 8, 3, n_times=2)
    with pytest.raises(ValueError, match=r"times must have shape \(B, 2\)"):
        net(torch.randn(4, 8, 2), torch.rand(4, 1), torch.randn(4, 3))


def test_documented_parameter_counts():
    # Pinned so that a silent change of a default shows up (numbers in nets.py's docstring).
    assert count_parameters(ResidualMLP(2, 16, 20)) == 1_125_472
    assert count_parameters(UNet1D(2, 16, 20)) == 1_144_162
    assert count_parameters(UNet1D(2, 16, 20, down_dims=(64, 128, 256))) == 4_159_874


def test_diffusion_policy_low_dim_default_is_constructible():
    net = UNet1D(2, 16, 20, down_dims=(256, 512, 1024), time_embed_dim=256)
    assert 60e6 < count_parameters(net) < 70e6  # DP's analytic count: ~65.8M (cond 2 x 20)
    with torch.no_grad():
        assert net(torch.randn(1, 16, 2), torch.rand(1, 1), torch.randn(1, 20)).shape == (1, 16, 2)


@pytest.mark.parametrize("name", ["unet", "mlp"])
def test_condition_and_time_change_the_output(name):
    torch.manual_seed(0)
    net = build_net({"name": name}, action_dim=2, horizon=8, cond_dim=4, n_times=1)
    x, t, c = torch.randn(3, 8, 2), torch.rand(3, 1), torch.randn(3, 4)
    y = net(x, t, c)
    assert not torch.allclose(y, net(x, t, c + 1.0))
    assert not torch.allclose(y, net(x, (t + 0.3) % 1, c))


@given(t=st.lists(st.floats(0, 1), min_size=1, max_size=8), dim=st.sampled_from([2, 8, 64]))
@settings(max_examples=30, deadline=None)
def test_sinusoidal_embedding_is_bounded_and_distinguishes_times(t, dim):
    emb = SinusoidalEmbedding(dim)(torch.tensor(t, dtype=torch.float64))
    assert emb.shape == (len(t), dim)
    assert emb.abs().max() <= 1.0 + 1e-12
    # sin^2 + cos^2 = 1 for every frequency
    half = dim // 2
    np.testing.assert_allclose((emb[:, :half] ** 2 + emb[:, half:] ** 2).numpy(), 1.0, atol=1e-12)


def test_unknown_net_name():
    with pytest.raises(ValueError, match="unknown network 'transformer'"):
        build_net({"name": "transformer"}, 2, 8, 3, 1)


@pytest.mark.parametrize("n_times", [1, 2])
def test_mlp_hand_written_jvp_equals_forward_mode_ad(n_times):
    """ResidualMLP.forward_jvp (MeanFlow's du/dt on CPU) = torch.func.jvp with tangents (dx, dtimes, 0)."""
    torch.manual_seed(0)
    net = ResidualMLP(3, 8, 5, n_times=n_times, width=32, n_blocks=2, time_embed_dim=16, time_scale=10.0).double()
    with torch.no_grad():  # LayerNorm affine away from its (1, 0) init, so the rule's gain term is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    x, dx = torch.randn(6, 8, 3, dtype=torch.float64), torch.randn(6, 8, 3, dtype=torch.float64)
    times, dtimes = torch.rand(6, n_times, dtype=torch.float64), torch.randn(6, n_times, dtype=torch.float64)
    cond = torch.randn(6, 5, dtype=torch.float64)
    y, dy = net.forward_jvp(x, times, cond, dx, dtimes)
    y_ref, dy_ref = torch.func.jvp(lambda a, b: net(a, b, cond), (x, times), (dx, dtimes))
    assert torch.equal(y, net(x, times, cond))  # the primal is the forward pass itself
    torch.testing.assert_close(dy, dy_ref, rtol=1e-10, atol=1e-12)
    assert dy.abs().max() > 1e-2 and not dy.requires_grad
    # the primal carries the same gradients as forward (the loss backpropagates through it)
    params = list(net.parameters())
    g = torch.autograd.grad((y * dx).sum(), params)
    g_ref = torch.autograd.grad((net(x, times, cond) * dx).sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@settings(max_examples=15, deadline=None)
@given(n_times=st.sampled_from([1, 2]), batch=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_mlp_inference_path_equals_the_module_path_bit_for_bit(n_times, batch, seed):
    torch.manual_seed(seed)
    net = ResidualMLP(action_dim=3, horizon=8, cond_dim=5, n_times=n_times, width=32, n_blocks=2,
                      time_embed_dim=16).eval()
    x, times, cond = torch.randn(batch, 8, 3), torch.rand(batch, n_times), torch.randn(batch, 5)
    with torch.enable_grad():
        reference = net(x, times, cond)  # the nn.Module path (autograd on)
    with torch.no_grad():
        fast = net.forward_inference(x, times, cond)  # what a batched no-grad call runs
    assert torch.equal(fast, reference.detach())
    with torch.no_grad(), pytest.raises(ValueError, match="times must have shape"):
        net(x, times[:, :1].expand(batch, n_times + 1), cond)


@settings(max_examples=20, deadline=None)
@given(n_times=st.sampled_from([1, 2]), seed=st.integers(0, 10_000), scale=st.sampled_from([0.05, 1.0, 30.0]))
def test_mlp_single_sample_numpy_path_matches_torch(n_times, seed, scale):
    """A no-grad batch-1 call runs ``forward_single`` (numpy); it gives ``forward_inference``'s numbers up to
    float32 rounding, over weights small and large (mish's exp clamp, layer norm of large activations)."""
    torch.manual_seed(seed)
    net = ResidualMLP(action_dim=3, horizon=8, cond_dim=5, n_times=n_times, width=32, n_blocks=2,
                      time_embed_dim=16).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, scale / max(1, p.shape[-1]) ** 0.5)
    x, times, cond = torch.randn(1, 8, 3), torch.rand(1, n_times), torch.randn(1, 5)
    with torch.no_grad():
        single = net(x, times, cond)
        reference = net.forward_inference(x, times, cond)
    assert single.shape == x.shape and single.dtype == torch.float32
    torch.testing.assert_close(single, reference, rtol=2e-5, atol=2e-5 * float(reference.abs().max()))
    # the numpy views follow in-place weight updates (a policy evaluated between training steps)
    with torch.no_grad():
        net.out[1].bias.add_(1.0)
        torch.testing.assert_close(net(x, times, cond), net.forward_inference(x, times, cond), rtol=2e-5,
                                   atol=2e-5 * float(reference.abs().max() + 1))
        # new parameter tensors (a dtype round trip, a state dict loaded by assignment) and storages moved to shared
        # memory (what starting a worker process does to the parent's tensors) are picked up
        net.share_memory()
        torch.testing.assert_close(net(x, times, cond), net.forward_inference(x, times, cond), rtol=2e-5,
                                   atol=2e-5 * float(reference.abs().max() + 1))
        assert "_np_cache" not in pickle.loads(pickle.dumps(net)).__dict__  # a pickled net makes its own views
        net.double().float()
        net.load_state_dict({k: v.clone() + 0.01 for k, v in net.state_dict().items()}, assign=True)
        torch.testing.assert_close(net(x, times, cond), net.forward_inference(x, times, cond), rtol=2e-5,
                                   atol=2e-5 * float(reference.abs().max() + 1))
    with torch.no_grad(), pytest.raises(ValueError, match="times must have shape"):
        net(x, times[:, :1].expand(1, n_times + 1), cond)
