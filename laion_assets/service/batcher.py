"""A small dynamic batcher: requests that arrive together share one model call."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


class DynamicBatcher(Generic[T]):
    """Runs `encode` (items -> one row per item) on the items of the requests waiting together.

    A batch starts with the oldest waiting request and takes those behind it until it holds `max_items`
    (a request is never split, so a batch can end a little over). While requests are still being
    prepared (inside `preparing()`: fetched, decoded, tokenised), it waits up to `max_wait` seconds for
    them; with none on the way it goes at once, so a lone request pays no wait. While the model runs,
    new requests queue up and make the next batch, so under load batches fill without waiting.
    `encode` always runs in `executor`: give every batcher of one model the same one-thread executor
    and the model is never used by two threads at once. With `enabled` off, each request is a model
    call of its own (the benchmark's baseline).
    """

    def __init__(
        self,
        encode: Callable[[list[T]], np.ndarray],
        executor: Executor,
        max_items: int,
        max_wait: float,
        enabled: bool = True,
    ) -> None:
        self.encode, self.executor = encode, executor
        self.max_items, self.max_wait, self.enabled = max_items, max_wait, enabled
        self.model_calls = 0
        self.items = 0
        self._waiting: deque[tuple[list[T], asyncio.Future]] = deque()
        self._preparing = 0  # requests on their way to the batcher
        self._arrived = asyncio.Event()  # set when a request is queued or one on its way gives up
        self._worker: asyncio.Task | None = None

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Around the preparation of a request's items, so that a batch being collected waits for them."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1
            self._arrived.set()

    async def __call__(self, items: list[T]) -> np.ndarray:
        """The rows of `items`, in order."""
        loop = asyncio.get_running_loop()
        if not self.enabled:
            return await loop.run_in_executor(self.executor, self._run, items)
        if self._worker is None:
            self._worker = loop.create_task(self._serve(), name="dynamic-batcher")
        future = loop.create_future()
        self._waiting.append((items, future))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    def _run(self, items: list[T]) -> np.ndarray:
        self.model_calls += 1
        self.items += len(items)
        return self.encode(items)

    async def _next_batch(self) -> list[tuple[list[T], asyncio.Future]]:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        batch, size = [], 0
        while size < self.max_items:
            if not self._waiting:
                remaining = deadline - loop.time()
                if remaining <= 0 or not self._preparing:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            request = self._waiting.popleft()
            if not request[1].cancelled():  # its client went away
                batch.append(request)
                size += len(request[0])
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            items = [item for request, _ in batch for item in request]
            try:
                rows = await loop.run_in_executor(self.executor, self._run, items)
            except Exception as exc:  # every request of the batch gets the model's error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for request, future in batch:
                if not future.done():
                    future.set_result(rows[start : start + len(request)])
                start += len(request)
