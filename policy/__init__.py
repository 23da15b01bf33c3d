"""stlflow.policy: networks, generative heads, the Policy and its trainer (see DESIGN.md).

Notation (Diffusion Policy): To = ``n_obs_steps``, Tp = ``horizon``, Ta = ``n_action_steps``.

- :mod:`stlflow.policy.nets` -- 1-D temporal U-Net with FiLM (:class:`UNet1D`) and :class:`ResidualMLP`
- :mod:`stlflow.policy.heads` -- :class:`DDPMHead` (DDIM sampling), :class:`FlowHead`, :class:`MeanFlowHead`
- :mod:`stlflow.policy.policy` -- :class:`Policy` (normaliser inside, obs history, θ + classifier-free guidance)
- :mod:`stlflow.policy.data` -- :class:`ChunkData` (training windows + per-episode θ from an EpisodeStore)
- :mod:`stlflow.policy.trainer` -- :class:`Trainer` (AdamW, warm-up + cosine, EMA, exact resume, DDP)
"""

from stlflow.policy.data import ChunkData
from stlflow.policy.heads import DDPMHead, FlowHead, Head, MeanFlowHead, build_head
from stlflow.policy.nets import ResidualMLP, UNet1D, build_net, count_parameters
from stlflow.policy.policy import Policy
from stlflow.policy.rti import RTIController as RTIController
from stlflow.policy.trainer import TrainConfig, Trainer

__all__ = [
    "ChunkData",
    "DDPMHead",
    "FlowHead",
    "Head",
    "MeanFlowHead",
    "Policy",
    "ResidualMLP",
    "TrainConfig",
    "Trainer",
    "UNet1D",
    "build_head",
    "build_net",
    "count_parameters",
]
