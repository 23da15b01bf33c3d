"""Denoising networks: a 1-D temporal U-Net with FiLM conditioning and a residual MLP.

Both map ``(x, times, cond) -> y`` with

- ``x``: ``(B, Tp, Da)`` a (noisy) normalised action chunk, Tp = ``horizon``, Da = action dim;
- ``times``: ``(B, n_times)`` noise levels / flow times in [0, 1] (one for DDPM and flow, two ``(t, t - r)``
  for the one-step average-velocity head);
- ``cond``: ``(B, Dc)`` the global condition (flattened normalised observation history, optional θ);
- ``y``: ``(B, Tp, Da)`` the head's regression target (noise, velocity or average velocity).

The U-Net follows the architecture described in the Diffusion Policy paper (Chi et al. 2023, §III-B): a
temporal convolutional U-Net over the chunk's time axis, residual blocks of two (Conv1d, GroupNorm, Mish)
layers, the condition injected by FiLM (a per-channel scale and bias computed from the time embedding and
the global condition) in every residual block, a sinusoidal time embedding, stride-2 convolutions to
downsample and transposed convolutions to upsample. It was written here from that description.

Parameter counts (``count_parameters``; Da = 2, Tp = 16, Dc = 20; pinned in ``tests/test_nets.py``):

==================================================================  ==========
network                                                             parameters
==================================================================  ==========
``ResidualMLP()`` width 256, 4 blocks (``net=mlp``, the CPU default)   1,125,472
``UNet1D()`` down_dims 32/64/128, time embed 64 (``net=unet``)         1,144,162
``UNet1D(down_dims=(64, 128, 256))``                                    4,159,874
``UNet1D(down_dims=(256, 512, 1024), time_embed_dim=256)`` (DP)        ~65.5 M
==================================================================  ==========

Training samples/s and per-call latency are printed by ``benchmarks/train_throughput.py`` and
``benchmarks/policies.py --latency-only``. On the shared 2-core development machine (load average ~7, one
thread, batch 256, Crossing dimensions) the throughput script measured 13 samples/s for DP's configuration,
318 for ``net=unet`` and 1905 for ``net=mlp``: the MLP is the default because it trains ~6x faster than the
CPU-sized U-Net at the same parameter count. The U-Net's wide convolutions (512 channels and more) compute their weight
gradient as one GEMM (:class:`Conv1d`): at DP's configuration that took the trainer's step from 1.0x to 2.2x Diffusion
Policy's at one thread and to 1.4x at two (``benchmarks/train_throughput.py --vs-dp``, batch 256).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stlflow.policy import mlp_numpy

__all__ = ["Conv1d", "SinusoidalEmbedding", "UNet1D", "ResidualMLP", "build_net", "count_parameters", "layer_norm_jvp",
           "linear_jvp", "mish_jvp"]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal embedding of scalars in [0, 1]: ``(B,) -> (B, dim)``.

    The input is scaled by ``scale`` (1000 by default, so that t in [0, 1] spans the frequencies the way a
    DDPM step index in [0, 1000) would).
    """

    def __init__(self, dim: int, scale: float = 1000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"SinusoidalEmbedding: dim must be even, got {dim}")
        self.dim, self.scale = dim, scale

    def _freqs(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        return torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / max(half - 1, 1))

    def forward(self, t: Tensor) -> Tensor:
        arg = (t * self.scale)[:, None] * self._freqs(t)[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)

    def forward_jvp(self, t: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
        """(embedding, its derivative along ``dt`` (B,)); see :meth:`ResidualMLP.forward_jvp`."""
        freqs = self._freqs(t)[None, :]
        arg = (t * self.scale)[:, None] * freqs
        sin, cos = arg.sin(), arg.cos()
        with torch.no_grad():
            darg = (dt * self.scale)[:, None] * freqs
            return torch.cat([sin, cos], dim=-1), torch.cat([cos.detach() * darg, -sin.detach() * darg], dim=-1)


class TimeEncoder(nn.Module):
    """Embed ``n_times`` scalars (each sinusoidally), concatenate, then an MLP: ``(B, n_times) -> (B, dim)``."""

    def __init__(self, dim: int, n_times: int = 1, scale: float = 1000.0):
        super().__init__()
        self.n_times = n_times
        self.embed = SinusoidalEmbedding(dim, scale)
        self.mlp = nn.Sequential(nn.Linear(dim * n_times, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))

    def forward(self, times: Tensor) -> Tensor:
        if times.ndim != 2 or times.shape[1] != self.n_times:
            raise ValueError(f"times must have shape (B, {self.n_times}), got {tuple(times.shape)}")
        return self.mlp(torch.cat([self.embed(times[:, i]) for i in range(self.n_times)], dim=-1))

    def forward_jvp(self, times: Tensor, dtimes: Tensor) -> tuple[Tensor, Tensor]:
        """(embedding, its derivative along ``dtimes`` (B, n_times)); see :meth:`ResidualMLP.forward_jvp`."""
        if times.ndim != 2 or times.shape[1] != self.n_times:
            raise ValueError(f"times must have shape (B, {self.n_times}), got {tuple(times.shape)}")
        pairs = [self.embed.forward_jvp(times[:, i], dtimes[:, i]) for i in range(self.n_times)]
        emb, demb = torch.cat([p[0] for p in pairs], dim=-1), torch.cat([p[1] for p in pairs], dim=-1)
        lin1, act, lin2 = self.mlp
        return linear_jvp(lin2, *mish_jvp(act, *linear_jvp(lin1, emb, demb)))


class _Conv1dGemmWeightGrad(torch.autograd.Function):
    """``F.conv1d`` whose weight gradient is one matrix product over the unfolded input windows.

    On CPU, torch's convolution backward computes the weight and bias gradients of a short-signal, wide
    convolution through a slow path: at Diffusion Policy's deepest level (1024 channels, 4 time steps, kernel 5,
    batch 64, one thread) it took 470 ms against 50 ms for the input gradient and 73 ms for the forward. As
    ``(B Lout, Co)^T @ (B Lout, C k)`` the same weight gradient is one GEMM (~4x less time there); the input
    gradient stays torch's own. Forward-mode AD (``torch.func.jvp``) goes through :meth:`jvp`.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
        return F.conv1d(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, stride, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.stride, ctx.padding = stride, padding

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(grad, x, weight, None, [s], [p], [1], False, [0], 1,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            c_out, c_in, k = weight.shape
            windows = F.pad(x, (p, p)).unfold(2, k, s)  # (B, C, Lout, k)
            rows = windows.permute(0, 2, 1, 3).reshape(-1, c_in * k)  # (B Lout, C k)
            gw = (grad.transpose(1, 2).reshape(-1, c_out).t() @ rows).view(c_out, c_in, k)
        if ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2))
        return gx, gw, gb, None, None

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dw: Tensor | None, db: Tensor | None, _ds, _dp) -> Tensor:
        x, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        # conv1d is linear in x and in (weight, bias): d out = conv(dx, w) + conv(x, dw) + db
        out = F.conv1d(torch.zeros_like(x) if dx is None else dx, weight, db, s, p)
        return out if dw is None else out + F.conv1d(x, dw, None, s, p)


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` (same parameters, state-dict keys and forward) whose training backward computes the weight
    gradient as one GEMM (:class:`_Conv1dGemmWeightGrad`) where that is faster than torch's own.

    ``weight_grad``: ``"auto"`` (default) takes the GEMM for inputs of at least ``GEMM_MIN_CHANNELS`` channels,
    ``"gemm"`` always, ``"aten"`` never. Measured per layer (fp32, batch 256, one thread, kernel 5, backward of a
    C -> C convolution): torch's / GEMM time 3.5x at C = 1024 and 4 time steps, 1.8x at 8, 1.2x at 16; 2.0x, 1.5x,
    1.0x at C = 512; 0.9-1.1x at C = 256 and 0.5-0.9x below, where the unfold copy costs more than it saves.
    Under CPU autocast the input, weight and bias are cast to the autocast dtype first, as autocast does for
    ``conv1d``, so that the backward's products run in that dtype too.
    """

    GEMM_MIN_CHANNELS = 512
    weight_grad = "auto"  # "auto" | "gemm" | "aten": an attribute, not a parameter; checkpoints do not record it

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(c_in, c_out, kernel_size, stride=stride, padding=padding)

    def _gemm(self) -> bool:
        if self.weight_grad == "auto":
            return self.in_channels >= self.GEMM_MIN_CHANNELS
        if self.weight_grad not in ("gemm", "aten"):
            raise ValueError(f"Conv1d.weight_grad must be 'auto', 'gemm' or 'aten', got {self.weight_grad!r}")
        return self.weight_grad == "gemm"

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self._gemm()):
            return super().forward(x)
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        return _Conv1dGemmWeightGrad.apply(x, w, b, self.stride[0], self.padding[0])


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length preserving."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, c_out),
            nn.Mish(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class FiLMResBlock(nn.Module):
    """Two Conv1dBlocks; the condition gives a per-channel scale and bias (FiLM) after the first."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(x)
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.conv2(scale * h + bias)
        return h + self.skip(x)


class UNet1D(nn.Module):
    """1-D temporal conditional U-Net with FiLM (Diffusion Policy's denoiser).

    Args:
        action_dim: Da, channels of the chunk.
        horizon: Tp, length of the chunk; must be divisible by ``2 ** (len(down_dims) - 1)``.
        cond_dim: Dc, size of the global condition (0 allowed).
        n_times: number of time inputs (1, or 2 for the average-velocity head).
        down_dims: channels per resolution level; ``len(down_dims) - 1`` downsamplings.
        time_embed_dim: width of the time embedding (DP's ``diffusion_step_embed_dim``).
        kernel_size: temporal kernel (5 in DP).
        n_groups: GroupNorm groups (8 in DP); every entry of ``down_dims`` must be divisible by it.
        time_scale: times in [0, 1] are multiplied by this before the sinusoidal embedding.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        n_times: int = 1,
        down_dims: Sequence[int] = (32, 64, 128),
        time_embed_dim: int = 64,
        kernel_size: int = 5,
        n_groups: int = 8,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if not down_dims:
            raise ValueError("UNet1D: down_dims must list at least one channel count")
        factor = 2 ** (len(down_dims) - 1)
        if horizon % factor:
            raise ValueError(
                f"UNet1D: horizon={horizon} must be divisible by 2**(len(down_dims)-1)={factor} "
                f"(down_dims={down_dims}); change policy.horizon or use fewer levels"
            )
        bad = [d for d in down_dims if d % n_groups]
        if bad:
            raise ValueError(f"UNet1D: down_dims {bad} are not divisible by n_groups={n_groups}")
        self.action_dim, self.horizon, self.cond_dim, self.n_times = action_dim, horizon, cond_dim, n_times
        self.time_encoder = TimeEncoder(time_embed_dim, n_times, time_scale)
        film_dim = time_embed_dim + cond_dim
        dims = [action_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:]))

        def block(ci: int, co: int) -> FiLMResBlock:
            return FiLMResBlock(ci, co, film_dim, kernel_size, n_groups)

        self.down = nn.ModuleList()
        for i, (ci, co) in enumerate(pairs):
            last = i == len(pairs) - 1
            sample = nn.Identity() if last else Conv1d(co, co, 3, stride=2, padding=1)
            self.down.append(nn.ModuleList([block(ci, co), block(co, co), sample]))
        mid = down_dims[-1]
        self.mid = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.up = nn.ModuleList()
        # One upsampling per downsampling; the finest level's skip is not used (as in DP).
        for ci, co in reversed(pairs[1:]):
            self.up.append(nn.ModuleList([block(2 * co, ci), block(ci, ci), nn.ConvTranspose1d(ci, ci, 4, 2, 1)]))
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups), Conv1d(down_dims[0], action_dim, 1)
        )

    def forward(self, x: Tensor, times: Tensor, cond: Tensor) -> Tensor:
        """``x`` (B, Tp, Da), ``times`` (B, n_times), ``cond`` (B, Dc) -> (B, Tp, Da)."""
        film = torch.cat([self.time_encoder(times), cond], dim=-1)
        h = x.transpose(1, 2)
        skips = []
        for res1, res2, down in self.down:
            h = res2(res1(h, film), film)
            skips.append(h)
            h = down(h)
        for res in self.mid:
            h = res(h, film)
        for res1, res2, up in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(res2(res1(h, film), film))
        return self.final(h).transpose(1, 2)


# Forward-mode derivatives by hand, for MeanFlow's JVP (``MeanFlowHead.u_and_total_derivative``). On CPU,
# ``torch.func.jvp`` through this MLP costs 5-7x a forward pass (its layer_norm rule alone ~80x the op's
# forward, its linear rule ~5x), which made the JVP over a quarter of the batch most of a MeanFlow training
# step. Each helper returns (y, dy): y is computed by the module itself (autograd tracks it as in forward), dy
# from detached values without autograd (MeanFlow's target is stop-gradient). tests/test_nets.py checks every
# one against torch.func.jvp.
def linear_jvp(lin: nn.Linear, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    y = lin(x)
    with torch.no_grad():
        return y, nn.functional.linear(dx, lin.weight.detach())


def mish_jvp(act: nn.Module, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(act, nn.Mish):
        raise TypeError(f"forward_jvp knows Mish only, got {type(act).__name__}")
    y = act(x)
    with torch.no_grad():  # mish'(x) = tanh(sp(x)) + x sech^2(sp(x)) sigmoid(x), sp = softplus
        xd = x.detach()
        th = torch.tanh(nn.functional.softplus(xd))
        return y, dx * (th + xd * (1 - th * th) * torch.sigmoid(xd))


def layer_norm_jvp(ln: nn.LayerNorm, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    y = ln(x)
    with torch.no_grad():  # d x_hat = (dx - mean(dx) - x_hat mean(x_hat dx)) / sigma
        xd = x.detach()
        var, mean = torch.var_mean(xd, dim=-1, unbiased=False, keepdim=True)
        inv = torch.rsqrt(var + ln.eps)
        xhat = (xd - mean) * inv
        dxhat = (dx - dx.mean(-1, keepdim=True) - xhat * (xhat * dx).mean(-1, keepdim=True)) * inv
        return y, dxhat if ln.weight is None else dxhat * ln.weight.detach()


class ResidualMLP(nn.Module):
    """Residual MLP over the flattened chunk: small and fast for CPU control.

    ``[x.flatten(), time embedding, cond] -> Linear(width) -> n_blocks x (LayerNorm, Linear, Mish, Linear)
    with residual connections -> LayerNorm -> Linear(Tp * Da)``.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        n_times: int = 1,
        width: int = 256,
        n_blocks: int = 4,
        time_embed_dim: int = 64,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        self.action_dim, self.horizon, self.cond_dim, self.n_times = action_dim, horizon, cond_dim, n_times
        self.time_encoder = TimeEncoder(time_embed_dim, n_times, time_scale)
        self.inp = nn.Linear(horizon * action_dim + time_embed_dim + cond_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Mish(), nn.Linear(2 * width, width))
            for _ in range(n_blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, horizon * action_dim))

    def forward(self, x: Tensor, times: Tensor, cond: Tensor) -> Tensor:
        """``x`` (B, Tp, Da), ``times`` (B, n_times), ``cond`` (B, Dc) -> (B, Tp, Da).

        Without autograd (inference: every control tick) the same operations run through :meth:`forward_inference`,
        which skips the ~30 ``nn.Module`` calls of the network and gives the same numbers bit for bit.
        """
        if not torch.is_grad_enabled():
            if x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == self.inp.weight.dtype == torch.float32:
                return self.forward_single(x, times, cond)
            return self.forward_inference(x, times, cond)
        h = self.inp(torch.cat([x.flatten(1), self.time_encoder(times), cond], dim=-1))
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(h).view(x.shape)

    def forward_inference(self, x: Tensor, times: Tensor, cond: Tensor) -> Tensor:
        """:meth:`forward` as functional calls on the layers' parameters (no module dispatch).

        Hand-written because it is the hot path of a control tick: at batch 1 the module calls cost as much as the
        matrix products (measured 1.3-2.2x faster for the default network, one thread, identical outputs;
        ``tests/test_nets.py``). It assumes the layers :meth:`__init__` builds (Linear, LayerNorm, Mish).
        """
        enc = self.time_encoder
        if times.ndim != 2 or times.shape[1] != enc.n_times:
            raise ValueError(f"times must have shape (B, {enc.n_times}), got {tuple(times.shape)}")
        emb = torch.cat([enc.embed(times[:, i]) for i in range(enc.n_times)], dim=-1)
        t1, _, t2 = enc.mlp
        emb = F.linear(F.mish(F.linear(emb, t1.weight, t1.bias)), t2.weight, t2.bias)
        h = F.linear(torch.cat([x.flatten(1), emb, cond], dim=-1), self.inp.weight, self.inp.bias)
        for ln, lin1, _, lin2 in self.blocks:
            a = F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            h = h + F.linear(F.mish(F.linear(a, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
        ln, lin = self.out
        h = F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return F.linear(h, lin.weight, lin.bias).view(x.shape)

    def forward_single(self, x: Tensor, times: Tensor, cond: Tensor) -> Tensor:
        """:meth:`forward` for one sample (batch 1, float32, CPU, no autograd) in numpy: a control tick's call
        (:mod:`stlflow.policy.mlp_numpy`: about half the time of torch's at batch 1; the same numbers up to float32
        rounding)."""
        return mlp_numpy.forward(self, x, times, cond)

    def __getstate__(self) -> dict:  # pickled (a spawned worker): the views are remade there, on its tensors
        state = dict(super().__getstate__())
        state.pop(mlp_numpy.CACHE_KEY, None)
        return state

    def _apply(self, fn, recurse=True):  # .to(), .float(), .share_memory(), ...: parameters may be new tensors
        self.__dict__.pop(mlp_numpy.CACHE_KEY, None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict(assign=True) puts new tensors in place
        self.__dict__.pop(mlp_numpy.CACHE_KEY, None)
        return super()._load_from_state_dict(*args, **kwargs)

    def forward_jvp(self, x: Tensor, times: Tensor, cond: Tensor, dx: Tensor, dtimes: Tensor
                    ) -> tuple[Tensor, Tensor]:
        """``(forward(x, times, cond), d/ds forward(x + s dx, times + s dtimes, cond) at s = 0)``.

        The same pair as ``torch.func.jvp`` with tangents (dx, dtimes, 0), at 1/3.2-1/2.4 of its cost on CPU.
        The first output carries autograd exactly as :meth:`forward` does; the second is not differentiable.
        """
        te, dte = self.time_encoder.forward_jvp(times, dtimes)
        with torch.no_grad():
            din = torch.cat([dx.flatten(1), dte, torch.zeros_like(cond)], dim=-1)
        h, dh = linear_jvp(self.inp, torch.cat([x.flatten(1), te, cond], dim=-1), din)
        for blk in self.blocks:
            ln, lin1, act, lin2 = blk
            a, da = linear_jvp(lin2, *mish_jvp(act, *linear_jvp(lin1, *layer_norm_jvp(ln, h, dh))))
            h, dh = h + a, dh + da
        ln, lin = self.out
        y, dy = linear_jvp(lin, *layer_norm_jvp(ln, h, dh))
        return y.view(x.shape), dy.view(x.shape)


NETS = {"unet": UNet1D, "mlp": ResidualMLP}


def build_net(cfg: dict, action_dim: int, horizon: int, cond_dim: int, n_times: int) -> nn.Module:
    """Build a network from a config dict ``{"name": "unet"|"mlp", **kwargs}``."""
    cfg = dict(cfg)
    name = cfg.pop("name", "unet")
    if name not in NETS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETS)}")
    return NETS[name](action_dim=action_dim, horizon=horizon, cond_dim=cond_dim, n_times=n_times, **cfg)
