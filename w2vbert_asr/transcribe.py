"""Transcribe audio files or folders of any length with a trained model: text, word timestamps, subtitles.

Usage:
    w2vbert-asr transcribe model=demo_out/model clip.mp3 recordings/
    w2vbert-asr transcribe model=user/w2v-bert-2.0-mn interview.flac transcribe.output_dir=out/ transcribe.device=cuda
    w2vbert-asr transcribe model=demo_out/model transcribe.lm=demo_out/lm talk.wav     # n-gram beam search

    from w2vbert_asr.transcribe import Transcriber, load_model
    model, processor = load_model("demo_out/model", "cpu")
    [result] = Transcriber(model, processor).transcribe([wave_16khz])   # .text, .words[i].start ...

For every input `<name>.<ext>` (folders are walked for every extension soundfile can read) it writes
into transcribe.output_dir: `<name>.txt` (the text), `<name>.json` (text, words with start/end seconds,
duration, model) and `<name>.srt` (subtitle cues of whole words, at most srt_max_seconds/srt_max_chars).

Long audio: the wave is cut into chunks of chunk_seconds that overlap by overlap_seconds; every chunk is
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
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from omegaconf import DictConfig

from . import UsageError
from .features import MIN_SAMPLES, SAMPLING_RATE, BatchFeatureExtractor, pad_waves, samples_per_frame
from .model import ctc_greedy_ids, load_ctc_model, output_lengths, pick_device
from .storage import atomic_write_text

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


@dataclass
class Transcript:
    text: str
    words: list[Word]
    duration: float  # seconds of audio
    decoding: str = "greedy"

    def to_dict(self) -> dict:
        return {"text": self.text, "duration": round(self.duration, 3), "decoding": self.decoding,
                "words": [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in self.words]}


# --------------------------------------------------------------------------------------------- chunking
@dataclass
class Chunk:
    """Samples [start, end) of a wave; output frames [keep_from, keep_to) of its logits are kept (local
    indices; keep_to=None: up to the chunk's last valid frame)."""

    start: int
    end: int
    keep_from: int
    keep_to: int | None


def plan_chunks(num_samples: int, frame: int, chunk_seconds: float, overlap_seconds: float,
                sampling_rate: int = SAMPLING_RATE) -> list[Chunk]:
    """Overlapping chunks that cover `num_samples`; starts are multiples of `frame` samples so every chunk's
    output frame j is global frame start/frame + j. Neighbours split their overlap in the middle."""
    chunk = max(frame, round(chunk_seconds * sampling_rate / frame) * frame)
    half = round(overlap_seconds * sampling_rate / 2 / frame) * frame  # dropped on each inner side
    if overlap_seconds < 0 or chunk - 2 * half < frame:
        raise UsageError(f"transcribe.chunk_seconds={chunk_seconds} must exceed transcribe.overlap_seconds="
                         f"{overlap_seconds} (and overlap must be >= 0)")
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


# --------------------------------------------------------------------------------------------- model
def load_model(model_ref: str | Path, device: str | torch.device = "cpu"):
    """-> (Wav2Vec2BertForCTC in eval mode on `device`, Wav2Vec2BertProcessor) from a local dir or Hub id."""
    from transformers import Wav2Vec2BertProcessor

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
    num_samples: int
    chunks: list[Chunk]
    parts: dict[int, torch.Tensor] = field(default_factory=dict)


class Transcriber:
    """Chunked, batched CTC transcription of 16 kHz waves.

    model: a `Wav2Vec2BertForCTC` (anything with `.config`, `(input_features, attention_mask) -> .logits`
    and `_get_feat_extract_output_lengths`); processor: its `Wav2Vec2BertProcessor` (tokenizer + features).
    lm_decoder: a pyctcdecode decoder (`lm.load_decoder`) for beam search, or None for greedy.
    """

    def __init__(self, model, processor, device: str | torch.device | None = None, chunk_seconds: float = 20.0,
                 overlap_seconds: float = 4.0, batch_size: int = 8, lm_decoder=None, beam_width: int = 64):
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.tokenizer = processor.tokenizer
        self.featurizer = BatchFeatureExtractor.from_hf(processor.feature_extractor).to(self.device)
        self.sampling_rate = self.featurizer.sampling_rate
        self.frame = samples_per_frame(model.config)
        self.chunk_seconds, self.overlap_seconds = float(chunk_seconds), float(overlap_seconds)
        self.batch_size = max(1, int(batch_size))
        self.lm_decoder, self.beam_width = lm_decoder, int(beam_width)

    @property
    def frame_seconds(self) -> float:
        return self.frame / self.sampling_rate

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[Transcript]:
        """16 kHz mono float waves `(N,)` -> one Transcript each, in order."""
        results = dict(self.stream((i, w) for i, w in enumerate(waves)))
        return [results[i] for i in range(len(waves))]

    def stream(self, items: Iterable[tuple[object, np.ndarray]]) -> Iterator[tuple[object, Transcript]]:
        """(key, wave (N,)) pairs -> (key, Transcript) in input order; waves are pulled lazily, so a folder
        of long files never sits in memory at once. Chunks of consecutive inputs share batches."""
        for key, logits, num_samples in self.stream_logits(items):
            yield key, self.decode(logits, num_samples)

    @torch.no_grad()
    def stream_logits(self, items: Iterable[tuple[object, np.ndarray]]) -> Iterator[tuple[object, torch.Tensor, int]]:
        """-> (key, stitched logits (T, V) float32 on CPU, num_samples) per input, in input order."""
        queue: deque[tuple[_Pending, int, np.ndarray]] = deque()
        order: deque[_Pending] = deque()
        source = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(queue) < self.batch_size:
                try:
                    key, wave = next(source)
                except StopIteration:
                    exhausted = True
                    break
                wave = np.asarray(wave, dtype=np.float32)
                if wave.ndim != 1:
                    raise ValueError(f"input {key}: wave has shape {wave.shape}; expected mono (N,)")
                pending = _Pending(key, len(wave), plan_chunks(len(wave), self.frame, self.chunk_seconds,
                                                               self.overlap_seconds, self.sampling_rate))
                order.append(pending)
                if len(wave) == 0:
                    pending.chunks = []
                for ci, c in enumerate(pending.chunks):
                    queue.append((pending, ci, wave[c.start:c.end]))
            if queue:
                batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
                for (pending, ci, _), logits in zip(batch, self._forward([w for _, _, w in batch])):
                    c = pending.chunks[ci]
                    pending.parts[ci] = logits[c.keep_from:c.keep_to]
            while order and len(order[0].parts) == len(order[0].chunks):
                done = order.popleft()
                vocab = self.model.config.vocab_size
                parts = [done.parts[i] for i in range(len(done.chunks))] or [torch.zeros(0, vocab)]
                yield done.key, torch.cat(parts), done.num_samples
            if exhausted and not queue and not order:
                return

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
            [ids] = ctc_greedy_ids(logits[None], torch.tensor([logits.shape[0]]))
            out = self.tokenizer.decode(ids, output_word_offsets=True)
            words = [Word(w["word"], int(w["start_offset"]) * fs, int(w["end_offset"]) * fs) for w in out.word_offsets]
            return Transcript(" ".join(w.word for w in words), words, duration, "greedy")
        beams = self.lm_decoder.decode_beams(logits.numpy(), beam_width=self.beam_width)
        text, _, word_frames = beams[0][:3]
        words = [Word(w, s * fs, e * fs) for w, (s, e) in word_frames]
        return Transcript(" ".join(w.word for w in words) if words else text.strip(), words, duration, "beam+lm")


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
    """Transcribe [(audio file, output name)] and write the outputs; unreadable files are reported, not fatal."""
    from .data import load_audio

    failed: dict[str, str] = {}

    def waves():
        for path, name in files:
            try:
                yield (path, name), load_audio(path, transcriber.sampling_rate)
            except Exception as e:  # noqa: BLE001 - any decoder error: report the file, go on with the rest
                failed[str(path)] = f"{type(e).__name__}: {e}"
                log.error("%s: cannot read audio (%s); skipped", path, e)

    done, audio_seconds, start = [], 0.0, time.perf_counter()
    for (path, name), transcript in transcriber.stream(waves()):
        outputs = write_outputs(transcript, output_dir / name, formats, path, model_name, srt_limits)
        audio_seconds += transcript.duration
        done.append({"audio": str(path), "text": transcript.text, "duration": transcript.duration,
                     "words": len(transcript.words), "outputs": [str(p) for p in outputs]})
        print(f"{path} ({transcript.duration:.1f} s) -> {output_dir / name}.{{{','.join(formats)}}}")
    seconds = time.perf_counter() - start
    if failed and not done:
        raise UsageError("no file could be read: " + "; ".join(f"{p}: {e}" for p, e in failed.items()))
    if failed:
        print(f"{len(failed)} file(s) could not be read: {', '.join(failed)}")
    rtfx = audio_seconds / seconds if seconds > 0 else float("inf")
    print(f"transcribed {len(done)} file(s), {audio_seconds:.1f} s of audio in {seconds:.1f} s "
          f"(RTFx {rtfx:.1f}, {transcriber.device})")
    return {"files": done, "failed": failed, "output_dir": str(output_dir), "audio_seconds": audio_seconds,
            "seconds": seconds, "rtfx": rtfx, "device": str(transcriber.device)}


def transcribe(cfg: DictConfig) -> dict:
    """`w2vbert-asr transcribe model=<dir or Hub id> <files or folders>`."""
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
    model, processor = load_model(cfg.model_dir, device)
    lm_decoder, beam_width = None, 64
    if tcfg.get("lm"):
        from .lm import lm_info, load_decoder

        lm_decoder = load_decoder(processor.tokenizer, tcfg.lm)
        beam_width = int(tcfg.get("beam_width") or lm_info(tcfg.lm).get("beam_width", beam_width))
    transcriber = Transcriber(model, processor, device, tcfg.chunk_seconds, tcfg.overlap_seconds, tcfg.batch_size,
                              lm_decoder, beam_width)
    limits = {"max_seconds": float(tcfg.get("srt_max_seconds", 7.0)), "max_chars": int(tcfg.get("srt_max_chars", 42)),
              "max_gap": float(tcfg.get("srt_max_gap", 1.0))}
    return transcribe_files(transcriber, files, Path(tcfg.output_dir), formats, str(cfg.model_dir), limits)

