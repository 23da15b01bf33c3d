"""``bc-flow``: the OFQL actor trained on its flow loss alone (behaviour cloning with a one-step average-velocity
policy), the baseline that isolates what OFQL's Q term adds. No critics are built or trained."""

from __future__ import annotations

from stlflow.policy.agents.ofql import ACTOR_DEFAULTS, OFQLAgent

__all__ = ["BCFlowAgent"]


class BCFlowAgent(OFQLAgent):
    """OFQL without the critics: the actor minimises the MeanFlow loss only; :meth:`act` is one EMA-actor step."""

    name = "bc-flow"
    uses_critic = False
    defaults = dict(ACTOR_DEFAULTS)
