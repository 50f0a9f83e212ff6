"""The process pool that decodes and checks rows for `prepare`: `check_row` over many rows, in order.

Usage:
    from w2vbert_asr.pool import DecodePool, num_processes
    with DecodePool(rules, num_processes("auto")) as pool:
        for row, (example, reason, detail) in pool.map(rows): ...

Decoding MP3 dominates prepare, and it parallelises perfectly: each process gets the rules once and then
chunks of CHUNK_ROWS rows; results come back in row order, so what prepare writes does not depend on the
number of processes. At most 2 chunks per process are in flight, so memory stays bounded whatever the
split's size.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice

from . import UsageError
from .rows import Rules, check_row
from .sources import RawRow

# Rows per unit of work: small enough to balance the processes and keep the rows in flight few, big enough
# that handing them over costs little next to decoding ~16 clips.
CHUNK_ROWS = 16

# Set once in each decoding process by the pool's initializer (and in-process when num_proc is 1).
_RULES: Rules | None = None


def _init_worker(rules: Rules) -> None:
    global _RULES
    _RULES = rules


def _check_chunk(rows: list[RawRow]) -> list[tuple[dict | None, str, str]]:
    return [check_row(row, _RULES) for row in rows]


def num_processes(setting) -> int:
    """`data.num_proc` -> a process count: `auto` is every core this process may run on."""
    if setting in (None, "auto"):
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # macOS, Windows
            return os.cpu_count() or 1
    try:
        n = int(setting)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise UsageError(f"data.num_proc={setting!r}: give a number of processes >= 1, or auto")
    return n


class DecodePool:
    """Runs `check_row` over rows, in `num_proc` processes or in this one, and yields the results in row order."""

    def __init__(self, rules: Rules, num_proc: int = 1):
        self.rules, self.num_proc, self.pool = rules, num_proc, None

    def __enter__(self) -> DecodePool:
        if self.num_proc > 1:
            import multiprocessing

            # fork: the processes start in milliseconds with everything imported; they only run numpy,
            # soundfile and soxr. Elsewhere spawn (macOS frameworks are not fork-safe).
            method = "fork" if sys.platform == "linux" else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(self.num_proc, _init_worker, (self.rules,))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if exc[0] is None:
                self.pool.close()
            else:  # an error (or Ctrl-C) in this process: stop the workers now
                self.pool.terminate()
            self.pool.join()
            self.pool = None

    def map(self, rows: Iterable[RawRow]) -> Iterator[tuple[RawRow, tuple[dict | None, str, str]]]:
        chunks = iter(lambda it=iter(rows): list(islice(it, CHUNK_ROWS)), [])
        if self.pool is None:
            _init_worker(self.rules)
            for chunk in chunks:
                yield from zip(chunk, _check_chunk(chunk))
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, self.pool.apply_async(_check_chunk, (chunk,))))
            if len(pending) >= 2 * self.num_proc:
                done, result = pending.popleft()
                yield from zip(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get())
