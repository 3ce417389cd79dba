"""Overlapping slow calls: many small S3 reads at once (footers, shard files), or preprocessing ahead
of a model. Each call waits on the network or releases the GIL, so threads are enough."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# S3 round trips in flight at once for footer and shard reads: one round trip costs tens of ms, so
# 41,000 footers read one after the other would take minutes.
STORE_READS = 32
# Shard rewrites in flight at once: each holds a shard's tables and is CPU-bound on a local disk, so
# more than a few only add memory (measured: 100 shards rewritten, 32 at once 25 s and 3.5 GiB, 2 at
# once 21 s and 0.6 GiB).
STORE_REWRITES = 4


def ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], lookahead: int
) -> Iterator[R]:
    """`map` over a pool, in order, with at most `lookahead` items in flight (bounded memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def store_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int = STORE_READS, lookahead: int | None = None
) -> Iterator[R]:
    """`fn` over `items` with `workers` calls running and `lookahead` (4 x `workers`) submitted at
    once, results in order."""
    with ThreadPoolExecutor(workers, thread_name_prefix="store") as pool:
        yield from ordered_map(pool, fn, items, lookahead or 4 * workers)


def pipelined(
    items: Iterable[T], work: Callable[[T, threading.Event], R], stop: Callable[[], None] | None = None
) -> Iterator[tuple[T, R]]:
    """`work(item, draining)` for each item, results in order; the next item starts as soon as the one
    before sets `draining` (only its tail is left: a shard's slowest hosts) or ends, so two run at
    once at most and the next one's work fills the time the last one spends waiting on its tail.

    Where an item fails, no item starts after it, and the one started beside it is finished and yielded
    before the failure is raised: its work (a shard's files) is done, and the caller records it. Where
    the caller stops (an error or an interrupt in its thread, or it closes the iterator), `stop()` is
    called before the items under way are waited for, so that they end at once: a terminated run
    waited for the whole download of the shards it had under way."""

    def run(item: T, draining: threading.Event) -> R:
        try:
            return work(item, draining)
        finally:
            draining.set()

    failure: Exception | None = None
    with ThreadPoolExecutor(2, thread_name_prefix="pipelined") as pool:
        try:
            started: deque[tuple[T, Future[R], threading.Event]] = deque()
            for item in items:
                if started:
                    started[-1][2].wait()
                    if started[-1][1].done() and started[-1][1].exception() is not None:
                        break  # failed before draining: the run ends with it
                draining = threading.Event()
                started.append((item, pool.submit(run, item, draining), draining))
                if len(started) == 2:
                    done, future, _ = started.popleft()
                    if (failure := future.exception()) is not None:
                        break
                    yield done, future.result()
            for done, future, _ in started:  # the last item, or the one under way when one failed
                if future.exception() is None:
                    yield done, future.result()
                else:
                    failure = failure or future.exception()
        except BaseException:
            if stop is not None:
                stop()
            raise
    if failure is not None:
        raise failure
