"""Offline reinforcement-learning agents (D4RL benchmarks) built on the policy heads and the datasets layer.

Layer: a folder of the policy layer (``stlflow.policy.agents``, beside the heads it reuses): it imports
``stlflow.stl``, ``stlflow.datasets`` and ``stlflow.policy`` only, never ``envs`` or ``control`` (the evaluation
harness, ``stlflow.control.d4rl_run``, wires environments in).
"""

from stlflow.policy.agents.base import Agent, OfflineAgent, Transitions, load_agent, save_agent
from stlflow.policy.agents.bc_flow import BCFlowAgent
from stlflow.policy.agents.ofql import OFQLAgent
from stlflow.policy.agents.td3bc import TD3BCAgent

# name (as in ``stlflow d4rl run agent=NAME``) -> agent class
AGENTS: dict[str, type[OfflineAgent]] = {cls.name: cls for cls in (OFQLAgent, BCFlowAgent, TD3BCAgent)}


def make_agent(name: str, obs_dim: int, action_dim: int, seed: int = 0, **settings) -> OfflineAgent:
    """Build agent ``name`` (see :data:`AGENTS`) for observations of size ``obs_dim`` and actions ``action_dim``."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; known agents: {', '.join(AGENTS)}")
    return AGENTS[name](obs_dim, action_dim, seed=seed, **settings)


__all__ = ["AGENTS", "Agent", "BCFlowAgent", "OFQLAgent", "OfflineAgent", "TD3BCAgent", "Transitions", "load_agent",
           "make_agent", "save_agent"]
