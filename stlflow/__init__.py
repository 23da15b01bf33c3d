"""stlflow: diffusion and flow policies for robots, shaped by Signal Temporal Logic rules.

Sub-packages, lowest layer first (docs/architecture.md explains the layering):

- :mod:`stlflow.stl`      STL syntax, batched exact/smooth robustness, calibration, online monitor
- :mod:`stlflow.datasets` zarr EpisodeStore, SequenceSampler, normalisers, importers, augmentation
- :mod:`stlflow.envs`     MuJoCo tasks (gymnasium ids ``stlflow/<Task>-v0``), experts, STL rules
- :mod:`stlflow.policy`   networks, DDPM/DDIM, flow and one-step flow heads, Policy, RTI controller
- :mod:`stlflow.control`  task registry, typed jobs, control loop, evaluation runner, recorder, worker pool
"""

__version__ = "0.1.0"
