"""One way to run independent jobs in worker processes: set-up, results in job order, a progress bar, errors.

:func:`parallel_map` runs ``fn(job)`` for each job, in this process (``workers=1``) or in a spawn-context
process pool whose workers first limit their compute threads (:func:`limit_threads`) and then run a caller's
initializer (e.g. to build a task or open a store once per process). Results come back in job order, so a
caller that writes them as they arrive produces the same output for any number of workers. A job that raises
surfaces in the caller as a :class:`WorkerError` carrying the worker's formatted traceback.

Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["WorkerError", "limit_threads", "parallel_map"]

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_REPR_CHARS = 200  # a job's repr in an error message is cut to this length


def limit_threads(threads: int = 1) -> None:
    """Worker set-up: OMP/MKL/OPENBLAS_NUM_THREADS env vars and torch.set_num_threads(threads) if torch is imported.
    (Two processes with 2 torch threads each on 2 cores ran 15-60x slower than with one thread each.)

    The environment variables are read by libraries imported later (torch reads them when it is first imported);
    a torch already imported is set directly.
    """
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


class WorkerError(RuntimeError):
    """A job failed in a worker: message names the job (its index and repr, shortened) and includes the worker's
    formatted traceback; attributes .index, .job, .worker_traceback (str)."""

    def __init__(self, index: int, job: Any, worker_traceback: str, summary: str | None = None):
        self.index = index
        self.job = job
        self.worker_traceback = worker_traceback
        lines = worker_traceback.rstrip().splitlines()
        self.summary = summary if summary is not None else (lines[-1] if lines else "")
        super().__init__(f"job {index} ({_short_repr(job)}) failed: {self.summary}\n{worker_traceback.rstrip()}")

    def __reduce__(self):
        return (WorkerError, (self.index, self.job, self.worker_traceback, self.summary))


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as err:  # a broken __repr__ must not hide the job's own error
        text = f"<{type(value).__name__} with a failing repr: {type(err).__name__}>"
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 3] + "..."


class _Failed:
    """What a worker sends back instead of a result when the job raised (exceptions need not pickle)."""

    __slots__ = ("summary", "text")

    def __init__(self, summary: str, text: str):
        self.summary = summary
        self.text = text

    def __reduce__(self):
        return (_Failed, (self.summary, self.text))


def _failure(err: BaseException) -> _Failed:
    summary = "".join(traceback.format_exception_only(type(err), err)).strip()
    return _Failed(summary, "".join(traceback.format_exception(type(err), err, err.__traceback__)))


# Set in each worker process by _init_worker: the initializer's failure, reported with the first job it gets.
_INIT_FAILURE: _Failed | None = None


def _init_worker(threads: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    global _INIT_FAILURE
    limit_threads(threads)
    if initializer is None:
        return
    try:
        initializer(*initargs)
    except Exception as err:
        # Raising here would only break the pool ("a process in the initializer failed"), without the traceback.
        failed = _failure(err)
        _INIT_FAILURE = _Failed(f"worker initializer failed: {failed.summary}", failed.text)


def _run_job(fn: Callable[[Any], Any], job: Any) -> Any:
    if _INIT_FAILURE is not None:
        return _INIT_FAILURE
    try:
        return fn(job)
    except Exception as err:
        return _failure(err)


def parallel_map(
    fn: Callable[[Any], Any],
    jobs: Iterable[Any],
    *,
    workers: int = 1,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
    threads_per_worker: int = 1,
    desc: str = "",
    unit: str = "it",
    progress: bool = True,
    chunksize: int = 1,
) -> Iterator[Any]:
    """Iterator over fn(job) for each job, in job order. workers == 1: runs in this process (initializer(*initargs)
    is called once first; thread count untouched). workers > 1: a spawn-context ProcessPoolExecutor whose worker
    initializer calls limit_threads(threads_per_worker) then initializer(*initargs); fn, jobs and initargs must be
    picklable (module-level functions). A tqdm progress bar (disabled when progress=False) advances as results
    arrive. An exception in fn (in a worker or in-process) is raised in the caller as WorkerError with the worker's
    traceback; the pool is shut down (pending jobs cancelled) before it propagates.

    Nothing runs before the first result is asked for. ``jobs`` is read into a list first (the bar's total);
    at most ``len(jobs)`` processes are started, and none for no jobs. ``chunksize`` jobs travel to a worker
    at a time (fewer round trips for many short jobs). Closing the iterator early (or dropping it) also shuts
    the pool down, cancelling the jobs not yet started. An exception in a worker's ``initializer`` is reported
    as a :class:`WorkerError` for the first job that worker gets; in this process it propagates as raised.
    """
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if int(chunksize) < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")
    return _parallel_map(fn, list(jobs), int(workers), initializer, tuple(initargs), int(threads_per_worker), desc,
                         unit, bool(progress), int(chunksize))


def _parallel_map(fn, jobs, workers, initializer, initargs, threads, desc, unit, progress, chunksize) -> Iterator:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc or None, unit=unit, disable=not progress)
    try:
        if workers == 1:
            if initializer is not None:
                initializer(*initargs)
            for index, job in enumerate(jobs):
                try:
                    result = fn(job)
                except Exception as err:
                    failed = _failure(err)
                    raise WorkerError(index, job, failed.text, failed.summary) from err
                bar.update(1)
                yield result
        elif jobs:
            yield from _pool_map(fn, jobs, min(workers, len(jobs)), initializer, initargs, threads, chunksize, bar)
    finally:
        bar.close()


def _pool_map(fn, jobs, workers, initializer, initargs, threads, chunksize, bar) -> Iterator:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads, initializer, initargs),
    )
    try:
        results = pool.map(functools.partial(_run_job, fn), jobs, chunksize=chunksize)
        for index, result in enumerate(results):
            if isinstance(result, _Failed):
                raise WorkerError(index, jobs[index], result.text, result.summary)
            bar.update(1)
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
