"""Per-key affine normalisers: min-max to [-1, 1] and Gaussian (zero mean, unit variance).

Each key ``k`` has per-feature ``scale`` and ``offset`` (shape = the data's last dimension, or ``()`` for
1-D data) and ``normalize(k, x) = x * scale + offset``, ``unnormalize(k, y) = (y - offset) / scale``.

- ``"minmax"``: ``[min, max] -> [-1, 1]``; a constant feature (``max - min < eps``) gets ``scale = 1`` and
  maps the middle of its range to 0 (as Diffusion Policy's ``range_eps``), so nothing divides by zero.
- ``"gaussian"``: ``(x - mean) / std``; a constant feature (``std < eps``) gets ``std = 1``.
- ``"identity"``: ``scale = 1, offset = 0``.

Works on numpy arrays and torch tensors (same type, device and floating dtype out; integer inputs become
float32) with any leading dimensions. Saved with safetensors; the mode is stored as an integer tensor so
that :meth:`state_dict` alone rebuilds the normaliser (e.g. inside a policy checkpoint).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

MODES = ("gaussian", "minmax", "identity")
_STATS = ("scale", "offset", "min", "max", "mean", "std")


class Normalizer:
    """Per-key affine normalisation. Build with :meth:`fit`, :meth:`from_state_dict` or :meth:`load`."""

    def __init__(self, params: Mapping[str, Mapping[str, Any]]):
        # params: {key: {"mode": str, "scale": array, "offset": array, "min", "max", "mean", "std": arrays}}
        self._params: dict[str, dict[str, Any]] = {}
        for key, p in params.items():
            if p["mode"] not in MODES:
                raise ValueError(f"normaliser key {key!r}: unknown mode {p['mode']!r}; choose from {MODES}")
            entry: dict[str, Any] = {"mode": p["mode"]}
            for name in _STATS:
                entry[name] = np.asarray(p[name], dtype=np.float64)
            if np.any(entry["scale"] == 0) or not np.all(np.isfinite(entry["scale"])):
                raise ValueError(f"normaliser key {key!r}: scale must be finite and non-zero")
            self._params[key] = entry
        self._torch_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def fit(
        cls,
        data: Mapping[str, Any],
        modes: Mapping[str, str] | str = "minmax",
        eps: float = 1e-4,
    ) -> Normalizer:
        """Fit per-feature statistics of each key.

        Args:
            data: ``{key: (..., D)}`` arrays or tensors; statistics reduce over all but the last dimension
                (1-D arrays are treated as one scalar feature).
            modes: one mode for every key, or ``{key: mode}`` (keys not named default to ``"minmax"``).
            eps: a feature whose range (min-max) or std is below ``eps`` counts as constant.
        """
        params = {}
        for key, value in data.items():
            mode = modes if isinstance(modes, str) else modes.get(key, "minmax")
            if mode not in MODES:
                raise ValueError(f"normaliser key {key!r}: unknown mode {mode!r}; choose from {MODES}")
            x = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            x = x.astype(np.float64)
            if x.size == 0:
                raise ValueError(f"normaliser key {key!r}: cannot fit on an empty array")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"normaliser key {key!r}: data contains NaN or inf")
            flat = x.reshape(-1) if x.ndim <= 1 else x.reshape(-1, x.shape[-1])
            lo, hi = flat.min(axis=0), flat.max(axis=0)
            mean, std = flat.mean(axis=0), flat.std(axis=0)
            if mode == "minmax":
                rng = hi - lo
                const = rng < eps
                scale = np.where(const, 1.0, 2.0 / np.where(const, 1.0, rng))
                offset = np.where(const, -(lo + hi) / 2, -1.0 - lo * scale)
            elif mode == "gaussian":
                s = np.where(std < eps, 1.0, std)
                scale, offset = 1.0 / s, -mean / s
            else:
                scale, offset = np.ones_like(lo), np.zeros_like(lo)
            params[key] = {
                "mode": mode,
                "scale": scale,
                "offset": offset,
                "min": lo,
                "max": hi,
                "mean": mean,
                "std": std,
            }
        return cls(params)

    # ------------------------------------------------------------------ use
    @property
    def keys(self) -> list[str]:
        return list(self._params)

    def __contains__(self, key: object) -> bool:
        return key in self._params

    def mode(self, key: str) -> str:
        return self._entry(key)["mode"]

    def stats(self, key: str) -> dict[str, np.ndarray]:
        """Fitted statistics of ``key``: ``scale, offset, min, max, mean, std`` (copies)."""
        e = self._entry(key)
        return {n: e[n].copy() for n in _STATS}

    def _entry(self, key: str) -> dict[str, Any]:
        try:
            return self._params[key]
        except KeyError:
            raise KeyError(f"normaliser has no key {key!r}; keys: {self.keys}") from None

    def _affine(self, key: str, x: Any) -> tuple[Any, Any, Any]:
        e = self._entry(key)
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point():
                x = x.float()
            ck = (key, x.device, x.dtype)
            if ck not in self._torch_cache:
                self._torch_cache[ck] = (
                    torch.as_tensor(e["scale"], dtype=x.dtype, device=x.device),
                    torch.as_tensor(e["offset"], dtype=x.dtype, device=x.device),
                )
            scale, offset = self._torch_cache[ck]
            return x, scale, offset
        x = np.asarray(x)
        dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
        return x.astype(dtype, copy=False), e["scale"].astype(dtype), e["offset"].astype(dtype)

    def _check_features(self, key: str, x: Any, scale: Any) -> None:
        n = tuple(scale.shape)
        if n and (x.ndim == 0 or tuple(x.shape[-1:]) != n):
            raise ValueError(f"normaliser key {key!r}: expected last dimension {n[0]}, got shape {tuple(x.shape)}")

    def normalize(self, key: str, x: Any) -> Any:
        """``x * scale + offset`` for ``x`` of shape ``(..., D)`` (numpy or torch, same type out)."""
        x, scale, offset = self._affine(key, x)
        self._check_features(key, x, scale)
        return x * scale + offset

    def unnormalize(self, key: str, y: Any) -> Any:
        """Inverse of :meth:`normalize`: ``(y - offset) / scale``."""
        y, scale, offset = self._affine(key, y)
        self._check_features(key, y, scale)
        return (y - offset) / scale

    def normalize_dict(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Normalise every entry of ``batch`` whose key the normaliser has; others pass through.

        Usable as ``SequenceDataset(sampler, transform=norm.normalize_dict)``.
        """
        return {k: self.normalize(k, v) if k in self._params else v for k, v in batch.items()}

    def unnormalize_dict(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Inverse of :meth:`normalize_dict`."""
        return {k: self.unnormalize(k, v) if k in self._params else v for k, v in batch.items()}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<key>.<stat>": float32 tensor, "<key>.mode": int64 scalar}``; rebuilt by :meth:`from_state_dict`."""
        out: dict[str, torch.Tensor] = {}
        for key, e in self._params.items():
            out[f"{key}.mode"] = torch.tensor(MODES.index(e["mode"]), dtype=torch.int64)
            for name in _STATS:
                out[f"{key}.{name}"] = torch.as_tensor(e[name], dtype=torch.float32).clone()
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> Normalizer:
        params: dict[str, dict[str, Any]] = {}
        for name, value in state.items():
            key, _, stat = name.rpartition(".")
            if not key or stat not in (*_STATS, "mode"):
                raise KeyError(f"unexpected normaliser state entry {name!r}")
            v = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            params.setdefault(key, {})[stat] = MODES[int(v)] if stat == "mode" else v
        for key, p in params.items():
            missing = [s for s in (*_STATS, "mode") if s not in p]
            if missing:
                raise KeyError(f"normaliser state for key {key!r} lacks {missing}")
        return cls(params)

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a safetensors file (key order kept in the file's metadata)."""
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "stlflow.Normalizer", "keys": json.dumps(self.keys)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Normalizer:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            order = json.loads((f.metadata() or {}).get("keys", "[]"))
        state = load_file(str(path))
        rank = {k: i for i, k in enumerate(order)}
        return cls.from_state_dict(
            dict(sorted(state.items(), key=lambda kv: rank.get(kv[0].rpartition(".")[0], 1 << 30)))
        )

    def __repr__(self) -> str:
        return (
            "Normalizer("
            + ", ".join(f"{k}: {e['mode']}{tuple(e['scale'].shape)}" for k, e in self._params.items())
            + ")"
        )
