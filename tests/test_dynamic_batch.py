"""The dynamic batcher: up to max_batch items per call, no longer than max_wait_ms for a batch to fill, like
sizes together, cancelled items dropped, a failing batch failing only its own callers, and close."""

from __future__ import annotations

import threading
import time

import pytest

from w2vbert_asr.dynamic_batch import BatcherClosed, DynamicBatcher


class Recorder:
    def __init__(self, delay: float = 0.0):
        self.batches, self.delay = [], delay

    def __call__(self, values):
        self.batches.append(list(values))
        time.sleep(self.delay)
        if "boom" in values:
            raise RuntimeError("boom")
        return [v * 2 if isinstance(v, int) else v for v in values]


def test_concurrent_items_share_batches_of_at_most_max_batch():
    run = Recorder(delay=0.05)
    batcher = DynamicBatcher(run, max_batch=4, max_wait_ms=200).start()
    futures = []
    threads = [threading.Thread(target=lambda i=i: futures.extend(batcher.submit([i]))) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(f.result(timeout=10) for f in futures) == [2 * i for i in range(10)]
    assert all(len(b) <= 4 for b in run.batches) and len(run.batches) <= 4
    assert batcher.stats.items == 10 and batcher.stats.largest == 4
    batcher.close()


def test_a_lone_item_waits_at_most_max_wait():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch=8, max_wait_ms=50).start()
    started = time.monotonic()
    [future] = batcher.submit([21])
    assert future.result(timeout=5) == 42
    assert 0.04 <= time.monotonic() - started < 2.0
    assert run.batches == [[21]]
    batcher.close()


def test_max_batch_1_never_batches():
    run = Recorder(delay=0.01)
    batcher = DynamicBatcher(run, max_batch=1, max_wait_ms=100).start()
    futures = batcher.submit(list(range(5)))
    assert [f.result(timeout=5) for f in futures] == [0, 2, 4, 6, 8]
    assert run.batches == [[i] for i in range(5)]
    batcher.close()


def test_the_oldest_goes_first_with_the_items_closest_in_size():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch=3, max_wait_ms=0, size=len)
    futures = batcher.submit(["aaaa", "b", "cccccccc", "ddd", "e", "ffff", "gggggggg"])
    batcher.start()
    for f in futures:
        f.result(timeout=5)
    assert run.batches[0] == ["aaaa", "ddd", "ffff"]  # the oldest, and the two nearest its length
    assert sorted(len(v) for b in run.batches for v in b) == sorted(len(v) for v in
                                                                    ["aaaa", "b", "cccccccc", "ddd", "e", "ffff", "gggggggg"])
    batcher.close()


def test_cancelled_items_are_dropped_and_errors_reach_only_their_batch():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch=2, max_wait_ms=0)
    first, dropped, same_batch, boom, later = batcher.submit([1, 2, 3, "boom", 4])
    assert dropped.cancel()
    batcher.start()
    assert first.result(timeout=5) == 2 and later.result(timeout=5) == 8
    for failed in (same_batch, boom):
        with pytest.raises(RuntimeError, match="boom"):
            failed.result(timeout=5)
    assert run.batches == [[1], [3, "boom"], [4]]  # 2 never ran
    batcher.close()


def test_close_fails_what_is_still_queued_and_refuses_more():
    batcher = DynamicBatcher(Recorder(), max_batch=2, max_wait_ms=0)
    [queued] = batcher.submit([1])
    batcher.close()
    with pytest.raises(BatcherClosed):
        queued.result(timeout=5)
    with pytest.raises(BatcherClosed):
        batcher.submit([2])


def test_a_wrong_number_of_results_is_an_error():
    batcher = DynamicBatcher(lambda values: values[:-1], max_batch=2, max_wait_ms=0)
    futures = batcher.submit([1, 2])
    batcher.start()
    for f in futures:
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            f.result(timeout=5)
    batcher.close()
