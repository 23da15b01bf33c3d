"""stlflow.policy: networks, generative heads, the Policy, its trainer and the real-time controller.

Notation (Diffusion Policy): To = ``n_obs_steps``, Tp = ``horizon``, Ta = ``n_action_steps``; θ = the STL rule
values a conditioned policy is asked for (``stl_params``).

- :mod:`stlflow.policy.nets` -- 1-D temporal U-Net with FiLM (:class:`UNet1D`) and :class:`ResidualMLP`
- :mod:`stlflow.policy.head_base` -- the head contract (noise levels, steps, NFE) and :class:`Head`
- :mod:`stlflow.policy.heads` -- :class:`DDPMHead` (DDIM sampling), :class:`FlowHead`, the registry ``HEADS``
- :mod:`stlflow.policy.meanflow` -- :class:`MeanFlowHead` (one-step average-velocity flow, JVP training)
- :mod:`stlflow.policy.policy` -- :class:`Policy` (normaliser inside, obs history, θ + classifier-free guidance)
- :mod:`stlflow.policy.checkpoint` -- atomic, hash-verified checkpoint folders; :class:`CheckpointError`
- :mod:`stlflow.policy.data` -- :class:`ChunkData` (training windows + per-episode θ from an EpisodeStore)
- :mod:`stlflow.policy.trainer` -- :class:`Trainer` (AdamW, warm-up + cosine, EMA, exact resume, DDP)
- :mod:`stlflow.policy.distill` -- :class:`Distiller` (a MeanFlow student distilled from a flow teacher)
- :mod:`stlflow.policy.rti` -- :class:`RTIController` (warm-started real-time iteration, k steps per tick)
- :mod:`stlflow.policy.guidance` -- :class:`STLGuidance` (inference-time STL guidance)
"""

from stlflow.policy.checkpoint import CheckpointError
from stlflow.policy.data import ChunkData
from stlflow.policy.distill import Distiller
from stlflow.policy.heads import DDPMHead, FlowHead, Head, MeanFlowHead, build_head
from stlflow.policy.nets import ResidualMLP, UNet1D, build_net, count_parameters
from stlflow.policy.policy import Policy
from stlflow.policy.rti import RTIController
from stlflow.policy.trainer import TrainConfig, Trainer

__all__ = [
    "CheckpointError",
    "ChunkData",
    "DDPMHead",
    "Distiller",
    "FlowHead",
    "Head",
    "MeanFlowHead",
    "Policy",
    "RTIController",
    "ResidualMLP",
    "TrainConfig",
    "Trainer",
    "UNet1D",
    "build_head",
    "build_net",
    "count_parameters",
]
