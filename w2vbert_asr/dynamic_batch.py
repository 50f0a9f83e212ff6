"""Dynamic batching: items that concurrent callers submit run together, one batched call at a time, in one
worker thread.

The worker takes the oldest waiting item, waits until `max_batch` items are queued or `max_wait_ms` have
passed since that item arrived, and calls `run_batch(values) -> results` once on up to `max_batch` of them.
With `size` (e.g. len), when more items wait than fit, the oldest is joined by those closest to it in size,
so a padded batch wastes less; every item is the oldest in its turn, so none waits for ever.
A caller holds one `concurrent.futures.Future` per item; cancelling one that no batch has taken yet drops
it. Nothing here knows about models: serve_engine.py batches the audio chunks of concurrent requests so
each forward pass of the model sees several of them.

Usage:
    batcher = DynamicBatcher(lambda xs: [x * 2 for x in xs], max_batch=8, max_wait_ms=10).start()
    futures = batcher.submit([1, 2, 3])          # from any thread
    [f.result() for f in futures]               # -> [2, 4, 6]
    batcher.close()
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """Set on the futures of items still queued when the batcher closes."""


@dataclass
class _Item:
    value: object
    future: Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What the worker has done: batches run, items in them, the largest batch."""

    batches: int = 0
    items: int = 0
    largest: int = 0

    def to_dict(self) -> dict:
        mean = self.items / self.batches if self.batches else 0.0
        return {"batches": self.batches, "items": self.items, "largest": self.largest, "mean": round(mean, 2)}


class DynamicBatcher:
    """run_batch(values) -> results (same length, same order) runs in the worker thread only, so a model
    behind it is never called from two threads at once."""

    def __init__(self, run_batch: Callable[[list], Sequence], max_batch: int, max_wait_ms: float,
                 name: str = "dynamic-batcher", size: Callable[[object], float] | None = None):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_wait_ms={max_wait_ms} >= 0")
        self.run_batch, self.size = run_batch, size
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000
        self.stats = BatchStats()
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def start(self) -> DynamicBatcher:
        self._thread.start()
        return self

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, values: Sequence) -> list[Future]:
        """Queue values -> one Future each, resolved by the worker (its result, or the batch's exception)."""
        items = [_Item(v, Future()) for v in values]
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._queue.extend(items)
            self._cond.notify()
        return [item.future for item in items]

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker after its current batch; items still queued fail with BatcherClosed."""
        with self._cond:
            self._closed = True
            left, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for item in left:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherClosed("the batcher closed before this item ran"))
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _next_batch(self) -> list[_Item] | None:
        """Block until a batch is due -> its items (cancelled ones dropped); None once closed."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                deadline = self._queue[0].arrived + self.max_wait
                while len(self._queue) < self.max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = [item for item in self._take() if item.future.set_running_or_notify_cancel()]
                if batch:  # (set_running_or_notify_cancel is False for an item its caller cancelled)
                    return batch

    def _take(self) -> list[_Item]:
        """Up to max_batch items off the queue: the oldest, and the next in line or, with `size`, those
        closest to it in size."""
        if self.size is None or len(self._queue) <= self.max_batch:
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        first, rest = self._queue[0], list(self._queue)[1:]
        target = self.size(first.value)
        chosen = sorted(rest, key=lambda item: abs(self.size(item.value) - target))[: self.max_batch - 1]
        keep = {id(item) for item in chosen}
        self._queue = collections.deque(item for item in rest if id(item) not in keep)
        return [first, *(item for item in rest if id(item) in keep)]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            try:
                results = list(self.run_batch([item.value for item in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except BaseException as e:  # noqa: BLE001 - every caller of this batch gets the error
                log.error("a batch of %d failed: %s: %s", len(batch), type(e).__name__, e)
                for item in batch:
                    item.future.set_exception(e)
                continue
            for item, result in zip(batch, results):
                item.future.set_result(result)
