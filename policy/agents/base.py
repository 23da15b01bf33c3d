"""What every offline-RL agent shares: transition batches, critics, target/EMA updates, checkpoints.

Notation: ``Do`` observation size, ``Da`` action size, ``B`` batch. Actions are in [-1, 1] (D4RL's convention for
maze2d and the locomotion tasks); observations are standardised inside the agent (:class:`ObsNormalizer`), so a
checkpoint is self-contained and :meth:`Agent.act` takes raw observations.

A checkpoint is a folder written atomically by :func:`stlflow.policy.checkpoint.write_checkpoint`:
``policy.yaml`` (agent name, its settings, dimensions, step; sha256 of each file), ``model.safetensors`` (every
network, target network, EMA copy and the normaliser) and ``training_state.pt`` (optimisers, update count, the
agent's random generator) for an exact resume.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from stlflow.policy.checkpoint import CheckpointError, read_config, resolve_file, write_checkpoint

__all__ = ["Agent", "EnsembleMLP", "FastMish", "ObsNormalizer", "OfflineAgent", "Transitions", "ema_update",
           "frozen_copy", "load_agent", "mish_and_slope", "save_agent",
           "use_compiled_mish"]

WEIGHTS_FILE, STATE_FILE = "model.safetensors", "training_state.pt"


@runtime_checkable
class Agent(Protocol):
    """The interface the D4RL harness drives."""

    name: str

    def update(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        """One gradient update on a batch of :meth:`Transitions.sample`; returns scalar diagnostics."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Action(s) in [-1, 1] for raw observation(s) ``(Do,)`` -> ``(Da,)`` or ``(B, Do)`` -> ``(B, Da)``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


class Transitions:
    """A ``qlearning_dataset`` dict as tensors, sampled uniformly with replacement.

    Args:
        data: ``observations (N, Do)``, ``actions (N, Da)``, ``rewards (N,)``, ``next_observations (N, Do)``,
            ``terminals (N,)``. Actions are clipped to [-1, 1] (D4RL files hold a few values a hair outside).
    """

    KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")

    def __init__(self, data: Mapping[str, np.ndarray]):
        missing = [k for k in self.KEYS if k not in data]
        if missing:
            raise ValueError(f"transitions lack {missing}; expected the keys of qlearning_dataset: {list(self.KEYS)}")
        n = len(data["rewards"])
        if n == 0:
            raise ValueError("transitions: the dataset holds no transitions")
        self.obs = torch.as_tensor(np.asarray(data["observations"], np.float32).reshape(n, -1))
        self.next_obs = torch.as_tensor(np.asarray(data["next_observations"], np.float32).reshape(n, -1))
        self.actions = torch.as_tensor(np.clip(np.asarray(data["actions"], np.float32).reshape(n, -1), -1, 1))
        self.rewards = torch.as_tensor(np.asarray(data["rewards"], np.float32).reshape(n))
        self.not_done = 1.0 - torch.as_tensor(np.asarray(data["terminals"], np.float32).reshape(n))
        for name, t in (("observations", self.obs), ("actions", self.actions), ("rewards", self.rewards)):
            if not torch.isfinite(t).all():
                raise ValueError(f"transitions: {name} hold NaN or infinite values")
        self.obs_dim, self.action_dim = self.obs.shape[1], self.actions.shape[1]

    def __len__(self) -> int:
        return len(self.rewards)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``batch`` transitions: ``obs, next_obs (B, Do)``, ``actions (B, Da)``, ``rewards, not_done (B,)``."""
        i = torch.randint(len(self), (batch,), generator=generator)
        return {"obs": self.obs[i], "actions": self.actions[i], "rewards": self.rewards[i],
                "next_obs": self.next_obs[i], "not_done": self.not_done[i]}


class ObsNormalizer(nn.Module):
    """Standardise observations with the dataset's mean and std (std floored at 1e-3): ``(..., Do) -> (..., Do)``."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim))

    def fit(self, obs: Tensor) -> None:
        self.mean.copy_(obs.mean(0))
        self.std.copy_(obs.std(0).clamp_min(1e-3))

    def forward(self, obs: Tensor) -> Tensor:
        return (obs - self.mean) / self.std


def _mish_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(tanh(softplus(x)), e = exp(x), 1 / (n + 2)) with n = e (e + 2), from one exponential."""
    e = torch.exp(x.clamp(max=20.0))  # beyond 20, tanh(softplus(x)) is 1 in float32
    inv = (e + 2.0).mul_(e).add_(2.0).reciprocal_()
    return inv.mul(-2.0).add_(1.0), e, inv


def _mish_value_slope(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mish(x), mish'(x)) eagerly: the one-exponential formulas of :class:`_MishFn`, in place where it can."""
    tsp, e, inv = _mish_parts(x)
    slope = (e + 1.0).mul_(e).mul_(x).mul_(inv).mul_(inv).mul_(4.0).add_(tsp)
    return tsp.mul_(x), slope


def _mish_value(x: Tensor) -> Tensor:
    tsp, _, _ = _mish_parts(x)
    return tsp.mul_(x)


def _mish_value_slope_pure(x: Tensor) -> tuple[Tensor, Tensor]:
    """The same pair written without in-place ops, for ``torch.compile`` (one fused loop instead of ~16 passes)."""
    e = torch.exp(x.clamp(max=20.0))
    inv = 1.0 / ((e + 2.0) * e + 2.0)
    tsp = 1.0 - 2.0 * inv
    return tsp * x, tsp + 4.0 * x * e * (e + 1.0) * inv * inv


def _mish_value_pure(x: Tensor) -> Tensor:
    e = torch.exp(x.clamp(max=20.0))
    return x * (1.0 - 2.0 / ((e + 2.0) * e + 2.0))


# The activation's elementwise kernels: eager by default; use_compiled_mish() swaps in fused torch.compile versions.
_KERNELS = {"value_slope": _mish_value_slope, "value": _mish_value}


def use_compiled_mish(enabled: bool = True) -> None:
    """Evaluate :class:`FastMish` and :func:`mish_and_slope` with ``torch.compile``-fused kernels (process-wide).

    On one CPU thread the eager activation (about 16 elementwise passes) costs as much as the 256-wide matmuls
    around it; the fused loop is 5-8x cheaper. Same values to float rounding. The first call compiles (about a
    minute; needs a C++ compiler; inductor caches the result on disk for later processes) and shapes are
    compiled dynamically, so batches of any size reuse it. ``enabled=False`` restores the eager kernels.
    """
    if enabled:
        _KERNELS["value_slope"] = torch.compile(_mish_value_slope_pure, dynamic=True)
        _KERNELS["value"] = torch.compile(_mish_value_pure, dynamic=True)
    else:
        _KERNELS.update(value_slope=_mish_value_slope, value=_mish_value)


class _MishFn(torch.autograd.Function):
    """mish(x) = x tanh(softplus(x)) through one exponential: with e = exp(x) and n = e (e + 2),
    tanh(softplus(x)) = n / (n + 2) = 1 - 2 / (n + 2) and mish'(x) = tanh(softplus(x)) + 4 x e (1 + e) / (n + 2)².
    The slope is formed in the forward pass, so the backward (and the forward-mode rule) is one product."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        return _KERNELS["value_slope"](x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        slope = output[1]
        ctx.mark_non_differentiable(slope)
        ctx.save_for_backward(slope)
        ctx.save_for_forward(slope)

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_slope: Tensor) -> Tensor:
        (slope,) = ctx.saved_tensors
        return grad * slope

    @staticmethod
    def jvp(ctx, x_tangent: Tensor) -> tuple[Tensor, None]:
        (slope,) = ctx.saved_tensors
        return x_tangent * slope, None


def mish_and_slope(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mish(x), mish'(x))``, differentiable in the first (through :class:`_MishFn` when ``x`` needs gradients):
    a forward-mode derivative through the activation is then one product with the slope, at no extra cost."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _MishFn.apply(x)
    return _MishFn.forward(x)


class FastMish(nn.Mish):
    """``nn.Mish`` with a cheaper kernel: same values (to float rounding) and derivatives, about half the
    forward-plus-backward time of ``torch.nn.functional.mish`` on one CPU thread (where the activation, not the
    256-wide matmuls, dominated an agent update). Without autograd it skips the slope."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _MishFn.apply(x)[0]
        return _KERNELS["value"](x)


class EnsembleMLP(nn.Module):
    """``n`` independent MLPs evaluated together (one batched matmul per layer): ``(B, in) -> (n, B, out)``.

    Twin critics are ``EnsembleMLP(2, Do + Da, 1)``; the batched form halves the number of kernel calls of two
    separate networks (the cost of an update at batch 256 on one CPU thread is largely per-call overhead).
    Initialisation follows ``nn.Linear`` (uniform ±1/sqrt(fan_in)).
    """

    def __init__(self, n: int, in_dim: int, out_dim: int, hidden: tuple[int, ...] = (256, 256, 256),
                 activation: type[nn.Module] = FastMish):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.n = n
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / fan_in**0.5
            self.weights.append(nn.Parameter(torch.empty(n, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, fan_out).uniform_(-bound, bound)))
        self.act = activation()

    def forward(self, x: Tensor, member: int | None = None) -> Tensor:
        """``x`` (B, in) or (n, B, in) -> (n, B, out); with ``member=i``, network i alone: (B, in) -> (B, out)."""
        if member is not None:
            h = x
            layers = [(w[member], b[member]) for w, b in zip(self.weights, self.biases)]
            step = torch.addmm
        else:
            h = x.unsqueeze(0).expand(self.n, *x.shape) if x.ndim == 2 else x
            layers = list(zip(self.weights, self.biases))
            step = torch.baddbmm
        for i, (w, b) in enumerate(layers):
            h = step(b, h, w)
            if i < len(layers) - 1:
                h = self.act(h)
        return h


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    """``target ← (1 - rate) target + rate source`` for every parameter (Polyak averaging / EMA)."""
    tp, sp = list(target.parameters()), list(source.parameters())
    torch._foreach_lerp_(tp, sp, float(rate))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without gradients (target networks, EMA actors)."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


class OfflineAgent(nn.Module):
    """Base of the agents here: settings, dimensions, normaliser, random generator, optimisers and checkpoints.

    Subclasses set ``name`` and ``defaults`` (their settings), build their networks in ``__init__`` after calling
    ``super().__init__``, list their optimisers in ``self.optimizers`` and implement ``update`` and ``_act``.
    """

    name = ""
    defaults: dict[str, Any] = {}

    def __init__(self, obs_dim: int, action_dim: int, seed: int = 0, **settings: Any):
        super().__init__()
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ValueError(f"agent {self.name!r}: unknown settings {unknown}; it takes {sorted(self.defaults)}")
        self.config = {**self.defaults, **settings}
        self.obs_dim, self.action_dim, self.seed = int(obs_dim), int(action_dim), int(seed)
        torch.manual_seed(self.seed)  # the networks' initial weights
        self.generator = torch.Generator().manual_seed(self.seed)
        self.obs_norm = ObsNormalizer(self.obs_dim)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.steps = 0

    @classmethod
    def task_defaults(cls, task: str) -> dict[str, Any]:
        """Settings this agent takes by default on a D4RL ``task`` (published per-dataset values); ``{}`` here."""
        return {}

    def prepare(self, data: Transitions) -> None:
        """Fit the observation normaliser to the training data (before the first update)."""
        if (data.obs_dim, data.action_dim) != (self.obs_dim, self.action_dim):
            raise ValueError(f"data has Do={data.obs_dim}, Da={data.action_dim}; agent {self.name!r} was built for "
                             f"Do={self.obs_dim}, Da={self.action_dim}")
        self.obs_norm.fit(data.obs)

    def update(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def _act(self, obs: Tensor) -> Tensor:
        """Normalised observations ``(B, Do)`` -> actions ``(B, Da)``."""
        raise NotImplementedError

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs, np.float32))
        single = x.ndim == 1
        if x.shape[-1] != self.obs_dim or x.ndim not in (1, 2):
            raise ValueError(f"obs must have shape ({self.obs_dim},) or (B, {self.obs_dim}), got {tuple(x.shape)}")
        a = self._act(self.obs_norm(x.reshape(-1, self.obs_dim))).clamp(-1.0, 1.0)
        return a[0].numpy() if single else a.numpy()

    def training_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "generator": self.generator.get_state(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])


def _registry() -> dict[str, type[OfflineAgent]]:
    from stlflow.policy.agents import AGENTS

    return AGENTS


def save_agent(agent: OfflineAgent, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``agent`` (weights and training state) as a verified checkpoint folder, atomically."""
    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous().clone() for k, v in agent.state_dict().items()}
    config = {"agent": agent.name, "obs_dim": agent.obs_dim, "action_dim": agent.action_dim, "seed": agent.seed,
              "steps": agent.steps, "settings": dict(agent.config), **dict(extra or {})}
    return write_checkpoint(directory, config, {
        WEIGHTS_FILE: lambda p: save_file(weights, str(p)),
        STATE_FILE: lambda p: torch.save(agent.training_state(), p),
    })


def load_agent(directory: str | os.PathLike, training: bool = True) -> tuple[OfflineAgent, dict[str, Any]]:
    """``(agent, checkpoint config)`` read back from :func:`save_agent`'s folder, every file verified first.

    ``training``: also restore the optimisers, update count and random generator (for resuming).
    """
    from safetensors.torch import load_file

    d = Path(directory)
    cfg, files, _ = read_config(d)
    agents = _registry()
    if cfg.get("agent") not in agents:
        raise CheckpointError(d, f"names agent {cfg.get('agent')!r}; known agents: {sorted(agents)}")
    agent = agents[cfg["agent"]](int(cfg["obs_dim"]), int(cfg["action_dim"]), seed=int(cfg.get("seed", 0)),
                                 **dict(cfg.get("settings") or {}))
    try:
        weights = load_file(str(resolve_file(d, files, WEIGHTS_FILE)), device="cpu")
        agent.load_state_dict(weights)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 -- garbage safetensors, other keys or shapes
        raise CheckpointError(d, f"{WEIGHTS_FILE} does not fit agent {cfg['agent']!r}: {type(err).__name__}: {err}"
                              ) from err
    if training:
        try:
            state = torch.load(resolve_file(d, files, STATE_FILE), map_location="cpu", weights_only=False)
            agent.load_training_state(state)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 -- truncated pickle, missing keys
            raise CheckpointError(d, f"{STATE_FILE} cannot be read: {type(err).__name__}: {err}") from err
    return agent, cfg
