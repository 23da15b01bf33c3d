"""One-step flow Q-learning (OFQL; Nguyen & Yoo, arXiv 2508.13904): Diffusion-QL with a one-step average-velocity
actor.

The actor is :class:`stlflow.policy.meanflow.MeanFlowHead` over a chunk of one action (horizon 1), conditioned on
the normalised state, with a Diffusion-QL-sized network (:class:`FlowMLP`: 3 hidden layers of 256, Mish). It
generates an action with one network call, ``a = ε - u(ε, r=0, t=1; s)``, ε ~ N(0, I), differentiably, so the
Q term needs no back-propagation through a sampling chain.
Acting draws ``act_samples`` (50) such actions per state and takes
the one the critics rate highest, as Diffusion-QL evaluates.

One update (batch ``B``; ``Q'``, ``π'`` the target critics and the EMA actor):

- critics: ``y = r + γ (1 - terminal) min_i Q'_i(s', a')``, ``a' = π'(s')`` (with ``max_q_backup``: the max over
  ``backup_samples`` draws of a', then the min over the twins); loss ``Σ_i mean (Q_i(s, a) - y)²``;
- actor: ``L = L_flow + η · (-mean Q_i(s, π(s)) / mean |Q_i(s, π(s))|) + c · mean |a - clamp(a, -1, 1)|²`` with
  i ∈ {1, 2} drawn at random and the denominator detached (Diffusion-QL's normalised Q weight α = η / mean |Q|,
  which makes η portable across tasks; Diffusion-QL takes the denominator from the other critic); π(s) is the
  one-step action a clamped to [-1, 1], and the last term (``clip_penalty`` c) gives actions beyond the bounds,
  which the clamp leaves without a Q gradient, a way back;
  ``L_flow`` is the head's average-velocity loss: u(a_t, r, t; s) regressed on the MeanFlow target
  ``v - (t - r)(v ∂_a u + ∂_t u)`` (one Jacobian-vector product, hand-written), with (t, r) the max and min of two
  logit-normal(-0.4, 1) draws, r = t for a ``flow_ratio`` share of the batch, and (r, t) = (0, 1), the one-step
  jump itself, for a ``one_step_ratio`` share of the r < t rows;
- targets: Polyak averaging of the critics (``tau``); the EMA actor copies the actor until ``ema_start`` updates,
  then follows it with decay ``ema_decay`` every ``ema_every`` updates (Diffusion-QL's schedule).

Why the one-step rows and the clip penalty: the logit-normal pairs almost never reach (0, 1), so ``L_flow`` alone
hardly constrains the one-step map that the Q term trains and the agent acts with. On maze2d-umaze the Q term
then pushed the one-step actions beyond [-1, 1] (median |a| 2.6 after 18k updates), where the clamp gave them no
gradient; the policy sat at the (-1, -1) corner, the critics extrapolated upwards there (Q ~ 72 against ~3 for
TD3+BC's) and the score stayed below random actions' (tests/test_agents.py reproduces it on a toy problem).

The actor's flow rows and one-step rows go through the network in one pass (:meth:`FlowMLP.forward_jvp_rows`).
``precision="bf16"`` runs the update's matrix products in bfloat16 (autocast; weights, optimiser state and losses
stay float32); ``compile=True`` fuses the activation's elementwise work with ``torch.compile``. Acting is float32.

``bc-flow`` (:mod:`stlflow.policy.agents.bc_flow`) is the same actor trained on ``L_flow`` alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stlflow.policy.agents.base import (
    EnsembleMLP,
    FastMish,
    OfflineAgent,
    ema_update,
    frozen_copy,
    mish_and_slope,
    use_compiled_mish,
)
from stlflow.policy.meanflow import MeanFlowHead
from stlflow.policy.nets import TimeEncoder, linear_jvp, mish_jvp

__all__ = ["FlowMLP", "OFQLAgent", "task_settings"]


class FlowMLP(nn.Module):
    """Velocity network of Diffusion-QL's size: ``[x.flatten(), time embedding, cond] -> n × (Linear(width), Mish)
    -> Linear(Tp · Da)``; ``x`` (B, Tp, Da), ``times`` (B, n_times), ``cond`` (B, Dc) -> (B, Tp, Da).

    :meth:`forward_jvp` chains the layer rules of :mod:`stlflow.policy.nets` (the residual MLP's hand-written
    forward-mode derivatives), so :class:`MeanFlowHead` takes its cheap JVP path.
    """

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, n_times: int = 2, width: int = 256,
                 layers: int = 3, time_embed_dim: int = 16, time_scale: float = MeanFlowHead.time_scale):
        super().__init__()
        if layers < 1 or width < 1:
            raise ValueError(f"FlowMLP needs layers >= 1 and width >= 1, got layers={layers}, width={width}")
        self.action_dim, self.horizon, self.cond_dim, self.n_times = action_dim, horizon, cond_dim, n_times
        self.time_encoder = TimeEncoder(time_embed_dim, n_times, time_scale)
        dims = [horizon * action_dim + time_embed_dim + cond_dim] + [width] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = FastMish()
        self.out = nn.Linear(width, horizon * action_dim)

    def forward(self, x: Tensor, times: Tensor, cond: Tensor) -> Tensor:
        """``times`` (B, n_times), or (1, n_times) for times shared by every row (embedded once)."""
        te = self.time_encoder(times)
        h = torch.cat([x.flatten(1), te.expand(x.shape[0], -1), cond], dim=-1)
        for lin in self.hidden:
            h = self.act(lin(h))
        return self.out(h).view(x.shape)

    def forward_jvp_rows(self, x: Tensor, times: Tensor, cond: Tensor, dx: Tensor, dtimes: Tensor
                         ) -> tuple[Tensor, Tensor]:
        """One pass over all ``B`` rows and the derivative of the first ``n = dx.shape[0]`` rows along
        ``(dx, dtimes, 0)``: ``(y (B, Tp, Da), dy (n, Tp, Da))``, ``dy`` not differentiable.

        The same values as :meth:`forward` on all rows and :meth:`forward_jvp` on the first ``n``, with one matmul
        per layer for the rows instead of two, and the activation's slope taken from its forward pass.
        """
        n = dx.shape[0]
        te, dte = self.time_encoder.forward_jvp(times[:n], dtimes)
        if n < x.shape[0]:
            te = torch.cat([te, self.time_encoder(times[n:])])
        h = torch.cat([x.flatten(1), te, cond], dim=-1)
        with torch.no_grad():
            dh = torch.cat([dx.flatten(1), dte, cond.new_zeros(n, cond.shape[1])], dim=-1)
        for lin in self.hidden:
            h, slope = mish_and_slope(lin(h))
            with torch.no_grad():
                dh = nn.functional.linear(dh, lin.weight) * slope[:n]
        y = self.out(h)
        with torch.no_grad():
            dy = nn.functional.linear(dh, self.out.weight)
        return y.view(x.shape), dy.view(dx.shape)

    def forward_jvp(self, x: Tensor, times: Tensor, cond: Tensor, dx: Tensor, dtimes: Tensor
                    ) -> tuple[Tensor, Tensor]:
        """``(forward(x, times, cond), its derivative along (dx, dtimes, 0))``; the second is not differentiable."""
        te, dte = self.time_encoder.forward_jvp(times, dtimes)
        h = torch.cat([x.flatten(1), te, cond], dim=-1)
        with torch.no_grad():
            dh = torch.cat([dx.flatten(1), dte, torch.zeros_like(cond)], dim=-1)
        for lin in self.hidden:
            h, dh = mish_jvp(self.act, *linear_jvp(lin, h, dh))
        y, dy = linear_jvp(self.out, h, dh)
        return y.view(x.shape), dy.view(x.shape)


# Diffusion-QL's per-dataset settings that carry over (gradient-norm clip, max-Q backup); η is OFQL's own grid
# search and left to the user (``agent.eta=...``).
_DQL_GRAD_NORM = {
    "halfcheetah-medium-v2": 9.0, "hopper-medium-v2": 9.0, "walker2d-medium-v2": 1.0,
    "halfcheetah-medium-replay-v2": 2.0, "hopper-medium-replay-v2": 4.0, "walker2d-medium-replay-v2": 4.0,
    "halfcheetah-medium-expert-v2": 7.0, "hopper-medium-expert-v2": 5.0, "walker2d-medium-expert-v2": 5.0,
}


def task_settings(task: str) -> dict[str, Any]:
    """Settings of the flow agents for a D4RL task where Diffusion-QL published them (else ``{}``)."""
    if task in _DQL_GRAD_NORM:
        return {"grad_norm": _DQL_GRAD_NORM[task]}
    return {}


ACTOR_DEFAULTS: dict[str, Any] = {
    "width": 256, "layers": 3, "time_embed_dim": 16,  # Diffusion-QL's actor size
    "lr": 3e-4, "grad_norm": 5.0,  # Adam; gradient-norm clip (0 = off)
    # the flow loss: share λ of r = t pairs, (t, r) from two logit-normal (or uniform) draws, MeanFlow's adaptive weight
    "flow_ratio": 0.5, "time_sampling": "logit_normal", "logit_mean": -0.4, "logit_std": 1.0, "adaptive_p": 0.0,
    # share of the r < t rows given the one-step pair (r, t) = (0, 1) itself: the logit-normal draws almost never
    # reach it, and without it the flow loss does not hold the one-step actions (those the Q term trains and the
    # agent acts with) to the data (on maze2d they left [-1, 1] and the policy collapsed to a corner)
    "one_step_ratio": 0.25,
    # weight of mean ((a - clamp(a, -1, 1))²) of the one-step actions a in the actor loss: the clamp gives actions
    # beyond [-1, 1] no Q gradient, this brings them back
    "clip_penalty": 1.0,
    "ema_decay": 0.995, "ema_every": 5, "ema_start": 1000,
    # the update's matrix products: "fp32", or "bf16" (bfloat16 autocast; weights, optimiser and losses stay float32)
    "precision": "fp32",
    "compile": False,  # fuse the activation's elementwise work with torch.compile (process-wide; compiles once)
}
PRECISIONS = ("fp32", "bf16")


class OFQLAgent(OfflineAgent):
    """One-step flow Q-learning (see the module docstring). Settings: :data:`ACTOR_DEFAULTS` and the critic's
    ``eta`` (Q weight η), ``discount``, ``tau``, ``critic_width``/``critic_layers``, ``max_q_backup``,
    ``backup_samples``, and ``act_samples``: act with the best of N one-step samples (the highest twin-minimum Q),
    Diffusion-QL's action selection with its N = 50 (it draws among them by softmax(Q); the argmax here is
    deterministic given the noise); ``act_samples=1`` acts with one sample. On maze2d-umaze one 24k-update
    checkpoint scored 25.5 with 1 sample, 45.3 with 10 and 61.8 with 50 (100 episodes each)."""

    name = "ofql"
    uses_critic = True
    defaults = {**ACTOR_DEFAULTS, "eta": 1.0, "discount": 0.99, "tau": 0.005, "critic_width": 256,
                "critic_layers": 3, "max_q_backup": False, "backup_samples": 10, "act_samples": 50}

    def __init__(self, obs_dim: int, action_dim: int, seed: int = 0, **settings: Any):
        super().__init__(obs_dim, action_dim, seed, **settings)
        c = self.config
        if not 0.0 <= c["flow_ratio"] <= 1.0:
            raise ValueError(f"flow_ratio must be in [0, 1] (share of r = t pairs), got {c['flow_ratio']}")
        if not 0.0 <= c["one_step_ratio"] <= 1.0:
            raise ValueError(f"one_step_ratio must be in [0, 1] (share of r < t rows at (r, t) = (0, 1)), got "
                             f"{c['one_step_ratio']}")
        if c["precision"] not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {c['precision']!r}")
        if c["compile"]:
            use_compiled_mish()
        net = FlowMLP(action_dim, 1, obs_dim, width=int(c["width"]), layers=int(c["layers"]),
                      time_embed_dim=int(c["time_embed_dim"]))
        self.actor = MeanFlowHead(net, horizon=1, action_dim=action_dim, ratio_r_neq_t=1.0 - c["flow_ratio"],
                                  time_sampling=c["time_sampling"], logit_mean=c["logit_mean"],
                                  logit_std=c["logit_std"], adaptive_p=c["adaptive_p"])
        self.ema_actor = frozen_copy(self.actor)
        self.optimizers["actor"] = torch.optim.Adam(self.actor.parameters(), lr=float(c["lr"]), fused=True)
        self.act_generator = torch.Generator().manual_seed(self.seed + 1)
        if self.uses_critic:
            hidden = (int(c["critic_width"]),) * int(c["critic_layers"])
            self.critic = EnsembleMLP(2, obs_dim + action_dim, 1, hidden)
            self.critic_target = frozen_copy(self.critic)
            self.optimizers["critic"] = torch.optim.Adam(self.critic.parameters(), lr=float(c["lr"]), fused=True)

    @classmethod
    def task_defaults(cls, task: str) -> dict[str, Any]:
        return {k: v for k, v in task_settings(task).items() if k in cls.defaults}

    # -- sampling --------------------------------------------------------------------------------------
    ONE_STEP_TIMES = torch.tensor([[1.0, 1.0]])  # the network's times (t, t - r) of the one-step jump r = 0, t = 1

    def one_step(self, head: MeanFlowHead, obs_n: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Actions ``(B, Da)`` = ε - u(ε, r=0, t=1; s), clamped to [-1, 1]; differentiable in the head's weights."""
        b = obs_n.shape[0]
        eps = torch.randn((b, 1, self.action_dim), generator=generator)
        u = head.net(eps, self.ONE_STEP_TIMES, obs_n)  # = head.u(eps, 0, 1, obs_n), the time embedded once
        return (eps - u.float()).squeeze(1).clamp(-1.0, 1.0)

    def q_values(self, critic: nn.Module, obs_n: Tensor, actions: Tensor) -> Tensor:
        """Twin Q-values ``(2, B)`` (float32)."""
        return critic(torch.cat([obs_n, actions], dim=-1)).squeeze(-1).float()

    def reset_act_noise(self, seed: int) -> None:
        """Seed the noise of :meth:`act` (evaluations are then repeatable)."""
        self.act_generator.manual_seed(int(seed))

    def _act(self, obs_n: Tensor) -> Tensor:
        n = int(self.config.get("act_samples", 1))
        if n <= 1:
            return self.one_step(self.ema_actor, obs_n, self.act_generator)
        rep = obs_n.repeat_interleave(n, 0)
        a = self.one_step(self.ema_actor, rep, self.act_generator)
        q = self.q_values(self.critic, rep, a).min(0).values.view(-1, n)
        best = q.argmax(1) + torch.arange(obs_n.shape[0]) * n
        return a[best]

    # -- training --------------------------------------------------------------------------------------
    def autocast(self) -> torch.autocast:
        """The update's precision: bfloat16 autocast of the matrix products with ``precision="bf16"``, else off."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config["precision"] == "bf16")

    def flow_and_one_step(self, obs_n: Tensor, actions: Tensor, noise: dict[str, Tensor],
                          eps_new: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The actor's flow loss and, for noise ``eps_new`` (B, 1, Da), its one-step actions (B, Da), from one pass.

        Equal to ``actor.loss(actions[:, None], obs_n, noise)`` and :meth:`one_step` with that noise (before its
        clamp to [-1, 1]): the r < t rows
        (with the JVP), the r = t rows and the one-step rows go through the network together
        (:meth:`FlowMLP.forward_jvp_rows`). ``obs_n`` (B, Do) normalised, ``actions`` (B, Da).
        """
        t, r, eps = noise["t"], noise["r"], noise["eps"]
        x0 = actions[:, None, :]
        z = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
        v = eps - x0
        jvp = r < t
        order = torch.cat([jvp.nonzero().squeeze(1), (~jvp).nonzero().squeeze(1)])  # the JVP rows first
        n, b = int(jvp.sum()), len(t)
        z, v, obs_o, times = z[order], v[order], obs_n[order], torch.stack([t, t - r], dim=-1)[order]
        if eps_new is not None:
            z, obs_o = torch.cat([z, eps_new]), torch.cat([obs_o, obs_n])
            times = torch.cat([times, self.ONE_STEP_TIMES.expand(len(eps_new), 2)])
        y, dudt = self.actor.net.forward_jvp_rows(z, times, obs_o, v[:n], torch.ones(n, 2))
        y = y.float()
        # MeanFlow target u = v - (t - r) du/dt on the r < t rows (times[:, 1] is t - r), v on the r = t rows
        target = torch.cat([v[:n] - times[:n, 1, None, None] * dudt.float(), v[n:b]])
        err = (y[:b] - target).pow(2).flatten(1).mean(1)
        p = float(self.config["adaptive_p"])
        if p > 0:
            err = err / (err.detach() + 1e-3).pow(p)
        a_new = None if eps_new is None else (eps_new - y[b:]).squeeze(1)
        return err.mean(), a_new

    def _clip_step(self, name: str, params) -> float:
        gn = float(self.config["grad_norm"])
        norm = nn.utils.clip_grad_norm_(params, gn) if gn > 0 else torch.zeros(())
        self.optimizers[name].step()
        return float(norm)

    def _critic_update(self, obs_n: Tensor, b: Mapping[str, Tensor]) -> dict[str, float]:
        c = self.config
        with torch.no_grad(), self.autocast():
            next_n = self.obs_norm(b["next_obs"])
            if c["max_q_backup"]:
                k = int(c["backup_samples"])
                rep = next_n.repeat_interleave(k, 0)
                q_next = self.q_values(self.critic_target, rep, self.one_step(self.ema_actor, rep, self.generator))
                q_next = q_next.view(2, -1, k).max(-1).values.min(0).values
            else:
                a_next = self.one_step(self.ema_actor, next_n, self.generator)
                q_next = self.q_values(self.critic_target, next_n, a_next).min(0).values
            target = b["rewards"] + float(c["discount"]) * b["not_done"] * q_next
        with self.autocast():
            q = self.q_values(self.critic, obs_n, b["actions"])
        loss = (q - target).pow(2).mean(1).sum()
        self.optimizers["critic"].zero_grad(set_to_none=True)
        loss.backward()
        norm = self._clip_step("critic", self.critic.parameters())
        return {"critic_loss": loss.item(), "q_mean": q.detach().mean().item(), "critic_grad_norm": norm}

    def draw_flow_noise(self, batch: int) -> dict[str, Tensor]:
        """The head's (t, r, ε) draws, with a ``one_step_ratio`` share of the r < t rows set to (r, t) = (0, 1)."""
        noise = self.actor.draw_noise(batch, generator=self.generator)
        corner = (torch.rand(batch, generator=self.generator) < float(self.config["one_step_ratio"]))
        corner &= noise["r"] < noise["t"]
        noise["t"] = torch.where(corner, 1.0, noise["t"])
        noise["r"] = torch.where(corner, 0.0, noise["r"])
        return noise

    def _actor_update(self, obs_n: Tensor, actions: Tensor) -> dict[str, float]:
        b = obs_n.shape[0]
        noise = self.draw_flow_noise(b)
        eps_new = torch.randn((b, 1, self.action_dim), generator=self.generator) if self.uses_critic else None
        with self.autocast():
            flow_loss, a_new = self.flow_and_one_step(obs_n, actions, noise, eps_new)
        loss, out = flow_loss, {"flow_loss": flow_loss.item()}
        if self.uses_critic:
            # One critic, drawn at random, scores the new actions and (detached) sets the weight α = η / mean |Q|
            # (Diffusion-QL normalises by the other critic; one critic's forward and backward less per update).
            i = int(torch.randint(2, (1,), generator=self.generator))
            a_in = a_new.clamp(-1.0, 1.0)
            self.critic.requires_grad_(False)  # the Q term trains the actor only: no critic weight gradients
            try:
                with self.autocast():
                    q = self.critic(torch.cat([obs_n, a_in], dim=-1), member=i).squeeze(-1).float()
            finally:
                self.critic.requires_grad_(True)
            q_loss = -q.mean() / q.detach().abs().mean().clamp_min(1e-6)
            clip_loss = (a_new - a_in).pow(2).sum(-1).mean()
            loss = flow_loss + float(self.config["eta"]) * q_loss + float(self.config["clip_penalty"]) * clip_loss
            out.update(q_loss=q_loss.item(), clip_loss=clip_loss.item())
        self.optimizers["actor"].zero_grad(set_to_none=True)
        loss.backward()
        out["actor_grad_norm"] = self._clip_step("actor", self.actor.parameters())
        return out

    def update(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        obs_n = self.obs_norm(batch["obs"])
        out = self._critic_update(obs_n, batch) if self.uses_critic else {}
        out.update(self._actor_update(obs_n, batch["actions"]))
        self.steps += 1
        c = self.config
        if self.steps % int(c["ema_every"]) == 0:
            ema_update(self.ema_actor, self.actor, 1.0 if self.steps < int(c["ema_start"]) else 1.0 - c["ema_decay"])
        if self.uses_critic:
            ema_update(self.critic_target, self.critic, float(c["tau"]))
        return out
