"""ROS 2 bags without ROS: `stlflow data export rosbag` writes an EpisodeStore as an MCAP bag of standard message types
that ``rosbags``' own reader reads; `stlflow data import rosbag` reads it back identically (arrays, dtypes, episode
and store attributes) and also reads bags written by other tools; bad input exits 2 with one line naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rosbags")

from rosbags.rosbag2 import Reader, StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from stlflow import cli  # noqa: E402
from stlflow.datasets import EpisodeStore  # noqa: E402
from stlflow.datasets.importers import DatasetImportError  # noqa: E402
from stlflow.datasets.rosbag import RosbagExportError, export_rosbag, import_rosbag  # noqa: E402

TS = get_typestore(Stores.ROS2_HUMBLE)
STANDARD = {
    "/stlflow/obs": "sensor_msgs/msg/JointState",
    "/stlflow/action": "std_msgs/msg/Float64MultiArray",
    "/stlflow/signal/clearance": "std_msgs/msg/Float64",
    "/stlflow/signal/speed": "std_msgs/msg/Float64",
    "/stlflow/key/reward": "std_msgs/msg/Float64MultiArray",
    "/stlflow/key/terminal": "std_msgs/msg/Float64MultiArray",
    "/stlflow/key/count": "std_msgs/msg/Float64MultiArray",
    "/stlflow/key/grid": "std_msgs/msg/Float64MultiArray",
    "/stlflow/key/signal_pose": "std_msgs/msg/Float64MultiArray",
    "/stlflow/episode": "std_msgs/msg/String",
}
LENGTHS = (12, 30, 7, 1)


def make_store(path: Path, dt: float | None = 0.1) -> EpisodeStore:
    """Several episodes of obs/action/signal keys of assorted dtypes and shapes, with store and episode attributes."""
    store = EpisodeStore.create(
        path, dt=dt, attrs={"task": "crossing", "obs_names": ["x", "y", "vx", "vy", "goal"], "theta": {"v_max": 1.5}}
    )
    rng = np.random.default_rng(0)
    for i, T in enumerate(LENGTHS):
        obs = rng.normal(size=(T, 5)).astype(np.float32)
        obs[0, 0] = np.float32(1e-40)  # a float32 subnormal survives too
        store.add_episode(
            {
                "obs": obs,
                "action": rng.uniform(-1, 1, size=(T, 2)).astype(np.float32),
                "signal_clearance": rng.normal(size=T).astype(np.float32),
                "signal_speed": rng.normal(size=T),  # float64
                "signal_pose": rng.normal(size=(T, 3)).astype(np.float32),  # not a scalar signal: a generic key
                "reward": rng.normal(size=T),
                "terminal": np.arange(T) == T - 1,
                "count": rng.integers(-(2**31), 2**31 - 1, size=T, dtype=np.int64),
                "grid": rng.integers(0, 255, size=(T, 2, 3)).astype(np.uint8),
            },
            attrs={"seed": i, "mode": ["yield", "left"][i % 2], "theta": {"v_max": 0.5 + i, "d_min": None}},
        )
    return store


def assert_same(a: EpisodeStore, b: EpisodeStore, indices=None) -> None:
    indices = list(range(a.n_episodes)) if indices is None else indices
    assert b.n_episodes == len(indices)
    assert b.keys == a.keys
    for j, i in enumerate(indices):
        ea, eb = a.episode(i), b.episode(j)
        for key in a.keys:
            assert eb[key].dtype == ea[key].dtype, key
            assert eb[key].shape == ea[key].shape, key
            assert np.array_equal(eb[key], ea[key]), key
        assert b.episode_attrs(j) == a.episode_attrs(i)
    assert b.attrs == a.attrs


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("stlflow")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def bad_input(proc: subprocess.CompletedProcess, name: str) -> None:
    """Exit status 2, one line on stderr naming the file, no traceback."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert name in lines[0] and "Traceback" not in proc.stderr


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if "stlflow-tmp" in p.name]


# ------------------------------------------------------------------------------------------------------ round trip
def test_round_trip_keeps_arrays_dtypes_and_attrs(tmp_path):
    store = make_store(tmp_path / "demos.zarr")
    proc = run_cli("data", "export", "rosbag", str(store.path), str(tmp_path / "demos_bag"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "exported 4 episodes, 50 steps" in proc.stdout
    proc = run_cli(
        "data", "import", "rosbag", str(tmp_path / "demos_bag"), str(tmp_path / "back.zarr"), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    back = EpisodeStore.open(tmp_path / "back.zarr")
    assert_same(store, back)
    assert back.dt == 0.1
    assert back.key_dtype("obs") == np.float32 and back.key_dtype("count") == np.int64
    assert back.key_shape("grid") == (2, 3)
    assert no_leftovers(tmp_path)


def test_bag_is_standard_for_rosbags_reader(tmp_path):
    """The bag's connections list standard message types; rosbags' own Reader and deserialiser read every field."""
    store = make_store(tmp_path / "demos.zarr")
    bag = export_rosbag(store, tmp_path / "demos_bag", progress=False)
    assert sorted(p.name for p in bag.iterdir()) == ["demos_bag.mcap", "metadata.yaml"]
    with Reader(bag) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == STANDARD
        counts = {c.topic: c.msgcount for c in reader.connections}
        assert counts["/stlflow/obs"] == sum(LENGTHS) and counts["/stlflow/action"] == sum(LENGTHS)
        assert counts["/stlflow/episode"] == 1 + 2 * len(LENGTHS)  # store event, begin and end per episode
        seen: dict[str, list] = {}
        for conn, stamp, raw in reader.messages():
            seen.setdefault(conn.topic, []).append((stamp, TS.deserialize_cdr(raw, conn.msgtype)))
    events = [json.loads(m.data) for _, m in seen["/stlflow/episode"]]
    assert [e["event"] for e in events[:3]] == ["store", "begin", "end"]
    assert events[0]["dt"] == 0.1 and events[0]["attrs"] == store.attrs
    assert events[1]["attrs"] == store.episode_attrs(0) and events[1]["steps"] == LENGTHS[0]
    # ticks at episode start + k * dt; the next episode 1 s after the previous one's last tick
    obs_stamps = np.array([s for s, _ in seen["/stlflow/obs"]])
    expected, start = [], 0
    for T in LENGTHS:
        expected += [start + round(k * 0.1e9) for k in range(T)]
        start = expected[-1] + 1_000_000_000
    assert obs_stamps.tolist() == expected
    for stamp, msg in seen["/stlflow/obs"]:  # header stamps set, equal to the bag timestamps
        assert msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec == stamp
        assert list(msg.name) == ["x", "y", "vx", "vy", "goal"] and len(msg.velocity) == 0
    positions = np.stack([m.position for _, m in seen["/stlflow/obs"]])
    assert positions.dtype == np.float64 and np.array_equal(positions, store.get("obs").astype(np.float64))
    action = seen["/stlflow/action"][0][1]
    assert [(d.label, d.size, d.stride) for d in action.layout.dim] == [("dim0", 2, 2)]
    assert np.array_equal(action.data, store.get("action")[0].astype(np.float64))
    grid = seen["/stlflow/key/grid"][0][1]
    assert [(d.size, d.stride) for d in grid.layout.dim] == [(2, 6), (3, 3)]
    assert seen["/stlflow/signal/speed"][5][1].data == store.get("signal_speed")[5]
    assert [s for s, _ in seen["/stlflow/signal/clearance"]] == expected


def test_export_subset_time_key_and_single_mcap_file(tmp_path):
    """--episodes picks and orders episodes; a per-tick `time` key gives the stamps; OUT.mcap is one MCAP file."""
    store = EpisodeStore.create(tmp_path / "rec.zarr", dt=None)
    rng = np.random.default_rng(3)
    t0 = 1_700_000_000.0  # a robot's wall clock (seconds since the epoch)
    for i, T in enumerate((5, 8, 6)):
        time = t0 + 60 * i + np.cumsum(rng.uniform(0.04, 0.06, size=T))
        store.add_episode(
            {"obs": rng.normal(size=(T, 3)), "action": rng.normal(size=(T, 1)).astype(np.float32), "time": time},
            attrs={"run": i},
        )
    out = tmp_path / "rec.mcap"
    proc = run_cli("data", "export", "rosbag", str(store.path), str(out), "--episodes", "2,0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "exported 2 episodes, 11 steps" in proc.stdout
    with Reader(out) as reader:
        conn = next(c for c in reader.connections if c.topic == "/stlflow/obs")
        stamps = [s for _, s, _ in reader.messages(connections=[conn])]
    ep2, ep0 = store.episode(2)["time"], store.episode(0)["time"]
    # absolute times are kept; episode 0 (earlier in time) is moved after episode 2, keeping its intervals
    assert stamps[:6] == np.rint(ep2 * 1e9).astype(np.int64).tolist()
    assert np.array_equal(np.diff(stamps[6:]), np.diff(np.rint(ep0 * 1e9).astype(np.int64)))
    assert stamps[6] == stamps[5] + 1_000_000_000
    back = import_rosbag(out, tmp_path / "back.zarr", progress=False)
    assert_same(store, back, [2, 0])
    assert 0.04 <= back.dt <= 0.06  # the store recorded no dt and none was given: the median stamp interval
    assert import_rosbag(out, tmp_path / "b2.zarr", dt=0.05, progress=False).dt == 0.05

    # overwrite replaces a bag (never anything else), leaving no staging folder
    proc = run_cli("data", "export", "rosbag", str(store.path), str(out), "--overwrite", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert import_rosbag(out, tmp_path / "all.zarr", progress=False).n_episodes == 3
    assert no_leftovers(tmp_path)


def test_store_without_dt_needs_dt_and_import_estimates_it(tmp_path):
    store = make_store(tmp_path / "nodt.zarr", dt=None)
    bad_input(run_cli("data", "export", "rosbag", str(store.path), str(tmp_path / "b"), "--no-progress"), "nodt.zarr")
    assert not (tmp_path / "b").exists()
    proc = run_cli("data", "export", "rosbag", str(store.path), str(tmp_path / "b"), "--dt", "0.02", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    back = import_rosbag(tmp_path / "b", tmp_path / "back.zarr", progress=False)
    assert back.dt == 0.02  # no dt in the store: from the time stamps
    assert_same(store, back)


def test_export_refuses_values_float64_cannot_carry(tmp_path):
    store = EpisodeStore.create(tmp_path / "big.zarr", dt=0.1)
    store.add_episode({"obs": np.zeros((3, 2)), "action": np.zeros((3, 1)), "id": np.array([1, 2**53 + 1, 3])})
    with pytest.raises(RosbagExportError, match=r"big\.zarr.*'id'"):
        export_rosbag(store, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists() and no_leftovers(tmp_path)


def test_stale_export_staging_is_removed(tmp_path):
    """A killed export's staging folder (a dead pid in its name) is removed by the next export to the same OUT."""
    store = make_store(tmp_path / "demos.zarr")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".bag.importing-{dead.pid}-{'0' * 32}.stlflow-tmp"
    (stale / "bag").mkdir(parents=True)
    (stale / "bag" / "bag.mcap").write_bytes(b"half")
    export_rosbag(store, tmp_path / "bag", progress=False)
    assert not stale.exists() and no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------------ other tools
def header(ns: int):
    Time, Header = TS.types["builtin_interfaces/msg/Time"], TS.types["std_msgs/msg/Header"]
    return Header(stamp=Time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id="base")


def joint_state(ns: int, names: list[str], position) -> object:
    return TS.types["sensor_msgs/msg/JointState"](
        header=header(ns),
        name=names,
        position=np.ascontiguousarray(position, dtype=np.float64),
        velocity=np.zeros(0),
        effort=np.zeros(0),
    )


def multi_array(msgtype: str, values, dtype) -> object:
    Dim, Layout = TS.types["std_msgs/msg/MultiArrayDimension"], TS.types["std_msgs/msg/MultiArrayLayout"]
    values = np.asarray(values, dtype=dtype)
    layout = Layout(dim=[Dim(label="joints", size=len(values), stride=len(values))], data_offset=0)
    return TS.types[msgtype](layout=layout, data=values)


def test_bag_of_another_tool_with_other_rates(tmp_path):
    """sqlite3 storage, no episode topic: obs at 20 Hz (JointState, one message with its joints in another order),
    action at 10 Hz starting after the first observation (held per tick), a signal per observation, a topic ignored."""
    bag = tmp_path / "robot_run"
    n_obs, t0 = 40, 100 * 10**9
    rng = np.random.default_rng(5)
    positions = rng.normal(size=(n_obs, 3))
    actions = rng.normal(size=(n_obs // 2, 2))
    clearance = rng.normal(size=n_obs)
    names = ["shoulder", "elbow", "wrist"]
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        c_obs = writer.add_connection("/stlflow/obs", "sensor_msgs/msg/JointState", typestore=TS)
        c_act = writer.add_connection("/stlflow/action", "std_msgs/msg/Float64MultiArray", typestore=TS)
        c_sig = writer.add_connection("/stlflow/signal/clearance", "std_msgs/msg/Float64", typestore=TS)
        c_log = writer.add_connection("/rosout_text", "std_msgs/msg/String", typestore=TS)
        for k in range(n_obs):
            ns = t0 + k * 50_000_000
            if k == 7:  # same joints, another order
                msg = joint_state(ns, names[::-1], positions[k][::-1])
            else:
                msg = joint_state(ns, names, positions[k])
            writer.write(c_obs, ns, TS.serialize_cdr(msg, "sensor_msgs/msg/JointState"))
            writer.write(
                c_sig, ns, TS.serialize_cdr(TS.types["std_msgs/msg/Float64"](data=clearance[k]), c_sig.msgtype)
            )
            if k % 2 == 0:  # actions at 10 Hz, published 10 ms after the observation
                a = multi_array("std_msgs/msg/Float64MultiArray", actions[k // 2], np.float64)
                writer.write(c_act, ns + 10_000_000, TS.serialize_cdr(a, c_act.msgtype))
            writer.write(c_log, ns, TS.serialize_cdr(TS.types["std_msgs/msg/String"](data="hi"), c_log.msgtype))
    proc = run_cli("data", "import", "rosbag", str(bag), str(tmp_path / "run.zarr"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    store = EpisodeStore.open(tmp_path / "run.zarr")
    assert store.n_episodes == 1 and store.dt == 0.05
    assert store.keys == ["obs", "action", "signal_clearance"]
    ep = store.episode(0)
    # the first observation comes before any action: dropped; tick k then holds the action published at or before it
    assert store.episode_attrs(0) == {"source": "rosbag", "start_time_ns": t0 + 50_000_000, "dropped_ticks": 1}
    assert np.array_equal(ep["obs"], positions[1:]) and ep["obs"].dtype == np.float64
    assert np.array_equal(ep["signal_clearance"], clearance[1:])
    held = [actions[(k - 1) // 2] for k in range(1, n_obs)]
    assert np.array_equal(ep["action"], np.stack(held))
    assert store.attrs["obs_names"] == names and store.attrs["ignored_topics"] == ["/rosout_text"]
    assert store.attrs["source"] == "rosbag" and store.attrs["topics"]["action"] == "/stlflow/action"


def test_bag_of_another_tool_with_episode_markers(tmp_path):
    """begin events on /stlflow/episode split episodes and carry attributes; Float32MultiArray actions stay float32;
    custom topic names for obs and action."""
    bag = tmp_path / "markers"
    rng = np.random.default_rng(6)
    lengths = (4, 6)
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        c_obs = writer.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=TS)
        c_act = writer.add_connection("/cmd", "std_msgs/msg/Float32MultiArray", typestore=TS)
        c_ep = writer.add_connection("/stlflow/episode", "std_msgs/msg/String", typestore=TS)
        ns, data = 5 * 10**9, []
        for e, T in enumerate(lengths):
            begin = json.dumps({"event": "begin", "attrs": {"operator": "ada", "trial": e}})
            writer.write(c_ep, ns, TS.serialize_cdr(TS.types["std_msgs/msg/String"](data=begin), c_ep.msgtype))
            obs, act = rng.normal(size=(T, 2)), rng.normal(size=(T, 3)).astype(np.float32)
            data.append((obs, act))
            for k in range(T):
                writer.write(c_obs, ns, TS.serialize_cdr(joint_state(ns, ["a", "b"], obs[k]), c_obs.msgtype))
                a = multi_array("std_msgs/msg/Float32MultiArray", act[k], np.float32)
                writer.write(c_act, ns + 1000, TS.serialize_cdr(a, c_act.msgtype))
                ns += 20_000_000
            ns += 3 * 10**9
    with pytest.raises(DatasetImportError, match="no topic /stlflow/obs"):
        import_rosbag(bag, tmp_path / "x.zarr", progress=False)
    store = import_rosbag(bag, tmp_path / "m.zarr", progress=False, obs_topic="/joint_states", action_topic="/cmd")
    assert store.n_episodes == 2 and store.dt == 0.02
    assert store.key_dtype("action") == np.float32 and store.key_dtype("obs") == np.float64
    for e, (obs, act) in enumerate(data):
        ep = store.episode(e)
        assert np.array_equal(ep["obs"], obs) and np.array_equal(ep["action"], act)
        attrs = store.episode_attrs(e)
        assert attrs["operator"] == "ada" and attrs["trial"] == e and attrs["source"] == "rosbag"


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    def data(*args: str) -> subprocess.CompletedProcess:  # in-process: as the console script, without its start-up
        rc = cli.main(["data", *args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, captured.out, captured.err)

    store = make_store(tmp_path / "demos.zarr")
    # a bag without the obs/action topics
    other = tmp_path / "chatter_bag"
    with Writer(other, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/chatter", "std_msgs/msg/String", typestore=TS)
        writer.write(conn, 1, TS.serialize_cdr(TS.types["std_msgs/msg/String"](data="hello"), conn.msgtype))
    proc = data("import", "rosbag", str(other), str(tmp_path / "a.zarr"))
    bad_input(proc, "chatter_bag")
    assert "/stlflow/obs" in proc.stderr
    # files that are not bags
    (tmp_path / "notes.txt").write_text("not a bag\n")
    bad_input(run_cli("data", "import", "rosbag", str(tmp_path / "notes.txt"), str(tmp_path / "a.zarr")), "notes.txt")
    (tmp_path / "fake.mcap").write_bytes(b"\x89MCAP0\r\n" + os.urandom(200))
    bad_input(data("import", "rosbag", str(tmp_path / "fake.mcap"), str(tmp_path / "a.zarr")), "fake.mcap")
    bad_input(data("import", "rosbag", str(store.path), str(tmp_path / "a.zarr")), "demos.zarr")
    bad_input(data("import", "rosbag", str(tmp_path / "none"), str(tmp_path / "a.zarr")), "none")
    # a truncated bag (a recorder killed mid-write)
    bag = export_rosbag(store, tmp_path / "good_bag", progress=False)
    mcap = bag / "good_bag.mcap"
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    bad_input(data("import", "rosbag", str(bag), str(tmp_path / "a.zarr")), "good_bag")
    assert not (tmp_path / "a.zarr").exists()

    # an existing OUT without --overwrite: import and export
    export_rosbag(store, tmp_path / "bag", progress=False)
    import_rosbag(tmp_path / "bag", tmp_path / "back.zarr", progress=False)
    bad_input(data("import", "rosbag", str(tmp_path / "bag"), str(tmp_path / "back.zarr")), "back.zarr")
    bad_input(data("export", "rosbag", str(store.path), str(tmp_path / "bag")), "bag")
    assert "--overwrite" in data("export", "rosbag", str(store.path), str(tmp_path / "bag")).stderr
    # --overwrite never replaces what is not a bag (here: the store itself)
    proc = data("export", "rosbag", str(store.path), str(store.path), "--overwrite")
    bad_input(proc, "demos.zarr")
    assert EpisodeStore.open(store.path).n_episodes == len(LENGTHS)
    # a store without the keys a bag needs, a missing store, an episode out of range
    partial = EpisodeStore.create(tmp_path / "noaction.zarr", dt=0.1)
    partial.add_episode({"obs": np.zeros((2, 2))})
    bad_input(data("export", "rosbag", str(partial.path), str(tmp_path / "x")), "noaction.zarr")
    bad_input(data("export", "rosbag", str(tmp_path / "gone.zarr"), str(tmp_path / "x")), "gone.zarr")
    bad_input(data("export", "rosbag", str(store.path), str(tmp_path / "x"), "--episodes", "9"), "demos.zarr")
    assert not (tmp_path / "x").exists() and no_leftovers(tmp_path)


def test_bag_missing_a_message_is_refused(tmp_path):
    """An stlflow bag that lost one observation (copied without it) fails naming the topic and episode."""
    store = make_store(tmp_path / "demos.zarr")
    bag = export_rosbag(store, tmp_path / "full", progress=False)
    lossy = tmp_path / "lossy"
    with Reader(bag) as reader, Writer(lossy, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=TS) for c in reader.connections}
        n_obs = 0
        for conn, stamp, raw in reader.messages():
            if conn.topic == "/stlflow/obs":
                n_obs += 1
                if n_obs == LENGTHS[0] + 3:  # the 4th observation of episode 1
                    continue
            writer.write(conns[conn.id], stamp, raw)
    with pytest.raises(DatasetImportError, match=r"lossy.*/stlflow/obs in episode 1: 29 messages.*30 steps"):
        import_rosbag(lossy, tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists() and no_leftovers(tmp_path)


def test_help_lists_export(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "export", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "rosbag" in out and "--episodes" in out and "/stlflow/action" in out
    with pytest.raises(SystemExit):
        cli.main(["data", "import", "--help"])
    assert "rosbag" in capsys.readouterr().out
