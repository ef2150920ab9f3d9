"""dask.distributed connection shared by the batch, whole-slide segmentation and detection runs.

``scheduler`` everywhere means: ``None`` or ``"local"`` (a ``LocalCluster`` of worker processes,
one thread each, started and stopped by the run), ``"tcp://host:port"`` (an existing
scheduler; the run only connects and disconnects), or a ``distributed.Client`` (used as is,
left open).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["as_finished", "connect", "dask_client", "worker_count"]


def connect(scheduler: Any = "local", n_workers: int = 2) -> tuple[Any, Callable[[], None]]:
    """A ``distributed.Client`` for ``scheduler`` and the function that releases it.

    Parameters
    ----------
    scheduler : None, "local", str or distributed.Client
        See the module docstring.
    n_workers : int
        Worker processes of a local cluster.

    Returns
    -------
    (client, close)
        ``close()`` closes what this call opened (nothing for a given ``Client``).
    """
    from distributed import Client, LocalCluster

    if scheduler is None or scheduler == "local":
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=None)
        client = Client(cluster)

        def close() -> None:
            client.close()
            cluster.close()

        return client, close
    if isinstance(scheduler, str):
        client = Client(scheduler)
        return client, client.close
    return scheduler, lambda: None


def worker_count(client: Any) -> int:
    """Workers the scheduler knows now (at least 1, for sizing tasks)."""
    return max(1, len(client.scheduler_info().get("workers", {})))


def as_finished(
    client: Any, fn: Callable[..., Any], argsets: Sequence[tuple]
) -> Iterator[tuple[int, Any]]:
    """Submit ``fn(*args)`` for every ``args`` and yield ``(index, result)`` as tasks finish.

    Tasks not finished when the caller stops iterating (Cancel closes the caller's progress
    generator, or an error) are cancelled on the cluster.
    """
    from distributed import as_completed

    futures = [client.submit(fn, *args, pure=False) for args in argsets]
    index = {f.key: i for i, f in enumerate(futures)}
    try:
        for fut in as_completed(futures):
            yield index[fut.key], fut.result()
    finally:
        for f in futures:
            f.cancel()


@contextmanager
def dask_client(scheduler: Any = "local", n_workers: int = 2) -> Iterator[Any]:
    """:func:`connect` as a context manager (released on exit, also on errors and Cancel)."""
    client, close = connect(scheduler, n_workers)
    try:
        yield client
    finally:
        close()
