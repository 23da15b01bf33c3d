"""Checkpoint folders written atomically and read back verified; :class:`CheckpointError` for every bad one.

A checkpoint is a folder holding a YAML description (``policy.yaml``) and the files it refers to. The YAML's
``files`` section gives each file's size and sha256 content hash::

    files:
      model.safetensors: {sha256: 9f2c..., bytes: 81234}
      normalizer.safetensors: {sha256: 41ab..., bytes: 1720}

and, only while a checkpoint is being replaced in place, the folder-relative ``path`` the file is kept at
(a hidden staging folder inside the checkpoint). Readers verify size and hash before they parse a file.

Writing (:func:`write_checkpoint`) never leaves a half-written checkpoint at the path, whatever the moment a
process is killed (or, the files and folders being fsynced before each rename, the machine loses power):

- a new folder is built complete in a temporary sibling folder ``.<name>.tmp-<pid>-<token>`` (files and YAML
  fsynced, the folder fsynced) and renamed into place, then the parent folder is fsynced;
- an existing folder (a checkpoint being replaced, or a folder that holds other things too, like a training
  run's output folder) is updated in place with ``policy.yaml`` as the pointer that is swapped atomically:
  the new files go to a staging folder ``.stage-<pid>-<token>`` inside it; a YAML naming the staged files
  replaces ``policy.yaml`` (write, fsync, rename, fsync the folder); the staged files are then hard-linked
  over the canonical names (``model.safetensors`` ...); a YAML naming the canonical files replaces
  ``policy.yaml``; the staging folder is removed. At every instant ``policy.yaml`` is either the old one,
  whose files are all still there, or a new one whose files are all there.

Leftovers of a killed writer (temporary folders and files carrying a process id that is no longer alive and
that ``policy.yaml`` does not refer to) are removed by the next write. Two processes writing the same
checkpoint at the same time is not supported.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from stlflow.datasets.store_io import fsync_path
from stlflow.datasets.store_lock import pid_alive

__all__ = [
    "CONFIG_FILE",
    "CheckpointError",
    "MissingCheckpointError",
    "atomic_write_text",
    "clean_stale",
    "file_entry",
    "fsync_dir",
    "read_config",
    "resolve_file",
    "sha256_file",
    "write_checkpoint",
]

CONFIG_FILE = "policy.yaml"
FILES_KEY = "files"
Writer = Callable[[Path], None]



class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or inconsistent. Names the folder and the problem.

    ``directory`` and ``problem`` are kept as attributes; ``str(err)`` is ``"checkpoint <folder>: <problem>"``.
    """

    def __init__(self, directory: str | os.PathLike, problem: str):
        self.directory, self.problem = Path(directory), str(problem)
        super().__init__(f"checkpoint {self.directory}: {self.problem}")

    def __reduce__(self):  # picklable across processes (worker pools) despite the two-argument constructor
        return type(self), (self.directory, self.problem)


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The checkpoint folder, or a file it needs, does not exist (also a :class:`FileNotFoundError`)."""

    def __init__(self, directory: str | os.PathLike, problem: str):
        CheckpointError.__init__(self, directory, problem)


# ---------------------------------------------------------------------------------------------- durability
def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk; a no-op where folders cannot be opened."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """The ``files`` entry of one file: ``{"sha256": hex, "bytes": size}``."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def _token() -> str:
    return f"{os.getpid()}-{os.urandom(6).hex()}"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a temporary sibling, fsynced, renamed over it, folder fsynced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{_token()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _yaml_text(config: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]]) -> str:
    return yaml.safe_dump({**dict(config), FILES_KEY: {n: dict(e) for n, e in files.items()}}, sort_keys=False)


# ---------------------------------------------------------------------------------------------- writing
def _referenced(directory: Path) -> set[str]:
    """Top-level entries of ``directory`` that its current ``policy.yaml`` refers to (best effort)."""
    try:
        cfg = yaml.safe_load((directory / CONFIG_FILE).read_text())
        files = cfg.get(FILES_KEY) or {}
        return {PurePosixPath(str(e["path"])).parts[0] for e in files.values() if isinstance(e, dict) and "path" in e}
    except Exception:  # noqa: BLE001 -- no readable YAML: nothing is referenced
        return set()


def clean_stale(directory: str | os.PathLike, prefixes: tuple[str, ...]) -> None:
    """Remove leftovers of killed writers in ``directory``: entries named ``<prefix><pid>-<hex>`` for one of
    ``prefixes`` whose process is no longer alive, except what the folder's ``policy.yaml`` refers to."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    keep = _referenced(Path(directory))
    for e in entries:
        prefix = next((p for p in prefixes if e.name.startswith(p)), None)
        m = None if prefix is None else re.fullmatch(r"(\d+)-[0-9a-f]+", e.name[len(prefix):])
        if not m or e.name in keep or pid_alive(int(m.group(1))):
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass


def _own_prefixes(files: Mapping[str, Writer]) -> tuple[str, ...]:
    """Name prefixes of the temporary entries an in-place write of ``files`` makes inside the checkpoint."""
    return (".stage-", f".{CONFIG_FILE}.tmp-", *(f".{n}.tmp-" for n in files))


def _write_files(folder: Path, files: Mapping[str, Writer]) -> dict[str, dict[str, Any]]:
    entries = {}
    for name, write in files.items():
        path = folder / name
        write(path)
        fsync_path(path)
        entries[name] = file_entry(path)
    return entries


def _check_names(files: Mapping[str, Writer]) -> None:
    for name in files:
        if name == CONFIG_FILE or not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"checkpoint file name {name!r}: a plain file name other than {CONFIG_FILE}")


def write_checkpoint(directory: str | os.PathLike, config: Mapping[str, Any], files: Mapping[str, Writer]) -> Path:
    """Write the checkpoint ``directory`` atomically (see the module docstring) and return its path.

    ``config``: the YAML content (``files`` is added); ``files``: ``{file name: writer}``, each writer writing
    that file at the path it is given. Existing entries of ``directory`` that are not named here are left as
    they are.
    """
    _check_names(files)
    d = Path(directory)
    parent = d.absolute().parent
    clean_stale(parent, (f".{d.name}.tmp-",))  # a killed writer's sibling folder for this checkpoint
    if not d.exists():
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{d.name}.tmp-{_token()}"
        os.mkdir(tmp)
        try:
            entries = _write_files(tmp, files)
            with open(tmp / CONFIG_FILE, "w") as f:
                f.write(_yaml_text(config, entries))
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            try:
                os.rename(tmp, d)
                renamed = True
            except OSError as err:  # a folder appeared there meanwhile and is not empty: written in place below
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not d.is_dir():
                    raise
                renamed = False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after the rename
        if renamed:
            fsync_dir(parent)
            return d
    if not d.is_dir():
        raise NotADirectoryError(f"cannot write a checkpoint to {d}: it exists and is not a folder")
    _write_in_place(d, config, files)
    return d


def _write_in_place(d: Path, config: Mapping[str, Any], files: Mapping[str, Writer]) -> None:
    clean_stale(d, _own_prefixes(files))
    stage = d / f".stage-{_token()}"
    os.mkdir(stage)
    try:
        entries = _write_files(stage, files)
        fsync_dir(stage)
        staged = {n: {**e, "path": f"{stage.name}/{n}"} for n, e in entries.items()}
        atomic_write_text(d / CONFIG_FILE, _yaml_text(config, staged))  # now the new checkpoint, read from stage
    except BaseException:
        if stage.name not in _referenced(d):
            shutil.rmtree(stage, ignore_errors=True)
        raise
    for name in files:  # policy.yaml names the staged files: the canonical names can change under it
        tmp = d / f".{name}.tmp-{_token()}"
        try:
            os.link(stage / name, tmp)
        except OSError:  # a filesystem without hard links: a copy, flushed
            shutil.copyfile(stage / name, tmp)
            fsync_path(tmp)
        os.replace(tmp, d / name)
    fsync_dir(d)
    atomic_write_text(d / CONFIG_FILE, _yaml_text(config, entries))  # the new checkpoint, canonical names
    shutil.rmtree(stage, ignore_errors=True)
    clean_stale(d, _own_prefixes(files))
    fsync_dir(d)


# ---------------------------------------------------------------------------------------------- reading
def read_config(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, Any]] | None, bytes]:
    """``(config, files, raw)`` of a checkpoint's ``policy.yaml``; ``files`` is None for a checkpoint written
    before content hashes (no ``files`` section). ``config`` excludes ``files``; ``raw`` is the file's bytes.

    Raises :class:`CheckpointError` (:class:`MissingCheckpointError` for a missing folder or YAML) when the YAML
    is unreadable, empty, not a mapping, or has a malformed ``files`` section.
    """
    d = Path(directory)
    if not d.is_dir():
        raise MissingCheckpointError(d, "the folder does not exist" if not d.exists() else "not a folder")
    path = d / CONFIG_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MissingCheckpointError(d, f"{CONFIG_FILE} is missing (not a policy checkpoint)") from None
    except OSError as err:
        raise CheckpointError(d, f"{CONFIG_FILE} cannot be read: {err}") from err
    try:
        cfg = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise CheckpointError(d, f"{CONFIG_FILE} is not valid YAML: {err}") from err
    if cfg is None:
        raise CheckpointError(d, f"{CONFIG_FILE} is empty")
    if not isinstance(cfg, dict):
        raise CheckpointError(d, f"{CONFIG_FILE} must be a mapping of settings, got a {type(cfg).__name__}")
    if FILES_KEY not in cfg:
        return cfg, None, raw
    files = cfg.pop(FILES_KEY)
    if not isinstance(files, dict):
        raise CheckpointError(d, f"{CONFIG_FILE}: '{FILES_KEY}' must map file names to their sha256 and size")
    for name, e in files.items():
        ok = (isinstance(e, dict) and isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])
              and isinstance(e.get("bytes"), int) and e["bytes"] >= 0 and set(e) <= {"sha256", "bytes", "path"})
        if not ok:
            raise CheckpointError(d, f"{CONFIG_FILE}: malformed '{FILES_KEY}' entry for {name!r}: {e!r} "
                                     f"(want {{sha256: 64 hex digits, bytes: size}})")
        rel = PurePosixPath(str(e.get("path", name)))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in str(rel):
            raise CheckpointError(d, f"{CONFIG_FILE}: file {name!r} points outside the checkpoint folder ({rel})")
    return cfg, files, raw


def resolve_file(directory: str | os.PathLike, files: Mapping[str, Mapping[str, Any]] | None, name: str) -> Path:
    """Path of the checkpoint file ``name``, verified against its size and sha256 when ``files`` lists them.

    ``files`` None (a checkpoint written before content hashes): the canonical path, checked to exist only.
    A missing file is a :class:`MissingCheckpointError`; a file ``files`` does not list, a size or a hash that
    disagrees is a :class:`CheckpointError`.
    """
    d = Path(directory)
    if files is None:
        path = d / name
        if not path.is_file():
            raise MissingCheckpointError(d, f"{name} is missing")
        return path
    if name not in files:
        raise CheckpointError(d, f"{CONFIG_FILE} lists no content hash for {name} (it lists {sorted(files)})")
    e = files[name]
    path = d / PurePosixPath(str(e.get("path", name)))
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MissingCheckpointError(d, f"{name} is missing") from None
    if size != e["bytes"]:
        what = "empty" if size == 0 else ("truncated" if size < e["bytes"] else "longer than written")
        raise CheckpointError(d, f"{name} is {what}: {size} bytes, {CONFIG_FILE} says {e['bytes']}")
    try:
        digest = sha256_file(path)
    except FileNotFoundError:  # removed between stat and open (a save by another process swapped it out)
        raise MissingCheckpointError(d, f"{name} is missing") from None
    if digest != e["sha256"]:
        raise CheckpointError(d, f"{name} is corrupted: its sha256 {digest[:16]}... differs from the "
                                 f"{e['sha256'][:16]}... recorded in {CONFIG_FILE}")
    return path
