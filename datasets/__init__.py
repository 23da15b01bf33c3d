"""stlflow.datasets: episode storage, sequence sampling, normalisers and importers (see DESIGN.md).

- :class:`EpisodeStore` -- zarr v3 episodes with atomic append (``store.py``)
- :class:`SequenceSampler`, :class:`SequenceDataset`, :func:`split_episodes` -- Diffusion Policy windows
- :class:`Normalizer` -- per-key min-max / Gaussian normalisation (numpy or torch)
- importers for D4RL HDF5, Minari folders and Diffusion Policy zarr stores (``importers.py``)
"""

from stlflow.datasets.normalizer import Normalizer
from stlflow.datasets.sampler import SequenceDataset, SequenceSampler, split_episodes
from stlflow.datasets.store import EpisodeStore, EpisodeStoreError

__all__ = [
    "EpisodeStore",
    "EpisodeStoreError",
    "Normalizer",
    "SequenceDataset",
    "SequenceSampler",
    "split_episodes",
]
