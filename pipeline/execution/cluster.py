"""Where a stage's blocks run: in this process (default) or on a Dask distributed cluster.

Every stage is a set of independent *block tasks* (a frames block, a feature block, a
BOLD voxel chunk, a ridge voxel chunk).  A task reads its inputs from the workspace,
computes, writes its own shard-aligned region and returns a small result; the
*client process* (the one running the CLI) then marks the block done in the store.
Only the client writes the ``block_done`` flags and the group state, so workers never
race on shared metadata, and a block whose task died (worker killed) is simply not
marked: Dask retries it, and a rerun of the command redoes it otherwise.

* :func:`dask_client` opens the cluster for one CLI command: ``scheduler=ADDRESS``
  connects to a running ``dask scheduler``; ``workers=N`` starts a
  ``distributed.LocalCluster`` of N single-threaded process workers (each with
  ``memory_limit``); neither gives ``None`` (local threads, no cluster).
* :func:`active_client` is how a stage learns whether it runs on a cluster.
* :func:`run_block_tasks` submits the tasks (a bounded number in flight), yields
  ``(key, result)`` as they complete, and retries a task whose worker died.

Workers must see the workspace at the same path as the client (one machine, or a
shared file system on a cluster).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Callable, Hashable, Iterator, Sequence

from voxelflow.pipeline.errors import InputError

TASK_RETRIES = 3  # a task whose worker died is resubmitted this many times
IN_FLIGHT_PER_THREAD = 2  # tasks submitted ahead per worker thread (bounds memory)
CONNECT_TIMEOUT = "10s"  # to reach a --scheduler address


def active_client():
    """The ``distributed.Client`` of this process, or ``None`` (local execution)."""
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None,
                memory_limit: str | None = None, threads_per_worker: int = 1
                ) -> Iterator[Any]:
    """Yield a ``distributed.Client`` (or ``None`` when neither option is given).

    ``scheduler``: address of a running scheduler (``tcp://HOST:PORT``).
    ``workers``: start a ``LocalCluster`` of that many process workers with
    ``threads_per_worker`` threads and ``memory_limit`` each (e.g. ``"4GiB"``).
    The client is the default client while the block runs and is closed after it
    (the LocalCluster too).
    """
    check_cluster_options(scheduler, workers, memory_limit)
    if not scheduler and workers is None:
        yield None
        return
    with _scheduler_config_restored():
        yield from _open_client(scheduler, workers, memory_limit, threads_per_worker)


@contextlib.contextmanager
def _scheduler_config_restored() -> Iterator[None]:
    """Put dask's ``scheduler`` setting back as it was: a default client sets it to
    "dask.distributed" and leaves it so when another client is still open, and a
    later ``compute()`` in the same process would then wait on a closed cluster."""
    import dask

    before = dask.config.config.get("scheduler", _MISSING)
    try:
        yield
    finally:
        if before is _MISSING:
            dask.config.config.pop("scheduler", None)
        else:
            dask.config.config["scheduler"] = before


_MISSING = object()


def _forget_failed_client(before: Any) -> None:
    """A ``Client`` that failed to connect has already registered itself as the
    default client (distributed does so before connecting) and is never closed: drop
    it, so that a later ``compute()`` in this process does not wait on it forever."""
    from distributed.client import _del_global_client  # no public way to unregister

    failed = active_client()
    if failed is not None and failed is not before:
        _del_global_client(failed)


def _open_client(scheduler: str | None, workers: int | None, memory_limit: str | None,
                 threads_per_worker: int) -> Iterator[Any]:
    """:func:`dask_client`'s body: connect to ``scheduler`` or start a LocalCluster."""
    from distributed import Client, LocalCluster

    if scheduler:
        before = active_client()
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT, set_as_default=True)
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: unknown scheme
            _forget_failed_client(before)
            raise InputError(f"--scheduler {scheduler}: cannot connect ({exc}); start one "
                             f"with `dask scheduler` and `dask worker ADDRESS`") from None
        try:
            yield client
        finally:
            client.close()
        return
    # dashboard ":0" takes any free port (None still binds 8787 and warns when it is taken)
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=threads_per_worker,
                           processes=True, memory_limit=memory_limit or "auto",
                           dashboard_address=":0", silence_logs=40)
    client = Client(cluster, set_as_default=True)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def check_cluster_options(scheduler: str | None, workers: int | None,
                          memory_limit: str | None) -> None:
    """One-line :class:`InputError` for options that cannot open a cluster: both
    ``--scheduler`` and ``--workers``, ``--workers`` < 1, a ``--memory-limit`` without
    ``--workers`` or that is neither ``auto`` nor a positive size (Dask's
    ``parse_bytes``: ``4GiB``, ``500MB``)."""
    if scheduler and workers is not None:
        raise InputError("give either --scheduler ADDRESS or --workers N, not both")
    if workers is not None and int(workers) < 1:
        raise InputError(f"--workers must be a positive number of worker processes (got "
                         f"{workers}); leave it out to run in this process")
    if memory_limit is None:
        return
    if workers is None:
        raise InputError("--memory-limit applies to the local cluster of --workers N; "
                         "set it on your `dask worker` processes instead")
    if memory_limit.strip().lower() == "auto":  # distributed's default: a share of the RAM
        return
    from dask.utils import parse_bytes

    try:
        limit = parse_bytes(memory_limit)
    except (ValueError, TypeError):
        limit = None
    if limit is None or limit <= 0:
        raise InputError(f"--memory-limit {memory_limit!r}: not a size; give bytes with a "
                         f"unit, e.g. 4GiB or 500MB")


def client_threads(client) -> int:
    """Total worker threads of the cluster (at least 1)."""
    return max(1, sum(int(n) for n in client.nthreads().values()))


def run_block_tasks(client, fn: Callable[..., Any], tasks: Sequence[tuple[Hashable, tuple]],
                    *, broadcast: dict[str, Any] | None = None,
                    in_flight: int | None = None) -> Iterator[tuple[Hashable, Any]]:
    """Run ``fn(*args, **broadcast)`` for each ``(key, args)`` of ``tasks``; yield
    ``(key, result)`` in completion order.

    With ``client=None`` the tasks run here, one after another, in order.  On a
    cluster at most ``in_flight`` tasks (default two per worker thread) are submitted
    at once, ``broadcast`` values are scattered to every worker once (large shared
    inputs such as ridge factors), and a task that fails because its worker died is
    retried up to :data:`TASK_RETRIES` times (Dask's ``retries``).  An exception
    raised by ``fn`` itself is re-raised here.
    """
    broadcast = dict(broadcast or {})
    if client is None:
        for key, args in tasks:
            yield key, fn(*args, **broadcast)
        return
    from distributed import as_completed

    if broadcast:
        scattered = client.scatter(list(broadcast.values()), broadcast=True, hash=False)
        broadcast = dict(zip(broadcast.keys(), scattered))
    limit = in_flight or IN_FLIGHT_PER_THREAD * client_threads(client)
    todo = list(tasks)
    # A token per call: two calls with the same fn and block keys (two models' feature
    # stages, a rerun) never share a Dask key, whose old result the scheduler may still hold.
    token = uuid.uuid4().hex[:8]
    keys: dict[Any, Hashable] = {}
    pending = as_completed()

    def submit(key: Hashable, args: tuple) -> None:
        future = client.submit(fn, *args, **broadcast, pure=False, retries=TASK_RETRIES,
                               key=f"voxelflow-{fn.__name__}-{token}-{_key_text(key)}")
        keys[future.key] = key
        pending.add(future)

    for key, args in todo[:limit]:
        submit(key, args)
    rest = iter(todo[limit:])
    for future in pending:
        result = future.result()  # re-raises the task's own exception
        key = keys.pop(future.key)
        future.release()
        nxt = next(rest, None)
        if nxt is not None:
            submit(*nxt)
        yield key, result


def _key_text(key: Hashable) -> str:
    text = "-".join(map(str, key)) if isinstance(key, tuple) else str(key)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def require_shared_path(client, path: str | os.PathLike) -> None:
    """Fail with one line when the cluster's workers cannot see ``path`` (the workspace)."""
    if client is None:
        return
    path = os.path.abspath(path)
    seen = client.run(os.path.exists, path)
    blind = [w for w, ok in seen.items() if not ok]
    if blind:
        raise InputError(f"{path}: not visible to dask worker(s) {', '.join(blind[:3])}; the "
                         f"workspace must be on a file system the workers share (same path)")


def scheduler_info_line(client) -> str:
    """``'4 workers, 4 threads at tcp://...'`` for the CLI's first line."""
    if client is None:
        return "local threads"
    workers = client.scheduler_info().get("workers", {})
    return (f"{len(workers)} dask worker(s), {client_threads(client)} thread(s) at "
            f"{client.scheduler.address}")

