"""stlflow.control.workers: parallel_map in this process and in real worker processes."""

from __future__ import annotations

import os

import pytest

from stlflow.control.workers import WorkerError, limit_threads, parallel_map

_STATE: dict = {}


def _square(x):
    return x * x


def _set_tag(tag):
    _STATE["tag"] = tag


def _tag_and_threads(_job):
    import torch

    return _STATE.get("tag"), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def _explode_on_three(x):
    if x == 3:
        raise ValueError(f"no threes here (got {x})")
    return x


@pytest.mark.parametrize("workers", [1, 2])
def test_results_in_job_order(workers):
    jobs = [7, 1, 5, 3, 0, 2, 9, 4]
    got = list(parallel_map(_square, jobs, workers=workers, progress=False, chunksize=1 + (workers == 2)))
    assert got == [x * x for x in jobs]


@pytest.mark.parametrize("workers", [1, 2])
def test_error_names_job_and_carries_the_worker_traceback(workers):
    with pytest.raises(WorkerError) as info:
        list(parallel_map(_explode_on_three, range(6), workers=workers, progress=False))
    err = info.value
    assert err.index == 3 and err.job == 3
    text = str(err)
    assert "job 3 (3)" in text
    assert "ValueError: no threes here (got 3)" in text
    assert "_explode_on_three" in text and "_explode_on_three" in err.worker_traceback


def _log_and_wait(job):
    import time

    path, x = job
    with open(path, "a") as f:
        f.write(f"{x}\n")
    if x == 0:
        raise RuntimeError("first job fails")
    time.sleep(0.2)
    return x


def test_failure_cancels_pending_jobs_and_stops_the_workers(tmp_path):
    import multiprocessing

    log = tmp_path / "started.txt"
    jobs = [(str(log), x) for x in range(40)]
    with pytest.raises(WorkerError, match="first job fails"):
        list(parallel_map(_log_and_wait, jobs, workers=2, progress=False))
    assert len(log.read_text().split()) < 10  # the jobs not yet handed to a worker never ran
    assert multiprocessing.active_children() == []


def test_results_before_the_failure_are_yielded():
    got = []
    with pytest.raises(WorkerError):
        for x in parallel_map(_explode_on_three, [0, 1, 2, 3, 4], workers=2, progress=False):
            got.append(x)
    assert got == [0, 1, 2]


def test_initializer_runs_in_each_worker_with_one_thread():
    jobs = list(range(4))
    got = list(parallel_map(_tag_and_threads, jobs, workers=2, initializer=_set_tag, initargs=("ready",),
                            progress=False))
    assert got == [("ready", 1, "1")] * len(jobs)


def test_in_process_runs_initializer_and_keeps_thread_count():
    import torch

    before = torch.get_num_threads()
    _STATE.clear()
    got = list(parallel_map(_tag_and_threads, [0, 1], initializer=_set_tag, initargs=("here",), progress=False))
    assert [g[:2] for g in got] == [("here", before)] * 2
    assert torch.get_num_threads() == before
    _STATE.clear()


def test_failing_initializer_in_a_worker_is_reported():
    with pytest.raises(WorkerError, match="initializer failed") as info:
        list(parallel_map(_square, [1, 2], workers=2, initializer=_explode_on_three, initargs=(3,), progress=False))
    assert "_explode_on_three" in info.value.worker_traceback


@pytest.mark.parametrize("workers", [1, 2])
def test_no_progress_writes_nothing(workers, capfd):
    assert list(parallel_map(_square, [1, 2, 3], workers=workers, progress=False)) == [1, 4, 9]
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_progress_bar_reports(capfd):
    list(parallel_map(_square, [1, 2, 3], desc="squares", unit="sq", progress=True))
    err = capfd.readouterr().err
    assert "squares" in err and "3/3" in err


def test_empty_jobs_and_bad_arguments():
    assert list(parallel_map(_square, [], workers=4, progress=False)) == []
    with pytest.raises(ValueError, match="workers"):
        parallel_map(_square, [1], workers=0)


def test_limit_threads_sets_env_and_torch(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "4")  # restored after the test
    try:
        limit_threads(1)
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_worker_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(WorkerError(2, {"a": 1}, "Traceback ...\nKeyError: 'a'\n")))
    assert err.index == 2 and err.job == {"a": 1} and "KeyError" in str(err)
