"""A writer thread for recorded episodes: the control loop's thread never touches the disk.

``RecordWriter(path, dt, attrs)`` creates (or opens for appending) an :class:`~stlflow.datasets.EpisodeStore` and
holds its writer lock; :meth:`RecordWriter.put` hands one episode ``(arrays, attrs)`` to the thread, which appends it
(one atomic commit per episode); :meth:`RecordWriter.close` waits until every episode handed over is committed and
releases the store. A failed write is kept and raised by the next :meth:`put` or by :meth:`close`.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RecordWriter"]

_STOP = object()


class RecordWriter:
    """Appends episodes to the EpisodeStore at ``path`` on its own thread (see the module docstring)."""

    def __init__(self, path: str | Path, dt: float, attrs: dict[str, Any] | None = None) -> None:
        from stlflow.datasets import EpisodeStore

        path = Path(path)
        if path.exists():
            self.store = EpisodeStore.open(path, "a")
        else:
            self.store = EpisodeStore.create(path, dt=float(dt), attrs=dict(attrs or {}))
        self.path = path
        self.committed: list[int] = []
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="stlflow-record-writer", daemon=True)
        self._thread.start()

    def put(self, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Queue one episode for appending (returns at once)."""
        if self.error is not None:
            raise self.error
        self._queue.put((arrays, attrs))

    def close(self) -> list[int]:
        """Wait for every queued episode to be committed, release the store; the indices committed."""
        self._queue.put(_STOP)
        self._thread.join()
        self.store.close()
        if self.error is not None:
            raise self.error
        return list(self.committed)

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue
            try:
                self.committed.append(int(self.store.add_episode(item[0], attrs=item[1])))
            except BaseException as err:  # noqa: BLE001 -- kept and raised on the caller's thread
                self.error = err
