"""The U-Net's Conv1d: the GEMM weight gradient equals torch's own backward, forward-mode AD goes through it,
checkpoints are those of nn.Conv1d, and ``auto`` takes the GEMM only where it was measured to pay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stlflow.policy.nets import Conv1d, UNet1D

torch.set_num_threads(1)

SHAPES = [(6, 8, 5, 1, 2), (8, 8, 3, 2, 1), (6, 4, 1, 1, 0), (5, 7, 4, 1, 1)]  # c_in, c_out, kernel, stride, padding


def _grads(conv: Conv1d, x: torch.Tensor, g: torch.Tensor, kind: str) -> list[torch.Tensor]:
    conv.weight_grad = kind
    x = x.detach().requires_grad_(True)
    conv.zero_grad(set_to_none=True)
    conv(x).backward(g)
    return [x.grad, conv.weight.grad, conv.bias.grad]


@pytest.mark.parametrize("c_in,c_out,k,stride,pad", SHAPES)
def test_gemm_weight_gradient_equals_torchs_backward(c_in, c_out, k, stride, pad):
    torch.manual_seed(0)
    conv = Conv1d(c_in, c_out, k, stride=stride, padding=pad).double()
    x = torch.randn(3, c_in, 8, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    gemm, aten = _grads(conv, x, g, "gemm"), _grads(conv, x, g, "aten")
    for a, b in zip(gemm, aten):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    conv.weight_grad = "gemm"
    w, b = conv.weight.detach().requires_grad_(True), conv.bias.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(conv, {"weight": w, "bias": b}, (x,)),
                                    (x.requires_grad_(True), w, b))


@pytest.mark.parametrize("c_in,c_out,k,stride,pad", SHAPES[:2])
def test_forward_mode_derivative_through_the_gemm_path(c_in, c_out, k, stride, pad):
    torch.manual_seed(0)
    conv = Conv1d(c_in, c_out, k, stride=stride, padding=pad).double()
    conv.weight_grad = "gemm"
    x, dx = torch.randn(2, c_in, 8, dtype=torch.float64), torch.randn(2, c_in, 8, dtype=torch.float64)
    params = dict(conv.named_parameters())
    tangents = {name: torch.randn_like(p) for name, p in params.items()}

    def through(kind):
        conv.weight_grad = kind
        return torch.func.jvp(lambda x, p: torch.func.functional_call(conv, p, (x,)), (x, params), (dx, tangents))

    (y_gemm, dy_gemm), (y_aten, dy_aten) = through("gemm"), through("aten")
    torch.testing.assert_close(y_gemm, y_aten)
    torch.testing.assert_close(dy_gemm, dy_aten)


def test_auto_takes_the_gemm_from_512_input_channels_only_when_training():
    wide, narrow = Conv1d(512, 8, 5, padding=2), Conv1d(256, 8, 5, padding=2)
    assert "Gemm" in wide(torch.randn(2, 512, 4)).grad_fn.name()
    assert "Gemm" not in narrow(torch.randn(2, 256, 4)).grad_fn.name()
    with torch.no_grad():
        assert wide(torch.randn(2, 512, 4)).grad_fn is None
    wide.weight_grad = "fast"
    with pytest.raises(ValueError, match="weight_grad must be 'auto', 'gemm' or 'aten', got 'fast'"):
        wide(torch.randn(2, 512, 4))


def test_checkpoints_are_those_of_nn_conv1d():
    torch.manual_seed(0)
    plain = nn.Conv1d(4, 6, 5, stride=2, padding=2)
    ours = Conv1d(4, 6, 5, stride=2, padding=2)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)


def test_bf16_autocast_gradients_stay_close_to_fp32():
    torch.manual_seed(0)
    conv = Conv1d(64, 32, 5, padding=2)
    conv.weight_grad = "gemm"
    x = torch.randn(16, 64, 8)
    g = torch.randn(16, 32, 8)
    ref = _grads(conv, x, g, "gemm")
    x = x.detach().requires_grad_(True)
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(g)
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    for got, want in zip([x.grad, conv.weight.grad, conv.bias.grad], ref):
        assert (got - want).norm() <= 2e-2 * want.norm()


def test_a_unets_gradients_are_the_same_with_either_weight_gradient():
    torch.manual_seed(0)
    net = UNet1D(2, 8, 3, down_dims=(8, 16), time_embed_dim=8, n_groups=4).double()
    x, t, c = torch.randn(4, 8, 2).double(), torch.rand(4, 1).double(), torch.randn(4, 3).double()
    grads = {}
    for kind in ("gemm", "aten"):
        for m in net.modules():
            if isinstance(m, Conv1d):
                m.weight_grad = kind
        net.zero_grad(set_to_none=True)
        net(x, t, c).square().sum().backward()
        grads[kind] = [p.grad.clone() for p in net.parameters()]
    assert sum(isinstance(m, Conv1d) for m in net.modules()) == sum(isinstance(m, nn.Conv1d) for m in net.modules())
    for a, b in zip(grads["gemm"], grads["aten"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
