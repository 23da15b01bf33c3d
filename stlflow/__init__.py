"""stlflow: diffusion and flow policies for robots, shaped by Signal Temporal Logic rules.

Sub-packages (see DESIGN.md for the layering):

- :mod:`stlflow.stl`      STL syntax, batched exact/smooth robustness, calibration, online monitor
- :mod:`stlflow.datasets` zarr EpisodeStore, SequenceSampler, normalisers, importers, augmentation
- :mod:`stlflow.envs`     MuJoCo tasks (gymnasium ids ``stlflow/<Task>-v0``), experts, STL rules
- :mod:`stlflow.policy`   networks, DDPM/DDIM, flow and one-step flow heads, Policy, RTI controller
- :mod:`stlflow.control`  control loop, robot interfaces, evaluation runner, recorder
"""

__version__ = "0.1.0"
