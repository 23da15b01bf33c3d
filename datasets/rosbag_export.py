"""EpisodeStores to ROS 2 bags (MCAP storage): :func:`export_rosbag`.

The message mapping, the time stamps and the episode events are documented in :mod:`stlflow.datasets.rosbag`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stlflow.datasets.rosbag_msgs import (
    ACTION_TOPIC,
    EPISODE_GAP_S,
    EPISODE_TOPIC,
    F64,
    F64_ARRAY,
    FORMAT_NAME,
    FORMAT_VERSION,
    JOINT_STATE,
    KEY_PREFIX,
    NS,
    OBS_TOPIC,
    SIGNAL_PREFIX,
    STRING,
    TIME_KEY,
    load_rosbags,
)
from stlflow.datasets.staging import remove_stale_staging, staging_folder
from stlflow.datasets.store import EpisodeStore
from stlflow.datasets.store_io import replace_dir

__all__ = ["RosbagExportError", "export_rosbag"]

_MAX_SEC = 2**31 - 1  # builtin_interfaces/msg/Time.sec is an int32


class RosbagExportError(ValueError):
    """A store cannot be exported as a bag as asked; the message names the store (or OUT) and the problem."""


def _token(name: str) -> str:
    """``name`` as one ROS 2 topic name token: ``[A-Za-z0-9_]``, not starting with a digit."""
    token = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return "_" + token if not token or token[0].isdigit() else token


def _is_bag(path: Path) -> bool:
    return (path.is_dir() and (path / "metadata.yaml").is_file()) or (path.is_file() and path.suffix == ".mcap")


def _plan_topics(store: EpisodeStore) -> dict[str, dict]:
    """``{key: {"topic", "msgtype", "shape", "dtype"}}`` in the store's key order, ``obs`` and ``action`` first."""
    plan: dict[str, dict] = {}
    used = {OBS_TOPIC, ACTION_TOPIC, EPISODE_TOPIC}
    keys = ["obs", "action"] + [k for k in store.keys if k not in ("obs", "action")]
    for key in keys:
        shape = list(store.key_shape(key))
        if key == "obs":
            topic, msgtype = OBS_TOPIC, JOINT_STATE
        elif key == "action":
            topic, msgtype = ACTION_TOPIC, F64_ARRAY
        else:
            if key.startswith("signal_") and len(key) > len("signal_") and not shape:
                base, msgtype, name = SIGNAL_PREFIX, F64, key[len("signal_") :]
            else:
                base, msgtype, name = KEY_PREFIX, F64_ARRAY, key
            topic = base + _token(name)
            n = 2
            while topic in used:
                topic, n = f"{base}{_token(name)}_{n}", n + 1
            used.add(topic)
        plan[key] = {"topic": topic, "msgtype": msgtype, "shape": shape, "dtype": store.key_dtype(key).str}
    return plan


def _check_exact(store: EpisodeStore, key: str, i: int, values: np.ndarray) -> np.ndarray:
    """``values`` as float64, refusing values that float64 does not represent exactly."""
    as_f64 = values.astype(np.float64)
    dtype = values.dtype
    if (dtype.kind in "iu" and dtype.itemsize > 4) or (dtype.kind == "f" and dtype.itemsize > 8):
        back = as_f64.astype(dtype)
        bad = ~((back == values) | (np.isnan(as_f64) & np.isnan(values.astype(np.float64))))
        if bad.any():
            raise RosbagExportError(
                f"{store.path}: key {key!r} of episode {i} holds {values[bad].reshape(-1)[0]!r}, which a float64 "
                "ROS message cannot carry exactly (integers beyond 2**53); export refused rather than rounded"
            )
    return as_f64


def _episode_stamps(
    store: EpisodeStore, i: int, ep: dict[str, np.ndarray], time_key: str | None, dt: float | None, next_ns: int
) -> np.ndarray:
    """The ``(T,)`` int64 nanosecond stamps of episode ``i``, starting no earlier than ``next_ns``."""
    T = len(ep["obs"])
    if time_key is not None:
        t = np.asarray(ep[time_key], dtype=np.float64).reshape(-1)
        if not np.isfinite(t).all():
            raise RosbagExportError(f"{store.path}: time key {time_key!r} of episode {i} is not finite")
        if (np.diff(t) < 0).any():
            raise RosbagExportError(f"{store.path}: time key {time_key!r} of episode {i} goes backwards")
        ns = np.rint(t * NS)
        if ns[0] < next_ns:
            ns = ns + (next_ns - ns[0])
    else:
        assert dt is not None
        ns = next_ns + np.rint(np.arange(T, dtype=np.float64) * (dt * NS))
    if ns[-1] > _MAX_SEC * float(NS):
        raise RosbagExportError(
            f"{store.path}: episode {i} ends at {ns[-1] / NS:.0f} s, past what a ROS 2 time stamp holds (2**31 s)"
        )
    return ns.astype(np.int64)


def _parse_indices(store: EpisodeStore, episodes: Iterable[int] | None) -> list[int]:
    n = store.n_episodes
    if episodes is None:
        return list(range(n))
    out: list[int] = []
    for i in episodes:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise RosbagExportError(f"{store.path}: episode indices are integers, got {i!r}")
        if not -n <= int(i) < n:
            raise RosbagExportError(f"{store.path}: episode {int(i)} out of range: the store has {n} episodes")
        j = int(i) % n
        if j in out:
            raise RosbagExportError(f"{store.path}: episode {j} is listed twice")
        out.append(j)
    return out


@dataclass
class _Export:
    """What :func:`export_rosbag` writes: the checked request and what it reads of the store up front."""

    src: EpisodeStore
    out: Path
    indices: list[int]
    time_key: str | None
    step_dt: float | None
    start_time: float
    plan: dict[str, dict]
    lengths: np.ndarray
    all_attrs: list[dict]
    names: list[str]


def export_rosbag(
    store: EpisodeStore | str | os.PathLike,
    out: str | os.PathLike,
    episodes: Iterable[int] | None = None,
    overwrite: bool = False,
    dt: float | None = None,
    start_time: float = 0.0,
    time_key: str | None = TIME_KEY,
    progress: bool = True,
) -> Path:
    """Write the episodes of ``store`` as a ROS 2 bag (MCAP storage) at ``out``; returns ``out``.

    Args:
        store: an EpisodeStore or its path; it needs keys ``obs`` and ``action``.
        out: the bag folder to write, or a single MCAP file when the name ends in ``.mcap``.
        episodes: indices to export, in this order (default: all).
        overwrite: replace an existing bag at ``out`` (anything else there is never replaced).
        dt: seconds per step for the time stamps (default: the store's; needed when it records none and there is no
            time key).
        start_time: seconds of the first tick (default 0, the start of a simulation clock).
        time_key: a key of per-step shape ``()`` holding each tick's time in seconds, used for the stamps when the
            store has it (``None``: always ``start + k * dt``).
        progress: show a progress bar.
    """
    Writer, StoragePlugin, _, typestore = load_rosbags()
    src = store if isinstance(store, EpisodeStore) else EpisodeStore.open(store, mode="r")
    job = _prepare(src, Path(out), episodes, overwrite, dt, start_time, time_key)
    out = job.out
    messages = _Messages(typestore, job.plan)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = staging_folder(out)
    try:
        staging.mkdir()
        single_file = out.suffix == ".mcap"
        bag_dir = staging / (out.stem if single_file else out.name)
        writer = Writer(bag_dir, version=9, storage_plugin=StoragePlugin.MCAP)
        writer.open()
        try:
            _write_episodes(writer, typestore, messages, job, progress)
        except BaseException:
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()
        if not single_file:
            replace_dir(bag_dir, out)  # an existing bag folder is moved aside, then deleted
        elif out.is_dir():
            _replace_dir_with_file(bag_dir / out.name, out)
        else:
            os.replace(bag_dir / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _prepare(
    src: EpisodeStore,
    out: Path,
    episodes: Iterable[int] | None,
    overwrite: bool,
    dt: float | None,
    start_time: float,
    time_key: str | None,
) -> _Export:
    """Check an export request (:class:`RosbagExportError` / ``FileExistsError`` naming the problem) and read what
    the export needs of the store up front: the topic plan, episode lengths and attributes, the observation names."""
    missing = [k for k in ("obs", "action") if k not in src.keys]
    if missing:
        raise RosbagExportError(
            f"{src.path}: the store has no key {missing[0]!r} (keys: {src.keys}); a bag needs 'obs' and 'action'"
        )
    if time_key is not None and (time_key not in src.keys or src.key_shape(time_key) != ()):
        time_key = None
    step_dt = dt if dt is not None else src.dt
    if step_dt is not None and (not isinstance(step_dt, (int, float)) or not math.isfinite(step_dt) or step_dt <= 0):
        raise RosbagExportError(f"{src.path}: dt must be a positive number of seconds, got {step_dt!r}")
    if step_dt is None and time_key is None:
        raise RosbagExportError(
            f"{src.path}: the store records no dt and has no per-tick time key {TIME_KEY!r}: pass dt= / --dt SECONDS"
        )
    if not math.isfinite(start_time) or not 0 <= start_time <= _MAX_SEC:
        raise RosbagExportError(f"start time {start_time!r} is not a time a ROS 2 stamp holds (0 .. 2**31 s)")
    indices = _parse_indices(src, episodes)
    if not indices:
        raise RosbagExportError(f"{src.path}: no episodes to export (the store holds {src.n_episodes})")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
        if not _is_bag(out):
            raise RosbagExportError(f"refusing to overwrite {out}: it is not a ROS 2 bag (no metadata.yaml or .mcap)")
    if out.resolve() == src.path.resolve():
        raise RosbagExportError(f"{out}: the bag would replace the store it is exported from")
    plan = _plan_topics(src)
    lengths = src.episode_lengths
    all_attrs = src.all_episode_attrs()
    obs_size = int(np.prod(plan["obs"]["shape"], dtype=np.int64))
    names = src.attrs.get("obs_names")
    if not (isinstance(names, list) and len(names) == obs_size and all(isinstance(s, str) for s in names)):
        names = [f"obs_{j}" for j in range(obs_size)]
    return _Export(src, out, indices, time_key, step_dt, start_time, plan, lengths, all_attrs, names)


class _Messages:
    """The ROS message types of a bag's topics (``typestore``'s), and the ``Float64MultiArray`` layout of each key."""

    def __init__(self, typestore: Any, plan: dict[str, dict]):
        types = typestore.types
        self.Time, self.Header = types["builtin_interfaces/msg/Time"], types["std_msgs/msg/Header"]
        self.JointState = types[JOINT_STATE]
        Dim, Layout = types["std_msgs/msg/MultiArrayDimension"], types["std_msgs/msg/MultiArrayLayout"]
        self.Float64MultiArray, self.Float64, self.String = types[F64_ARRAY], types[F64], types[STRING]
        self.layouts = {}
        for key, spec in plan.items():
            shape, dims, stride = spec["shape"], [], int(np.prod(spec["shape"], dtype=np.int64))
            for j, size in enumerate(shape):
                dims.append(Dim(label=f"dim{j}", size=int(size), stride=int(stride)))
                stride = stride // int(size) if size else 0
            self.layouts[key] = Layout(dim=dims, data_offset=0)
        self.empty = np.zeros(0, dtype=np.float64)


def _write_episodes(writer: Any, typestore: Any, m: _Messages, job: _Export, progress: bool) -> None:
    """Write the store event, then each episode's begin event, messages of every tick and end event."""
    src, plan, indices, lengths = job.src, job.plan, job.indices, job.lengths
    serialize = typestore.serialize_cdr
    conns = {key: writer.add_connection(s["topic"], s["msgtype"], typestore=typestore) for key, s in plan.items()}
    events = writer.add_connection(EPISODE_TOPIC, STRING, typestore=typestore)

    def event(stamp: int, payload: dict) -> None:
        writer.write(events, stamp, serialize(m.String(data=json.dumps(payload)), STRING))

    next_ns = int(round(job.start_time * NS))
    first = True
    bar = tqdm(total=len(indices), desc=f"export {job.out.name}", unit="episode", disable=not progress, leave=False)
    with bar:
        for k, (i, ep) in enumerate(zip(indices, src.iter_episodes(indices))):
            stamps = _episode_stamps(src, i, ep, job.time_key, job.step_dt, next_ns)
            if first:
                event(int(stamps[0]), {
                    "event": "store", "format": FORMAT_NAME, "version": FORMAT_VERSION, "dt": src.dt,
                    "attrs": src.attrs, "keys": plan, "episodes": len(indices),
                    "steps": int(sum(int(lengths[j]) for j in indices)), "time_key": job.time_key,
                })  # fmt: skip
                first = False
            T = len(stamps)
            event(int(stamps[0]), {
                "event": "begin", "episode": k, "source_episode": i, "steps": T, "attrs": job.all_attrs[i],
            })  # fmt: skip
            flat = {key: _check_exact(src, key, i, ep[key]).reshape(T, -1) for key in plan}
            for t in range(T):
                ns = int(stamps[t])
                stamp = m.Time(sec=ns // NS, nanosec=ns % NS)
                for key, spec in plan.items():
                    row = flat[key][t]
                    if spec["msgtype"] == JOINT_STATE:
                        msg = m.JointState(
                            header=m.Header(stamp=stamp, frame_id=""),
                            name=job.names,
                            position=np.ascontiguousarray(row),
                            velocity=m.empty,
                            effort=m.empty,
                        )
                    elif spec["msgtype"] == F64:
                        msg = m.Float64(data=float(row[0]))
                    else:
                        msg = m.Float64MultiArray(layout=m.layouts[key], data=np.ascontiguousarray(row))
                    writer.write(conns[key], ns, serialize(msg, spec["msgtype"]))
            event(int(stamps[-1]), {"event": "end", "episode": k, "steps": T})
            next_ns = int(stamps[-1]) + int(round(EPISODE_GAP_S * NS))
            bar.update(1)


def _replace_dir_with_file(src: Path, dst: Path) -> None:
    """Replace the bag folder ``dst`` (its name ends in ``.mcap``) with the file ``src``."""
    trash = dst.parent / f".{dst.name}.replaced-{uuid.uuid4().hex}.stlflow-tmp"
    os.rename(dst, trash)
    os.rename(src, dst)
    shutil.rmtree(trash, ignore_errors=True)
