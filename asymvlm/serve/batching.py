"""Dynamic batching: concurrent requests grouped into one model call.

A :class:`DynamicBatcher` owns a queue of work items and one worker task. The worker waits for
the first item, then gathers more until the batch holds ``max_batch`` units of work or
``max_wait_s`` has passed since the first, and runs ``fn(items) -> results`` once, in the model
thread (an executor shared by every batcher of a service, so one forward runs at a time and the
event loop keeps accepting requests meanwhile). While a batch runs, new requests queue up and
form the next batch: under load the batches grow by themselves, at no added latency.

The wait for company is adaptive: it applies only after a batch of more than one unit (requests
are arriving together). A lone client never waits — measured, a fixed 2 ms wait cost a single
client 20% of its throughput for nothing (``bench/serve.py``).

``fn`` is the same function the one-by-one path calls with a single item, so batched and
unbatched results come from one code path. If a batch fails, its items are retried one by one,
so one bad item cannot fail the requests it happened to share a batch with.

Hand-written on purpose: the batching libraries for Python serving (Ray Serve's ``@serve.batch``,
BentoML's adaptive batching) come with their own servers and runtimes; this is ~100 lines over
asyncio.

Example:
    >>> import asyncio
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> calls = []
    >>> def double(items):
    ...     calls.append(len(items))
    ...     return [2 * x for x in items]
    >>> async def main():
    ...     b = DynamicBatcher(double, max_batch=8, max_wait_s=0.05, executor=ThreadPoolExecutor(1))
    ...     out = await asyncio.gather(*(b.submit(i) for i in range(5)))
    ...     await b.close()
    ...     return out
    >>> asyncio.run(main()), calls
    ([0, 2, 4, 6, 8], [5])
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from asymvlm.errors import ConfigError

__all__ = ["DynamicBatcher", "Overloaded"]


class Overloaded(RuntimeError):
    """The batcher's queue is full (the service answers 503 with Retry-After)."""


class DynamicBatcher:
    """Group concurrent :meth:`submit` calls into calls of ``fn(items)``.

    Args:
        fn: ``items -> results`` (same length, same order); runs in ``executor``.
        max_batch: the most units of work per call (``cost(item)`` units each; an item costing more
            than ``max_batch`` runs alone).
        max_wait_s: how long the first item of a batch may wait for company (0: take what is queued).
        executor: where ``fn`` runs (one thread: one model call at a time).
        max_queue: the most queued units; beyond it :meth:`submit` raises :class:`Overloaded`.
        cost: units of work of an item (e.g. its number of queries); 1 by default.
        on_batch: called with ``(units, seconds waited by the first item)`` for each batch (metrics).
    """

    def __init__(
        self,
        fn: Callable[[Sequence[Any]], Sequence[Any]],
        *,
        max_batch: int,
        max_wait_s: float,
        executor: Executor,
        max_queue: int = 4096,
        cost: Callable[[Any], int] = lambda item: 1,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ConfigError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.executor = executor
        self.max_queue = max_queue
        self.cost = cost
        self.on_batch = on_batch
        self._queue: deque[tuple[Any, asyncio.Future, int, float]] = deque()
        self._queued_units = 0
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._last_units = 1  # units of the previous batch: > 1 means requests arrive together

    @property
    def queued(self) -> int:
        """Units of work waiting (not yet in a running batch)."""
        return self._queued_units

    async def submit(self, item: Any) -> Any:
        """Queue ``item`` and wait for its result (``fn``'s exception for it propagates)."""
        units = max(1, int(self.cost(item)))
        if self._queued_units + units > self.max_queue:
            raise Overloaded(f"the queue holds {self._queued_units} units of work (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        fut = loop.create_future()
        self._queue.append((item, fut, units, time.perf_counter()))
        self._queued_units += units
        self._wake.set()
        return await fut

    def _take(self) -> list[tuple[Any, asyncio.Future, int, float]]:
        batch, units = [], 0
        while self._queue:
            item = self._queue[0]
            if batch and units + item[2] > self.max_batch:
                break
            self._queue.popleft()
            self._queued_units -= item[2]
            if item[1].cancelled():  # the client went away before its turn
                continue
            batch.append(item)
            units += item[2]
            if units >= self.max_batch:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.max_wait_s > 0 and self._last_units > 1 and self._queued_units < self.max_batch:
                deadline = self._queue[0][3] + self.max_wait_s
                while self._queued_units < self.max_batch:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            self._last_units = sum(b[2] for b in batch)
            if self.on_batch is not None:
                self.on_batch(self._last_units, time.perf_counter() - batch[0][3])
            items = [b[0] for b in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} items")
                outcomes = [(r, None) for r in results]
            except Exception as err:  # noqa: BLE001 - handed to the callers
                outcomes = [(None, err)] if len(items) == 1 else await self._one_by_one(items)
            for (_, fut, _, _), (result, err) in zip(batch, outcomes):
                if fut.done():
                    continue
                if err is None:
                    fut.set_result(result)
                else:
                    fut.set_exception(err)

    async def _one_by_one(self, items: list[Any]) -> list[tuple[Any, BaseException | None]]:
        """Run every item of a failed batch alone, so only the failing ones fail."""
        loop = asyncio.get_running_loop()
        outcomes: list[tuple[Any, BaseException | None]] = []
        for it in items:
            try:
                outcomes.append(((await loop.run_in_executor(self.executor, self.fn, [it]))[0], None))
            except Exception as err:  # noqa: BLE001 - handed to that item's caller
                outcomes.append((None, err))
        return outcomes

    async def close(self) -> None:
        """Stop the worker (queued callers get ``CancelledError``)."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._queue:
            _, fut, _, _ = self._queue.popleft()
            if not fut.done():
                fut.cancel()
        self._queued_units = 0
