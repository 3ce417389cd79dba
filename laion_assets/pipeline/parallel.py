"""Overlapping slow calls: many small S3 reads at once (footers, shard files), or preprocessing ahead
of a model. Each call waits on the network or releases the GIL, so threads are enough."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# S3 round trips in flight at once for footer and shard reads: one round trip costs tens of ms, so
# 41,000 footers read one after the other would take minutes.
STORE_READS = 32


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


def store_map(fn: Callable[[T], R], items: Iterable[T], lookahead: int = 4 * STORE_READS) -> Iterator[R]:
    """`fn` over `items` with STORE_READS calls in flight, results in order."""
    with ThreadPoolExecutor(STORE_READS, thread_name_prefix="store-read") as pool:
        yield from ordered_map(pool, fn, items, lookahead)
