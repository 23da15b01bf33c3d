"""Policy controllers compared in closed loop (all: ``reset(seed=None)``, ``act(obs) -> action``, ``last_nfe``).

Symbols: To = ``policy.n_obs_steps``, Tp = ``policy.horizon``, Ta = actions executed per plan, k = solver steps.

============  =============================================================  ==========================
name          what it does                                                   network evals per action
============  =============================================================  ==========================
receding      Diffusion Policy's standard: cold full schedule (e.g. DDIM-16  nfe(full) / Ta
              or DDPM-100 via ``steps``), execute Ta = 8 actions, replan
full          cold full schedule every tick (Ta = 1)                         nfe(full)
cold          cold k-step sampling; Ta = 1 by default (set                   nfe(k) / Ta
              ``n_action_steps`` for few-step receding horizon)
onestep       cold one-step sampling (a one-step flow head), Ta = 1 default  nfe(1) / Ta
rti           :class:`stlflow.policy.rti.RTIController`, warm start, k       nfe(k) (+ cold ticks)
============  =============================================================  ==========================

Every chunk controller executes ``chunk[To-1 : To-1+Ta]`` (the chunk starts at the oldest observation in the
history, Diffusion Policy's convention), so ``Ta <= Tp - To + 1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stlflow.policy.rti import ObservationHistory, RTIController, exec_offset_of

CONTROLLERS = ("receding", "full", "cold", "onestep", "rti")


class ChunkController:
    """Cold sampling with a receding horizon: every Ta ticks plan a chunk from noise, then play Ta actions of it.

    Args:
        policy: a ``stlflow.policy.Policy``.
        n_action_steps: Ta, actions executed per plan (1 = replan every tick).
        steps: solver steps per plan (None: the head's default schedule, e.g. DDIM-16).
        params: STL parameters for a conditioned policy.
        seed: seed of the noise generator (``reset(seed=...)`` reseeds it).
        guidance: optional inference-time guidance (``stlflow.policy.guidance.STLGuidance``); None = off.
    """

    def __init__(self, policy: Any, n_action_steps: int = 1, steps: int | None = None, params: Any = None,
                 seed: int = 0, guidance: Any = None) -> None:
        self.policy, self.steps, self.params = policy, steps, params
        self.guidance = guidance
        self.exec_offset = exec_offset_of(policy)
        max_ta = policy.horizon - self.exec_offset
        if not 1 <= int(n_action_steps) <= max_ta:
            raise ValueError(f"n_action_steps must be in [1, horizon - n_obs_steps + 1 = {max_ta}], "
                             f"got {n_action_steps}")
        self.n_action_steps = int(n_action_steps)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.history = ObservationHistory(policy.n_obs_steps, policy.obs_dim)
        self._queue: list[np.ndarray] = []
        self.last_nfe = 0

    def reset(self, seed: int | None = None) -> None:
        self._queue = []
        self.history.reset()
        if seed is not None:
            self.generator.manual_seed(int(seed))

    @torch.no_grad()
    def act(self, obs: Any) -> np.ndarray:
        """Observation (Do,) physical -> action (Da,) physical (discrete channels thresholded)."""
        history = self.history.push(obs)
        self.last_nfe = 0
        if not self._queue:
            cond = self.policy.condition(history, self.params)
            gfn = None if self.guidance is None else self.guidance.bind(self.policy, history, self.params)
            chunk = self.policy.sample_normalized(cond, steps=self.steps, generator=self.generator, guidance_fn=gfn)
            self.last_nfe = self.policy.nfe(self.steps)
            actions = self.policy.unnormalize_action(chunk[0, self.exec_offset:self.exec_offset + self.n_action_steps])
            if np.asarray(self.policy.discrete_action_mask).any():
                actions = self.policy.threshold_discrete(actions)
            actions = actions.detach().cpu().numpy() if torch.is_tensor(actions) else np.asarray(actions)
            self._queue = list(actions.astype(np.float32))
        return self._queue.pop(0)

    def __repr__(self) -> str:
        return f"ChunkController(Ta={self.n_action_steps}, steps={self.steps})"


def make_controller(name: str, policy: Any, *, k: int | None = None, n_action_steps: int | None = None,
                    steps: int | None = None, params: Any = None, seed: int = 0, guidance: Any = None,
                    **rti_options: Any) -> Any:
    """Build a controller by name (see the module table).

    ``k``: solver steps of ``cold`` and ``rti`` (default 2); ``steps``: solver steps of a full plan (``receding``,
    ``full``; None = the head's default); ``n_action_steps``: Ta (``receding`` default: the policy's own, 8 in
    Diffusion Policy; others 1); ``rti_options``: keyword arguments of :class:`RTIController` (``t_start``,
    ``renoise``, ``discrete_mode``, ``clip_factor``, ``obs_jump``, ``residual_max``, ``cold_steps``,
    ``lookahead``, ``plan_at_reset``);
    ``guidance``: optional STL guidance object for any controller (None = off).
    """
    if name not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}; choose one of {CONTROLLERS}")
    if rti_options and name != "rti":
        raise ValueError(f"options {sorted(rti_options)} only apply to controller 'rti', not {name!r}")
    k = 2 if k is None else int(k)
    if name == "rti":
        if n_action_steps not in (None, 1):
            raise ValueError("the rti controller executes one action per tick; n_action_steps must be 1")
        return RTIController(policy, steps_per_tick=k, params=params, seed=seed, guidance=guidance, **rti_options)
    if name == "receding":
        ta = n_action_steps or policy.n_action_steps
        return ChunkController(policy, n_action_steps=ta, steps=steps, params=params, seed=seed, guidance=guidance)
    if name == "full":
        return ChunkController(policy, n_action_steps=n_action_steps or 1, steps=steps, params=params, seed=seed,
                               guidance=guidance)
    if name == "cold":
        return ChunkController(policy, n_action_steps=n_action_steps or 1, steps=k, params=params, seed=seed,
                               guidance=guidance)
    return ChunkController(policy, n_action_steps=n_action_steps or 1, steps=1, params=params, seed=seed,
                           guidance=guidance)
