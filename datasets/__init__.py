"""stlflow.datasets: episode storage, sequence sampling, normalisers, importers and STL augmentation.

- :class:`EpisodeStore` -- zarr v3 episodes with atomic append (``store.py``; on-disk layout and atomic files in
  ``store_io.py``, consistency checks in ``store_check.py``, filter/merge copies in ``store_merge.py``)
- :class:`SequenceSampler`, :class:`SequenceDataset`, :func:`split_episodes` -- Diffusion Policy windows
- :class:`Normalizer` -- per-key min-max / Gaussian normalisation (numpy or torch)
- importers for D4RL HDF5, Minari folders and Diffusion Policy zarr stores (``importers.py``)
- STL augmentation of one demonstration (``augment.py``; optimisers in ``augment_optim.py``, selection and
  diversity in ``augment_select.py``, θ calibration in ``calibration.py``); the loop over a store is
  ``stlflow.control.augment``

Names are imported lazily, so that ``stlflow.datasets.store`` alone (e.g. in a recorder process) does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EpisodeStore": "stlflow.datasets.store",
    "EpisodeStoreError": "stlflow.datasets.store",
    "Normalizer": "stlflow.datasets.normalizer",
    "SequenceDataset": "stlflow.datasets.sampler",
    "SequenceSampler": "stlflow.datasets.sampler",
    "split_episodes": "stlflow.datasets.sampler",
}

__all__ = [
    "EpisodeStore",
    "EpisodeStoreError",
    "Normalizer",
    "SequenceDataset",
    "SequenceSampler",
    "split_episodes",
]

if TYPE_CHECKING:
    from stlflow.datasets.normalizer import Normalizer
    from stlflow.datasets.sampler import SequenceDataset, SequenceSampler, split_episodes
    from stlflow.datasets.store import EpisodeStore, EpisodeStoreError


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stlflow.datasets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
