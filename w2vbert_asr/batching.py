"""Duration-bucketed dynamic batching for variable-length speech.

A batch's cost is its padded length in seconds, ``len(batch) * max(duration in batch)``,
because the encoder pads every utterance to the longest one. Random batches of speech
whose durations spread over 1-10 s waste a large share of compute on padding; globally
sorted batches waste almost none but are identical every epoch. ``DurationBatchSampler``
sits in between:

1. sort utterances by duration and cut the sorted order into buckets of similar length;
2. each epoch, shuffle inside every bucket and cut the bucket into batches of a fixed
   size derived from the bucket's longest utterance (so both caps hold whatever the order);
3. shuffle the order of all batches across buckets, deterministically from (seed, epoch);
4. deal batches round-robin to the distributed ranks.

Because the batch size inside a bucket does not depend on the shuffle, the number of
batches is the same every epoch, so ``__len__`` is stable and equal on every rank.

Usage (inside a training loop; see ``DurationBatchSampler`` for checkpointing)::

    sampler = DurationBatchSampler(durations, max_seconds=200, max_batch_size=32,
                                   seed=0, num_replicas=world_size, rank=rank)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

# Default bucketing (bucket_width=None) cuts the sorted order into buckets holding about
# this many full batches each. More batches per bucket means more variety in which
# utterances meet in a batch, but a wider duration spread inside the bucket and so more
# padding; 4 keeps padding at or below 1 % on speech-like 1-10 s durations at caps of
# 100-400 s per batch (benchmarks/batching.py).
BATCHES_PER_BUCKET = 4


def _as_durations(durations) -> np.ndarray:
    """Validate ``durations`` (any 1-D sequence of seconds) into a float64 array ``(N,)``."""
    if isinstance(durations, torch.Tensor):
        durations = durations.detach().cpu().numpy()
    arr = np.asarray(durations, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"durations must be a 1-D sequence of seconds, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("durations is empty: the dataset has no utterances to batch")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"durations[{i}] = {arr[i]!r} is not a positive finite number of seconds "
            f"({bad.size} such rows); drop or fix row {i} of the manifest"
        )
    return arr


def greedy_batches(
    order: Sequence[int], durations, max_seconds: float, max_batch_size: int
) -> list[list[int]]:
    """Pack ``order`` into consecutive batches, greedily, under both caps.

    A batch grows while ``(len + 1) * max(duration) <= max_seconds`` and
    ``len + 1 <= max_batch_size``. An utterance longer than ``max_seconds`` forms a batch
    of one (it is never dropped). Used for the random/sorted baselines in the benchmark.
    """
    d = np.asarray(durations, dtype=np.float64)
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0.0
    for i in order:
        i = int(i)
        new_max = max(cur_max, d[i])
        if cur and (len(cur) + 1 > max_batch_size or (len(cur) + 1) * new_max > max_seconds):
            batches.append(cur)
            cur, new_max = [], d[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def padding_share(batches: list[list[int]], durations) -> float:
    """Share of padding in the padded batches: padded / (padded + real) seconds.

    Frames are proportional to seconds, so this equals padded frames / total frames.
    0 means no padding; a batch of one never pads.
    """
    d = np.asarray(durations, dtype=np.float64)
    total = 0.0  # padded-batch seconds, sum of len(batch) * max(batch)
    real = 0.0
    for b in batches:
        if not b:
            continue
        db = d[np.asarray(b)]
        total += len(b) * db.max()
        real += db.sum()
    return 0.0 if total == 0 else float((total - real) / total)


class DurationBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding lists of dataset indices, bucketed by duration.

    Args:
        durations: seconds per utterance, ``(N,)``; all positive and finite.
        max_seconds: cap on a batch's padded seconds, ``len(batch) * max(duration)``.
        max_batch_size: cap on utterances per batch.
        shuffle: shuffle within buckets and the batch order each epoch. With ``False`` the
            batches come in ascending duration order, the same every epoch (for evaluation).
        seed: base seed; batches depend only on (seed, epoch), never on global RNG state.
        num_replicas, rank: distributed data parallel world size and this process's rank.
        bucket_width: width in seconds of fixed-width buckets ``[k*w, (k+1)*w)``. ``None``
            (default) cuts the sorted order into equal-count buckets of about
            ``BATCHES_PER_BUCKET`` full batches, which adapts to any duration distribution.

    Guarantees:
        * every batch has ``len <= max_batch_size`` and ``len * max(duration) <= max_seconds``,
          except that an utterance longer than ``max_seconds`` is yielded alone in a batch
          of one, because dropping it would silently lose data (filter such rows beforehand
          if the model cannot fit them);
        * each epoch every index appears in exactly one batch across all ranks;
        * remainder: when the batch count is not divisible by ``num_replicas``, the ranks
          that are one batch short repeat their own first batch of the epoch, so every rank
          yields ``len(self)`` batches, no data is dropped and ranks stay disjoint. (Only if
          there are fewer batches than ranks does a rank repeat another rank's batch.)

    Checkpointing: ``__iter__`` does not count what it yields, because a DataLoader with
    workers pulls batches from the sampler ahead of the training step (prefetch), so a
    yield count would run ahead of the steps actually taken. Call ``advance()`` once per
    batch consumed by the training step; ``state_dict()`` then records
    ``{"epoch", "batches_done"}`` and after ``load_state_dict`` the next ``__iter__``
    starts at batch ``batches_done`` of that epoch. ``set_epoch`` to a different epoch
    resets ``batches_done`` to 0; setting the same epoch again (as a resumed loop does)
    keeps it. ``__len__`` is always the full per-rank epoch length.
    """

    def __init__(
        self,
        durations,
        max_seconds: float,
        max_batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        bucket_width: float | None = None,
    ):
        self.durations = _as_durations(durations)
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        if int(max_batch_size) != max_batch_size or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {rank=} {num_replicas=}")
        if bucket_width is not None and not bucket_width > 0:
            raise ValueError(f"bucket_width must be > 0 seconds or None, got {bucket_width}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.max_seconds = float(max_seconds)
        self.max_batch_size = int(max_batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.bucket_width = bucket_width
        self.epoch = 0
        self.batches_done = 0
        # (indices sorted by duration, batch size) per bucket; fixed for the sampler's life.
        self._buckets = self._make_buckets()
        self._num_batches = sum(math.ceil(len(idx) / size) for idx, size in self._buckets)

    def _batch_size_for(self, longest: float) -> int:
        """Batch size that keeps ``size * longest <= max_seconds`` and the count cap (>= 1)."""
        return max(1, min(self.max_batch_size, math.floor(self.max_seconds / longest)))

    def _make_buckets(self) -> list[tuple[np.ndarray, int]]:
        d = self.durations
        order = np.argsort(d, kind="stable")  # stable: ties keep index order, deterministic
        too_long = d[order] > self.max_seconds
        # Each over-long utterance is its own bucket of batch size 1, so it cannot force
        # batch size 1 on the normal utterances it would otherwise share a bucket with.
        buckets = [(order[j : j + 1], 1) for j in np.flatnonzero(too_long)]
        order = order[~too_long]
        if order.size == 0:
            return buckets
        if self.bucket_width is not None:
            keys = np.floor(d[order] / self.bucket_width)
            cuts = np.flatnonzero(np.diff(keys)) + 1
            groups = np.split(order, cuts)
        else:
            groups = []
            start = 0
            while start < order.size:
                # Size the bucket from its first (shortest) utterance's batch size; longer
                # ones in it get smaller batches, so it holds at least BATCHES_PER_BUCKET.
                n = BATCHES_PER_BUCKET * self._batch_size_for(d[order[start]])
                groups.append(order[start : start + n])
                start += n
        buckets += [(g, self._batch_size_for(d[g[-1]])) for g in groups]
        return buckets

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` across ranks, in global order (length ``_num_batches``)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        batches: list[list[int]] = []
        for idx, size in self._buckets:
            if self.shuffle:
                idx = rng.permutation(idx)
            batches += [idx[j : j + size].tolist() for j in range(0, len(idx), size)]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's full batch list for ``epoch`` (default: current), ignoring resume."""
        batches = self._epoch_batches(self.epoch if epoch is None else epoch)
        mine = batches[self.rank :: self.num_replicas]
        if len(mine) < len(self):
            # Remainder: repeat own first batch; fall back to another rank's batch only when
            # there are fewer batches than ranks and this rank got none.
            mine.append(mine[0] if mine else batches[self.rank % len(batches)])
        return mine

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.batches_done = 0
        self.epoch = int(epoch)

    def advance(self, n: int = 1) -> None:
        """Record that the training loop consumed ``n`` more batches of this epoch."""
        if n < 0 or self.batches_done + n > len(self):
            raise ValueError(f"advance({n}) from {self.batches_done} leaves the epoch of {len(self)} batches")
        self.batches_done += n

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.rank_batches()[self.batches_done :]

    def __len__(self) -> int:
        return math.ceil(self._num_batches / self.num_replicas)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "batches_done"} - set(state)
        if missing:
            raise KeyError(f"sampler state is missing {sorted(missing)}; got keys {sorted(state)}")
        done = int(state["batches_done"])
        if not 0 <= done <= len(self):
            raise ValueError(
                f"sampler state batches_done={done} is outside this epoch's 0..{len(self)} batches; "
                "was the checkpoint made with other durations, caps or num_replicas?"
            )
        self.epoch = int(state["epoch"])
        self.batches_done = done
