"""Offline reinforcement-learning agents (D4RL benchmarks) built on the policy heads and the datasets layer.

Layer: ``stlflow.agents`` may import ``stlflow.stl``, ``stlflow.datasets`` and ``stlflow.policy``; it never imports
``envs`` or ``control`` (the evaluation harness in ``stlflow.control`` wires environments in).
"""

from stlflow.agents.base import Agent, OfflineAgent, Transitions, load_agent, save_agent
from stlflow.agents.bc_flow import BCFlowAgent
from stlflow.agents.ofql import OFQLAgent
from stlflow.agents.td3bc import TD3BCAgent

# name (as in ``stlflow d4rl run agent=NAME``) -> agent class
AGENTS: dict[str, type[OfflineAgent]] = {cls.name: cls for cls in (OFQLAgent, BCFlowAgent, TD3BCAgent)}


def make_agent(name: str, obs_dim: int, action_dim: int, seed: int = 0, **settings) -> OfflineAgent:
    """Build agent ``name`` (see :data:`AGENTS`) for observations of size ``obs_dim`` and actions ``action_dim``."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; known agents: {', '.join(AGENTS)}")
    return AGENTS[name](obs_dim, action_dim, seed=seed, **settings)


__all__ = ["AGENTS", "Agent", "BCFlowAgent", "OFQLAgent", "OfflineAgent", "TD3BCAgent", "Transitions", "load_agent",
           "make_agent", "save_agent"]
