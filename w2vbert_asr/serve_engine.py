"""The transcription side of `w2vbert-asr serve`: `transcribe`'s own path, shared by concurrent requests.

Each request runs `Transcriber.stream` on its uploaded file in a worker thread, exactly as `transcribe` does
(read_blocks, the streaming chunker, stitching, greedy or LM decoding, confidences), so a response holds the
text `transcribe` writes for that file. Only the forward passes differ: `BatchedTranscriber.forward_chunks`
hands each request's chunks to one `DynamicBatcher`, whose single thread runs the model on up to
serve.max_batch chunks of several requests at a time (after waiting at most serve.max_wait_ms for them).
A chunk that shares a batch is zero-padded with its attention mask, as in `evaluate`.

Admission and memory: 2 * max_batch requests are transcribed at once (enough to fill every batch while the
others read audio or decode text), and serve.queue_size more may wait; beyond that a request gets 503 with
Retry-After. A request in progress holds its uploaded file on disk, the chunks it has in flight (transcribe
.batch_size of them: one on CPU) and its logits, so memory grows with neither the load nor the length of the
audio. A request past serve.timeout_s, or whose client has gone, is cancelled: its queued chunks are dropped
and its thread stops at its next block or chunk.

Usage (serve.py does this):
    engine = TranscriptionEngine(cfg)
    engine.start()
    body, media_type = await engine.transcribe(path, Options("srt"), deadline, client_gone)
    engine.close()
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .audio import read_blocks
from .dynamic_batch import DynamicBatcher
from .transcribe import Transcriber, build_transcriber, srt_limits
from .transcript_formats import GRANULARITIES, render

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often a waiting request checks its deadline and whether its client is still there
MAX_RETRY_AFTER = 60


class Cancelled(Exception):
    """The request was cancelled: past its deadline, or its client disconnected."""


class TimedOut(Exception):
    """The request was not transcribed within serve.timeout_s."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Options:
    """What a request asks for (checked by serve.py)."""

    response_format: str = "json"
    granularities: tuple[str, ...] = GRANULARITIES
    language: str | None = None


class Job:
    """One request's transcription: the chunks it has queued, and whether it was cancelled."""

    def __init__(self):
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._futures: list[Future] = []

    def track(self, futures: list[Future]) -> list[Future]:
        with self._lock:
            self._futures = futures
            if self.cancelled.is_set():
                for f in futures:
                    f.cancel()
                raise Cancelled("cancelled")
        return futures

    def cancel(self) -> None:
        with self._lock:
            self.cancelled.set()
            for f in self._futures:
                f.cancel()  # a chunk no batch has taken yet is dropped; one in a batch finishes

    def blocks(self, blocks: Iterable) -> Iterator:
        """Audio blocks that stop (Cancelled) once the job is cancelled."""
        for block in blocks:
            if self.cancelled.is_set():
                raise Cancelled("cancelled")
            yield block


class BatchedTranscriber(Transcriber):
    """A Transcriber whose forward passes go through a shared DynamicBatcher. `for_job` gives a request its
    view (same model, featurizer and decoder) whose chunks join the batches of the other requests'."""

    batcher: DynamicBatcher | None = None
    job: Job | None = None
    _decode_lock: threading.Lock | None = None

    def attach(self, batcher: DynamicBatcher) -> None:
        self.batcher, self._decode_lock = batcher, threading.Lock()

    def for_job(self, job: Job) -> BatchedTranscriber:
        view = copy.copy(self)
        view.job = job
        return view

    def forward_chunks(self, waves):
        if self.job is None or self.batcher is None:  # the batcher's own thread, or no batcher
            with torch.no_grad():  # grad mode is per thread: stream_logits' no_grad does not reach this one
                return super().forward_chunks(waves)
        futures = self.job.track(self.batcher.submit(list(waves)))
        return [f.result() for f in futures]

    def decode(self, logits, num_samples):
        if self.beam_search is None or self._decode_lock is None:
            return super().decode(logits, num_samples)
        with self._decode_lock:  # one pyctcdecode decoder (and its kenlm model) for every request
            return super().decode(logits, num_samples)


def model_language(cfg) -> str:
    """The model's language code: lang, or the training config next to the model folder; else ''."""
    import yaml

    candidates = [str(cfg.lang)] if cfg.lang != "model" else []
    run_config = Path(str(cfg.model_dir)).parent / "config.yaml"
    if run_config.is_file():
        try:
            candidates.append(str((yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("lang", "")))
        except (OSError, yaml.YAMLError):
            pass
    return next((c for c in candidates if re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]+)?", c)), "")


def model_name(cfg) -> str:
    """serve.model_name, or the model folder's name (its run folder's when it is train's `model/`)."""
    if cfg.serve.model_name:
        return str(cfg.serve.model_name)
    path = Path(str(cfg.model_dir))
    if not path.exists():
        return str(cfg.model_dir)  # a Hub id
    path = path.resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


class TranscriptionEngine:
    """The model, its batcher, the request threads and the admission count of one server."""

    def __init__(self, cfg, transcriber: BatchedTranscriber | None = None):
        scfg = cfg.serve
        self.transcriber = transcriber or build_transcriber(cfg, BatchedTranscriber)
        self.limits = srt_limits(cfg.transcribe)
        self.batcher = DynamicBatcher(self.transcriber.forward_chunks, scfg.max_batch, scfg.max_wait_ms,
                                      name="w2vbert-model", size=len)  # chunks of like length share a pass
        self.transcriber.attach(self.batcher)
        self.workers = 2 * int(scfg.max_batch)
        self.queue_size = int(scfg.queue_size)
        self.model_name, self.language = model_name(cfg), model_language(cfg)
        self.backend = str(cfg.transcribe.backend)
        self.admitted = 0  # requests being transcribed or waiting; touched on the event loop only
        self.running = 0
        self.served = 0
        self._seconds_per_request = 1.0  # moving average, for Retry-After
        self._running_lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.tmp: Path | None = None

    def start(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="w2vbert-serve-"))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="w2vbert-request")
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------ admission
    @property
    def capacity(self) -> int:
        return self.workers + self.queue_size

    def full(self) -> bool:
        return self.admitted >= self.capacity

    def retry_after(self) -> int:
        waiting = max(0, self.admitted - self.workers) + 1
        return max(1, min(MAX_RETRY_AFTER, math.ceil(waiting * self._seconds_per_request / self.workers)))

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "backend": self.backend,
                "device": str(self.transcriber.device), "running": self.running,
                "waiting": max(0, self.admitted - self.running), "capacity": self.capacity,
                "served": self.served, "max_batch": self.batcher.max_batch, "batches": self.batcher.stats.to_dict()}

    def _finished(self, started: float) -> None:
        self.admitted -= 1
        self.served += 1
        self._seconds_per_request = 0.9 * self._seconds_per_request + 0.1 * (time.monotonic() - started)

    # ------------------------------------------------------------------------------------ requests
    def temp_path(self, suffix: str = "") -> Path:
        """A new empty file in the server's own temporary folder (never a name the client chose)."""
        handle, name = tempfile.mkstemp(suffix=suffix, dir=self.tmp)
        os.close(handle)
        return Path(name)

    async def transcribe(self, path: Path, options: Options, deadline: float,
                         client_gone: Callable[[], Awaitable[bool]]) -> tuple[dict | str, str]:
        """Transcribe an audio file -> (body, media type). Raises QueueFull, TimedOut, Cancelled (the client
        left), AudioError (undecodable audio) or what the model raised."""
        if self.full():
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        self.admitted += 1
        job, started = Job(), time.monotonic()
        work = self.pool.submit(self._run, job, path, options)
        work.add_done_callback(lambda _: _call_soon(loop, self._finished, started))
        future = asyncio.wrap_future(work)
        future.add_done_callback(_retrieve)
        try:
            while not future.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimedOut("not transcribed before the request's deadline")
                await asyncio.wait({future}, timeout=min(POLL_SECONDS, remaining))
                if not future.done() and await client_gone():
                    raise Cancelled("the client disconnected")
            return future.result()
        except BaseException:
            job.cancel()
            work.cancel()
            raise

    def _run(self, job: Job, path: Path, options: Options) -> tuple[dict | str, str]:
        if job.cancelled.is_set():
            raise Cancelled("cancelled before it started")
        with self._running_lock:
            self.running += 1
        try:
            view = self.transcriber.for_job(job)
            [(_, transcript)] = view.stream([("upload", job.blocks(read_blocks(path, view.sampling_rate)))])
            return render(transcript, options.response_format, options.granularities, self.limits,
                          self.language or options.language or "", view.confidence.utterance_aggregation,
                          self._tokenize)
        finally:
            with self._running_lock:
                self.running -= 1

    def _tokenize(self, text: str) -> list[int]:
        return list(self.transcriber.tokenizer(text)["input_ids"])


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed (server shutdown): nothing left to count
        pass


def _retrieve(future: asyncio.Future) -> None:
    """Mark an abandoned request's outcome as seen (asyncio would log 'exception was never retrieved')."""
    if not future.cancelled():
        future.exception()
