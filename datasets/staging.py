"""Staging of new stores: build in a hidden folder next to ``OUT``, rename it to ``OUT`` when complete.

Used by the importers (:mod:`stlflow.datasets.importers`) and the ROS 2 bag import and export
(:mod:`stlflow.datasets.rosbag`). A staging folder is named ``.<out>.importing-<pid>-<hex>.stlflow-tmp``
(:func:`staging_folder`); a process killed mid-import leaves it behind, and the next import or export to the same
``OUT`` deletes it once its owner is dead (:func:`remove_stale_staging`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from stlflow.datasets.store import EpisodeStore, EpisodeStoreError
from stlflow.datasets.store_io import replace_dir
from stlflow.datasets.store_lock import acquire_writer_lock, remove_if_abandoned

__all__ = [
    "BATCH_STEPS",
    "commit_in_batches",
    "remove_stale_staging",
    "staged_store",
    "staging_folder",
    "staging_folders",
]

BATCH_STEPS = 1 << 16
"""Steps per commit while importing (one atomic commit per batch of episodes)."""


def staging_folder(out: str | os.PathLike) -> Path:
    """A fresh hidden staging folder path next to ``out``, ``.<out>.importing-<pid>-<hex>.stlflow-tmp`` (found by
    :func:`staging_folders`, removed by :func:`remove_stale_staging` once this process is dead)."""
    out = Path(out)
    return out.parent / f".{out.name}.importing-{os.getpid()}-{uuid.uuid4().hex}.stlflow-tmp"


def staging_folders(out: str | os.PathLike) -> list[tuple[Path, int | None]]:
    """The staging folders of imports into ``out`` (and their build folders) with the pid in their names (``None``
    for names of older stlflow versions, which carry none)."""
    out = Path(out)
    pattern = re.compile(r"\.{1,2}" + re.escape(out.name) + r"\.importing-(?:(\d+)-)?[0-9a-f]{32}\.stlflow-tmp")
    found = []
    if out.parent.is_dir():
        for entry in out.parent.iterdir():
            m = pattern.match(entry.name)
            if m and entry.is_dir():
                found.append((entry, int(m.group(1)) if m.group(1) else None))
    return sorted(found)


def remove_stale_staging(out: str | os.PathLike) -> list[Path]:
    """Delete the staging folders of imports into ``out`` whose owner process is dead; returns those deleted.

    A live import's staging store holds its writer lock, so it is never touched (even if its pid was reused).
    """
    return [folder for folder, pid in staging_folders(out) if remove_if_abandoned(folder, pid)]


@contextlib.contextmanager
def staged_store(out: str | os.PathLike, overwrite: bool, dt: float | None, attrs: dict) -> Iterator[EpisodeStore]:
    """Yield a new store in a hidden staging folder next to ``out``; rename it to ``out`` only if the block succeeds.

    The staging folder's name holds this process's pid; stale ones of dead imports are removed first. An existing
    store at ``out`` is replaced only while this process holds its writer lock.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists() and not (out / "stlflow.json").is_file():
        raise EpisodeStoreError(f"refusing to overwrite {out}: it is not an EpisodeStore")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    # the store being replaced: nobody else may write it meanwhile (StoreLockedError if someone does now)
    old_lock = acquire_writer_lock(out) if out.exists() else None
    tmp = staging_folder(out)
    store = None
    try:
        store = EpisodeStore.create(tmp, dt=dt, attrs=attrs)
        yield store
        replace_dir(tmp, out)
    finally:
        if store is not None:
            store.close()
        if old_lock is not None:
            old_lock.release()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit_in_batches(
    store: EpisodeStore, episodes: Iterator[tuple[dict, dict]], total_steps: int, desc: str, progress: bool
) -> None:
    """Append ``episodes`` (``(arrays, attrs)`` pairs) to ``store``, one commit per :data:`BATCH_STEPS` steps."""
    batch, batch_attrs, steps = [], [], 0
    with tqdm(total=total_steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for ep, attrs in episodes:
            batch.append(ep)
            batch_attrs.append(attrs)
            steps += len(next(iter(ep.values())))
            if steps >= BATCH_STEPS:
                store.add_episodes(batch, batch_attrs)
                bar.update(steps)
                batch, batch_attrs, steps = [], [], 0
        if batch:
            store.add_episodes(batch, batch_attrs)
            bar.update(steps)
