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
start of a simulation clock); each further episode starts 1 s (:data:`~stlflow.datasets.rosbag_msgs.EPISODE_GAP_S`)
after the previous one's last tick, or at its own time-key times when those already lie after that (absolute clocks
are kept as they are). The bag timestamp of every message and the ``header.stamp`` of the observations are that tick
time.

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

The code: :mod:`stlflow.datasets.rosbag_export` (export), :mod:`stlflow.datasets.rosbag_import` (import),
:mod:`stlflow.datasets.rosbag_msgs` (topics, message types, the ``rosbags`` loader); this module re-exports their
public names.
"""

from __future__ import annotations

from stlflow.datasets.rosbag_export import RosbagExportError, export_rosbag
from stlflow.datasets.rosbag_import import import_rosbag
from stlflow.datasets.rosbag_msgs import ACTION_TOPIC, EPISODE_TOPIC, KEY_PREFIX, OBS_TOPIC, SIGNAL_PREFIX

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
