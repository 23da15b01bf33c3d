"""ROS 2 bags (MCAP storage) to and from EpisodeStores, without ROS installed (the ``rosbags`` package).

Message mapping of :func:`export_rosbag`. Every message is a standard ROS 2 type (the ``ROS2_HUMBLE`` definitions of
``rosbags``, identical in later distributions: same type hashes) and the MCAP file carries their definitions, so a
reader needs no stlflow types; the tests read it with ``rosbags``' own reader. The bag folder's ``metadata.yaml`` is
rosbag2 format version 9 (as ROS 2 Jazzy writes); the ``.mcap`` file inside is a complete MCAP file on its own.

=========================  ==================================  ==================================================
topic                      message type                        content
=========================  ==================================  ==================================================
``/stlflow/obs``           ``sensor_msgs/msg/JointState``      ``position`` = the ``obs`` vector of one tick (per
                                                               step shapes of more than one axis are flattened,
                                                               C order); ``name`` = the store attribute
                                                               ``obs_names`` when it is a list of that many strings,
                                                               else ``obs_0 .. obs_{D-1}``; ``velocity`` and
                                                               ``effort`` empty; ``header.stamp`` = the tick's time
``/stlflow/action``        ``std_msgs/msg/Float64MultiArray``  ``data`` = the ``action`` vector; ``layout.dim`` =
                                                               its per-step shape (``dim0``, ``dim1``, ...)
``/stlflow/signal/<name>`` ``std_msgs/msg/Float64``            the STL signal ``signal_<name>`` (per-step shape
                                                               ``()``)
``/stlflow/key/<key>``     ``std_msgs/msg/Float64MultiArray``  every other key (``reward``, ``next_obs``, the time
                                                               key, signals of another shape), shape in ``layout``
``/stlflow/episode``       ``std_msgs/msg/String``             JSON events, see below
=========================  ==================================  ==================================================

Why ``Float64MultiArray`` for actions and not ``trajectory_msgs``: an action is whatever the policy outputs (joint
velocities, an end-effector twist, a gripper command, an action chunk of shape ``(H, Da)``); a
``JointTrajectory`` claims joint-space positions with joint names and a time from start, which stlflow does not know,
while ``Float64MultiArray`` carries any vector and keeps a multi-axis shape in its layout. It has no header: like the
signals, its time is the message's bag timestamp, which equals the observation's ``header.stamp`` of the same tick.

Names in topics: characters other than ``[A-Za-z0-9_]`` become ``_``, a leading digit gets a ``_`` prefix, and a
name that collides with another gets ``_2``, ``_3``...; the exact key of every topic is in the ``store`` event.

Precision: every value travels as a float64, so bool, all integers up to 2**53 and float16/32/64 values survive
exactly (float32 to float64 and back is exact); the store's dtype is restored from the ``store`` event. A key holding
an (u)int64 beyond 2**53 is refused at export rather than rounded.

Timestamps: tick ``k`` of an episode is at ``start + k * dt`` (``dt``: the store's, or ``dt=`` / ``--dt`` for a
store that records none); with a per-tick time key (default ``time``, per-step shape ``()``, seconds,
non-decreasing) the ticks are at those times instead. The first episode starts at ``start_time`` (default 0 s, the
start of a simulation clock); each further episode starts 1 s (:data:`EPISODE_GAP_S`) after the previous one's last
tick, or at its own time-key times when those already lie after that (absolute clocks are kept as they are). The bag
timestamp of every message and the ``header.stamp`` of the observations are that tick time.

Events on ``/stlflow/episode`` (``std_msgs/msg/String``, JSON):

- ``{"event": "store", "format": "stlflow-rosbag", "version": 1, "dt", "attrs", "keys": {key: {"topic", "msgtype",
  "shape", "dtype"}}, "episodes", "steps", "time_key"}``: once, first, at the first tick's time;
- ``{"event": "begin", "episode", "source_episode", "steps", "attrs"}`` at an episode's first tick (before its data);
- ``{"event": "end", "episode", "steps"}`` at its last tick (after its data).

The bag is written into a hidden staging folder next to ``OUT`` (the importers' naming, so a killed export's leftover
is removed by the next export or import to the same ``OUT``) and renamed to ``OUT`` only when complete. ``OUT`` is a
rosbag2 folder (``metadata.yaml`` + ``<OUT>.mcap``), or a single MCAP file when its name ends in ``.mcap``.

:func:`import_rosbag` reads a bag folder, or a single ``.mcap``/``.db3`` file, back into a new EpisodeStore (staged and
renamed like the other importers; a bad bag leaves nothing at ``OUT``):

- stlflow's own bags (a ``store`` event first on ``/stlflow/episode``): every key with its dtype, per-step shape and
  name, every episode with its attributes, the store's attributes and ``dt``: arrays are identical to the exported
  store's. Each episode must hold exactly its declared number of messages on every topic (a truncated bag is an
  error naming the topic and episode).
- bags of other tools. Required: ``/stlflow/obs`` and ``/stlflow/action`` (other names with ``obs_topic`` /
  ``action_topic``), each of type ``sensor_msgs/msg/JointState`` (``position``; later messages whose ``name`` order
  differs are reordered by name), ``std_msgs/msg/Float64MultiArray`` or ``Float32MultiArray`` (``data``, shaped by its
  ``layout`` when the sizes match) or ``std_msgs/msg/Float64``/``Float32``. Optional: ``/stlflow/signal/<name>`` ->
  key ``signal_<name>``, ``/stlflow/key/<key>`` -> ``<key>`` (same types); other topics are ignored (listed in the
  store attribute ``ignored_topics``). Episodes: each ``{"event": "begin", ...}`` JSON on ``/stlflow/episode`` starts
  one; without any, the whole bag is one episode. Episode attributes: the begin event's ``attrs``, plus ``source``
  ``"rosbag"`` and ``start_time_ns`` (the first tick's bag timestamp); store attributes: ``source``, ``source_file``,
  ``topics``, ``msgtypes``, ``ignored_topics`` and ``obs_names`` (the JointState names). The observations are the
  ticks: a topic with as many messages as the observations in an episode is paired with them in order; otherwise each
  tick takes the latest message at or before it (bag timestamps), and leading ticks before every topic has spoken are
  dropped (counted in the episode attribute ``dropped_ticks``). Values are stored as float64 (float32 for the Float32
  types). ``dt``: ``dt=`` / ``--dt`` when given, else the ``store`` event's, else the median interval between
  consecutive observations in an episode (bag timestamps); ``None`` with a single observation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stlflow.datasets.importers import DatasetImportError, _commit_in_batches, _staged_store, remove_stale_staging
from stlflow.datasets.store import EpisodeStore
from stlflow.datasets.store_io import replace_dir

__all__ = [
    "ACTION_TOPIC",
    "EPISODE_TOPIC",
    "KEY_PREFIX",
    "OBS_TOPIC",
    "SIGNAL_PREFIX",
    "RosbagExportError",
    "export_rosbag",
    "import_rosbag",
]

OBS_TOPIC = "/stlflow/obs"
ACTION_TOPIC = "/stlflow/action"
SIGNAL_PREFIX = "/stlflow/signal/"
KEY_PREFIX = "/stlflow/key/"
EPISODE_TOPIC = "/stlflow/episode"
JOINT_STATE = "sensor_msgs/msg/JointState"
F64_ARRAY = "std_msgs/msg/Float64MultiArray"
F32_ARRAY = "std_msgs/msg/Float32MultiArray"
F64 = "std_msgs/msg/Float64"
F32 = "std_msgs/msg/Float32"
STRING = "std_msgs/msg/String"
VALUE_TYPES = (JOINT_STATE, F64_ARRAY, F32_ARRAY, F64, F32)
"""Message types :func:`import_rosbag` reads values from."""
FORMAT_NAME = "stlflow-rosbag"
FORMAT_VERSION = 1
TIME_KEY = "time"
EPISODE_GAP_S = 1.0
"""Seconds between the last tick of an episode and the first of the next (stamps laid out by dt)."""
_NS = 1_000_000_000
_MAX_SEC = 2**31 - 1  # builtin_interfaces/msg/Time.sec is an int32


class RosbagExportError(ValueError):
    """A store cannot be exported as a bag as asked; the message names the store (or OUT) and the problem."""


def _rosbags() -> tuple[Any, Any, Any, Any]:
    """``(Writer, StoragePlugin, AnyReader, typestore)``; a clear error when ``rosbags`` is not installed."""
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "ROS 2 bag support needs the rosbags package: pip install 'stlflow[control]' (or pip install rosbags)",
            name=err.name,
        ) from err
    return Writer, StoragePlugin, AnyReader, get_typestore(Stores.ROS2_HUMBLE)


def _token(name: str) -> str:
    """``name`` as one ROS 2 topic name token: ``[A-Za-z0-9_]``, not starting with a digit."""
    token = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return "_" + token if not token or token[0].isdigit() else token


def _is_bag(path: Path) -> bool:
    return (path.is_dir() and (path / "metadata.yaml").is_file()) or (path.is_file() and path.suffix == ".mcap")


# ---------------------------------------------------------------------------------------------- export
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
        ns = np.rint(t * _NS)
        if ns[0] < next_ns:
            ns = ns + (next_ns - ns[0])
    else:
        assert dt is not None
        ns = next_ns + np.rint(np.arange(T, dtype=np.float64) * (dt * _NS))
    if ns[-1] > _MAX_SEC * float(_NS):
        raise RosbagExportError(
            f"{store.path}: episode {i} ends at {ns[-1] / _NS:.0f} s, past what a ROS 2 time stamp holds (2**31 s)"
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


def _staging_folder(out: Path) -> Path:
    """A hidden staging folder next to ``out``, named as the importers name theirs (so that
    :func:`remove_stale_staging` removes it once this process is dead)."""
    return out.parent / f".{out.name}.importing-{os.getpid()}-{uuid.uuid4().hex}.stlflow-tmp"


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
    Writer, StoragePlugin, _, typestore = _rosbags()
    src = store if isinstance(store, EpisodeStore) else EpisodeStore.open(store, mode="r")
    out = Path(out)
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

    types = typestore.types
    Time, Header, JointState = types["builtin_interfaces/msg/Time"], types["std_msgs/msg/Header"], types[JOINT_STATE]
    Dim, Layout = types["std_msgs/msg/MultiArrayDimension"], types["std_msgs/msg/MultiArrayLayout"]
    Float64MultiArray, Float64, String = types[F64_ARRAY], types[F64], types[STRING]
    layouts = {}
    for key, spec in plan.items():
        shape, dims, stride = spec["shape"], [], int(np.prod(spec["shape"], dtype=np.int64))
        for j, size in enumerate(shape):
            dims.append(Dim(label=f"dim{j}", size=int(size), stride=int(stride)))
            stride = stride // int(size) if size else 0
        layouts[key] = Layout(dim=dims, data_offset=0)
    empty = np.zeros(0, dtype=np.float64)
    serialize = typestore.serialize_cdr

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = _staging_folder(out)
    try:
        staging.mkdir()
        single_file = out.suffix == ".mcap"
        bag_dir = staging / (out.stem if single_file else out.name)
        writer = Writer(bag_dir, version=9, storage_plugin=StoragePlugin.MCAP)
        writer.open()
        try:
            conns = {
                key: writer.add_connection(s["topic"], s["msgtype"], typestore=typestore) for key, s in plan.items()
            }
            events = writer.add_connection(EPISODE_TOPIC, STRING, typestore=typestore)

            def event(stamp: int, payload: dict) -> None:
                writer.write(events, stamp, serialize(String(data=json.dumps(payload)), STRING))

            next_ns = int(round(start_time * _NS))
            first = True
            bar = tqdm(total=len(indices), desc=f"export {out.name}", unit="episode", disable=not progress, leave=False)
            with bar:
                for k, (i, ep) in enumerate(zip(indices, src.iter_episodes(indices))):
                    stamps = _episode_stamps(src, i, ep, time_key, step_dt, next_ns)
                    if first:
                        event(int(stamps[0]), {
                            "event": "store", "format": FORMAT_NAME, "version": FORMAT_VERSION, "dt": src.dt,
                            "attrs": src.attrs, "keys": plan, "episodes": len(indices),
                            "steps": int(sum(int(lengths[j]) for j in indices)), "time_key": time_key,
                        })  # fmt: skip
                        first = False
                    T = len(stamps)
                    event(int(stamps[0]), {
                        "event": "begin", "episode": k, "source_episode": i, "steps": T, "attrs": all_attrs[i],
                    })  # fmt: skip
                    flat = {key: _check_exact(src, key, i, ep[key]).reshape(T, -1) for key in plan}
                    for t in range(T):
                        ns = int(stamps[t])
                        stamp = Time(sec=ns // _NS, nanosec=ns % _NS)
                        for key, spec in plan.items():
                            row = flat[key][t]
                            if spec["msgtype"] == JOINT_STATE:
                                msg = JointState(
                                    header=Header(stamp=stamp, frame_id=""),
                                    name=names,
                                    position=np.ascontiguousarray(row),
                                    velocity=empty,
                                    effort=empty,
                                )
                            elif spec["msgtype"] == F64:
                                msg = Float64(data=float(row[0]))
                            else:
                                msg = Float64MultiArray(layout=layouts[key], data=np.ascontiguousarray(row))
                            writer.write(conns[key], ns, serialize(msg, spec["msgtype"]))
                    event(int(stamps[-1]), {"event": "end", "episode": k, "steps": T})
                    next_ns = int(stamps[-1]) + int(round(EPISODE_GAP_S * _NS))
                    bar.update(1)
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


def _replace_dir_with_file(src: Path, dst: Path) -> None:
    """Replace the bag folder ``dst`` (its name ends in ``.mcap``) with the file ``src``."""
    trash = dst.parent / f".{dst.name}.replaced-{uuid.uuid4().hex}.stlflow-tmp"
    os.rename(dst, trash)
    os.rename(src, dst)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- import
class _Topic:
    """One topic of the bag that becomes a store key."""

    def __init__(self, key: str, topic: str, msgtype: str, shape: Sequence[int] | None, dtype: str | None):
        self.key, self.topic, self.msgtype = key, topic, msgtype
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.names: list[str] | None = None  # JointState names of the first message (their order is kept)


def _value(msg: Any, msgtype: str, topic: _Topic, src: Path) -> np.ndarray:
    """The numeric value a message carries."""
    if msgtype == JOINT_STATE:
        position = np.asarray(msg.position, dtype=np.float64)
        names = list(msg.name)
        if topic.names is None:
            topic.names = names
        elif names != topic.names and len(names) == len(position):
            if sorted(names) != sorted(topic.names) or len(set(names)) != len(names):
                raise DatasetImportError(
                    f"{src}: topic {topic.topic}: joint names {names} differ from the first message's {topic.names}"
                )
            order = {n: j for j, n in enumerate(names)}
            position = position[[order[n] for n in topic.names]]
        return position
    if msgtype in (F64_ARRAY, F32_ARRAY):
        data = np.asarray(msg.data)
        offset = int(msg.layout.data_offset)
        sizes = [int(d.size) for d in msg.layout.dim]
        n = int(np.prod(sizes, dtype=np.int64)) if sizes else len(data) - offset
        if sizes and offset + n <= len(data):
            return data[offset : offset + n].reshape(sizes)
        return data[offset:]
    return np.asarray(msg.data, dtype=np.float64 if msgtype == F64 else np.float32)


class _Segment:
    """The messages of one episode: per topic, bag timestamps and values."""

    def __init__(self, marker: dict | None):
        self.marker = marker
        self.times: dict[str, list[int]] = {}
        self.values: dict[str, list[np.ndarray]] = {}

    def add(self, topic: str, stamp: int, value: np.ndarray) -> None:
        self.times.setdefault(topic, []).append(stamp)
        self.values.setdefault(topic, []).append(value)

    def empty(self) -> bool:
        return not self.times


def _stack(values: list[np.ndarray], topic: str, src: Path, where: str) -> np.ndarray:
    shape = values[0].shape
    for j, v in enumerate(values):
        if v.shape != shape:
            raise DatasetImportError(
                f"{src}: topic {topic} {where}: message {j} holds shape {v.shape}, the first held {shape}"
            )
    return np.stack(values)


def _cast(values: np.ndarray, topic: _Topic, src: Path, where: str) -> np.ndarray:
    """``values`` of the stlflow schema's shape and dtype, refusing anything that does not survive exactly."""
    T = len(values)
    assert topic.shape is not None and topic.dtype is not None
    if values[0].size != int(np.prod(topic.shape, dtype=np.int64)):
        raise DatasetImportError(
            f"{src}: topic {topic.topic} {where}: {values[0].size} values per message, the store event declares "
            f"shape {list(topic.shape)}"
        )
    values = values.reshape((T, *topic.shape))
    cast = values.astype(topic.dtype)
    back = cast.astype(np.float64)
    if not np.array_equal(back, values.astype(np.float64), equal_nan=True):
        raise DatasetImportError(
            f"{src}: topic {topic.topic} {where}: values do not fit the declared dtype {topic.dtype} exactly"
        )
    return cast


class _BagReader:
    """The bag open through ``rosbags``' AnyReader; reader errors become :class:`DatasetImportError` naming it."""

    def __init__(self, src: Path):
        _, _, AnyReader, typestore = _rosbags()
        self.src = src
        if not src.exists():
            raise DatasetImportError(f"{src}: no such ROS 2 bag")
        try:
            self.reader = AnyReader([src], default_typestore=typestore)
            self.reader.open()
        except Exception as err:
            raise DatasetImportError(f"{src}: not a readable ROS 2 bag ({type(err).__name__}: {_line(err)})") from err

    def close(self) -> None:
        try:
            self.reader.close()
        except Exception:
            pass

    def __enter__(self) -> _BagReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connections(self) -> dict[str, list]:
        by_topic: dict[str, list] = {}
        for conn in self.reader.connections:
            by_topic.setdefault(conn.topic, []).append(conn)
        return by_topic

    def messages(self, conns: list, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, str, int, Any]]:
        """``(topic, msgtype, stamp_ns, message)`` in bag order (``message`` is ``None`` for topics in ``skip``)."""
        it = self.reader.messages(connections=conns)
        while True:
            try:
                conn, stamp, raw = next(it)
                msg = None if conn.topic in skip else self.reader.deserialize(raw, conn.msgtype)
            except StopIteration:
                return
            except Exception as err:
                raise DatasetImportError(
                    f"{self.src}: cannot read the bag (truncated or corrupt?): {type(err).__name__}: {_line(err)}"
                ) from err
            yield conn.topic, conn.msgtype, stamp, msg


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _event(msg: Any, src: Path, stlflow: bool) -> dict | None:
    try:
        value = json.loads(msg.data)
    except (json.JSONDecodeError, TypeError) as err:
        if stlflow:
            raise DatasetImportError(f"{src}: a message on {EPISODE_TOPIC} is not JSON: {err}") from err
        return None
    return value if isinstance(value, dict) else None


def _store_event(bag: _BagReader, by_topic: dict[str, list]) -> dict | None:
    """The ``store`` event that starts an stlflow bag, or ``None`` for bags of other tools."""
    conns = [c for c in by_topic.get(EPISODE_TOPIC, []) if c.msgtype == STRING]
    if not conns:
        return None
    for _, _, _, msg in bag.messages(conns):
        ev = _event(msg, bag.src, stlflow=False)
        if ev is not None and ev.get("event") == "store" and ev.get("format") == FORMAT_NAME:
            return ev
        return None
    return None


def _estimate_dt(bag: _BagReader, by_topic: dict[str, list], obs_topic: str) -> float | None:
    """The median interval in seconds between consecutive observations of one episode (bag timestamps)."""
    conns = by_topic[obs_topic] + [c for c in by_topic.get(EPISODE_TOPIC, []) if c.msgtype == STRING]
    diffs: list[int] = []
    last: int | None = None
    for topic, _, stamp, msg in bag.messages(conns, skip=frozenset([obs_topic])):
        if topic == EPISODE_TOPIC:
            ev = _event(msg, bag.src, stlflow=False)
            if ev is not None and ev.get("event") == "begin":
                last = None
            continue
        if last is not None and stamp > last:
            diffs.append(stamp - last)
        last = stamp
    if not diffs:
        return None
    return float(np.median(np.asarray(diffs, dtype=np.float64))) / _NS


def _foreign_topics(by_topic: dict[str, list], obs_topic: str, action_topic: str, src: Path) -> tuple[list, list]:
    """``([_Topic...], ignored topic names)`` of a bag of another tool."""
    topics: list[_Topic] = []
    ignored: list[str] = []
    taken: set[str] = set()
    for topic in sorted(by_topic, key=lambda t: (t != obs_topic, t != action_topic, t)):
        if topic == EPISODE_TOPIC:
            continue
        if topic == obs_topic:
            key = "obs"
        elif topic == action_topic:
            key = "action"
        elif topic.startswith(SIGNAL_PREFIX) and len(topic) > len(SIGNAL_PREFIX):
            key = "signal_" + topic[len(SIGNAL_PREFIX) :].replace("/", "_")
        elif topic.startswith(KEY_PREFIX) and len(topic) > len(KEY_PREFIX):
            key = topic[len(KEY_PREFIX) :].replace("/", "_")
        else:
            ignored.append(topic)
            continue
        msgtypes = sorted({c.msgtype for c in by_topic[topic]})
        if len(msgtypes) != 1 or msgtypes[0] not in VALUE_TYPES:
            if key in ("obs", "action"):
                raise DatasetImportError(
                    f"{src}: topic {topic} has message type {' and '.join(msgtypes)}; "
                    f"supported: {', '.join(VALUE_TYPES)}"
                )
            ignored.append(topic)
            continue
        if key in taken or key.startswith("."):
            ignored.append(topic)
            continue
        taken.add(key)
        topics.append(_Topic(key, topic, msgtypes[0], None, None))
    return topics, ignored


def import_rosbag(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dt: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    obs_topic: str = OBS_TOPIC,
    action_topic: str = ACTION_TOPIC,
) -> EpisodeStore:
    """Import a ROS 2 bag (a rosbag2 folder, or one ``.mcap`` / ``.db3`` file) into a new EpisodeStore at ``out``.

    A bag written by :func:`export_rosbag` comes back with identical arrays (dtypes included) and attributes; other
    bags need at least ``obs_topic`` and ``action_topic`` (see the module documentation). A bag that is not one, or
    lacks those topics, or is truncated, raises :class:`DatasetImportError` naming it and leaves nothing at ``out``.
    """
    src = Path(src)
    with _BagReader(src) as bag:
        by_topic = bag.connections()
        store_ev = _store_event(bag, by_topic)
        if store_ev is not None:
            obs_topic, action_topic = OBS_TOPIC, ACTION_TOPIC
            keys = store_ev.get("keys")
            if not isinstance(keys, dict) or "obs" not in keys or "action" not in keys:
                raise DatasetImportError(f"{src}: the store event on {EPISODE_TOPIC} lists no 'obs' and 'action' keys")
            try:
                topics = [_Topic(k, s["topic"], s["msgtype"], s["shape"], s["dtype"]) for k, s in keys.items()]
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetImportError(f"{src}: malformed store event on {EPISODE_TOPIC}: {err}") from err
            ignored: list[str] = []
        else:
            for topic in (obs_topic, action_topic):
                if topic not in by_topic:
                    raise DatasetImportError(
                        f"{src}: no topic {topic} in the bag (needed: {obs_topic} and {action_topic}, of types "
                        f"{', '.join(VALUE_TYPES)}); topics: {sorted(by_topic) or 'none'}"
                    )
            topics, ignored = _foreign_topics(by_topic, obs_topic, action_topic, src)
        for t in topics:
            if t.topic not in by_topic:
                raise DatasetImportError(f"{src}: no topic {t.topic} in the bag (the store event lists it)")
            have = {c.msgtype for c in by_topic[t.topic]}
            if have != {t.msgtype}:
                raise DatasetImportError(f"{src}: topic {t.topic} has type {sorted(have)}, expected {t.msgtype}")
        if dt is None:
            dt = store_ev.get("dt") if store_ev is not None else None
            if dt is None:
                dt = _estimate_dt(bag, by_topic, obs_topic)
        if store_ev is not None:
            attrs = store_ev.get("attrs") if isinstance(store_ev.get("attrs"), dict) else {}
            total = int(store_ev.get("steps") or 0)
        else:
            attrs = {
                "source": "rosbag",
                "source_file": src.name,
                "topics": {t.key: t.topic for t in topics},
                "msgtypes": {t.topic: t.msgtype for t in topics},
                "ignored_topics": ignored,
            }
            total = int(sum(c.msgcount for c in by_topic[obs_topic]))
        episodes = _episodes(bag, by_topic, topics, store_ev is not None)
        with _staged_store(out, overwrite, dt, attrs) as store:
            _commit_in_batches(store, episodes, total, f"import {src.name}", progress)
            if store_ev is not None and store.n_episodes != int(store_ev.get("episodes", store.n_episodes)):
                raise DatasetImportError(
                    f"{src}: the store event announces {store_ev['episodes']} episodes, the bag holds "
                    f"{store.n_episodes} (truncated?)"
                )
            if store_ev is None and store.n_episodes == 0:
                raise DatasetImportError(f"{src}: no messages on {obs_topic}")
            if store_ev is None and topics[0].names and "obs_names" not in attrs:
                store.set_attrs({"obs_names": topics[0].names})
    return EpisodeStore.open(out)


def _episodes(
    bag: _BagReader, by_topic: dict[str, list], topics: list[_Topic], stlflow: bool
) -> Iterator[tuple[dict, dict]]:
    """The bag's episodes ``(arrays, attrs)``, one segment between ``begin`` events at a time."""
    by_name = {t.topic: t for t in topics}
    conns = [c for t in topics for c in by_topic[t.topic]]
    conns += [c for c in by_topic.get(EPISODE_TOPIC, []) if c.msgtype == STRING]
    seg = _Segment(None)
    count = 0
    for topic, msgtype, stamp, msg in bag.messages(conns):
        if topic == EPISODE_TOPIC:
            ev = _event(msg, bag.src, stlflow)
            if ev is None or ev.get("event") != "begin":
                continue
            if not seg.empty() or seg.marker is not None:
                yield _build(seg, topics, stlflow, bag.src, count)
                count += 1
            seg = _Segment(ev)
            continue
        seg.add(topic, stamp, _value(msg, msgtype, by_name[topic], bag.src))
    if not seg.empty() or seg.marker is not None:
        yield _build(seg, topics, stlflow, bag.src, count)


def _build(seg: _Segment, topics: list[_Topic], stlflow: bool, src: Path, count: int) -> tuple[dict, dict]:
    marker = seg.marker or {}
    where = f"in episode {marker.get('episode', count)}"
    if stlflow:
        if seg.marker is None:
            raise DatasetImportError(f"{src}: messages before the first begin event on {EPISODE_TOPIC}")
        steps = marker.get("steps")
        attrs = marker.get("attrs", {})
        if not isinstance(steps, int) or steps < 1 or not isinstance(attrs, dict):
            raise DatasetImportError(f"{src}: malformed begin event on {EPISODE_TOPIC}: {json.dumps(marker)[:200]}")
        ep = {}
        for t in topics:
            values = seg.values.get(t.topic, [])
            if len(values) != steps:
                raise DatasetImportError(
                    f"{src}: topic {t.topic} {where}: {len(values)} messages, the begin event declares {steps} "
                    "steps (truncated or damaged bag?)"
                )
            ep[t.key] = _cast(_stack(values, t.topic, src, where), t, src, where)
        return ep, attrs
    obs = topics[0]
    ticks = np.asarray(seg.times.get(obs.topic, []), dtype=np.int64)
    if len(ticks) == 0:
        raise DatasetImportError(f"{src}: no messages on {obs.topic} {where}")
    index: dict[str, np.ndarray] = {}
    first = 0
    for t in topics[1:]:
        times = np.asarray(seg.times.get(t.topic, []), dtype=np.int64)
        if len(times) == 0:
            raise DatasetImportError(f"{src}: no messages on {t.topic} {where} (it has {len(ticks)} observations)")
        if len(times) == len(ticks):
            index[t.topic] = np.arange(len(ticks))
        else:
            idx = np.searchsorted(times, ticks, side="right") - 1
            index[t.topic] = idx
            valid = np.flatnonzero(idx >= 0)
            first = max(first, int(valid[0]) if len(valid) else len(ticks))
    if first >= len(ticks):
        raise DatasetImportError(f"{src}: {where}, no observation comes after a message on every topic")
    ep = {obs.key: _stack(seg.values[obs.topic], obs.topic, src, where)[first:]}
    for t in topics[1:]:
        values = _stack(seg.values[t.topic], t.topic, src, where)
        ep[t.key] = values[index[t.topic][first:]]
    attrs = dict(marker.get("attrs", {})) if isinstance(marker.get("attrs"), dict) else {}
    attrs.setdefault("source", "rosbag")
    attrs.setdefault("start_time_ns", int(ticks[first]))
    if first:
        attrs["dropped_ticks"] = first
    return ep, attrs
