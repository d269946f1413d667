"""Run a stage's blocks: one per-block function, here on threads or on a Dask cluster.

Every stage is a set of independent blocks (a frames shard, a features block, a BOLD
voxel chunk, a ridge voxel block).  A stage describes its per-block work once, as a
:class:`BlockWork` (a small picklable object with two methods):

* ``compute(key)`` reads the block's inputs and returns its outputs (host arrays);
* ``write(key, outputs)`` writes the block's data region into the workspace (never
  its done flag) and returns a small summary (e.g. how many samples it wrote).

:func:`run_blocks` then runs that same work wherever the command runs:

* **here** (no Dask client): ``compute`` runs on the calling thread, block after block,
  while one writer thread writes the previous block and then marks it done, so
  compression and disk writes overlap the next block's computation and at most two
  blocks are in memory;
* **on a cluster** (``distributed`` client active): the work object is sent to every
  worker once, each block is one task ``write(key, compute(key))`` on a worker, and the
  client marks the block done when its task has finished.  A task whose worker died is
  retried; a block that is never marked is redone by the next run.

Only the calling (client) process marks blocks done, so workers never race on shared
metadata.  :func:`prefetch` is the helper for work whose ``compute`` should read its
next input piece on a background thread while it computes on the current one.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterable, Iterator, Protocol, Sequence

from voxelflow.pipeline.execution.cluster import active_client, run_block_tasks


class BlockWork(Protocol):
    """The per-block work of one stage (picklable: it travels to cluster workers)."""

    def compute(self, key: Hashable) -> Any:
        """Read the inputs of block ``key`` and compute its outputs."""

    def write(self, key: Hashable, outputs: Any) -> Any:
        """Write the data of block ``key`` (not its done flag); return a small summary."""


def _block_task(key: Hashable, *, work: BlockWork) -> Any:
    """What a cluster task runs for one block: compute it, write it, return the summary."""
    return work.write(key, work.compute(key))


def run_blocks(work: BlockWork, keys: Sequence[Hashable], *,
               mark_done: Callable[[Hashable], None] | None = None,
               on_block: Callable[[Hashable, Any], None] | None = None,
               client: Any = "active", overlap: bool = True) -> int:
    """Compute and write every block of ``keys``; return the number of blocks done.

    ``mark_done(key)`` is called in this process once the block's data is written
    (``None``: the work records completion itself); ``on_block(key, summary)`` after
    that (progress bars, counters).  ``client`` defaults to the active Dask client
    (``None`` forces local execution).  ``overlap=False`` (here only) computes, writes
    and marks each block on the calling thread before the next, so one block is in
    memory instead of two: for work whose block is as large as its memory budget
    allows.  An exception raised by the work stops the run and is re-raised here;
    blocks already marked stay done.
    """
    if client == "active":
        client = active_client()
    if client is not None:
        return _run_on_cluster(client, work, keys, mark_done, on_block)
    return _run_here(work, keys, mark_done, on_block, overlap)


def _run_here(work: BlockWork, keys: Sequence[Hashable],
              mark_done: Callable[[Hashable], None] | None,
              on_block: Callable[[Hashable, Any], None] | None, overlap: bool = True) -> int:
    """Compute on this thread; one writer thread writes and marks the previous block
    (``overlap=False``: this thread writes and marks each block itself)."""

    def write_and_mark(key: Hashable, outputs: Any) -> Any:
        summary = work.write(key, outputs)
        if mark_done is not None:
            mark_done(key)
        return summary

    done = 0
    if not overlap:
        for key in keys:
            summary = write_and_mark(key, work.compute(key))
            if on_block is not None:
                on_block(key, summary)
            done += 1
        return done
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxelflow-writer") as pool:
        previous: tuple[Hashable, Future] | None = None
        for key in keys:
            outputs = work.compute(key)
            if previous is not None:
                done += _finish(previous, on_block)
            previous = (key, pool.submit(write_and_mark, key, outputs))
            del outputs
        if previous is not None:
            done += _finish(previous, on_block)
    return done


def _finish(item: tuple[Hashable, Future], on_block) -> int:
    key, future = item
    summary = future.result()  # re-raises the writer's exception
    if on_block is not None:
        on_block(key, summary)
    return 1


def _run_on_cluster(client: Any, work: BlockWork, keys: Sequence[Hashable],
                    mark_done: Callable[[Hashable], None] | None,
                    on_block: Callable[[Hashable, Any], None] | None) -> int:
    """One task per block; ``work`` is scattered to every worker once."""
    tasks = [(key, (key,)) for key in keys]
    done = 0
    for key, summary in run_block_tasks(client, _block_task, tasks, broadcast={"work": work}):
        if mark_done is not None:
            mark_done(key)
        if on_block is not None:
            on_block(key, summary)
        done += 1
    return done


_END = object()


def prefetch(items: Iterable[Any], depth: int = 2, name: str = "voxelflow-reader"
             ) -> Iterator[Any]:
    """Iterate over ``items`` while a background thread produces up to ``depth`` ahead.

    For reads (Zarr decompression, file I/O) that should overlap the computation on
    the previous item.  An exception in the producer is re-raised at the point of
    iteration where its item would have come; leaving the loop early stops the
    producer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            failure.append(exc)
        finally:
            while not stop.is_set():
                try:
                    q.put(_END, timeout=0.1)
                    return
                except queue.Full:
                    continue

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                break
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
        thread.join()
