"""Offline reinforcement-learning agents (D4RL benchmarks) built on the policy heads and the datasets layer.

Layer: ``stlflow.agents`` may import ``stlflow.stl``, ``stlflow.datasets`` and ``stlflow.policy``; it never imports
``envs`` or ``control`` (the evaluation harness in ``stlflow.control`` wires environments in).
"""
