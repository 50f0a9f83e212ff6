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

Long audio: files are read and resampled block by block (`read_blocks`), and cut as they arrive into chunks
of chunk_seconds that overlap by overlap_seconds (`iter_chunks`), so memory holds a batch of chunks, not the
file: a 1 h file peaks within ~150 MB of a 2 s one (benchmarks/transcribe_long.py). Every chunk is
decoded by the model (batched, on the GPU when there is one), and of each chunk only its central part is
kept: the boundary between two neighbours is the middle of their overlap, so each side drops half the
overlap, by output frame. Chunk starts are whole output frames, so the kept frames form one continuous
frame sequence for the file, which is then CTC-decoded once (greedy, or beam search with an n-gram LM).
This is the `stride` chunking of transformers' ASR pipeline; a word cut by a chunk edge is still whole,
because every frame comes from a chunk that sees at least overlap_seconds/2 of context on both sides.
Word times are CTC frame offsets times the model's frame duration (640 samples = 40 ms for W2v-BERT 2.0
with its adapter).
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
import soundfile as sf
import soxr
import torch
from omegaconf import DictConfig

from . import UsageError
from .confidence import Confidence, beam_hypothesis, greedy_hypothesis
from .features import MIN_SAMPLES, SAMPLING_RATE, BatchFeatureExtractor, pad_waves, samples_per_frame
from .model import load_ctc_model, output_lengths, pick_device
from .storage import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# File extensions per libsndfile format; only formats that soundfile reports on this machine are used.
# RAW (header-less) and MAT (Matlab data) are left out: a folder's .raw/.mat files are rarely audio.
FORMAT_EXTENSIONS = {
    "WAV": ("wav",), "WAVEX": ("wav",), "RF64": ("wav", "rf64"), "W64": ("w64",), "FLAC": ("flac",),
    "OGG": ("ogg", "oga", "opus"), "MP3": ("mp3",), "AIFF": ("aif", "aiff", "aifc"), "AU": ("au", "snd"),
    "CAF": ("caf",), "NIST": ("nist", "sph"), "IRCAM": ("sf",), "VOC": ("voc",), "AVR": ("avr",),
    "SVX": ("8svx", "iff"), "PAF": ("paf",), "PVF": ("pvf",), "SD2": ("sd2",), "SDS": ("sds",), "XI": ("xi",),
    "WVE": ("wve",), "HTK": ("htk",),
}
FORMATS = ("txt", "json", "srt")
AudioInput = np.ndarray | Iterable[np.ndarray]  # a whole wave (N,), or its blocks as they are decoded
FAILED_FILE = "failed.json"  # in transcribe.output_dir: {audio file: why it could not be transcribed}
# Blocks are read in whole MPEG frames (1152 samples; MPEG-2's 576 and Layer I's 384 divide it) of about
# READ_BLOCK_SECONDS: libsndfile 1.2.2 decodes an MP3 read that ends inside a frame wrongly from there on
# (errors up to 0.4 seen), and a short first read (0.7 s, whole frames) differently for the next ~1,000
# samples (0.035). Whole frames from 2.4 s up matched one read of the whole file to float rounding (1.2e-7).
MPEG_FRAME = 1152
# Chunks per forward pass for batch_size=auto, (CPU, GPU). On CPU a 20 s chunk already makes the matrix
# products large: 16 chunks of the tiny model on 2 threads took 1.44 s one at a time, 1.58 s two at a time and
# 1.86 s four at a time, and every extra chunk in a batch holds its own (heads, T, T) attention tensors
# (~16 MB each per 20 s chunk of the tiny model). A GPU wants the bigger batch.
AUTO_BATCH_SIZE = (1, 8)
# Files are decoded this many seconds at a time: a few MB per block at 44.1 kHz stereo, whatever the file's length.
READ_BLOCK_SECONDS = 10.0


def audio_extensions() -> set[str]:
    """Lower-case extensions (no dot) of the formats the installed libsndfile reads."""
    available = sf.available_formats()
    return {ext for fmt, exts in FORMAT_EXTENSIONS.items() if fmt in available for ext in exts}


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


# --------------------------------------------------------------------------------------------- chunking
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


class AudioReadError(ValueError):
    """An audio file that cannot be decoded (empty, cut short, not audio); its message names the file."""


def read_blocks(path: str | Path, sampling_rate: int = SAMPLING_RATE,
                block_seconds: float = READ_BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Decode an audio file block by block -> mono float32 blocks `(n,)` at `sampling_rate` (resampled by a
    soxr stream when the file's rate differs). Their concatenation equals `data.load_audio(path)` sample
    for sample (the same channel mean; soxr's stream gives the samples of its one-shot resample), except
    for MP3, where libsndfile's reads in blocks differ by float rounding (see MPEG_FRAME)."""
    name = str(path)
    if not Path(path).is_file():
        raise AudioReadError(f"{name}: no such file")
    if Path(path).stat().st_size == 0:
        raise AudioReadError(f"{name}: empty or undecodable audio (the file is empty)")
    try:
        audio = sf.SoundFile(name)
    except Exception as e:  # soundfile raises several types for a corrupt file; all mean the same here
        why = getattr(e, "error_string", None) or str(e)
        # libsndfile says "File does not exist" of an existing file it cannot parse (an empty or cut MP3)
        detail = "" if "does not exist" in why else f" ({why})"
        raise AudioReadError(f"{name}: empty or undecodable audio{detail}") from None
    with audio:
        rate = audio.samplerate
        stream = None if rate == sampling_rate else soxr.ResampleStream(rate, sampling_rate, 1, dtype="float32",
                                                                          quality="HQ")
        size = max(1, round(block_seconds * rate / MPEG_FRAME)) * MPEG_FRAME
        total = 0
        while True:
            try:
                data = audio.read(size, dtype="float32", always_2d=True)
            except Exception as e:  # noqa: BLE001 - a file cut short mid-stream
                raise AudioReadError(f"{name}: undecodable audio after {total / rate:.1f} s ({e})") from e
            total += len(data)
            if len(data) == 0:
                break
            wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            yield np.ascontiguousarray(stream.resample_chunk(wave) if stream else wave, dtype=np.float32)
        if total == 0:
            raise AudioReadError(f"{name}: empty or undecodable audio (0 samples decoded)")
        if stream is not None:
            yield stream.resample_chunk(np.zeros(0, np.float32), last=True)


# --------------------------------------------------------------------------------------------- model
def load_model(model_ref: str | Path, device: str | torch.device = "cpu", backend: str = "torch",
               quantize: str | None = None):
    """-> (Wav2Vec2BertForCTC in eval mode on `device`, Wav2Vec2BertProcessor) from a local dir or Hub id.
    backend="onnx": the folder's onnxruntime export instead (`onnx_model.OnnxCTCModel`; quantize="int8"
    picks the int8 file)."""
    from transformers import Wav2Vec2BertProcessor

    from .onnx_model import check_backend, load_onnx_model, local_model_dir

    if check_backend(backend) == "onnx":
        model_dir = local_model_dir(model_ref)
        model = load_onnx_model(model_dir, quantize)
        return model, Wav2Vec2BertProcessor.from_pretrained(str(model_dir))

    ref = str(model_ref)
    local = Path(ref)
    if local.exists() and not (local / "config.json").is_file():
        raise UsageError(f"{ref} is not a model folder (no config.json); pass model=<trained model dir or Hub id>")
    if not local.exists() and (ref.count("/") != 1 or ref.startswith((".", "/"))):
        raise UsageError(f"model {ref!r} not found: pass model=<trained model dir> (e.g. demo_out/model) or a "
                         "Hub id like user/name")
    try:
        processor = Wav2Vec2BertProcessor.from_pretrained(ref)
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

    model: a `Wav2Vec2BertForCTC` (anything with `.config` and `(input_features, attention_mask) -> .logits`);
    processor: its `Wav2Vec2BertProcessor` (tokenizer + features).
    lm_decoder: a pyctcdecode decoder (`lm.load_decoder`) for beam search, or None for greedy.
    confidence: the measure behind word and utterance confidences (default: `Confidence()`).
    """

    def __init__(self, model, processor, device: str | torch.device | None = None, chunk_seconds: float = 20.0,
                 overlap_seconds: float = 4.0, batch_size: int | str | None = "auto", lm_decoder=None,
                 beam_width: int = 64, confidence: Confidence | None = None):
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.tokenizer = processor.tokenizer
        self.featurizer = BatchFeatureExtractor.from_hf(processor.feature_extractor).to(self.device)
        self.sampling_rate = self.featurizer.sampling_rate
        self.frame = samples_per_frame(model.config)
        self.chunk_seconds, self.overlap_seconds = float(chunk_seconds), float(overlap_seconds)
        chunk_geometry(self.frame, self.chunk_seconds, self.overlap_seconds, self.sampling_rate)  # fail early
        if batch_size in (None, "auto"):
            batch_size = AUTO_BATCH_SIZE[self.device.type == "cuda"]
        try:
            self.batch_size = max(1, int(batch_size))
        except ValueError:
            raise UsageError(f"transcribe.batch_size={batch_size!r}: give a number of chunks or auto") from None
        self.lm_decoder, self.beam_width = lm_decoder, int(beam_width)
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
                for (pending, i, c, _), logits in zip(batch, self._forward([b[3] for b in batch])):
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

    def _forward(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        """Chunks -> per-chunk logits (T_i, V) on CPU, only the valid frames."""
        lengths = [len(w) for w in waves]
        # Clips shorter than two fbank frames (35 ms) are zero-padded; the featurizer needs two.
        waves = [w if len(w) >= MIN_SAMPLES else np.pad(w, (0, MIN_SAMPLES - len(w))) for w in waves]
        batch, lens = pad_waves(waves)
        feats, mask = self.featurizer(batch.to(self.device), lens.to(self.device))
        logits = self.model(input_features=feats, attention_mask=mask).logits.float().cpu()
        # Padded-to-35 ms clips count their padding as signal, as the model saw it.
        valid = output_lengths(lens, self.model.config).tolist()
        if logits.shape[1] != max(valid):
            # Timestamps come from the config's geometry; a model that disagrees would be mis-timed.
            raise RuntimeError(f"model emits {logits.shape[1]} frames for {int(lens.max())} samples, expected "
                               f"{max(valid)} ({self.frame} samples per frame from its config)")
        return [row[:v] for row, v in zip(logits, valid)]

    def decode(self, logits: torch.Tensor, num_samples: int) -> Transcript:
        """Stitched logits (T, V) of one file -> Transcript with word times in seconds."""
        duration = num_samples / self.sampling_rate
        if logits.shape[0] == 0:
            return Transcript("", [], duration, "greedy" if self.lm_decoder is None else "beam+lm")
        fs = self.frame_seconds
        if self.lm_decoder is None:
            hyp, decoding = greedy_hypothesis(logits, self.tokenizer, self.confidence), "greedy"
        else:
            beams = self.lm_decoder.decode_beams(logits.numpy(), beam_width=self.beam_width)
            hyp = beam_hypothesis(logits, beams[0], self.tokenizer.pad_token_id, self.confidence)
            decoding = "beam+lm"
        words = [Word(w, s * fs, e * fs, c) for w, s, e, c in hyp.words]
        return Transcript(hyp.text, words, duration, decoding, hyp.confidence)


# --------------------------------------------------------------------------------------------- subtitles
def srt_time(seconds: float) -> str:
    """Seconds -> SRT `HH:MM:SS,mmm`."""
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def subtitle_cues(words: Sequence[Word], max_seconds: float = 7.0, max_chars: int = 42,
                  max_gap: float = 1.0) -> list[tuple[float, float, str]]:
    """Group words into one-line cues: a new cue starts when the line would exceed max_chars or
    max_seconds, or after a pause longer than max_gap. -> [(start, end, text)]"""
    cues: list[list[Word]] = []
    for w in words:
        if cues:
            cue = cues[-1]
            text_len = sum(len(x.word) + 1 for x in cue) + len(w.word)
            if text_len <= max_chars and w.end - cue[0].start <= max_seconds and w.start - cue[-1].end <= max_gap:
                cue.append(w)
                continue
        cues.append([w])
    return [(c[0].start, c[-1].end, " ".join(x.word for x in c)) for c in cues]


def to_srt(words: Sequence[Word], **limits) -> str:
    cues = subtitle_cues(words, **limits)
    blocks = []
    for i, (start, end, text) in enumerate(cues, 1):
        end = max(end, start + 0.001)  # players drop zero-length cues
        blocks.append(f"{i}\n{srt_time(start)} --> {srt_time(end)}\n{text}\n")
    return "\n".join(blocks)


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
        failed[str(path)] = str(e) if isinstance(e, AudioReadError) else f"{path}: {type(e).__name__}: {e}"
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


def transcribe(cfg: DictConfig) -> dict:
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
    device = pick_device(tcfg.device)
    model, processor = load_model(cfg.model_dir, device, tcfg.get("backend", "torch"),
                                  (cfg.get("export") or {}).get("quantize"))
    lm_decoder, beam_width = None, 64
    if tcfg.get("lm"):
        from .lm import lm_info, load_decoder

        lm_decoder = load_decoder(processor.tokenizer, tcfg.lm)
        beam_width = int(tcfg.get("beam_width") or lm_info(tcfg.lm).get("beam_width", beam_width))
    transcriber = Transcriber(model, processor, device, tcfg.chunk_seconds, tcfg.overlap_seconds, tcfg.batch_size,
                              lm_decoder, beam_width, Confidence.from_config(cfg.get("confidence")))
    limits = {"max_seconds": float(tcfg.get("srt_max_seconds", 7.0)), "max_chars": int(tcfg.get("srt_max_chars", 42)),
              "max_gap": float(tcfg.get("srt_max_gap", 1.0))}
    result = transcribe_files(transcriber, files, Path(tcfg.output_dir), formats, str(cfg.model_dir), limits)
    if result["failed"]:
        sys.exit(1)  # the command failed for some inputs (the others are written): scripts must notice
    return result

