"""Transcribe audio files or folders of any length with a trained model: text, word timestamps, subtitles.

Usage:
    w2vbert-asr transcribe model=demo_out/model clip.mp3 recordings/
    w2vbert-asr transcribe model=user/w2v-bert-2.0-mn interview.flac transcribe.output_dir=out/ transcribe.device=cuda
    w2vbert-asr transcribe model=demo_out/model transcribe.lm=demo_out/lm talk.wav     # n-gram beam search

    from w2vbert_asr.transcribe import Transcriber, load_model
    model, processor = load_model("demo_out/model", "cpu")
    [result] = Transcriber(model, processor).transcribe([wave_16khz])   # .text, .words[i].start ...
    result = Transcriber(model, processor).transcribe_file("talk.flac")  # read block by block

For every input `<name>.<ext>` (folders are walked for every extension soundfile can read) it writes
into transcribe.output_dir: `<name>.txt` (the text), `<name>.json` (text, words with start/end seconds
and confidence, utterance confidence, duration, model) and `<name>.srt` (subtitle cues of whole words, at most srt_max_seconds/srt_max_chars).
A file that cannot be decoded does not stop the others: it is listed with the reason in
`<output_dir>/failed.json`, and the command then exits 1.

Long audio: files are read and resampled block by block (`audio.read_blocks`), and cut as they arrive into
overlapping chunks (chunking.py), so memory holds a batch of chunks, not the file (benchmarks/transcribe_long.py).
Every chunk is decoded by the model (batched, on the GPU when there is one); the kept frames of a file are
CTC-decoded once (greedy, or beam search with an n-gram LM). Word times are CTC frame offsets times the
model's frame duration (geometry.py: 40 ms for W2v-BERT 2.0 with its adapter, 20 ms for omniASR-CTC).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import UsageError
from .audio import AudioError, audio_extensions, read_blocks
from .chunking import Chunk, chunk_geometry, iter_chunks
from .confidence import Confidence, beam_hypothesis, greedy_hypothesis
from .devices import pick_device
from .fbank import MIN_SAMPLES
from .features import pad_waves
from .geometry import FrameGeometry
from .model import check_model_dir, load_ctc_model
from .storage import atomic_write_json, atomic_write_text
from .subtitles import to_srt
from .waveform import featurizer_for

log = logging.getLogger(__name__)

FORMATS = ("txt", "json", "srt")
AudioInput = np.ndarray | Iterable[np.ndarray]  # a whole wave (N,), or its blocks as they are decoded
FAILED_FILE = "failed.json"  # in transcribe.output_dir: {audio file: why it could not be transcribed}
# Chunks per forward pass for batch_size=auto, (CPU, GPU). On CPU a 20 s chunk already makes the matrix
# products large, so batching chunks gains no speed and every extra chunk holds its own (heads, T, T)
# attention tensors (benchmarks/README.md, long audio). A GPU wants the bigger batch.
AUTO_BATCH_SIZE = (1, 8)


# --------------------------------------------------------------------------------------------- results
@dataclass
class Word:
    word: str
    start: float  # seconds from the start of the file
    end: float
    confidence: float | None = None  # 0..1 from the CTC posteriors of the word's frames (confidence.py)

    def to_dict(self) -> dict:
        out = {"word": self.word, "start": round(self.start, 3), "end": round(self.end, 3)}
        if self.confidence is not None:
            out["confidence"] = round(self.confidence, 4)
        return out


@dataclass
class Transcript:
    text: str
    words: list[Word]
    duration: float  # seconds of audio
    decoding: str = "greedy"
    confidence: float | None = None  # the utterance's, aggregated from its words

    def to_dict(self) -> dict:
        out = {"text": self.text, "duration": round(self.duration, 3), "decoding": self.decoding}
        if self.confidence is not None:
            out["confidence"] = round(self.confidence, 4)
        return {**out, "words": [w.to_dict() for w in self.words]}


# --------------------------------------------------------------------------------------------- model
def load_model(model_ref: str | Path, device: str | torch.device = "cpu", backend: str = "torch",
               quantize: str | None = None, onnx_dir: str | Path | None = None):
    """-> (CTC model of its family in eval mode on `device`, its processor) from a local dir or Hub id.
    backend="onnx": the folder's onnxruntime export instead (`onnx_model.OnnxCTCModel`; quantize="int8"
    picks the int8 file; onnx_dir: where it was exported, export.output_dir, default <model>/onnx)."""
    from .families import load_processor
    from .onnx_model import check_backend, load_onnx_model, local_model_dir

    if check_backend(backend) == "onnx":
        model_dir = local_model_dir(model_ref)
        model = load_onnx_model(model_dir, quantize, output_dir=onnx_dir)
        return model, load_processor(model_dir)

    ref = str(model_ref)
    local = Path(ref)
    if local.exists():
        check_model_dir(local)
    elif ref.count("/") != 1 or ref.startswith((".", "/")):
        raise UsageError(f"model {ref!r} not found: pass model=<trained model dir> (e.g. demo_out/model) or a "
                         "Hub id like user/name")
    from .weights import hub_ids, require

    require(hub_ids([ref]), "transcribe")
    try:
        processor = load_processor(ref)
        model = load_ctc_model(ref, device)
    except OSError as e:
        raise UsageError(f"could not load model {ref!r}: {e}") from e
    return model, processor


@dataclass
class _Pending:
    """One input being transcribed: its chunks' kept logits arrive batch by batch."""

    key: object
    num_samples: int = 0
    chunks: int = 0  # chunks read so far
    read: bool = False  # all chunks read
    failed: bool = False
    parts: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.failed or (self.read and len(self.parts) == self.chunks)


class Transcriber:
    """Chunked, batched CTC transcription of 16 kHz audio, read as it is decoded.

    model: a CTC model of a family (families.py; anything with `.config` and `(**featurizer inputs) -> .logits`);
    processor: its processor (tokenizer + feature extractor).
    beam_search: an n-gram beam search (`lm.beam_search`), or None for greedy decoding.
    confidence: the measure behind word and utterance confidences (default: `Confidence()`).
    """

    def __init__(self, model, processor, device: str | torch.device | None = None, chunk_seconds: float = 20.0,
                 overlap_seconds: float = 4.0, batch_size: int | str | None = "auto", beam_search=None,
                 confidence: Confidence | None = None):
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.tokenizer = processor.tokenizer
        self.featurizer = featurizer_for(processor.feature_extractor).to(self.device)
        self.sampling_rate = self.featurizer.sampling_rate
        self.geometry = FrameGeometry.of(model.config)
        self.frame = self.geometry.samples_per_frame
        self.chunk_seconds, self.overlap_seconds = float(chunk_seconds), float(overlap_seconds)
        chunk_geometry(self.frame, self.chunk_seconds, self.overlap_seconds, self.sampling_rate)  # fail early
        if batch_size in (None, "auto"):
            batch_size = AUTO_BATCH_SIZE[self.device.type == "cuda"]
        try:
            self.batch_size = max(1, int(batch_size))
        except ValueError:
            raise UsageError(f"transcribe.batch_size={batch_size!r}: give a number of chunks or auto") from None
        self.beam_search = beam_search
        self.confidence = confidence or Confidence()

    @property
    def frame_seconds(self) -> float:
        return self.frame / self.sampling_rate

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[Transcript]:
        """16 kHz mono float waves `(N,)` -> one Transcript each, in order."""
        results = dict(self.stream((i, w) for i, w in enumerate(waves)))
        return [results[i] for i in range(len(waves))]

    def transcribe_file(self, path: str | Path) -> Transcript:
        """One audio file of any length, read block by block -> Transcript."""
        [(_, result)] = self.stream([(path, read_blocks(path, self.sampling_rate))])
        return result

    def stream(self, items: Iterable[tuple[object, AudioInput]], on_error=None) -> Iterator[tuple[object, Transcript]]:
        """(key, audio) pairs -> (key, Transcript) in input order. audio: a wave `(N,)` or an iterable of 1-D
        blocks (`read_blocks(path)`); inputs are pulled lazily and read chunk by chunk, so neither a folder
        of files nor a long file sits in memory. Chunks of consecutive inputs share batches.
        on_error(key, exception): called for an input whose audio fails while read, which is then skipped;
        without it the exception propagates."""
        for key, logits, num_samples in self.stream_logits(items, on_error):
            yield key, self.decode(logits, num_samples)

    @torch.no_grad()
    def stream_logits(self, items: Iterable[tuple[object, AudioInput]],
                      on_error=None) -> Iterator[tuple[object, torch.Tensor, int]]:
        """-> (key, stitched logits (T, V) float32 on CPU, num_samples) per input, in input order."""
        source = iter(items)
        order: deque[_Pending] = deque()  # inputs not yet yielded, in input order
        reading: tuple[_Pending, Iterator[tuple[Chunk, np.ndarray]]] | None = None
        exhausted = False
        while True:
            batch: list[tuple[_Pending, int, Chunk, np.ndarray]] = []
            while len(batch) < self.batch_size and not (exhausted and reading is None):
                if reading is None:
                    try:
                        key, audio = next(source)
                    except StopIteration:
                        exhausted = True
                        continue
                    order.append(_Pending(key))
                    reading = order[-1], self._chunks(audio)
                pending, chunks = reading
                try:
                    chunk, samples = next(chunks)
                except StopIteration:
                    pending.read, reading = True, None
                    continue
                except Exception as e:
                    if on_error is None:
                        raise
                    on_error(pending.key, e)
                    pending.failed, reading = True, None
                    continue
                pending.num_samples = chunk.end  # the last chunk ends at the end of the audio
                batch.append((pending, pending.chunks, chunk, samples))
                pending.chunks += 1
            if batch:
                for (pending, i, c, _), logits in zip(batch, self.forward_chunks([b[3] for b in batch])):
                    pending.parts[i] = logits[c.keep_from:c.keep_to].clone()  # not a view of the batch
            while order and order[0].done:
                done = order.popleft()
                if not done.failed:
                    parts = [done.parts.pop(i) for i in range(done.chunks)]  # freed once joined: one copy held
                    logits = torch.cat(parts) if parts else torch.zeros(0, self.model.config.vocab_size)
                    del parts
                    yield done.key, logits, done.num_samples
            if exhausted and reading is None and not order:
                return

    def _chunks(self, audio: AudioInput) -> Iterator[tuple[Chunk, np.ndarray]]:
        if isinstance(audio, (np.ndarray, torch.Tensor)):
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1:
                raise ValueError(f"wave has shape {audio.shape}; expected mono (N,)")
            audio = [audio]
        return iter_chunks(audio, self.frame, self.chunk_seconds, self.overlap_seconds, self.sampling_rate)

    def forward_chunks(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        """Chunks -> per-chunk logits (T_i, V) on CPU, only the valid frames: one forward pass. stream_logits
        calls it for each batch it reads; `w2vbert-asr serve` (serve_engine.py) overrides it to batch the
        chunks of concurrent requests together."""
        # Clips shorter than two fbank frames (35 ms) are zero-padded; the fbank featurizer needs two, and
        # omniASR's convolutions one window (25 ms).
        waves = [w if len(w) >= MIN_SAMPLES else np.pad(w, (0, MIN_SAMPLES - len(w))) for w in waves]
        batch, lens = pad_waves(waves)
        inputs = self.featurizer.model_inputs(batch.to(self.device), lens.to(self.device))
        logits = self.model(**inputs).logits.float().cpu()
        # Padded-to-35 ms clips count their padding as signal, as the model saw it.
        valid = self.geometry.output_frames(lens).tolist()
        if logits.shape[1] != max(valid):
            # Timestamps come from the config's geometry; a model that disagrees would be mis-timed.
            raise RuntimeError(f"model emits {logits.shape[1]} frames for {int(lens.max())} samples, expected "
                               f"{max(valid)} ({self.frame} samples per frame from its config)")
        return [row[:v] for row, v in zip(logits, valid)]

    def decode(self, logits: torch.Tensor, num_samples: int) -> Transcript:
        """Stitched logits (T, V) of one file -> Transcript with word times in seconds."""
        duration = num_samples / self.sampling_rate
        if logits.shape[0] == 0:
            return Transcript("", [], duration, "greedy" if self.beam_search is None else "beam+lm")
        fs = self.frame_seconds
        if self.beam_search is None:
            hyp, decoding = greedy_hypothesis(logits, self.tokenizer, self.confidence), "greedy"
        else:
            beam = self.beam_search.best_beam(logits)
            hyp = beam_hypothesis(logits, beam, self.tokenizer.pad_token_id, self.confidence)
            decoding = "beam+lm"
        words = [Word(w, s * fs, e * fs, c) for w, s, e, c in hyp.words]
        return Transcript(hyp.text, words, duration, decoding, hyp.confidence)


# --------------------------------------------------------------------------------------------- files
def find_audio(inputs: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """Files and folders -> [(audio file, output name)]; folders are walked recursively and keep their
    sub-folder layout in the output names. Duplicate names fall back to the full file name."""
    exts = audio_extensions()
    found: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in exts
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                log.warning("%s: no audio files (%s)", path, ", ".join(sorted(exts)))
            found += [(p, str(p.relative_to(path).with_suffix(""))) for p in files]
        elif path.is_file():
            found.append((path, path.stem))
        else:
            raise UsageError(f"{path} does not exist; pass audio files or folders to transcribe")
    seen_files, names, out = set(), set(), []
    for path, name in found:
        if path.resolve() in seen_files:
            continue
        seen_files.add(path.resolve())
        if name in names:
            name = f"{name}{path.suffix}"
        while name in names:
            name += "_"
        names.add(name)
        out.append((path, name))
    return out


def write_outputs(transcript: Transcript, base: Path, formats: Iterable[str], audio: Path | str, model: str,
                  srt_limits: dict | None = None) -> list[Path]:
    """<base>.txt / .json / .srt -> written paths."""
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = base.with_name(base.name + f".{fmt}")
        if fmt == "txt":
            content = transcript.text + "\n"
        elif fmt == "json":
            content = json.dumps({"audio": str(audio), "model": model, **transcript.to_dict()}, ensure_ascii=False,
                                 indent=2)
        elif fmt == "srt":
            content = to_srt(transcript.words, **(srt_limits or {}))
        else:
            raise UsageError(f"transcribe.formats: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        written.append(atomic_write_text(path, content))
    return written


def transcribe_files(transcriber: Transcriber, files: Sequence[tuple[Path, str]], output_dir: Path,
                     formats: Sequence[str], model_name: str, srt_limits: dict | None = None) -> dict:
    """Transcribe [(audio file, output name)] and write the outputs. A file that cannot be read is reported,
    not fatal: the others are still transcribed, and `failed.json` in output_dir lists {file: reason}
    (written, or removed, on every run so that it describes this one)."""
    failed: dict[str, str] = {}

    def record_failure(path, e: Exception) -> None:
        failed[str(path)] = str(e) if isinstance(e, AudioError) else f"{path}: {type(e).__name__}: {e}"
        log.error("%s; skipped", failed[str(path)])

    inputs = (((path, name), read_blocks(path, transcriber.sampling_rate)) for path, name in files)
    done, audio_seconds, start = [], 0.0, time.perf_counter()
    for (path, name), transcript in transcriber.stream(inputs, on_error=lambda key, e: record_failure(key[0], e)):
        outputs = write_outputs(transcript, output_dir / name, formats, path, model_name, srt_limits)
        audio_seconds += transcript.duration
        done.append({"audio": str(path), "text": transcript.text, "duration": transcript.duration,
                     "words": len(transcript.words), "outputs": [str(p) for p in outputs]})
        print(f"{path} ({transcript.duration:.1f} s) -> {output_dir / name}.{{{','.join(formats)}}}")
    seconds = time.perf_counter() - start
    failed_file = output_dir / FAILED_FILE
    if failed:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(failed_file, failed)
    else:
        failed_file.unlink(missing_ok=True)  # a previous run's list would no longer be true
    if failed and not done:
        raise UsageError("no file could be read: " + "; ".join(failed.values()) + f" (listed in {failed_file})")
    if failed:
        print(f"{len(failed)} file(s) could not be read, listed with the reasons in {failed_file}: "
              + ", ".join(failed))
    rtfx = audio_seconds / seconds if seconds > 0 else float("inf")
    print(f"transcribed {len(done)} file(s), {audio_seconds:.1f} s of audio in {seconds:.1f} s "
          f"(RTFx {rtfx:.1f}, {transcriber.device})")
    return {"files": done, "failed": failed, "output_dir": str(output_dir), "audio_seconds": audio_seconds,
            "seconds": seconds, "rtfx": rtfx, "device": str(transcriber.device)}


def build_transcriber(cfg, cls: type[Transcriber] = Transcriber) -> Transcriber:
    """The Transcriber `transcribe` uses for a composed config: cfg.model_dir on transcribe.device with its
    backend, chunking, batch size, LM and confidence measure. `serve` passes its batched subclass as cls."""
    tcfg = cfg.transcribe
    device = pick_device(tcfg.device)
    model, processor = load_model(cfg.model_dir, device, tcfg.backend, tcfg.quantize, cfg.export.output_dir)
    search = None
    if tcfg.lm:
        from .lm import beam_search

        search = beam_search(processor.tokenizer, tcfg.lm, tcfg.beam_width)
    return cls(model, processor, device, tcfg.chunk_seconds, tcfg.overlap_seconds, tcfg.batch_size, search,
               Confidence.from_config(cfg.confidence))


def srt_limits(tcfg) -> dict:
    """transcribe.srt_* -> the keyword arguments of subtitles.to_srt / subtitle_cues."""
    return {"max_seconds": float(tcfg.srt_max_seconds), "max_chars": int(tcfg.srt_max_chars),
            "max_gap": float(tcfg.srt_max_gap)}


def transcribe(cfg) -> dict:
    """`w2vbert-asr transcribe model=<dir or Hub id> <files or folders>`. Exits 1 (SystemExit) when some inputs
    could not be read, after writing the others and `failed.json`."""
    tcfg = cfg.transcribe
    if not tcfg.inputs:
        raise UsageError("nothing to transcribe: w2vbert-asr transcribe model=<dir or Hub id> clip.mp3 folder/")
    formats = list(tcfg.formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"transcribe.formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
    files = find_audio(tcfg.inputs)
    if not files:
        raise UsageError(f"no audio files in {list(tcfg.inputs)} (extensions: {', '.join(sorted(audio_extensions()))})")
    transcriber = build_transcriber(cfg)
    result = transcribe_files(transcriber, files, Path(tcfg.output_dir), formats, str(cfg.model_dir),
                              srt_limits(tcfg))
    if result["failed"]:
        sys.exit(1)  # the command failed for some inputs (the others are written): scripts must notice
    return result
