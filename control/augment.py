"""STL augmentation of a whole EpisodeStore: the demonstrations in batches of ``settings.batch_demos`` through
:func:`stlflow.datasets.augment_batch.augment_demos` (one tensor program and one round of parallel replays per
batch), batches in worker processes, accepted episodes written in demo order.

The algorithm and its types live in :mod:`stlflow.datasets.augment` and :mod:`stlflow.datasets.augment_batch`;
this module is the driver: it opens the demo store, builds the task once per process, runs the batches with
:func:`stlflow.control.workers.parallel_map`, writes the output store and totals an :class:`AugmentReport`.
Batches are cut from the demo order by ``batch_demos`` alone, so the output does not depend on ``workers``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stlflow.control.workers import parallel_map
from stlflow.datasets.augment import AugmentReport, AugmentSettings, AugmentTask, DemoResult

if TYPE_CHECKING:
    from stlflow.datasets.store import EpisodeStore

__all__ = ["augment_store"]

# Per process: the task, the open demo store and the run's settings (set by _worker_init).
_WORKER: dict[str, Any] = {}


def _worker_init(make_task: Callable[[], AugmentTask], data_path: str, parse: Callable, settings, seed) -> None:
    from stlflow.datasets.store import EpisodeStore

    _WORKER.update(task=make_task(), store=EpisodeStore.open(data_path), parse=parse, settings=settings, seed=seed)


def _worker_batch(indices: list[int]) -> list[tuple[int, DemoResult, dict[str, Any]]]:
    """Augment the demonstrations ``indices`` together (demo ``i`` with seed ``(seed, i)``)."""
    from stlflow.datasets.augment_batch import DemoSpec, augment_demos

    task: AugmentTask = _WORKER["task"]
    store = _WORKER["store"]
    specs, parents = [], []
    for i in indices:
        attrs = store.episode_attrs(i)
        theta = {**task.defaults, **dict(attrs.get("stl_params") or {})}
        specs.append(DemoSpec(task.window(store.episode(i), attrs), attrs.get("mode"), theta,
                              (int(_WORKER["seed"]), int(i))))
        parents.append(attrs)
    results = augment_demos(specs, task.rules, task.modes, task.param_ranges, task.control_low, task.control_high,
                            task.dt, _WORKER["settings"], _WORKER["parse"], init_low=task.init_low,
                            init_high=task.init_high, stack=task.stack)
    return list(zip(indices, results, parents))


@contextlib.contextmanager
def _one_torch_thread():
    """One torch thread in this process (as in each worker), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def augment_store(
    data_path: str,
    out_path: str,
    make_task: Callable[[], AugmentTask],
    settings: AugmentSettings,
    parse: Callable[[str], Any],
    *,
    seed: int = 0,
    workers: int = 1,
    episodes: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    out_attrs: dict[str, Any] | None = None,
) -> AugmentReport:
    """Augment every demonstration of the store at ``data_path`` into a new EpisodeStore at ``out_path``.

    ``make_task`` builds the :class:`AugmentTask` (it runs once in each worker process, so it must be
    picklable: a module-level function or a ``functools.partial`` of one). Demo ``i`` is processed with seed
    ``(seed, i)`` on one torch thread, together with the other demonstrations of its batch (consecutive runs of
    ``settings.batch_demos`` of ``episodes``), and episodes are written in demo order, so the output is identical
    for any ``workers`` (``workers <= 1``: in this process). Output keys: the demo store's ``obs``, ``action`` and
    ``signal_<name>`` (same dtypes, so the two stores merge); episode attrs ``source="augmented"``,
    ``stl_params``, ``mode``, ``seed`` (the parent's env seed), ``parent_episode``, ``rho_model``, ``rho_replay``.
    A batch that fails raises :class:`stlflow.control.workers.WorkerError` naming the batch's index (batch k holds
    the demonstrations ``episodes[k * batch_demos : (k + 1) * batch_demos]``), with the traceback of the failure.
    """
    from stlflow.datasets.store import EpisodeStore

    t0 = time.perf_counter()
    demos = EpisodeStore.open(data_path)
    indices = list(range(demos.n_episodes)) if episodes is None else [int(i) for i in episodes]
    keys, out = _create_output(demos, data_path, out_path, overwrite, out_attrs)

    report = AugmentReport(n_demos=len(indices), per_demo=settings.per_demo)
    workers = max(1, int(workers))
    size = max(1, int(settings.batch_demos))
    batches = [indices[k : k + size] for k in range(0, len(indices), size)]
    results = (item for batch in parallel_map(
        _worker_batch,
        batches,
        workers=workers,
        initializer=_worker_init,
        initargs=(make_task, str(data_path), parse, settings, seed),
        threads_per_worker=1,
        desc="augment",
        unit="batch",
        progress=progress,
    ) for item in batch)
    # In this process too, one torch thread: the results then do not depend on the number of workers.
    with _one_torch_thread() if workers == 1 else contextlib.nullcontext():
        try:
            figures = _write_results(results, out, keys, report)
        except BaseException:
            out.close()  # release the writer lock; the committed episodes stay readable
            raise
        finally:
            _WORKER.clear()
    _set_demo_means(report, figures, demos, indices)
    report.seconds = time.perf_counter() - t0
    out.set_attrs({"augment_report": report.as_dict()})
    out.close()
    return report


def _create_output(
    demos: EpisodeStore, data_path: str, out_path: str, overwrite: bool, out_attrs: dict[str, Any] | None
) -> tuple[list[str], EpisodeStore]:
    """The keys to store (obs, action, signals) and the new output store, with the demo store's schema and attrs."""
    from stlflow.datasets.store import EpisodeStore

    keys = [k for k in demos.keys if k in ("obs", "action") or k.startswith("signal_")]
    for k in ("obs", "action"):
        if k not in keys:
            raise KeyError(f"{data_path} has no key {k!r} (keys: {demos.keys}); augmentation needs obs and action")
    schema = {k: (demos.key_shape(k), demos.key_dtype(k)) for k in keys}
    attrs = {**demos.attrs, **(out_attrs or {}), "source": "augmented", "augmented_from": str(data_path)}
    out = EpisodeStore.create(out_path, dt=demos.dt, attrs=attrs, overwrite=overwrite, schema=schema)
    return keys, out


def _write_results(
    results: Iterable[tuple[int, DemoResult, dict[str, Any]]], out: EpisodeStore, keys: list[str], report: AugmentReport
) -> dict[str, list]:
    """Write each demonstration's accepted episodes in demo order and add its counters to the report.

    Returns the per-demonstration figures the report averages: ``div_candidates``, ``div_random``,
    ``div_selected`` and ``modes_after`` (distinct modes among the demo's stored episodes).
    """
    figures: dict[str, list] = {"div_candidates": [], "div_random": [], "div_selected": [], "modes_after": []}
    for i, res, parent in results:
        for arrays, ep_attrs in res.episodes:
            _write_episode(out, keys, i, parent, arrays, ep_attrs)
            counts = report.mode_counts_augmented
            counts[ep_attrs["mode"]] = counts.get(ep_attrs["mode"], 0) + 1
        _add_demo(report, parent, res)
        figures["div_candidates"].append(res.div_candidates)
        figures["div_random"].append(res.div_random)
        figures["div_selected"].append(res.div_selected)
        figures["modes_after"].append(len({a["mode"] for _, a in res.episodes}))
    return figures


def _write_episode(
    out: EpisodeStore, keys: list[str], i: int, parent: dict[str, Any], arrays: dict[str, Any], ep_attrs: dict[str, Any]
) -> None:
    """Add one accepted episode of demonstration ``i`` to the output store, with its parent's provenance."""
    episode = {"obs": arrays["obs"], "action": arrays["action"]}
    for k in keys:
        if k.startswith("signal_"):
            episode[k] = np.asarray(arrays["signals"][k[len("signal_") :]])
    out.add_episode(
        episode,
        {
            "source": "augmented",
            **ep_attrs,
            "seed": parent.get("seed"),
            "parent_episode": int(i),
            "parent_mode": parent.get("mode"),
            "env_id": parent.get("env_id"),
        },
    )


def _add_demo(report: AugmentReport, parent: dict[str, Any], res: DemoResult) -> None:
    """Add one demonstration's counters to the report's totals."""
    mode = str(parent.get("mode"))
    report.mode_counts_demos[mode] = report.mode_counts_demos.get(mode, 0) + 1
    report.n_candidates += res.n_candidates
    report.n_satisfying += res.n_satisfying
    report.n_replayed += res.n_replayed
    report.n_accepted += res.n_accepted
    report.n_rejected_collision += res.n_rejected_collision
    for m in res.rejected_modes:
        report.rejected_by_mode[m] = report.rejected_by_mode.get(m, 0) + 1
    report.worker_seconds += res.seconds
    report.optimise_seconds += res.optimise_seconds


def _set_demo_means(report: AugmentReport, figures: dict[str, list], demos: EpisodeStore, indices: list[int]) -> None:
    """Set the report's means over demonstrations: diversity, and behaviour modes per start state before/after."""
    div_c, div_r, div_s = figures["div_candidates"], figures["div_random"], figures["div_selected"]
    modes_after = figures["modes_after"]
    report.div_candidates = float(np.mean(div_c)) if div_c else 0.0
    report.div_random = float(np.mean(div_r)) if div_r else 0.0
    report.div_selected = float(np.mean(div_s)) if div_s else 0.0
    # Start states are env seeds: how many distinct modes the demonstrations show from each one.
    by_seed: dict[Any, set] = {}
    for i in indices:
        a = demos.episode_attrs(i)
        by_seed.setdefault(a.get("seed", ("episode", i)), set()).add(a.get("mode"))
    report.modes_per_demo_before = float(np.mean([len(m) for m in by_seed.values()])) if by_seed else 0.0
    report.modes_per_demo_after = float(np.mean(modes_after)) if modes_after else 0.0
