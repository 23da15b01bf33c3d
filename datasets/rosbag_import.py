"""ROS 2 bags (MCAP or SQLite storage) into a new EpisodeStore: :func:`import_rosbag`.

How stlflow's own bags and other tools' bags map to store keys, episodes and attributes is documented in
:mod:`stlflow.datasets.rosbag`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stlflow.datasets.importers import DatasetImportError
from stlflow.datasets.rosbag_msgs import (
    ACTION_TOPIC,
    EPISODE_TOPIC,
    F32_ARRAY,
    F64,
    F64_ARRAY,
    FORMAT_NAME,
    JOINT_STATE,
    KEY_PREFIX,
    NS,
    OBS_TOPIC,
    SIGNAL_PREFIX,
    STRING,
    VALUE_TYPES,
    load_rosbags,
)
from stlflow.datasets.staging import commit_in_batches, staged_store
from stlflow.datasets.store import EpisodeStore

__all__ = ["import_rosbag"]


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
        _, _, AnyReader, typestore = load_rosbags()
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
    return float(np.median(np.asarray(diffs, dtype=np.float64))) / NS


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
        with staged_store(out, overwrite, dt, attrs) as store:
            commit_in_batches(store, episodes, total, f"import {src.name}", progress)
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
