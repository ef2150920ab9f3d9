"""One driver for tiled slide work, in this process or on a dask.distributed cluster.

Slide segmentation and slide detection both plan their tiles on the driver, then run a *work*
function over tile indices: ``work(record, obj, indices, *args)`` yields
:class:`~napari_medseg.progress.Progress` (passed through) and its outputs, in tile order.
:func:`run_tiles` either calls it once over every tile in this process, or cuts the tiles into
runs of consecutive indices and runs ``work`` on dask workers, each of which opens the slide and
loads the model or detector itself (:func:`worker_slide`, once per worker) and returns only
its outputs (never pixels) to the driver. ``work``, ``load`` and ``args`` travel to the workers,
so they are module-level functions and plain data.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import TYPE_CHECKING, Any

from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord

__all__ = ["run_tiles", "task_runs", "worker_slide"]

_WORKER_CACHE: dict = {}


def worker_slide(slide_path: str, ref: str, load: Callable[[str], Any]) -> tuple[ImageRecord, Any]:
    """Dask worker side: the opened slide and ``load(ref)`` (a model or detector), kept
    between the tasks of one run (keyed by the slide file's path, mtime and size, and ``ref``;
    one entry per worker process)."""
    from napari_medseg.io.raster import read_slide

    st = os.stat(slide_path)
    key = (slide_path, st.st_mtime_ns, st.st_size, ref)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = read_slide(slide_path)
        _WORKER_CACHE[key] = (rec, load(ref))
    return _WORKER_CACHE[key]


def task_runs(
    n_tiles: int, n_workers: int, tiles_per_task: int | None = None, multiple: int = 1
) -> list[list[int]]:
    """Consecutive tile indices per dask task.

    Parameters
    ----------
    n_tiles, n_workers : int
    tiles_per_task : int, optional
        Default: about 4 tasks per worker.
    multiple : int
        Each run's length is a multiple of this (the batch size), so batches are the same as
        in one process.
    """
    per = tiles_per_task or max(multiple, math.ceil(n_tiles / (4 * n_workers)))
    per = int(math.ceil(per / multiple) * multiple)
    return [list(range(i, min(n_tiles, i + per))) for i in range(0, n_tiles, per)]


def _remote(
    slide_path: str,
    ref: str,
    load: Callable[[str], Any],
    work: Callable[..., Iterator],
    indices: list[int],
    args: tuple,
) -> list:
    """Worker side: open the slide and ``load(ref)`` (cached), run ``work``; its outputs."""
    record, obj = worker_slide(slide_path, ref, load)
    return [item for item in work(record, obj, indices, *args) if not isinstance(item, Progress)]


def run_tiles(
    work: Callable[..., Iterator],
    args: tuple,
    n_tiles: int,
    *,
    record: ImageRecord,
    obj: Any,
    scheduler: Any = None,
    slide_path: str | None = None,
    ref: str | None = None,
    load: Callable[[str], Any] | None = None,
    tiles_per_task: int | None = None,
    multiple: int = 1,
) -> Iterator[Any]:
    """Run ``work`` over tiles ``0 .. n_tiles - 1``; yield its progress and outputs.

    Parameters
    ----------
    work : callable
        ``work(record, obj, indices, *args)``: a generator of Progress and outputs.
    args : tuple
        Its further arguments (picklable for a cluster).
    n_tiles : int
    record, obj
        In this process: the opened slide and the loaded model or detector.
    scheduler : None, "local", str or distributed.Client
        ``None``: run here. Otherwise a cluster (:func:`napari_medseg.core.engine.cluster.
        connect`): ``"local"`` starts a two-worker ``LocalCluster``, ``"tcp://host:port"``
        joins a scheduler.
    slide_path, ref, load
        On a cluster: the slide file every worker opens, the model/detector reference and the
        module-level function that loads it on a worker.
    tiles_per_task, multiple
        How tiles are cut into tasks (:func:`task_runs`).

    Yields
    ------
    Progress or output
        In this process, as ``work`` yields them. On a cluster, first status messages
        (``Progress(0, n_tiles, ...)``), then the outputs of each task as it finishes (tasks
        finish in any order; outputs within a task keep their order).
    """
    if scheduler is None:
        yield from work(record, obj, list(range(n_tiles)), *args)
        return
    from napari_medseg.core.engine.cluster import as_finished, connect, worker_count

    yield Progress(0, n_tiles, "starting the dask cluster")
    client, close_client = connect(scheduler)
    try:
        n_workers = worker_count(client)
        runs = task_runs(n_tiles, n_workers, tiles_per_task, multiple)
        argsets = [(str(slide_path), str(ref), load, work, r, args) for r in runs]
        yield Progress(0, n_tiles, f"{n_tiles} tiles in {len(runs)} tasks on {n_workers} workers")
        with closing(as_finished(client, _remote, argsets)) as tasks:
            for _, outputs in tasks:
                yield from outputs
    finally:
        close_client()
