"""Inference-time STL guidance: steer a diffusion / flow policy's samples toward higher rule robustness.

Symbols: To = ``policy.n_obs_steps``, Tp = ``policy.horizon``, Da = action dim, H = Tp - To + 1 (the planned
actions from the newest observation on), Ds = model state dim, θ = the requested STL parameters.

Gradient guidance (the default and only method here), at every denoising step of a head's ``sample``::

    x0_hat (B, Tp, Da) normalised        the head's prediction of the clean chunk at noise level t
    a   = unnormalise(x0_hat)[:, To-1:]  (B, H, Da) physical controls from the current tick on
    s   = dynamics.rollout(state0, a)    (B, H, Ds) differentiable task model from the current state
    ρ_τ = smooth robustness (log-sum-exp, temperature τ) of the rules at θ on signals(s, context)
    L   = Σ_b relu(margin - ρ_τ[b])      hinge: a sample that already satisfies the rules by ``margin`` is left alone
    x0_hat <- x0_hat - clamp(scale · ∂L/∂x0_hat, ±max_step)     repeated ``iters`` times

The head turns the corrected x0_hat back into its update (DDIM: a consistent ε; flow: a corrected velocity),
so guidance works for cold sampling and inside the real-time-iteration controller's few warm steps alike.

Particle selection (``particles = N > 1``), for each policy call with one observation history::

    x0^1..N  = N chunks sampled in one batch (different noise; the same warm start under RTI)
    ρ_i      = exact robustness of chunk i (as above, no smoothing)
    choice   = uniform at random among {i : ρ_i >= margin}, or argmax_i ρ_i when none qualifies

The gradient pulls every violating sample toward the same constraint boundary, which costs diversity; selection
moves no sample, it only discards violating ones, so the distinct behaviours the policy proposes survive. The
two combine (``scale > 0`` guides every particle); ``scale = 0`` with ``particles > 1`` is selection alone.

Layering: this module imports no env and no controller. It receives the dynamics model (``rollout`` and
``signals``), the STL text and a function ``model_inputs(obs_history (To, Do), horizon H) -> (state0 (1, Ds),
context)`` that builds the model's start state and whatever the signals need besides the robot (e.g. the
pedestrians' predicted positions); the caller above (``stlflow.pipeline``) wires the task in. Everything held
is picklable (the formula is parsed lazily), so a guidance object travels to evaluation worker processes.

Off by default: a controller built without ``guidance`` never calls into this module, and its samples are
bit-identical to an unguided build (``tests/test_guidance.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stlflow.policy.head_base import GuidanceFn

__all__ = ["STLGuidance"]


class STLGuidance:
    """Gradient guidance on the smooth robustness of STL rules through a differentiable dynamics model.

    Args:
        rules: parametric STL text over the signals that ``dynamics.signals`` returns (e.g. the task's safety rules;
            leave out rules whose horizon is longer than the chunk, such as reaching a far goal).
        dynamics: an object with ``rollout(state0 (B, Ds), controls (B, H, Da)) -> states (B, H, Ds)`` and
            ``signals(states, context) -> {name: (B, H)}``, both differentiable in torch.
        model_inputs: ``model_inputs(obs_history (To, Do) ndarray, H) -> (state0 (1, Ds) tensor, context)`` (must be
            picklable, e.g. a module-level function, when the guidance goes to worker processes).
        dt: seconds per control step (the unit of the rules' time bounds).
        params: θ values for the rules' free parameters; the policy's requested θ (``stl_params`` of :meth:`bind`)
            overrides these name by name.
        scale: gradient step on the normalised chunk per unit of hinge gradient.
        max_step: cap on each element of one correction (normalised action units).
        margin: hinge margin (signal units): samples with ρ_τ >= margin get no correction.
        smooth: log-sum-exp temperature τ of the robustness (the smooth value under-estimates the exact one by at most
            ``log(k)/τ`` per min over k samples, so a small positive margin also covers that gap).
        iters: gradient steps per denoising step.
        t_max: guide only at noise levels t <= t_max (1.0: every step).
        exec_offset: chunk index of the action for the newest observation (None: ``policy.n_obs_steps - 1``).
        particles: chunks sampled per policy call for selection (1 = no selection; see the module docstring).
    """

    def __init__(
        self,
        rules: str,
        dynamics: Any,
        model_inputs: Callable[[np.ndarray, int], tuple[Tensor, Any]],
        dt: float,
        params: Mapping[str, float] | None = None,
        *,
        scale: float = 1.0,
        max_step: float = 0.5,
        margin: float = 0.05,
        smooth: float = 30.0,
        iters: int = 2,
        t_max: float = 1.0,
        exec_offset: int | None = None,
        particles: int = 1,
    ) -> None:
        if not rules or not isinstance(rules, str):
            raise ValueError(f"rules must be non-empty STL text, got {rules!r}")
        for name in ("rollout", "signals"):
            if not callable(getattr(dynamics, name, None)):
                raise TypeError(f"dynamics must have a callable {name}(); got {type(dynamics).__name__}")
        if (dt <= 0 or scale < 0 or max_step <= 0 or smooth <= 0 or iters < 1 or not 0.0 <= t_max <= 1.0
                or int(particles) < 1):
            raise ValueError(
                f"need dt > 0, scale >= 0, max_step > 0, smooth > 0, iters >= 1, 0 <= t_max <= 1, particles >= 1; "
                f"got dt={dt}, scale={scale}, max_step={max_step}, smooth={smooth}, iters={iters}, t_max={t_max}, "
                f"particles={particles}"
            )
        self.rules, self.dynamics, self.model_inputs, self.dt = rules, dynamics, model_inputs, float(dt)
        self.params = {k: float(v) for k, v in dict(params or {}).items()}
        self.scale, self.max_step, self.margin = float(scale), float(max_step), float(margin)
        self.smooth, self.iters, self.t_max = float(smooth), int(iters), float(t_max)
        self.exec_offset = exec_offset
        self.particles = int(particles)
        self._spec = None
        self.calls = 0  # guidance evaluations (one rollout forward + backward each) since the last reset_counters
        self.seconds = 0.0
        self.selections = 0  # particle selections, and how many of them found a particle with ρ >= margin
        self.selections_ok = 0

    # ------------------------------------------------------------------ helpers
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_spec"] = None  # re-parsed where it is unpickled
        return state

    @property
    def spec(self) -> Any:
        """The parsed rules (parsed on first use)."""
        if self._spec is None:
            from stlflow.stl import parse

            self._spec = parse(self.rules)
        return self._spec

    def reset_counters(self) -> None:
        self.calls, self.seconds = 0, 0.0
        self.selections = self.selections_ok = 0

    def _theta(self, requested: Any) -> dict[str, float]:
        theta = dict(self.params)
        if isinstance(requested, Mapping):
            theta.update({k: float(np.asarray(v).reshape(-1)[0]) for k, v in requested.items()})
        missing = sorted(set(self.spec.params) - set(theta))
        if missing:
            raise KeyError(f"STL guidance: no value for rule parameter(s) {missing}; give them in params= or θ")
        return {k: theta[k] for k in self.spec.params}

    def _offset(self, policy: Any) -> int:
        return int(policy.n_obs_steps - 1) if self.exec_offset is None else int(self.exec_offset)

    # ------------------------------------------------------------------ robustness of chunks
    def robustness(self, policy: Any, x0: Tensor, obs_history: Any, stl_params: Any = None,
                   smooth: float | None = None) -> Tensor:
        """Robustness (B,) of normalised chunks ``x0`` (B, Tp, Da) rolled out from ``obs_history`` (To, Do).

        ``stl_params``: the requested θ, as in :meth:`bind`. ``smooth`` None: exact robustness; otherwise the
        log-sum-exp temperature. Differentiable in ``x0``.
        """
        history = np.asarray(obs_history, dtype=np.float32)
        if history.ndim == 3:
            history = history[0]
        off = self._offset(policy)
        horizon = x0.shape[1] - off
        state0, context = self.model_inputs(history, horizon)
        return self._rho(policy, x0, state0, context, self._theta(stl_params), off, smooth)

    def _rho(self, policy: Any, x0: Tensor, state0: Tensor, context: Any, theta: dict[str, float], off: int,
             smooth: float | None) -> Tensor:
        controls = policy.unnormalize_action(x0)[:, off:]
        states = self.dynamics.rollout(state0.to(controls).expand(controls.shape[0], -1), controls)
        signals = self.dynamics.signals(states, context)
        sig = {k: signals[k] for k in self.spec.signals}
        return self.spec.robustness(sig, dt=self.dt, params=theta, smooth=smooth)

    # ------------------------------------------------------------------ the head's hook
    def bind(self, policy: Any, obs_history: Any, stl_params: Any = None) -> GuidanceFn:
        """The ``guidance_fn(x0_hat, t) -> correction`` of one tick (the head adds the correction to x0_hat).

        ``obs_history``: (To, Do) or (1, To, Do) physical observations of this tick; ``stl_params``: the requested
        θ ({name: value}; the rule values the policy is conditioned on), which overrides the guidance's own
        ``params`` name by name (a θ that is not a mapping overrides nothing). The returned function also carries
        ``particles`` and ``select(x0 (N, Tp, Da), generator) -> (1, Tp, Da)``, which
        :meth:`stlflow.policy.Policy.sample_normalized` uses for particle selection, and ``steers`` (False when
        ``scale`` is 0: the denoising steps are then left untouched).
        """
        import time

        history = np.asarray(obs_history, dtype=np.float32)
        if history.ndim == 3:
            if history.shape[0] != 1:
                raise ValueError(f"STL guidance binds one observation history, got a batch of {history.shape[0]}")
            history = history[0]
        off = self._offset(policy)
        horizon = int(policy.horizon) - off
        state0, context = self.model_inputs(history, horizon)
        theta = self._theta(stl_params)
        # A DDPM head clips x0_hat after adding the correction; start from the clipped chunk so that the correction
        # is not lost to the clip when the prediction lies outside it.
        clip = getattr(policy.head, "clip_sample", None)

        def guidance_fn(x0_hat: Tensor, t: float) -> Tensor:
            if t > self.t_max or self.scale == 0.0:
                return torch.zeros_like(x0_hat)
            t0 = time.perf_counter()
            x = x0_hat.detach().clamp(-clip, clip) if clip else x0_hat.detach().clone()
            moved = False
            with torch.no_grad():  # cheap check without a graph: satisfied samples cost one forward pass
                satisfied = bool((self._rho(policy, x, state0, context, theta, off, self.smooth) >= self.margin).all())
            with torch.enable_grad():
                for _ in range(0 if satisfied else self.iters):
                    x.requires_grad_(True)
                    rho = self._rho(policy, x, state0, context, theta, off, self.smooth)
                    loss = torch.relu(self.margin - rho).sum()
                    if not bool(loss > 0):
                        break
                    (grad,) = torch.autograd.grad(loss, x)
                    step = (self.scale * grad).clamp(-self.max_step, self.max_step)
                    x = (x - torch.nan_to_num(step)).detach()
                    moved = True
            self.calls += 1
            self.seconds += time.perf_counter() - t0
            return (x - x0_hat).detach() if moved else torch.zeros_like(x0_hat)

        def select(x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
            t0 = time.perf_counter()
            x = x0.clamp(-clip, clip) if clip else x0
            with torch.no_grad():
                rho = self._rho(policy, x, state0, context, theta, off, None)
            ok = torch.nonzero(rho >= self.margin).squeeze(1)
            if ok.numel():
                i = int(ok[torch.randint(int(ok.numel()), (1,), generator=generator, device=ok.device)])
            else:
                i = int(torch.argmax(rho))
            self.selections += 1
            self.selections_ok += int(ok.numel() > 0)
            self.seconds += time.perf_counter() - t0
            return x0[i : i + 1]

        guidance_fn.steers = self.scale > 0.0  # type: ignore[attr-defined]  # False: selection alone, no hook
        guidance_fn.particles = self.particles  # type: ignore[attr-defined]
        guidance_fn.select = select  # type: ignore[attr-defined]
        return guidance_fn

    def __repr__(self) -> str:
        return (f"STLGuidance(rules={self.rules!r}, scale={self.scale}, margin={self.margin}, smooth={self.smooth}, "
                f"iters={self.iters}, t_max={self.t_max}, particles={self.particles})")
