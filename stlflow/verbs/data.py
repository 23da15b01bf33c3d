"""`stlflow data`: inspect EpisodeStores, import datasets into them, export them as ROS 2 bags.

stlflow data info PATH [--episodes N]
stlflow data import {d4rl,minari,dp,rosbag} SRC OUT [--dt SECONDS] [--overwrite] [--no-progress]
                    [--obs-topic TOPIC] [--action-topic TOPIC]
stlflow data export rosbag STORE OUT [--episodes 0,1,...] [--dt SECONDS] [--start-time SECONDS] [--overwrite]
                    [--no-progress]

ROS 2 bags are read and written by :mod:`stlflow.datasets.rosbag` (message mapping there) through the ``rosbags``
package, without ROS.

Exit status: 0 on success; 2 on bad input: a store whose files contradict each other, no such path, not a store, a
bad import source, an existing OUT without --overwrite (one line on stderr naming the file and the problem). With
``stlflow --debug`` (or STLFLOW_DEBUG=1) the traceback is shown too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np

EPILOG = """examples:
  stlflow data info demos.zarr
  stlflow data import d4rl hopper-medium-v2.hdf5 hopper.zarr --dt 0.008
  stlflow data import minari ~/.minari/datasets/D4RL/pointmaze/umaze-v2 umaze.zarr
  stlflow data import dp pusht_cchi_v7_replay.zarr pusht.zarr --dt 0.1
  stlflow data import rosbag run_0412 run.zarr
  stlflow data export rosbag demos.zarr demos_bag --episodes 0,1,2

Imported keys: obs, action, reward, terminal, timeout, next_obs (when the source has it), info_<name>; from a ROS 2
bag: obs, action, signal_<name> and /stlflow/key/<key> topics (a bag exported by stlflow comes back identical).
A failed import or export leaves nothing at OUT; the hidden staging folder of a killed one is removed by the next
import or export to the same OUT.

ROS 2 bags (MCAP): /stlflow/obs sensor_msgs/msg/JointState (position = obs), /stlflow/action
std_msgs/msg/Float64MultiArray, /stlflow/signal/<name> std_msgs/msg/Float64, other keys on /stlflow/key/<key>
(Float64MultiArray), episode boundaries and attributes as JSON std_msgs/msg/String on /stlflow/episode.

exit status: 0 ok; 2 bad input (the file and the problem named on stderr in one line)."""


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _flatten(attrs: dict, prefix: str = "") -> dict:
    """``{"theta": {"v_max": 1}}`` -> ``{"theta.v_max": 1}``."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _summarise_attrs(all_attrs: list[dict], max_values: int = 6) -> list[str]:
    """One line per (nested, dotted) attribute key: how many episodes have it and its values."""
    lines = []
    all_attrs = [_flatten(a) for a in all_attrs]
    keys = sorted({k for a in all_attrs for k in a})
    for key in keys:
        values = [json.dumps(a[key], sort_keys=True) for a in all_attrs if key in a]
        counts = Counter(values)
        if len(counts) <= max_values:
            shown = ", ".join(f"{v} x{c}" for v, c in counts.most_common())
        else:
            numbers = [
                a[key] for a in all_attrs if isinstance(a.get(key), (int, float)) and not isinstance(a[key], bool)
            ]
            if len(numbers) == len(values):
                shown = f"{len(counts)} distinct, min {min(numbers)}, max {max(numbers)}"
            else:
                top = ", ".join(f"{v} x{c}" for v, c in counts.most_common(3))
                shown = f"{len(counts)} distinct; most common: {top}"
        lines.append(f"  {key} ({len(values)}/{len(all_attrs)} episodes): {shown}")
    return lines


def info(path: str, episodes: int) -> int:
    from stlflow.datasets.store import EpisodeStore

    store = EpisodeStore.open(path, mode="r")
    lengths = store.episode_lengths
    all_attrs = store.all_episode_attrs()  # before printing anything: a damaged store gives only its error
    print(
        f"{store.path}  ({'EpisodeStore' if store.source_format == 'stlflow' else 'Diffusion Policy store, read-only'})"
    )
    print(f"episodes: {store.n_episodes}")
    print(f"steps:    {store.n_steps}")
    if len(lengths):
        print(f"episode length: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}")
    dt = "unknown" if store.dt is None else f"{store.dt} s"
    duration = "" if store.dt is None else f" ({store.n_steps * store.dt:.1f} s of data)"
    print(f"dt:       {dt}{duration}")
    print(f"size on disk: {_human_bytes(store.nbytes_on_disk())}")
    print("keys:")
    width = max((len(k) for k in store.keys), default=0)
    for key in store.keys:
        shape = (store.n_steps, *store.key_shape(key))
        print(f"  {key.ljust(width)}  shape {shape}  dtype {np.dtype(store.key_dtype(key)).name}")
    print("store attrs:")
    if store.attrs:
        for k, v in store.attrs.items():
            text = json.dumps(v)
            print(f"  {k}: {text if len(text) <= 200 else text[:197] + '...'}")
    else:
        print("  (none)")
    print("episode attrs:")
    print("\n".join(_summarise_attrs(all_attrs)) if any(all_attrs) else "  (none)")
    if episodes > 0 and store.n_episodes:
        print(f"first {min(episodes, store.n_episodes)} episodes:")
        for i in range(min(episodes, store.n_episodes)):
            print(f"  {i}: {lengths[i]} steps  {json.dumps(all_attrs[i])}")
    return 0


def run_import(
    fmt: str, src: str, out: str, dt: float | None, overwrite: bool, progress: bool, topics: dict | None = None
) -> int:
    if fmt == "rosbag":
        from stlflow.datasets.rosbag import import_rosbag

        store = import_rosbag(src, out, dt=dt, overwrite=overwrite, progress=progress, **(topics or {}))
    else:
        from stlflow.datasets.importers import IMPORTERS

        store = IMPORTERS[fmt](src, out, dt=dt, overwrite=overwrite, progress=progress)
    print(f"imported {store.n_episodes} episodes, {store.n_steps} steps, keys {store.keys} into {store.path}")
    return 0


def run_export(
    store: str,
    out: str,
    episodes: list[int] | None,
    dt: float | None,
    start_time: float,
    overwrite: bool,
    progress: bool,
) -> int:
    from stlflow.datasets.rosbag import export_rosbag
    from stlflow.datasets.store import EpisodeStore

    with EpisodeStore.open(store, mode="r") as source:
        path = export_rosbag(
            source, out, episodes=episodes, overwrite=overwrite, dt=dt, start_time=start_time, progress=progress
        )
        n = source.n_episodes if episodes is None else len(episodes)  # valid: the export checked them
        steps = int(source.episode_lengths[episodes].sum()) if episodes is not None else source.n_steps
    print(f"exported {n} episodes, {steps} steps of {source.path} as a ROS 2 bag (MCAP) at {path}")
    return 0


def _episode_list(text: str) -> list[int]:
    """``"0,1,5"`` -> ``[0, 1, 5]`` (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated episode indices like 0,1,5, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one episode index")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stlflow data",
        description="Inspect EpisodeStores, import D4RL / Minari / Diffusion Policy datasets and ROS 2 bags into them, "
        "and export them as ROS 2 bags.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,import,export}")
    p_info = sub.add_parser(
        "info",
        help="episodes, steps, keys (shapes, dtypes), attributes and size on disk of a store",
        description="Print a summary of an EpisodeStore (or a Diffusion Policy zarr store).",
    )
    p_info.add_argument("path", help="the store folder (e.g. demos.zarr)")
    p_info.add_argument("--episodes", type=int, default=0, metavar="N", help="also list the first N episodes")
    p_imp = sub.add_parser(
        "import",
        help="import a D4RL HDF5 file, a Minari dataset folder, a Diffusion Policy zarr store or a ROS 2 bag",
        description="Import a dataset into a new EpisodeStore. A failed import leaves nothing at OUT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_imp.add_argument(
        "format",
        choices=["d4rl", "minari", "dp", "rosbag"],
        metavar="FORMAT",
        help="source format: {d4rl,minari,dp} datasets, or rosbag (a ROS 2 bag folder or .mcap file)",
    )
    p_imp.add_argument("src", help="D4RL .hdf5 file, Minari dataset folder, Diffusion Policy .zarr, or ROS 2 bag")
    p_imp.add_argument("out", help="new EpisodeStore folder to write (e.g. out.zarr)")
    p_imp.add_argument("--dt", type=float, default=None, help="seconds per step to record (default: unknown)")
    p_imp.add_argument("--overwrite", action="store_true", help="replace an existing EpisodeStore at OUT")
    p_imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_imp.add_argument(
        "--obs-topic", default=None, metavar="TOPIC", help="rosbag: observation topic (default /stlflow/obs)"
    )
    p_imp.add_argument(
        "--action-topic", default=None, metavar="TOPIC", help="rosbag: action topic (default /stlflow/action)"
    )
    p_exp = sub.add_parser(
        "export",
        help="write a store's episodes as a ROS 2 bag (MCAP) with standard message types",
        description="Export an EpisodeStore as a ROS 2 bag (MCAP storage, standard message types), written under a "
        "temporary name and renamed when complete. `stlflow data import rosbag` reads it back identically.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_exp.add_argument("format", choices=["rosbag"], help="output format")
    p_exp.add_argument("store", help="the EpisodeStore to export (needs keys obs and action)")
    p_exp.add_argument("out", help="the bag folder to write (a single MCAP file if the name ends in .mcap)")
    p_exp.add_argument(
        "--episodes", type=_episode_list, default=None, metavar="0,1,...", help="episodes to export (default: all)"
    )
    p_exp.add_argument(
        "--dt", type=float, default=None, help="seconds per step for the time stamps (default: the store's dt)"
    )
    p_exp.add_argument(
        "--start-time", type=float, default=0.0, metavar="SECONDS", help="time of the first tick (default 0)"
    )
    p_exp.add_argument("--overwrite", action="store_true", help="replace an existing bag at OUT")
    p_exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from stlflow.datasets.importers import DatasetImportError
    from stlflow.datasets.store import EpisodeStoreError, StoreCorruptError

    try:
        if args.command == "info":
            try:
                return info(args.path, args.episodes)
            except (StoreCorruptError, DatasetImportError, EpisodeStoreError, OSError):
                raise
            except Exception as err:  # zarr/numcodecs on damaged files: name the store, not a traceback
                if _debugging():
                    raise
                raise StoreCorruptError(f"{args.path}: cannot read the store ({type(err).__name__}: {err})") from err
        if args.command == "export":
            return run_export(
                args.store,
                args.out,
                args.episodes,
                args.dt,
                args.start_time,
                args.overwrite,
                not args.no_progress,
            )
        topics = {}
        if args.format == "rosbag":
            topics = {k: v for k, v in (("obs_topic", args.obs_topic), ("action_topic", args.action_topic)) if v}
        elif args.obs_topic or args.action_topic:
            print("stlflow data import: error: --obs-topic/--action-topic apply to rosbag only", file=sys.stderr)
            return 2
        return run_import(args.format, args.src, args.out, args.dt, args.overwrite, not args.no_progress, topics)
    except StoreCorruptError as err:
        if _debugging():
            raise
        print(f"stlflow data {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (DatasetImportError, EpisodeStoreError, OSError) as err:  # OSError: missing/existing/unreadable paths
        if _debugging():
            raise
        print(f"stlflow data {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2  # bad input, as for every verb
    except (ValueError, ModuleNotFoundError) as err:  # RosbagExportError; rosbags not installed
        from stlflow.datasets.rosbag import RosbagExportError

        if _debugging() or not (
            isinstance(err, RosbagExportError) or (isinstance(err, ModuleNotFoundError) and "rosbags" in str(err))
        ):
            raise
        print(f"stlflow data {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _debugging() -> bool:
    import os

    return os.environ.get("STLFLOW_DEBUG", "") not in ("", "0")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
