"""Generative heads: exact recovery with perfect predictors, NFE accounting, MeanFlow JVP, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stlflow.policy.heads import DDPMHead, FlowHead, MeanFlowHead, build_head, squared_cosine_alphas_cumprod
from stlflow.policy.nets import ResidualMLP, UNet1D

torch.set_num_threads(1)

TP, DA = 8, 2


class Oracle(nn.Module):
    """A 'perfect' network for a single clean chunk x0 (any condition): it counts its calls.

    kind "eps": ε̂(x_k) = (x_k - sqrt(ᾱ_k) x0) / sqrt(1 - ᾱ_k); "v": v̂(x_t) = (x_t - x0) / t;
    "u": the average velocity of the straight path, (z_t - x0) / t.
    """

    def __init__(self, x0: torch.Tensor, kind: str, n_times: int = 1, alphas_cumprod=None):
        super().__init__()
        self.x0, self.kind, self.n_times, self.calls = x0, kind, n_times, 0
        self.ab = alphas_cumprod
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, times, cond):
        self.calls += 1
        t = times[:, 0].to(x)[:, None, None]
        if self.kind == "eps":
            k = torch.round(times[:, 0] * (len(self.ab) - 1)).long()
            ab = self.ab[k].to(x)[:, None, None]
            return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return (x - self.x0) / t


def _x0(batch=3, seed=0):
    return torch.rand(batch, TP, DA, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.8 - 0.9


def _cond(batch=3):
    return torch.zeros(batch, 1, dtype=torch.float64)


def _head(kind: str, x0: torch.Tensor, **kw):
    if kind == "ddpm":
        head = DDPMHead(Oracle(x0, "eps"), TP, DA, **kw).double()
        head.net.ab = head.alphas_cumprod
        return head
    if kind == "flow":
        return FlowHead(Oracle(x0, "v"), TP, DA, **kw)
    return MeanFlowHead(Oracle(x0, "u", n_times=2), TP, DA, **kw)


@pytest.mark.parametrize("kind,kw", [("ddpm", {}), ("flow", {}), ("flow", {"solver": "midpoint"}), ("meanflow", {})])
@given(steps=st.integers(1, 20), t_start=st.floats(0.05, 1.0))
@settings(max_examples=20, deadline=None)
def test_perfect_predictor_recovers_the_data_from_x_init_at_t_start(kind, kw, steps, t_start):
    x0 = _x0()
    head = _head(kind, x0, **kw)
    x_init = head.noise_to(x0, t_start, generator=torch.Generator().manual_seed(1))
    head.net.calls = 0
    out = head.sample(_cond(), x_init=x_init, t_start=t_start, steps=steps)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    assert head.net.calls == head.nfe(steps, t_start)


def test_nfe_counts():
    x0 = _x0()
    assert _head("flow", x0).nfe(10) == 10
    assert _head("flow", x0, solver="midpoint").nfe(10) == 20
    assert _head("meanflow", x0).nfe() == 1 and _head("meanflow", x0).nfe(3) == 3
    ddpm = _head("ddpm", x0)
    assert ddpm.nfe() == 16 and ddpm.nfe(100) == 100 and ddpm.nfe(1000) == 100
    assert ddpm.nfe(16, t_start=0.05) == ddpm.level_to_step(0.05) + 1  # only k_start + 1 distinct steps left
    for head in (ddpm, _head("flow", x0), _head("meanflow", x0)):
        assert head.nfe(5, t_start=0.0) == 0


def test_t_start_zero_returns_x_init_unchanged():
    x0 = _x0()
    for kind in ("ddpm", "flow", "meanflow"):
        head = _head(kind, x0)
        x = torch.randn(3, TP, DA, dtype=torch.float64)
        torch.testing.assert_close(head.sample(_cond(), x_init=x, t_start=0.0), x)
        torch.testing.assert_close(head.noise_to(x, 0.0), x)


def test_cold_start_needs_no_x_init_but_warm_start_does():
    x0 = _x0()
    head = _head("flow", x0)
    torch.testing.assert_close(head.sample(_cond(), generator=torch.Generator().manual_seed(0)), x0)
    with pytest.raises(ValueError, match="x_init is required when t_start < 1"):
        head.sample(_cond(), t_start=0.5)
    with pytest.raises(ValueError, match=r"x_init must have shape \(B, 8, 2\)"):
        head.sample(_cond(), x_init=torch.zeros(3, 4, 2), t_start=0.5)
    with pytest.raises(ValueError, match="t_start must be in"):
        head.sample(_cond(), x_init=x0, t_start=1.5)


def test_sampling_is_deterministic_given_a_generator():
    torch.manual_seed(0)
    head = FlowHead(ResidualMLP(DA, TP, 1, width=32, n_blocks=1), TP, DA)
    cond = torch.zeros(4, 1)
    a = head.sample(cond, generator=torch.Generator().manual_seed(3))
    b = head.sample(cond, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@given(t=st.floats(0.01, 1.0))
@settings(max_examples=20, deadline=None)
def test_noise_to_marginals(t):
    x0 = torch.full((4000, TP, DA), 0.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    flow = _head("flow", x0).noise_to(x0, t, generator=g)
    assert abs(flow.mean().item() - (1 - t) * 0.5) < 0.01 + 3 * t / math.sqrt(x0.numel())
    assert abs(flow.std().item() - t) < 0.01
    ddpm = _head("ddpm", x0)
    ab = ddpm.alphas_cumprod[ddpm.level_to_step(t)].item()
    x = ddpm.noise_to(x0, t, generator=g)
    assert abs(x.mean().item() - math.sqrt(ab) * 0.5) < 0.01
    assert abs(x.std().item() - math.sqrt(1 - ab)) < 0.01


def test_squared_cosine_schedule():
    ab = squared_cosine_alphas_cumprod(100).numpy()
    assert ab.shape == (100,)
    assert np.all(np.diff(ab) < 0) and 0.999 < ab[0] < 1.0 and ab[-1] < 1e-3
    betas = 1 - ab / np.concatenate([[1.0], ab[:-1]])
    assert np.all((betas > 0) & (betas <= 0.999 + 1e-12))
    # iDDPM closed form away from the cap: ᾱ_k = f(k+1)/f(0) with f(τ) = cos²((τ/K + s)/(1+s) π/2)
    f = lambda tau: math.cos((tau / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(ab[:90], [f(k + 1) / f(0) for k in range(90)], rtol=1e-10)


@pytest.mark.parametrize("net_name,jvp", [("mlp", "auto"), ("mlp", "func"), ("unet", "auto")])
def test_meanflow_total_derivative_matches_finite_differences(net_name, jvp):
    """du/dt by the MLP's hand-written JVP, and by torch.func.jvp (forced, and for a net without forward_jvp)."""
    torch.manual_seed(0)
    if net_name == "mlp":
        net = ResidualMLP(DA, TP, 3, n_times=2, width=32, n_blocks=2, time_scale=10.0).double()
    else:
        net = UNet1D(DA, TP, 3, n_times=2, down_dims=(8, 16), time_embed_dim=8, n_groups=4, time_scale=10.0).double()
    head = MeanFlowHead(net, TP, DA, jvp=jvp)
    b = 4
    z = torch.randn(b, TP, DA, dtype=torch.float64)
    v = torch.randn(b, TP, DA, dtype=torch.float64)
    t = torch.rand(b, dtype=torch.float64) * 0.8 + 0.1
    r = t * torch.rand(b, dtype=torch.float64)
    cond = torch.randn(b, 3, dtype=torch.float64)
    u, dudt = head.u_and_total_derivative(z, v, r, t, cond)
    torch.testing.assert_close(u, head.u(z, r, t, cond))
    h = 1e-6
    fd = (head.u(z + h * v, r, t + h, cond) - head.u(z - h * v, r, t - h, cond)) / (2 * h)
    torch.testing.assert_close(dudt, fd, atol=1e-7, rtol=1e-6)
    assert dudt.abs().max() > 1e-3  # the check is not vacuous


def test_meanflow_loss_backpropagates_through_u_only():
    torch.manual_seed(0)
    net = ResidualMLP(DA, TP, 3, n_times=2, width=32, n_blocks=1, time_scale=10.0)
    head = MeanFlowHead(net, TP, DA, ratio_r_neq_t=1.0)
    loss = head.loss(torch.rand(8, TP, DA) * 2 - 1, torch.randn(8, 3))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_meanflow_loss_split_by_r_eq_t_matches_the_one_pass_identity(ratio):
    """The loss skips the JVP for r = t pairs; value and gradients equal the identity applied to the whole batch."""
    torch.manual_seed(0)
    net = ResidualMLP(DA, TP, 3, n_times=2, width=32, n_blocks=2, time_scale=10.0).double()
    head = MeanFlowHead(net, TP, DA, ratio_r_neq_t=ratio, adaptive_p=0.5)
    x0, cond = torch.rand(16, TP, DA, dtype=torch.float64) * 2 - 1, torch.randn(16, 3, dtype=torch.float64)
    noise = head.draw_noise(16, generator=torch.Generator().manual_seed(3))
    n_jvp = int((noise["r"] < noise["t"]).sum())
    assert n_jvp == 0 if ratio == 0.0 else n_jvp == 16 if ratio == 1.0 else 0 < n_jvp < 16  # both paths exercised
    t, r, eps = (noise[k].double() for k in ("t", "r", "eps"))
    z = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
    v = eps - x0
    u, dudt = head.u_and_total_derivative(z, v, r, t, cond)
    err = (u - (v - (t - r)[:, None, None] * dudt).detach()).pow(2).flatten(1).mean(1)
    reference = (err / (err.detach() + 1e-3).pow(0.5)).mean()
    loss = head.loss(x0, cond, noise)
    torch.testing.assert_close(loss, reference)
    g_ref = torch.autograd.grad(reference, list(net.parameters()))
    g = torch.autograd.grad(loss, list(net.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_ddpm_min_snr_weighting():
    torch.manual_seed(0)
    net = ResidualMLP(DA, TP, 3, width=32, n_blocks=1).double()
    x0, cond = torch.rand(32, TP, DA, dtype=torch.float64) * 2 - 1, torch.randn(32, 3, dtype=torch.float64)
    noise = DDPMHead(net, TP, DA).draw_noise(32, generator=torch.Generator().manual_seed(1))
    plain = DDPMHead(net, TP, DA).loss(x0, cond, noise)
    # γ above every level's SNR: all weights are 1
    torch.testing.assert_close(DDPMHead(net, TP, DA, snr_gamma=1e9).loss(x0, cond, noise), plain)
    head = DDPMHead(net, TP, DA, snr_gamma=5.0)
    ab = head.alphas_cumprod[noise["k"]].double()
    snr = ab / (1 - ab)
    w = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    assert (w < 1).any() and (w == 1).any()  # both regimes occur in this batch
    x_k = ab.sqrt()[:, None, None] * x0 + (1 - ab).sqrt()[:, None, None] * noise["eps"].double()
    per = (net(x_k, head._times(noise["k"]).double(), cond) - noise["eps"].double()).pow(2)
    torch.testing.assert_close(head.loss(x0, cond, noise), (w[:, None, None] * per).mean())
    with pytest.raises(ValueError, match="snr_gamma"):
        DDPMHead(net, TP, DA, snr_gamma=0.0)


def test_meanflow_draws_r_le_t_and_the_configured_fraction_of_r_eq_t():
    head = MeanFlowHead(ResidualMLP(DA, TP, 1, n_times=2, width=8, n_blocks=1), TP, DA, ratio_r_neq_t=0.25)
    n = head.draw_noise(20000, generator=torch.Generator().manual_seed(0))
    assert torch.all(n["r"] <= n["t"]) and torch.all((n["t"] > 0) & (n["t"] < 1))
    assert abs((n["r"] < n["t"]).float().mean().item() - 0.25) < 0.02
    uni = MeanFlowHead(ResidualMLP(DA, TP, 1, n_times=2, width=8, n_blocks=1), TP, DA, ratio_r_neq_t=1.0,
                       time_sampling="uniform").draw_noise(20000, generator=torch.Generator().manual_seed(0))
    # max and min of two uniforms: E[t] = 2/3, E[r] = 1/3, and the one-step corner t > 0.9 is visited 19% of the time
    assert abs(uni["t"].mean().item() - 2 / 3) < 0.01 and abs(uni["r"].mean().item() - 1 / 3) < 0.01
    assert abs((uni["t"] > 0.9).float().mean().item() - 0.19) < 0.015 and (n["t"] > 0.9).float().mean() < 0.05
    with pytest.raises(ValueError, match="time_sampling"):
        MeanFlowHead(ResidualMLP(DA, TP, 1, n_times=2), TP, DA, time_sampling="beta")
    # fm_times="single": the r = t rows take one draw (uniform: mean 1/2, 10% below 0.1), the r < t rows are unchanged
    net = ResidualMLP(DA, TP, 1, n_times=2, width=8, n_blocks=1)
    single = MeanFlowHead(net, TP, DA, ratio_r_neq_t=0.5, time_sampling="uniform", fm_times="single").draw_noise(
        40000, generator=torch.Generator().manual_seed(1))
    fm, mf = single["r"] == single["t"], single["r"] < single["t"]
    assert abs(fm.float().mean().item() - 0.5) < 0.02 and bool(torch.all(fm | mf))
    assert abs(single["t"][fm].mean().item() - 0.5) < 0.01 and abs((single["t"][fm] < 0.1).float().mean() - 0.1) < 0.01
    assert abs(single["t"][mf].mean().item() - 2 / 3) < 0.01
    with pytest.raises(ValueError, match="fm_times"):
        MeanFlowHead(net, TP, DA, fm_times="min")


def test_flow_time_sampling_modes():
    head = FlowHead(ResidualMLP(DA, TP, 1, width=8, n_blocks=1), TP, DA, time_sampling="logit_normal")
    t = head.draw_noise(20000, generator=torch.Generator().manual_seed(0))["t"]
    assert abs(t.mean().item() - 0.5) < 0.01 and t.std().item() < 0.25  # concentrated in the middle
    with pytest.raises(ValueError, match="time_sampling"):
        FlowHead(ResidualMLP(DA, TP, 1), TP, DA, time_sampling="beta")


def test_head_rejects_a_net_with_the_wrong_number_of_times():
    with pytest.raises(ValueError, match="n_times=2"):
        MeanFlowHead(ResidualMLP(DA, TP, 1, n_times=1), TP, DA)
    with pytest.raises(ValueError, match="unknown head kind"):
        build_head({"kind": "gan"}, ResidualMLP(DA, TP, 1), TP, DA)


def test_every_head_is_reachable_from_the_heads_module():
    from stlflow.policy import head_base, meanflow
    from stlflow.policy.heads import HEADS, Head

    assert HEADS == {"ddpm": DDPMHead, "flow": FlowHead, "meanflow": meanflow.MeanFlowHead}
    assert MeanFlowHead is meanflow.MeanFlowHead and Head is head_base.Head
    assert all(issubclass(h, Head) for h in HEADS.values())
