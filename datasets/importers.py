"""Importers from D4RL HDF5 files, Minari dataset folders and Diffusion Policy zarr stores into an EpisodeStore.

Imported stores use one naming scheme, whatever the source:

==============  =========================  ==============================  ===================================
store key       D4RL HDF5                  Minari ``episode_<id>``          meaning
==============  =========================  ==============================  ===================================
``obs``         ``observations``           ``observations[:-1]``            observation before the action
``next_obs``    ``next_observations``      ``observations[1:]``             observation after it (when known)
``action``      ``actions``                ``actions``
``reward``      ``rewards``                ``rewards``
``terminal``    ``terminals``              ``terminations``                 the MDP ended (bool)
``timeout``     ``timeouts``               ``truncations``                  cut by a time limit (bool)
``info_<k>``    ``infos/<k>`` (numeric)    ``infos/<k>`` (numeric)          nested names joined with ``_``
==============  =========================  ==============================  ===================================

Dict observation/action spaces (Minari groups) become ``obs_<k>``, ``next_obs_<k>``, ``action_<k>``.
D4RL's flat arrays are split into episodes after every step with ``terminals | timeouts``; steps after
the last such flag form a final episode with ``attrs["complete"] = False``.

Every import writes into a hidden staging folder next to ``out``, ``.<out>.importing-<pid>-<hex>.stlflow-tmp``,
and renames it at the end: a malformed or truncated source raises :class:`DatasetImportError` naming the file
and the problem, and leaves nothing at ``out``. A process killed mid-import (SIGKILL, power loss) cannot
clean up: its staging folder stays, and the next import to the same ``out`` deletes it once its owner is
dead (the staging store's writer lock is free, or, for a folder without one, no process ``<pid>`` runs).
An import never replaces a store that another process has open for writing. Neither ``d4rl`` nor ``minari``
is needed; the files are read with ``h5py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

from stlflow.datasets.staging import commit_in_batches, staged_store
from stlflow.datasets.store import EpisodeStore, EpisodeStoreError
from stlflow.datasets.store_io import to_jsonable

D4RL_KEYS = {
    "observations": "obs",
    "actions": "action",
    "rewards": "reward",
    "terminals": "terminal",
    "timeouts": "timeout",
    "next_observations": "next_obs",
}
D4RL_REQUIRED = ("observations", "actions", "rewards", "terminals")


class DatasetImportError(ValueError):
    """A source dataset is missing, truncated or malformed; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------- helpers
def _read_dataset(f: h5py.File | h5py.Group, name: str, file: Path) -> np.ndarray:
    try:
        node = f[name]
    except KeyError:
        raise DatasetImportError(f"{file}: missing dataset {name!r}") from None
    if not isinstance(node, h5py.Dataset):
        raise DatasetImportError(f"{file}: {node.name!r} is a group, expected a dataset")
    try:
        return node[()]
    except Exception as err:  # truncated files fail here, with h5py's OSError
        raise DatasetImportError(f"{file}: cannot read {node.name!r} (truncated or corrupt file?): {err}") from err


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise DatasetImportError(f"{path}: no such HDF5 file")
    try:
        return h5py.File(path, "r")
    except Exception as err:
        raise DatasetImportError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from err


def _numeric(a: np.ndarray) -> bool:
    return a.dtype.kind in "biuf"


# ---------------------------------------------------------------------------------------------- D4RL
def load_d4rl_hdf5(path: str | os.PathLike, progress: bool = False) -> dict[str, np.ndarray]:
    """Read a D4RL HDF5 file into flat arrays (``observations``, ``actions``, ..., ``infos/<k>``).

    Required: ``observations, actions, rewards, terminals``; ``timeouts`` and ``next_observations`` and
    numeric ``infos/*`` datasets are read when present. All must have the same length ``N``.
    """
    path = Path(path)
    with _open_h5(path) as f:
        data: dict[str, np.ndarray] = {}
        names = [n for n in D4RL_KEYS if n in D4RL_REQUIRED or n in f]
        infos: list[str] = []
        if "infos" in f and isinstance(f["infos"], h5py.Group):
            f["infos"].visititems(lambda n, node: infos.append(n) if isinstance(node, h5py.Dataset) else None)
        for name in tqdm(names + [f"infos/{n}" for n in infos], desc=f"read {path.name}", disable=not progress):
            value = _read_dataset(f, name, path)
            if name.startswith("infos/") and not _numeric(value):
                continue
            data[name] = value
        metadata = {}
        if "metadata" in f and isinstance(f["metadata"], h5py.Group):
            for key, node in f["metadata"].items():
                if isinstance(node, h5py.Dataset) and node.shape == ():
                    metadata[key] = _metadata_value(node[()])
    for name, value in data.items():
        if value.ndim == 0:
            raise DatasetImportError(
                f"{path}: {name!r} is a scalar (shape ()), expected one row per step (malformed file)"
            )
    n = len(data["rewards"])
    for name, value in data.items():
        if len(value) != n:
            raise DatasetImportError(
                f"{path}: {name!r} has {len(value)} rows but 'rewards' has {n} (truncated or malformed file)"
            )
    if n == 0:
        raise DatasetImportError(f"{path}: the file holds no steps")
    for name in ("terminals", "timeouts"):
        if name in data:
            check_flags(data[name], name, path)
    data["_metadata"] = metadata  # type: ignore[assignment]
    return data


def check_flags(value: np.ndarray, name: str, file: Path) -> None:
    """Raise :class:`DatasetImportError` naming ``name`` unless ``value`` holds only 0/1 (bool, integer or float):
    a NaN or a 0.5 in ``terminals`` would otherwise silently become ``True``."""
    if value.dtype.kind == "b":
        return
    if value.dtype.kind not in "iuf":
        raise DatasetImportError(f"{file}: {name!r} has dtype {value.dtype}, expected 0/1 flags")
    flat = value.reshape(-1)
    if value.dtype.kind == "f":
        nan = np.flatnonzero(np.isnan(flat))
        if len(nan):
            raise DatasetImportError(
                f"{file}: {name!r} holds NaN ({len(nan)} rows, the first at row {nan[0]}); expected 0/1 flags"
            )
    bad = np.flatnonzero((flat != 0) & (flat != 1))
    if len(bad):
        raise DatasetImportError(
            f"{file}: {name!r} holds {flat[bad[0]].item()!r} at row {bad[0]} ({len(bad)} rows not 0 or 1); "
            "expected 0/1 flags"
        )


def _metadata_value(value: Any) -> Any:
    """A scalar HDF5 metadata value as JSON: text that is not UTF-8 keeps its bytes as ``\\xNN`` escapes; values
    that are not JSON-able (compound, opaque) become their ``repr``."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    try:
        return to_jsonable(value, "metadata")
    except EpisodeStoreError:
        return repr(value)


def d4rl_episode_bounds(terminals: np.ndarray, timeouts: np.ndarray | None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` episodes of a flat D4RL array: each ends after a step with terminal | timeout."""
    done = np.asarray(terminals, dtype=bool).reshape(-1).copy()
    if timeouts is not None:
        done |= np.asarray(timeouts, dtype=bool).reshape(-1)
    ends = (np.flatnonzero(done) + 1).tolist()
    if not ends or ends[-1] != len(done):
        ends.append(len(done))
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def qlearning_dataset(
    source: str | os.PathLike | Mapping[str, np.ndarray] | EpisodeStore,
    terminate_on_end: bool = False,
    ignore_terminals: bool = False,
) -> dict[str, np.ndarray]:
    """Transitions ``(s, a, r, s', terminal)`` with the semantics of D4RL's ``qlearning_dataset``.

    For steps ``i = 0 .. N-2``: ``s' = observations[i + 1]``. A step flagged ``timeouts`` is dropped (its
    ``s'`` belongs to the next episode), not marked terminal, unless ``terminate_on_end``; ``terminals`` is
    kept as is (at a terminal step ``s'`` is the next episode's first observation, as in D4RL, and is
    masked by ``terminal``). The last step ``N-1`` is always dropped.

    Args:
        source: a D4RL HDF5 path, a mapping of its flat arrays, or an EpisodeStore with keys ``obs, action,
            reward`` (and ``terminal``/``timeout`` when present; an episode end that is not terminal
            counts as a timeout).
        ignore_terminals: every returned ``terminals`` is False, and a terminal step keeps ``s' =
            observations[i + 1]`` (the data is one continuous stream). For tasks whose stored terminals are no
            end of the evaluation episode: maze2d's generator marks reached intermediate targets, while its
            evaluation never terminates (:func:`stlflow.datasets.d4rl_refs.d4rl_task_settings` says which).
            In an EpisodeStore an episode that ends at a terminal step continues into the next episode.

    Returns:
        ``{"observations": (M, Do), "actions": (M, Da), "next_observations": (M, Do), "rewards": (M,),
        "terminals": (M,) bool}``.
    """
    if isinstance(source, EpisodeStore):
        for key in ("obs", "action", "reward"):
            if key not in source.keys:
                raise KeyError(f"qlearning_dataset needs key {key!r}; the store at {source.path} has {source.keys}")
        terminals = source.get("terminal").astype(bool) if "terminal" in source.keys else np.zeros(source.n_steps, bool)
        timeouts = source.get("timeout").astype(bool) if "timeout" in source.keys else np.zeros(source.n_steps, bool)
        last = np.zeros(source.n_steps, dtype=bool)
        last[source.episode_ends - 1] = True
        data = {
            "observations": source.get("obs"),
            "actions": source.get("action"),
            "rewards": source.get("reward"),
            "terminals": terminals,
            "timeouts": timeouts | (last & ~terminals),
        }
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = load_d4rl_hdf5(source)
    for name in ("observations", "actions", "rewards", "terminals"):
        if name not in data:
            raise KeyError(f"qlearning_dataset needs {name!r}")
    n = len(data["rewards"])
    i = np.arange(max(n - 1, 0))
    timeouts = np.asarray(data.get("timeouts", np.zeros(n, bool)), dtype=bool).reshape(-1)
    keep = i if terminate_on_end else i[~timeouts[i]]
    obs = np.asarray(data["observations"])
    return {
        "observations": obs[keep],
        "actions": np.asarray(data["actions"])[keep],
        "next_observations": obs[keep + 1],
        "rewards": np.asarray(data["rewards"]).reshape(-1)[keep],
        "terminals": np.zeros(len(keep), dtype=bool)
        if ignore_terminals
        else np.asarray(data["terminals"], dtype=bool).reshape(-1)[keep],
    }


def import_d4rl(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dt: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EpisodeStore:
    """Import a D4RL HDF5 file into a new EpisodeStore at ``out`` (keys per the module table)."""
    src = Path(src)
    data = load_d4rl_hdf5(src, progress=progress)
    metadata = data.pop("_metadata")
    terminals = data["terminals"].astype(bool).reshape(-1)
    timeouts = data["timeouts"].astype(bool).reshape(-1) if "timeouts" in data else None
    bounds = d4rl_episode_bounds(terminals, timeouts)
    keys = {name: D4RL_KEYS.get(name) or "info_" + name[len("infos/") :].replace("/", "_") for name in data}
    for name in ("terminals", "timeouts"):
        if name in data:
            data[name] = data[name].astype(bool).reshape(-1)
    attrs = {"source": "d4rl", "source_file": src.name, "d4rl_metadata": to_jsonable(metadata, "metadata")}

    def episodes() -> Iterator[tuple[dict, dict]]:
        for start, end in bounds:
            ep = {keys[name]: value[start:end] for name, value in data.items()}
            term = bool(terminals[end - 1])
            tout = bool(timeouts[end - 1]) if timeouts is not None else False
            yield ep, {"source": "d4rl", "start": start, "terminal": term, "timeout": tout, "complete": term or tout}

    with staged_store(out, overwrite, dt, attrs) as store:
        commit_in_batches(store, episodes(), len(terminals), f"import {src.name}", progress)
    return EpisodeStore.open(out)


# ---------------------------------------------------------------------------------------------- Minari
def _minari_paths(src: Path) -> tuple[Path, Path | None]:
    """``(main_data.hdf5, metadata.json or None)`` for a dataset folder, its ``data/`` folder or the file."""
    candidates = [src / "data" / "main_data.hdf5", src / "main_data.hdf5"] if src.is_dir() else [src]
    for h5 in candidates:
        if h5.is_file():
            meta = h5.parent / "metadata.json"
            return h5, (meta if meta.is_file() else None)
    raise DatasetImportError(f"{src}: not a Minari dataset (no data/main_data.hdf5)")


def _flatten_group(node: h5py.Group | h5py.Dataset, prefix: str, file: Path) -> dict[str, np.ndarray]:
    """A dataset -> ``{prefix: array}``; a group (Dict/Tuple space) -> ``{prefix_<k>: array}`` recursively."""
    if isinstance(node, h5py.Dataset):
        try:
            return {prefix: node[()]}
        except Exception as err:
            raise DatasetImportError(f"{file}: cannot read {node.name!r} (truncated or corrupt?): {err}") from err
    out: dict[str, np.ndarray] = {}
    for key in node:
        out.update(_flatten_group(node[key], f"{prefix}_{key}", file))
    return out


def _episode_ids(f: h5py.File, file: Path) -> list[int]:
    ids = []
    for name in f:
        m = re.fullmatch(r"episode_(\d+)", name)
        if m:
            ids.append(int(m.group(1)))
    if not ids:
        raise DatasetImportError(f"{file}: no episode_<id> groups")
    return sorted(ids)


def _minari_episode(f: h5py.File, eid: int, file: Path, infos: bool) -> tuple[dict[str, np.ndarray], dict]:
    group = f[f"episode_{eid}"]
    where = f"{file}: episode_{eid}"
    for name in ("observations", "actions", "rewards", "terminations", "truncations"):
        if name not in group:
            raise DatasetImportError(f"{where} has no {name!r}")
    rewards = _read_dataset(group, "rewards", file).reshape(-1)
    T = len(rewards)
    ep: dict[str, np.ndarray] = {"reward": rewards}
    for name, key in (("terminations", "terminal"), ("truncations", "timeout")):
        ep[key] = _read_dataset(group, name, file).astype(bool).reshape(-1)
    for key, value in _flatten_group(group["actions"], "action", file).items():
        ep[key] = value
    for key, value in _flatten_group(group["observations"], "obs", file).items():
        if len(value) != T + 1:
            raise DatasetImportError(
                f"{where}: observations {key!r} has {len(value)} rows, expected steps + 1 = {T + 1}"
            )
        ep[key] = value[:-1]
        ep["next_" + key] = value[1:]
    if infos and "infos" in group and isinstance(group["infos"], h5py.Group):
        for key, value in _flatten_group(group["infos"], "info", file).items():
            if _numeric(value) and value.ndim >= 1 and len(value) in (T, T + 1):
                ep[key] = value[1:] if len(value) == T + 1 else value  # T+1: the reset info comes first
    for key, value in ep.items():
        if len(value) != T:
            raise DatasetImportError(f"{where}: {key!r} has {len(value)} rows, expected {T} (truncated or malformed)")
        if not _numeric(value):
            raise DatasetImportError(f"{where}: {key!r} has non-numeric dtype {value.dtype}")
    total = group.attrs.get("total_steps")
    if total is not None and int(total) != T:
        raise DatasetImportError(f"{where}: attrs say total_steps={int(total)} but the arrays hold {T} steps")
    attrs = {"source": "minari", "episode_id": eid}
    for key, value in group.attrs.items():
        with contextlib.suppress(EpisodeStoreError):
            attrs[key] = to_jsonable(
                value.decode("utf-8", errors="backslashreplace") if isinstance(value, bytes) else value, key
            )
    return ep, attrs


def import_minari(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dt: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    infos: bool = True,
) -> EpisodeStore:
    """Import a Minari dataset (folder with ``data/main_data.hdf5`` and ``data/metadata.json``) into ``out``."""
    src = Path(src)
    h5_path, meta_path = _minari_paths(src)
    metadata: dict[str, Any] = {}
    if meta_path is not None:
        try:
            metadata = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetImportError(f"{meta_path}: not valid JSON: {err}") from err
    with _open_h5(h5_path) as f:
        ids = _episode_ids(f, h5_path)
        if "total_episodes" in metadata and int(metadata["total_episodes"]) != len(ids):
            raise DatasetImportError(
                f"{h5_path}: metadata.json says total_episodes={metadata['total_episodes']} but the file holds "
                f"{len(ids)} episodes (truncated?)"
            )
        total_steps = int(metadata.get("total_steps", 0)) or None
        attrs = {"source": "minari", "dataset_id": metadata.get("dataset_id"), "minari_metadata": metadata}
        if isinstance(metadata.get("env_spec"), str):
            with contextlib.suppress(Exception):
                spec = json.loads(metadata["env_spec"])
                attrs["env_id"] = spec.get("id")
        seen = {"steps": 0, "keys": None}

        def episodes() -> Iterator[tuple[dict, dict]]:
            for eid in ids:
                ep, ep_attrs = _minari_episode(f, eid, h5_path, infos)
                if seen["keys"] is None:
                    seen["keys"] = sorted(ep)
                elif sorted(ep) != seen["keys"]:
                    raise DatasetImportError(
                        f"{h5_path}: episode_{eid} has keys {sorted(ep)}, episode_{ids[0]} has {seen['keys']}"
                    )
                seen["steps"] += len(ep["reward"])
                yield ep, ep_attrs

        with staged_store(out, overwrite, dt, to_jsonable(attrs, "metadata")) as store:
            commit_in_batches(store, episodes(), total_steps or 0, f"import {src.name}", progress)
            if total_steps is not None and seen["steps"] != total_steps:
                raise DatasetImportError(
                    f"{h5_path}: metadata.json says total_steps={total_steps} but the episodes hold {seen['steps']}"
                )
    return EpisodeStore.open(out)


# ---------------------------------------------------------------------------------------------- Diffusion Policy
def import_dp(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dt: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EpisodeStore:
    """Copy a Diffusion Policy zarr store (v2 or v3; ``data/<key>``, ``meta/episode_ends``) into ``out``."""
    src = Path(src)
    try:
        source = EpisodeStore.open(src, mode="r")
    except (EpisodeStoreError, FileNotFoundError) as err:
        raise DatasetImportError(str(err)) from err
    attrs = {"source": "diffusion_policy", "source_path": str(src), "source_attrs": source.attrs}

    def episodes() -> Iterator[tuple[dict, dict]]:
        i = 0
        try:
            for i, ep in enumerate(source.iter_episodes()):
                yield ep, {"source": "diffusion_policy", "episode": i, **source.episode_attrs(i)}
        except Exception as err:  # zarr/numcodecs raise assorted types for corrupt chunks
            raise DatasetImportError(f"{src}: cannot read episode {i} (truncated or corrupt?): {err}") from err

    with staged_store(out, overwrite, dt if dt is not None else source.dt, attrs) as store:
        commit_in_batches(store, episodes(), source.n_steps, f"import {src.name}", progress)
    return EpisodeStore.open(out)


IMPORTERS = {"d4rl": import_d4rl, "minari": import_minari, "dp": import_dp}
