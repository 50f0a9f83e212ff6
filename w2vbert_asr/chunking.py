"""Long audio in overlapping chunks whose kept frames join into one frame sequence for the file.

A file is cut, as its samples arrive, into chunks of chunk_seconds that overlap by overlap_seconds; of each
chunk only its central part is kept: the boundary between two neighbours is the middle of their overlap, so
each side drops half the overlap, by output frame. Chunk starts are whole output frames (`frame` samples),
so the kept frames form one continuous frame sequence, which is then CTC-decoded once. This is the
`stride` chunking of transformers' ASR pipeline; a word cut by a chunk edge is still whole, because every
frame comes from a chunk that sees at least overlap_seconds/2 of context on both sides.

Usage:
    from w2vbert_asr.chunking import iter_chunks, plan_chunks
    for chunk, samples in iter_chunks(read_blocks(path), frame=640, chunk_seconds=20.0, overlap_seconds=4.0):
        logits = model(samples)[chunk.keep_from:chunk.keep_to]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from . import UsageError
from .geometry import SAMPLING_RATE

@dataclass
class Chunk:
    """Samples [start, end) of a wave; output frames [keep_from, keep_to) of its logits are kept (local
    indices; keep_to=None: up to the chunk's last valid frame)."""

    start: int
    end: int
    keep_from: int
    keep_to: int | None


def chunk_geometry(frame: int, chunk_seconds: float, overlap_seconds: float,
                   sampling_rate: int = SAMPLING_RATE) -> tuple[int, int]:
    """-> (chunk length, overlap dropped on each inner side), in samples, both multiples of `frame`."""
    chunk = max(frame, round(chunk_seconds * sampling_rate / frame) * frame)
    half = round(overlap_seconds * sampling_rate / 2 / frame) * frame
    if overlap_seconds < 0 or chunk - 2 * half < frame:
        raise UsageError(f"transcribe.chunk_seconds={chunk_seconds} must exceed transcribe.overlap_seconds="
                         f"{overlap_seconds} (and overlap must be >= 0)")
    return chunk, half


def plan_chunks(num_samples: int, frame: int, chunk_seconds: float, overlap_seconds: float,
                sampling_rate: int = SAMPLING_RATE) -> list[Chunk]:
    """Overlapping chunks that cover `num_samples`; starts are multiples of `frame` samples so every chunk's
    output frame j is global frame start/frame + j. Neighbours split their overlap in the middle.
    (`iter_chunks` makes the same plan from audio whose length is known only at its end.)"""
    chunk, half = chunk_geometry(frame, chunk_seconds, overlap_seconds, sampling_rate)
    if num_samples <= chunk:
        return [Chunk(0, num_samples, 0, None)]
    starts = list(range(0, num_samples - chunk, chunk - 2 * half))
    # The last chunk ends at the end of the file and is full length (so it has context too).
    last = (num_samples - chunk) // frame * frame
    if last == starts[-1]:
        starts.pop()
    starts.append(last)
    ends = [min(s + chunk, num_samples) for s in starts[:-1]] + [num_samples]
    # Boundary between chunk i and i+1: the middle of their overlap, in global output frames.
    bounds = [((starts[i + 1] + ends[i]) // 2) // frame for i in range(len(starts) - 1)]
    chunks = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        first = s // frame
        keep_from = bounds[i - 1] - first if i > 0 else 0
        keep_to = bounds[i] - first if i < len(bounds) else None
        chunks.append(Chunk(s, e, keep_from, keep_to))
    return chunks


def iter_chunks(blocks: Iterable[np.ndarray], frame: int, chunk_seconds: float, overlap_seconds: float,
                sampling_rate: int = SAMPLING_RATE) -> Iterator[tuple[Chunk, np.ndarray]]:
    """Audio arriving as 1-D blocks -> (Chunk, its samples (end - start,)) as soon as each is settled:
    exactly `plan_chunks(N, ...)` for the N samples the blocks add up to, with at most a chunk, a frame
    and a block of samples held. Nothing is yielded for empty audio.

    Chunk i is settled once chunk i + 1 is: a start s is a regular chunk [s, s + chunk) when at least
    chunk + frame samples follow it (then the file's last chunk starts at least one frame later); else
    the file has ended and the last chunk is the final `chunk` samples, its start rounded down to a frame.
    The boundary between two chunks is the middle of their overlap, so a chunk's keep_to needs its successor."""
    chunk, half = chunk_geometry(frame, chunk_seconds, overlap_seconds, sampling_rate)
    source = iter(blocks)
    parts: list[np.ndarray] = []  # samples [offset, have) not yet dropped
    offset = have = 0
    ended = False

    def fill(upto: int) -> None:
        nonlocal have, ended
        while have < upto and not ended:
            block = next(source, None)
            if block is None:
                ended = True
            elif len(block):
                block = np.asarray(block, dtype=np.float32)
                if block.ndim != 1:
                    raise ValueError(f"audio block has shape {block.shape}; expected mono (N,)")
                parts.append(block)
                have += len(block)

    def take(start: int, end: int) -> np.ndarray:
        """Samples [start, end); drops what lies before `start` (no later chunk reaches back past it)."""
        nonlocal parts, offset
        buffer = parts[0] if len(parts) == 1 else np.concatenate(parts)
        buffer = buffer[start - offset:]
        parts, offset = [buffer], start
        return buffer[: end - start].copy()

    previous: tuple[int, int, int, np.ndarray] | None = None  # start, end, keep_from, samples: awaiting keep_to
    start = 0
    while True:
        fill(start + chunk + frame)
        last = have < start + chunk + frame  # the audio ended before a regular chunk at `start`
        if last:
            if have == 0:
                return
            start = max(0, (have - chunk) // frame * frame)
        end = have if last else start + chunk
        samples = take(start, end)
        keep_from = 0
        if previous is not None:
            p_start, p_end, p_keep_from, p_samples = previous
            bound = (start + p_end) // 2 // frame  # global output frame where this chunk takes over
            yield Chunk(p_start, p_end, p_keep_from, bound - p_start // frame), p_samples
            keep_from = bound - start // frame
        if last:
            yield Chunk(start, end, keep_from, None), samples
            return
        previous = (start, end, keep_from, samples)
        start += chunk - 2 * half
