"""The trainer's checkpoints on disk (:class:`stlflow.policy.trainer.Trainer`): which ones are kept, how old ones are
pruned, how one is read back and verified, and which one a resume starts from.

A training checkpoint is a ``checkpoints/step_XXXXXXXX`` folder holding the live policy (``policy.yaml``,
``model.safetensors``, ``normalizer.safetensors``), :data:`EMA_FILE` (the EMA weights) and :data:`STATE_FILE` (step,
optimiser, scheduler, EMA decay, RNG states, config); ``checkpoints/latest`` (:data:`LATEST_FILE`) names the newest.
Writing one is :meth:`Trainer.save_checkpoint`'s work (atomic and hashed, :mod:`stlflow.policy.checkpoint`).

Resume fallback (:func:`find_resume_point`): the checkpoint ``latest`` names is verified first; when ``latest`` or
that checkpoint is missing, empty, truncated or corrupted, the kept checkpoints are tried newest first, and the
problems met on the way are reported; a :class:`~stlflow.policy.checkpoint.CheckpointError` when none is intact.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stlflow.policy.checkpoint import CheckpointError, fsync_dir, read_config, resolve_file
from stlflow.policy.policy import NORMALIZER_FILE, WEIGHTS_FILE

__all__ = ["EMA_FILE", "LATEST_FILE", "STATE_FILE", "ResumePoint", "find_resume_point", "kept_checkpoints",
           "prune_checkpoints", "read_training_checkpoint", "rng_state", "set_rng_state"]

EMA_FILE, STATE_FILE, LATEST_FILE = "ema.safetensors", "training_state.pt", "latest"


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, numpy, python, and CUDA when available), as saved in :data:`STATE_FILE`."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNG states of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ keeping
def kept_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The ``step_XXXXXXXX`` folders of the checkpoint root as ``(step, path)``, newest first."""
    out = []
    for p in root.glob("step_*"):
        tail = p.name[len("step_"):]
        if p.is_dir() and tail.isdigit():
            out.append((int(tail), p))
    return sorted(out, reverse=True)


def prune_checkpoints(root: Path, current: Path, step: int, keep_last: int) -> None:
    """Keep ``current`` (the checkpoint of ``step``) and the newest ``keep_last - 1`` older checkpoints; folders of
    steps after the current one (left by a run resumed from an earlier checkpoint) are left alone until this run
    saves over them."""
    older = [p for s, p in kept_checkpoints(root) if s < step and p != current]
    for p in older[max(1, keep_last) - 1 :]:
        trash = p.with_name(f".trash-{os.getpid()}-{os.urandom(6).hex()}")
        try:
            os.rename(p, trash)  # out of the step_* namespace at once: never a half-deleted checkpoint
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(root)


# ------------------------------------------------------------------------------------------------ reading back
def read_training_checkpoint(d: Path, policy: Any) -> tuple[dict, dict, dict]:
    """``(model, ema, training state)`` of checkpoint ``d``, verified against the files' hashes and the shapes of
    ``policy`` (the policy being trained); a CheckpointError names what is wrong."""
    from safetensors.torch import load_file

    _, files, _ = read_config(d)
    paths = {n: resolve_file(d, files, n) for n in (WEIGHTS_FILE, NORMALIZER_FILE, EMA_FILE, STATE_FILE)}
    try:
        model = load_file(str(paths[WEIGHTS_FILE]), device="cpu")
        ema = load_file(str(paths[EMA_FILE]), device="cpu")
    except Exception as err:  # noqa: BLE001 -- truncated or garbage safetensors
        raise CheckpointError(d, f"weights cannot be read: {type(err).__name__}: {err}") from err
    try:
        state = torch.load(paths[STATE_FILE], map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 -- truncated, empty or garbage pickle
        raise CheckpointError(d, f"{STATE_FILE} cannot be read: {type(err).__name__}: {err}") from err
    need = ("step", "optimizer", "scheduler", "ema_decay", "rng")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise CheckpointError(d, f"{STATE_FILE} lacks some of {list(need)}")
    want = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    for name, sd in ((WEIGHTS_FILE, model), (EMA_FILE, ema)):
        if {k: tuple(v.shape) for k, v in sd.items()} != want:
            raise CheckpointError(d, f"{name} does not fit the policy being trained (other keys or shapes)")
    return model, ema, state


@dataclass
class ResumePoint:
    """The checkpoint a resume starts from: its ``path``, its ``model`` / ``ema`` state dicts and training
    ``state``; ``problems`` met before it (empty when it is the one ``latest`` names) and ``wanted`` (the checkpoint
    ``latest`` names, or ``latest`` itself when it names none)."""

    path: Path
    model: dict
    ema: dict
    state: dict
    problems: list[str]
    wanted: Path


def find_resume_point(root: Path, policy: Any) -> ResumePoint | None:
    """The newest intact checkpoint under ``root`` (see the module docstring), None when there is no checkpoint at
    all; a CheckpointError naming every problem when none is intact."""
    latest, kept = root / LATEST_FILE, kept_checkpoints(root)
    if not latest.exists() and not kept:
        return None
    problems: list[str] = []
    first: Path | None = None
    try:
        name = latest.read_text().strip()
    except FileNotFoundError:
        problems.append(f"{latest} is missing")
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{latest} cannot be read ({type(err).__name__})")
    else:
        if not name or "/" in name or name.startswith("."):
            problems.append(f"{latest} is empty or garbled ({name[:40]!r})")
        else:
            first = root / name
    candidates = ([first] if first is not None else []) + [p for _, p in kept if p != first]
    loaded = None
    for d in candidates:
        try:
            loaded = d, read_training_checkpoint(d, policy)
            break
        except CheckpointError as err:
            problems.append(str(err))
    if loaded is None:
        raise CheckpointError(root, "resume=True but no kept checkpoint is intact: " + "; ".join(problems))
    d, (model, ema, state) = loaded
    return ResumePoint(d, model, ema, state, problems, first if first is not None else latest)
