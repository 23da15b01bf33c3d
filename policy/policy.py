"""The Policy: normalise, condition on the observation history (and θ), sample an action chunk, unnormalise.

Notation (Diffusion Policy): To = ``n_obs_steps``, Tp = ``horizon``, Ta = ``n_action_steps``, Do = obs dim,
Da = action dim, P = number of STL parameters θ.

Timing (To = 2, Tp = 16, Ta = 8; the same windows as :class:`stlflow.datasets.SequenceSampler`)::

    chunk index j:   0    1    2   ...   8   9  ...  15
    obs history:   [t-1   t]
    actions:       [a_{t-1} a_t a_{t+1} ... a_{t+7}  ...  a_{t+14}]
                        executed: j = To-1 ... To-1+Ta-1  (a_t ... a_{t+7})

``predict(obs_history)`` returns the whole chunk ``(B, Tp, Da)``; the caller executes
``chunk[:, To-1 : To-1+Ta]`` (``Policy.executed_slice``).

The condition is ``[normalised obs history flattened (To*Do), θ_normalised * keep (P), keep (1)]`` where
``keep`` is 1 when θ is given and 0 for the unconditional branch (no θ, or dropped at training time with
probability ``cfg_dropout`` for classifier-free guidance). At sampling, ``guidance_scale`` s != 1 combines
the predictions as u + s (c - u), which costs two network evaluations per step (batched).

Discrete action channels (``discrete_action_mask``, from the env) take the values {-1, +1} in physical
units; :meth:`predict` snaps them at threshold 0.

A checkpoint directory holds ``policy.yaml`` (configuration, and the sha256 and size of every file it refers to),
``model.safetensors`` (weights and the head's buffers, e.g. the DDPM schedule) and ``normalizer.safetensors``; it
loads on a CPU-only machine. :meth:`Policy.save` writes it atomically and :meth:`Policy.load` verifies it
(:mod:`stlflow.policy.checkpoint`); a bad checkpoint is a :class:`~stlflow.policy.checkpoint.CheckpointError`.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stlflow.datasets.normalizer import Normalizer
from stlflow.policy.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    MissingCheckpointError,
    read_config,
    resolve_file,
    write_checkpoint,
)
from stlflow.policy.heads import HEADS, Head, build_head
from stlflow.policy.nets import build_net, count_parameters

__all__ = ["Policy"]

FORMAT_VERSION = 2  # 2: policy.yaml lists the sha256 of its files; 1 (no hashes) still loads
WEIGHTS_FILE, NORMALIZER_FILE = "model.safetensors", "normalizer.safetensors"


class Policy(nn.Module):
    """A chunking generative policy.

    Args:
        obs_dim: Do.
        action_dim: Da.
        n_obs_steps: To, observation history length.
        horizon: Tp, predicted chunk length.
        n_action_steps: Ta, actions executed per chunk; ``Ta <= Tp - To + 1``.
        head: head config ``{"kind": "ddpm"|"flow"|"meanflow", ...}`` (see ``heads.py``).
        net: network config ``{"name": "mlp"|"unet", ...}`` (see ``nets.py``).
        param_names: names of the STL parameters θ, in order ([] = unconditioned).
        discrete_action_mask: bool (Da,), channels that take values {-1, +1}.
        normalizer: a :class:`stlflow.datasets.Normalizer` with keys ``obs``, ``action`` (and ``params`` when
            θ is used); None = identity.
        cfg_dropout: probability of dropping θ at training (classifier-free guidance); used only with θ.
        guidance_scale: classifier-free guidance scale at sampling (1.0 = off).
        discrete_scale: the discrete channels' normalised values are divided by this factor (>= 1), so that the
            network sees a flip of a binary channel as a small move (the RTI controller's ``discrete_mode="scale"``);
            1.0 = no scaling. Applied inside :meth:`normalize_action` / :meth:`unnormalize_action`, so training,
            sampling and checkpoints all use it.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        n_obs_steps: int = 2,
        horizon: int = 16,
        n_action_steps: int = 8,
        head: Mapping[str, Any] | None = None,
        net: Mapping[str, Any] | None = None,
        param_names: Sequence[str] = (),
        discrete_action_mask: Sequence[bool] | np.ndarray | None = None,
        normalizer: Normalizer | None = None,
        cfg_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        discrete_scale: float = 1.0,
    ):
        super().__init__()
        if min(obs_dim, action_dim, n_obs_steps, horizon, n_action_steps) < 1:
            raise ValueError("obs_dim, action_dim, n_obs_steps, horizon and n_action_steps must all be >= 1")
        if n_action_steps > horizon - n_obs_steps + 1:
            raise ValueError(
                f"n_action_steps={n_action_steps} must be <= horizon - n_obs_steps + 1 = "
                f"{horizon - n_obs_steps + 1} (the chunk must cover the executed actions)"
            )
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.n_obs_steps, self.horizon, self.n_action_steps = int(n_obs_steps), int(horizon), int(n_action_steps)
        self.param_names = [str(p) for p in param_names]
        self.head_cfg = dict(head or {"kind": "flow"})
        kind = self.head_cfg.get("kind")
        if kind not in HEADS:
            raise ValueError(f"unknown head kind {kind!r}; choose one of {sorted(HEADS)}")
        self.net_cfg = {"time_scale": HEADS[kind].time_scale, **dict(net or {"name": "mlp"})}
        mask = np.zeros(action_dim, bool) if discrete_action_mask is None else np.asarray(discrete_action_mask, bool)
        if mask.shape != (action_dim,):
            raise ValueError(f"discrete_action_mask must have shape ({action_dim},), got {mask.shape}")
        self.discrete_action_mask = mask
        self.cfg_dropout, self.guidance_scale = float(cfg_dropout), float(guidance_scale)
        self.discrete_scale = float(discrete_scale)
        if not self.discrete_scale >= 1.0:
            raise ValueError(f"discrete_scale must be >= 1, got {discrete_scale}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
        if normalizer is None:
            data = {"obs": np.zeros((1, obs_dim)), "action": np.zeros((1, action_dim))}
            if self.param_names:
                data["params"] = np.zeros((1, len(self.param_names)))
            normalizer = Normalizer.fit(data, modes="identity")
        needed = ["obs", "action"] + (["params"] if self.param_names else [])
        missing = [k for k in needed if k not in normalizer]
        if missing:
            raise ValueError(f"normalizer lacks keys {missing}; it has {normalizer.keys}")
        self.normalizer = normalizer
        self.cond_dim = self.n_obs_steps * self.obs_dim + (len(self.param_names) + 1 if self.param_names else 0)
        net_module = build_net(self.net_cfg, self.action_dim, self.horizon, self.cond_dim, HEADS[kind].n_times)
        self.head: Head = build_head(self.head_cfg, net_module, self.horizon, self.action_dim)

    # ------------------------------------------------------------------ properties
    # The first weight, kept to read the device and dtype from: walking the module tree for them on every call cost
    # ~10% of a warm RTI tick. ``_apply`` (behind .to(), .float(), ...) refreshes it.
    def _probe(self) -> Tensor:
        probe = self.__dict__.get("_probe_param")
        if probe is None:
            probe = self.__dict__["_probe_param"] = next(self.parameters())
        return probe

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_probe_param", None)
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self._probe().device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights, in which :meth:`condition` builds its inputs."""
        return self._probe().dtype

    @property
    def executed_slice(self) -> slice:
        """Chunk indices of the Ta actions to execute after the latest observation: [To-1, To-1+Ta)."""
        return slice(self.n_obs_steps - 1, self.n_obs_steps - 1 + self.n_action_steps)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def config(self) -> dict[str, Any]:
        """Everything (except weights and normaliser) needed to rebuild the policy."""
        return {
            "format_version": FORMAT_VERSION,
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "n_obs_steps": self.n_obs_steps,
            "horizon": self.horizon,
            "n_action_steps": self.n_action_steps,
            "head": self.head_cfg,
            "net": self.net_cfg,
            "param_names": list(self.param_names),
            "discrete_action_mask": [bool(b) for b in self.discrete_action_mask],
            "cfg_dropout": self.cfg_dropout,
            "guidance_scale": self.guidance_scale,
            "discrete_scale": self.discrete_scale,
        }

    # ------------------------------------------------------------------ normalisation
    def _tensor(self, x: Any) -> Tensor:
        return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=self.dtype).to(self.device)

    def normalize_action(self, a: Tensor) -> Tensor:
        """Physical -> normalised actions, any leading dims ``(..., Da)`` (discrete channels / ``discrete_scale``)."""
        x = self.normalizer.normalize("action", a)
        return x * self._discrete_factor(x) if self.discrete_scale != 1.0 else x

    def unnormalize_action(self, x: Tensor) -> Tensor:
        """Normalised -> physical actions, any leading dims ``(..., Da)``."""
        if self.discrete_scale != 1.0:
            x = x / self._discrete_factor(x)
        return self.normalizer.unnormalize("action", x)

    def _discrete_factor(self, x: Any) -> Any:
        """Per-channel multiplier (Da,): 1 / discrete_scale on discrete channels, 1 elsewhere (like ``x``)."""
        f = np.where(self.discrete_action_mask, 1.0 / self.discrete_scale, 1.0)
        return torch.as_tensor(f, dtype=x.dtype, device=x.device) if isinstance(x, Tensor) else f.astype(x.dtype)

    def threshold_discrete(self, a: Any) -> Any:
        """Snap discrete channels to {-1, +1} (threshold 0); ``a`` (..., Da) physical, numpy or torch."""
        if not self.discrete_action_mask.any():
            return a
        if isinstance(a, Tensor):
            a = a.clone()
            m = torch.as_tensor(self.discrete_action_mask, device=a.device)
            a[..., m] = torch.where(a[..., m] > 0, 1.0, -1.0).to(a.dtype)
            return a
        a = np.array(a, copy=True)
        a[..., self.discrete_action_mask] = np.where(a[..., self.discrete_action_mask] > 0, 1.0, -1.0)
        return a

    # ------------------------------------------------------------------ conditioning
    def theta_tensor(self, stl_params: Any) -> Tensor | None:
        """θ as the tensor :meth:`condition` takes: ``(1, P)`` float in this policy's dtype, on its device, columns
        in ``param_names`` order; ``(N, P)`` when the values are given per row. Build it once and pass it to every
        :meth:`condition` call that asks for the same θ (the controllers do, once per episode).

        ``stl_params``: ``{name: value}`` naming exactly ``param_names`` (a value is a float or an (N,) array), or an
        array / tensor (P,) or (N, P) already in that order; None gives None (unconditional). A missing or unknown
        name, a wrong shape, or θ for a policy trained without θ is a ValueError.
        """
        if stl_params is None:
            return None
        if not self.param_names:
            raise ValueError("θ given, but this policy was trained without θ (param_names is empty)")
        if isinstance(stl_params, Mapping):
            missing = [n for n in self.param_names if n not in stl_params]
            unknown = sorted(str(n) for n in stl_params if n not in self.param_names)
            if missing or unknown:
                raise ValueError(f"θ must name exactly this policy's param_names {self.param_names}; "
                                 f"missing {missing}, unknown {unknown}")
            cols = [self._tensor(stl_params[n]).reshape(-1) for n in self.param_names]
            rows = max(c.numel() for c in cols)
            if any(c.numel() not in (1, rows) for c in cols):
                sizes = {n: c.numel() for n, c in zip(self.param_names, cols)}
                raise ValueError(f"θ values must be scalars or all of one length; got sizes {sizes}")
            return torch.stack([c.expand(rows) for c in cols], dim=-1)
        theta = self._tensor(stl_params)
        theta = theta.reshape(1, -1) if theta.ndim == 1 else theta
        if theta.ndim != 2 or theta.shape[1] != len(self.param_names):
            raise ValueError(f"θ must have shape (P,) or (N, P) with P = {len(self.param_names)} "
                             f"(param_names {self.param_names}), got {tuple(theta.shape)}")
        return theta

    def _is_theta_tensor(self, theta: Any) -> bool:
        """Whether ``theta`` is already a :meth:`theta_tensor` result (used as it is, nothing rebuilt)."""
        return (bool(self.param_names) and isinstance(theta, Tensor) and theta.ndim == 2
                and theta.shape[1] == len(self.param_names) and theta.dtype == self.dtype
                and theta.device == self.device)

    def condition(self, obs_history: Any, theta: Any = None, keep: Tensor | None = None) -> Tensor:
        """Condition vector ``(B, Dc)`` from ``obs_history`` (B, To, Do) in physical units and θ.

        ``theta``: a :meth:`theta_tensor` result (1 or B rows; used as it is), or anything :meth:`theta_tensor`
        takes (``{name: float | (B,)}``, an array (B, P) or (P,)), or None (unconditional).
        ``keep``: optional (B,) 0/1 mask (training-time θ dropout).
        """
        obs = self._tensor(obs_history)
        if obs.ndim == 2:
            obs = obs.unsqueeze(0)
        if obs.shape[1:] != (self.n_obs_steps, self.obs_dim):
            raise ValueError(
                f"obs_history must have shape (B, To={self.n_obs_steps}, Do={self.obs_dim}), got {tuple(obs.shape)}"
            )
        parts = [self.normalizer.normalize("obs", obs).flatten(1)]
        if theta is not None and not self._is_theta_tensor(theta):
            theta = self.theta_tensor(theta)
        if self.param_names:
            b = obs.shape[0]
            if theta is None:
                theta_n, k = obs.new_zeros(b, len(self.param_names)), obs.new_zeros(b)
            else:
                if theta.shape[0] not in (1, b):
                    raise ValueError(f"θ must have 1 or {b} rows (the batch), got {tuple(theta.shape)}")
                theta_n = self.normalizer.normalize("params", theta.expand(b, -1))
                k = obs.new_ones(b) if keep is None else keep.to(obs)
            parts += [theta_n * k[:, None], k[:, None]]
        return torch.cat(parts, dim=-1)

    def unconditional(self, cond: Tensor) -> Tensor:
        """The same condition with θ removed (the classifier-free guidance's unconditional branch)."""
        if not self.param_names:
            return cond
        out = cond.clone()
        out[:, self.n_obs_steps * self.obs_dim :] = 0
        return out

    # ------------------------------------------------------------------ training
    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """All training randomness for ``batch`` samples (head noise/times and the θ-dropout mask)."""
        dev = generator.device if generator is not None else self.device
        noise = self.head.draw_noise(batch, generator=generator, device=dev)
        if self.param_names:
            noise["cfg_keep"] = (torch.rand((batch,), generator=generator, device=dev) >= self.cfg_dropout).float()
        return noise

    def batch_inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(obs (B,To',Do), action (B,Tp,Da), θ (B,P) or None)`` of a training batch, on this policy's device.

        θ is the batch's ``"params"`` for a conditioned policy (required then) and None otherwise.
        """
        obs, act = batch["obs"].to(self.device), batch["action"].to(self.device)
        params = batch.get("params") if self.param_names else None
        if self.param_names and params is None:
            raise KeyError(f"batch lacks 'params' for the θ conditioning on {self.param_names}")
        return obs, act, params

    def compute_loss(self, batch: Mapping[str, Tensor], noise: Mapping[str, Tensor] | None = None) -> Tensor:
        """Training loss of a batch ``{"obs": (B,To,Do), "action": (B,Tp,Da), ["params": (B,P)]}`` (physical)."""
        obs, act, params = self.batch_inputs(batch)
        noise = dict(noise) if noise is not None else self.draw_noise(act.shape[0])
        keep = noise.pop("cfg_keep", None)
        cond = self.condition(obs[:, : self.n_obs_steps], params, keep=keep)
        return self.head.loss(self.normalize_action(act), cond, noise)

    def forward(self, batch: Mapping[str, Tensor], noise: Mapping[str, Tensor] | None = None) -> Tensor:
        """Training loss (so that DistributedDataParallel can wrap the policy)."""
        return self.compute_loss(batch, noise)

    # ------------------------------------------------------------------ sampling
    def nfe(self, steps: int | None = None, t_start: float = 1.0) -> int:
        """Network evaluations of one :meth:`sample_normalized` call (x2 with classifier-free guidance)."""
        n = self.head.nfe(steps, t_start)
        return 2 * n if (self.param_names and self.guidance_scale != 1.0) else n

    @torch.no_grad()
    def sample_normalized(
        self,
        cond: Tensor,
        x_init: Tensor | None = None,
        t_start: float = 1.0,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_fn: Callable[[Tensor, float], Tensor] | None = None,
    ) -> Tensor:
        """Normalised chunk (B, Tp, Da) for ``cond`` (B, Dc), with classifier-free guidance when configured.

        Particle selection: when ``guidance_fn`` carries ``particles`` = N > 1 and ``select`` (STL guidance bound
        to one observation history) and B = 1, N chunks are sampled in one batch (``x_init`` repeated, the noise
        different) and ``guidance_fn.select`` returns the one kept (1, Tp, Da).
        """
        use_cfg = bool(self.param_names) and self.guidance_scale != 1.0
        n = int(getattr(guidance_fn, "particles", 1) or 1)
        select = n > 1 and cond.shape[0] == 1
        if select:
            cond = cond.expand(n, -1)
            x_init = None if x_init is None else x_init.expand(n, *x_init.shape[1:])
        hook = guidance_fn if getattr(guidance_fn, "steers", True) else None
        x = self.head.sample(
            cond, x_init=x_init, t_start=t_start, steps=steps, generator=generator, guidance_fn=hook,
            uncond=self.unconditional(cond) if use_cfg else None, guidance_scale=self.guidance_scale,
        )
        return guidance_fn.select(x, generator) if select else x

    @torch.no_grad()
    def predict(
        self, obs_history: Any, stl_params: Any = None, steps: int | None = None,
        generator: torch.Generator | None = None, guidance: Any = None,
    ) -> np.ndarray:
        """Action chunks ``(B, Tp, Da)`` in physical units, discrete channels thresholded.

        ``obs_history``: (B, To, Do) or (To, Do), physical units. ``stl_params``: θ, the rule values a conditioned
        policy is asked for (anything :meth:`theta_tensor` takes; None = unconditional). ``steps``: solver steps
        (head default if None). ``guidance``: optional STL guidance (``stlflow.policy.guidance.STLGuidance``, one
        observation history); None = off.
        """
        cond = self.condition(obs_history, self.theta_tensor(stl_params))
        gfn = None if guidance is None else guidance.bind(self, obs_history, stl_params)
        x = self.sample_normalized(cond, steps=steps, generator=generator, guidance_fn=gfn)
        return self.threshold_discrete(self.unnormalize_action(x).cpu().numpy())

    # ------------------------------------------------------------------ persistence
    def save(
        self, directory: str | os.PathLike, state_dict: Mapping[str, Tensor] | None = None,
        extra_files: Mapping[str, Callable[[Path], None]] | None = None,
    ) -> Path:
        """Write ``policy.yaml``, ``model.safetensors`` (``state_dict`` or this policy's) and the normaliser.

        Atomic (:func:`stlflow.policy.checkpoint.write_checkpoint`): a new folder is built complete in a temporary
        sibling and renamed into place; an existing one (a checkpoint, or a folder holding other things too) is
        replaced through a staging folder and an atomic swap of ``policy.yaml``, so that a process killed at any
        moment leaves either the old or the new complete checkpoint at ``directory``. ``policy.yaml`` records the
        sha256 and size of every file. ``extra_files``: ``{file name: writer(path)}`` written, hashed and
        committed with the policy (the trainer's EMA weights and training state).
        """
        from safetensors.torch import save_file

        sd = self.state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        files: dict[str, Callable[[Path], None]] = {
            WEIGHTS_FILE: lambda p: save_file(tensors, str(p), metadata={"format": "stlflow.Policy"}),
            NORMALIZER_FILE: self.normalizer.save,
        }
        for name, write in (extra_files or {}).items():
            if name in files:
                raise ValueError(f"extra_files may not replace the policy's own {name}")
            files[name] = write
        return write_checkpoint(directory, self.config(), files)

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Policy:
        """Rebuild a policy saved with :meth:`save` on ``map_location`` (CPU by default), verified.

        The size and sha256 of ``model.safetensors`` and ``normalizer.safetensors`` must match those recorded in
        ``policy.yaml``. Checkpoints written before content hashes (``format_version: 1``, no ``files`` section,
        e.g. ``tests/data/golden/*``) still load, without the hash check. Any bad checkpoint -- a missing folder or
        file, an empty / truncated / garbage safetensors file, an empty, invalid or non-mapping YAML, unknown or
        missing settings, dimensions that disagree with the weights, a hash mismatch, non-finite weights -- raises
        :class:`~stlflow.policy.checkpoint.CheckpointError` (a ``ValueError``) naming the folder and the problem;
        a missing folder or file is also a ``FileNotFoundError``. A load that overlaps a save by another process
        (``policy.yaml`` swapped while the files were read) reads the checkpoint again, up to five times.
        """
        d, tries = Path(directory), 0
        while True:
            cfg, files, raw = read_config(d)
            try:
                contents, err = cls._read_checkpoint(d, cfg, files), None
            except CheckpointError as e:
                contents, err = None, e
            except FileNotFoundError as e:  # a staged file removed under us by a concurrent save
                contents, err = None, MissingCheckpointError(d, f"{Path(str(e.filename)).name} vanished while read")
            try:
                unchanged = (d / CONFIG_FILE).read_bytes() == raw
            except OSError:
                unchanged = False
            if unchanged:  # nothing was swapped while we read: the files read are the ones policy.yaml describes
                if err is not None:
                    raise err
                return cls._build(d, cfg, *contents).to(map_location).eval()
            tries += 1  # another process is saving here: read the checkpoint again, after a short pause
            if tries == 10:
                raise err or CheckpointError(d, f"{CONFIG_FILE} kept changing while it was read (another process is "
                                                f"writing this checkpoint)")
            time.sleep(0.01 * tries)

    @classmethod
    def _read_checkpoint(
        cls, d: Path, cfg: dict[str, Any], files: dict[str, dict[str, Any]] | None,
    ) -> tuple[Normalizer, dict[str, Tensor]]:
        """Check the settings' names and read the normaliser and the weights, verified (nothing built yet)."""
        from safetensors.torch import load_file

        version = cfg.pop("format_version", None)
        if version not in (1, FORMAT_VERSION):
            raise CheckpointError(d, f"{CONFIG_FILE}: unsupported format_version {version!r} "
                                     f"(this code reads 1 and {FORMAT_VERSION})")
        if version == FORMAT_VERSION and files is None:
            raise CheckpointError(d, f"{CONFIG_FILE} (format_version {version}) lacks the 'files' content hashes")
        params = inspect.signature(cls.__init__).parameters
        known = {n for n in params if n not in ("self", "normalizer")}
        required = {n for n in known if params[n].default is inspect.Parameter.empty}
        unknown, missing = sorted(map(str, set(cfg) - known)), sorted(required - set(cfg))
        if unknown or missing:
            raise CheckpointError(d, f"{CONFIG_FILE}: unknown settings {unknown}, missing settings {missing} "
                                     f"(known: {sorted(known)})")
        weights_path = resolve_file(d, files, WEIGHTS_FILE)
        norm_path = resolve_file(d, files, NORMALIZER_FILE)
        try:
            normalizer = Normalizer.load(norm_path)
        except Exception as err:  # noqa: BLE001 -- safetensors, key and value errors alike: a damaged file
            raise CheckpointError(d, f"{NORMALIZER_FILE} cannot be read: {type(err).__name__}: {err}") from err
        try:
            weights = load_file(str(weights_path), device="cpu")
        except Exception as err:  # noqa: BLE001 -- a truncated, empty or garbage file
            raise CheckpointError(d, f"{WEIGHTS_FILE} cannot be read: {type(err).__name__}: {err}") from err
        return normalizer, weights

    @classmethod
    def _build(cls, d: Path, cfg: dict[str, Any], normalizer: Normalizer, weights: dict[str, Tensor]) -> Policy:
        """The policy ``cfg`` describes, with ``weights``; settings that disagree with the files are refused."""
        try:
            policy = cls(**cfg, normalizer=normalizer)
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(d, f"{CONFIG_FILE} does not describe a valid policy: {err}") from err
        for key, dim in (("obs", policy.obs_dim), ("action", policy.action_dim)):
            shape = tuple(normalizer.stats(key)["scale"].shape)
            if shape not in ((), (dim,)):
                raise CheckpointError(d, f"{NORMALIZER_FILE} has {shape[0]} {key} features, {CONFIG_FILE} says {dim}")
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(d, f"{WEIGHTS_FILE} holds non-finite values (NaN or inf) in {bad[:5]}")
        mine = policy.state_dict()
        missing_w, unexpected = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
        shapes = [f"{k}: {tuple(weights[k].shape)} in the file, {tuple(v.shape)} for {CONFIG_FILE}"
                  for k, v in mine.items() if k in weights and weights[k].shape != v.shape]
        if missing_w or unexpected or shapes:
            raise CheckpointError(d, f"{WEIGHTS_FILE} does not match {CONFIG_FILE}: missing {missing_w[:5]}, "
                                     f"unexpected {unexpected[:5]}, shapes {shapes[:5]}")
        policy.load_state_dict(weights, strict=True)
        return policy
