"""Topics, message types and format constants of stlflow's ROS 2 bags, and the ``rosbags`` package loader.

The message mapping itself is documented in :mod:`stlflow.datasets.rosbag`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ACTION_TOPIC",
    "EPISODE_GAP_S",
    "EPISODE_TOPIC",
    "F32",
    "F32_ARRAY",
    "F64",
    "F64_ARRAY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "JOINT_STATE",
    "KEY_PREFIX",
    "NS",
    "OBS_TOPIC",
    "SIGNAL_PREFIX",
    "STRING",
    "TIME_KEY",
    "VALUE_TYPES",
    "load_rosbags",
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
"""Message types :func:`~stlflow.datasets.rosbag_import.import_rosbag` reads values from."""
FORMAT_NAME = "stlflow-rosbag"
FORMAT_VERSION = 1
TIME_KEY = "time"
EPISODE_GAP_S = 1.0
"""Seconds between the last tick of an episode and the first of the next (stamps laid out by dt)."""
NS = 1_000_000_000
"""Nanoseconds per second (bag timestamps are nanoseconds)."""


def load_rosbags() -> tuple[Any, Any, Any, Any]:
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
