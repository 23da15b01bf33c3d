"""TD3+BC (Fujimoto & Gu 2021), written plainly: the classic baseline that checks the D4RL harness end to end.

Deterministic actor ``π(s) = tanh(MLP(s))``, twin critics with target networks. One update (batch B):

- critics: ``a' = clip(π'(s') + clip(σ ε, -c, c), -1, 1)``, ``y = r + γ (1 - terminal) min_i Q'_i(s', a')``,
  loss ``Σ_i mean (Q_i(s, a) - y)²``;
- every ``policy_freq`` updates, the actor: ``L = -λ mean Q_1(s, π(s)) + mean ‖π(s) - a‖²`` with
  ``λ = α / mean |Q_1(s, π(s))|`` (detached), then Polyak averaging (``tau``) of actor and critic targets.

Defaults are the paper's (α = 2.5, σ = 0.2, c = 0.5, policy_freq = 2, 2 × 256 ReLU networks, Adam 3e-4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stlflow.policy.agents.base import EnsembleMLP, OfflineAgent, ema_update, frozen_copy

__all__ = ["TD3BCAgent"]


class TD3BCAgent(OfflineAgent):
    """TD3+BC (see the module docstring); settings in :attr:`defaults`."""

    name = "td3bc"
    defaults: dict[str, Any] = {"width": 256, "layers": 2, "lr": 3e-4, "discount": 0.99, "tau": 0.005,
                                "alpha": 2.5, "policy_noise": 0.2, "noise_clip": 0.5, "policy_freq": 2}

    def __init__(self, obs_dim: int, action_dim: int, seed: int = 0, **settings: Any):
        super().__init__(obs_dim, action_dim, seed, **settings)
        c = self.config
        hidden = (int(c["width"]),) * int(c["layers"])
        self.actor = EnsembleMLP(1, obs_dim, action_dim, hidden, activation=nn.ReLU)
        self.actor_target = frozen_copy(self.actor)
        self.critic = EnsembleMLP(2, obs_dim + action_dim, 1, hidden, activation=nn.ReLU)
        self.critic_target = frozen_copy(self.critic)
        self.optimizers["actor"] = torch.optim.Adam(self.actor.parameters(), lr=float(c["lr"]), fused=True)
        self.optimizers["critic"] = torch.optim.Adam(self.critic.parameters(), lr=float(c["lr"]), fused=True)

    def policy(self, actor: nn.Module, obs_n: Tensor) -> Tensor:
        """Actions ``(B, Da)`` in (-1, 1)."""
        return torch.tanh(actor(obs_n)[0])

    def _act(self, obs_n: Tensor) -> Tensor:
        return self.policy(self.actor, obs_n)

    def update(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        c = self.config
        obs_n, next_n = self.obs_norm(batch["obs"]), self.obs_norm(batch["next_obs"])
        with torch.no_grad():
            noise = torch.randn(batch["actions"].shape, generator=self.generator) * float(c["policy_noise"])
            noise = noise.clamp(-float(c["noise_clip"]), float(c["noise_clip"]))
            a_next = (self.policy(self.actor_target, next_n) + noise).clamp(-1.0, 1.0)
            q_next = self.critic_target(torch.cat([next_n, a_next], -1)).squeeze(-1).min(0).values
            target = batch["rewards"] + float(c["discount"]) * batch["not_done"] * q_next
        q = self.critic(torch.cat([obs_n, batch["actions"]], -1)).squeeze(-1)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.optimizers["critic"].zero_grad(set_to_none=True)
        critic_loss.backward()
        self.optimizers["critic"].step()
        out = {"critic_loss": critic_loss.item(), "q_mean": q.detach().mean().item()}
        self.steps += 1
        if self.steps % int(c["policy_freq"]) == 0:
            pi = self.policy(self.actor, obs_n)
            self.critic.requires_grad_(False)
            try:
                q_pi = self.critic(torch.cat([obs_n, pi], -1))[0].squeeze(-1)
            finally:
                self.critic.requires_grad_(True)
            lam = float(c["alpha"]) / q_pi.abs().mean().detach().clamp_min(1e-6)
            bc = (pi - batch["actions"]).pow(2).mean()
            actor_loss = -lam * q_pi.mean() + bc
            self.optimizers["actor"].zero_grad(set_to_none=True)
            actor_loss.backward()
            self.optimizers["actor"].step()
            ema_update(self.actor_target, self.actor, float(c["tau"]))
            ema_update(self.critic_target, self.critic, float(c["tau"]))
            out.update(actor_loss=actor_loss.item(), bc_loss=bc.item())
        return out
