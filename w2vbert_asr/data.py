"""Data preparation: read a source, normalise and filter it, build the vocabulary and the processor.

Usage:
    w2vbert-asr prepare data.root=/data/cv-corpus-21.0/mn lang=mn output_dir=outputs/mn
    w2vbert-asr prepare recipe=mn data.root=/data/cv-corpus-21.0/mn data.num_proc=8
    w2vbert-asr prepare data=manifest data.files.train=train.csv data.files.dev=dev.csv data.files.test=test.csv lang=xx
    w2vbert-asr prepare data=hf data.name=/data/my_saved_dataset lang=xx

Sources: a Common Voice release folder (clips/ + <split>.tsv), a `datasets` dataset (Hub id or local
folder) or CSV/TSV/JSONL manifests. Audio is decoded with soundfile and resampled with soxr to 16 kHz
mono, by `data.num_proc` processes (`auto`: every core this process may use) over chunks of rows; the
results are written in row order, so the output does not depend on `num_proc`. Every row that cannot be
used is skipped, counted by reason, listed in `prepare_report.json` and summarised on the terminal; the
run only stops when a split ends up empty (after writing the report).

Writes under `output_dir`:
    processor/                  Wav2Vec2BertProcessor (tokenizer + feature extractor) + normalizer.json
    prepared/<split>.arrow      id, path, sentence (raw), text (normalised), duration, speaker ("" if unknown),
                                audio (16 kHz int16 PCM: read it with `to_float` / `waves_of`)
    prepared/DONE               what the prepared data was made from (settings, input files): a later run
                                re-prepares when any of it changed, and says what
    prepare_report.json         counts, skip reasons with examples, vocabulary and out-of-vocabulary rates
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from omegaconf import DictConfig, OmegaConf

from . import UsageError
from .features import INT16_SCALE, SAMPLING_RATE, ctc_output_frames
from .storage import atomic_write_json, disk_full_guard
from .text import Normalizer, Vocabulary, build_processor

log = logging.getLogger(__name__)

PREPARED = "prepared"
PROCESSOR = "processor"
REPORT = "prepare_report.json"
STAMP = "DONE"
# Bump when what prepare writes changes meaning, so that older prepared folders are re-prepared.
# 2: audio stored as int16 PCM (was float32).
PREPARED_FORMAT = 2
# The prepared columns (see _features); in the fingerprint too, so that data prepared before a column
# existed is prepared again rather than read without it.
COLUMNS = ("id", "path", "sentence", "text", "duration", "speaker", "audio")
# Skip reasons, in the order they are checked (cheap checks first: no decoding for a bad path or text).
REASONS = ("path_escape", "empty_text", "contains_digits", "missing_file", "undecodable_audio", "duration",
           "transcript_too_long", "out_of_vocabulary")
# Columns naming who spoke a row (Common Voice: client_id); `compare` resamples whole speakers when known.
SPEAKER_COLUMNS = ("client_id", "speaker_id", "speaker")
# Rows per unit of work for the decoding processes: small enough to balance the processes and keep the
# rows in flight few, big enough that handing them over costs little next to decoding ~16 clips.
CHUNK_ROWS = 16
# Settings that change how prepare runs but not what it writes: left out of the fingerprint.
RUN_ONLY_KEYS = ("num_proc", "force_prepare")
csv.field_size_limit(2**24)  # Common Voice sentences are short, but a broken file should not abort the read


@dataclass
class RawRow:
    """One transcript row as the source wrote it, with where it came from for error messages."""

    id: str
    sentence: str
    file: str          # the TSV/manifest the row came from (or dataset name)
    line: int          # 1-based line in that file (header is line 1), or dataset row index
    path: str | None = None      # audio file path as written in the row
    audio_bytes: bytes | None = None
    base: str | None = None      # folder a relative path is resolved against
    contained: bool = False      # the path must name a file inside `base` (Common Voice clips/)
    speaker: str = ""            # who spoke it, when the source says (SPEAKER_COLUMNS)


@dataclass
class SplitReport:
    rows: int = 0
    kept: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def skip(self, row: RawRow, reason: str, detail: str, limit: int) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < limit:
            self.examples[reason].append({"file": row.file, "row": row.line, "id": row.id, "detail": detail})

    def add(self, other: SplitReport) -> None:
        self.rows += other.rows
        self.kept += other.kept
        self.seconds += other.seconds
        self.skipped.update(other.skipped)
        for k, v in other.examples.items():
            self.examples[k].extend(v)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "hours": round(self.seconds / 3600, 4),
                "skipped": dict(self.skipped), "examples": {k: v for k, v in self.examples.items()}}


# --------------------------------------------------------------------------------------------- audio
class AudioError(UsageError):
    """An audio file that cannot be used: missing, empty, truncated or in a format soundfile cannot read."""


def load_audio(source: str | Path | bytes, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Decode any format soundfile reads (WAV, FLAC, OGG, MP3) to mono float32 at `sampling_rate`: (N,).

    Raises AudioError naming the file when it is missing, empty or undecodable (libsndfile reports an
    empty or truncated MP3 as "File does not exist", which sends users looking in the wrong place)."""
    name = "audio bytes" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        if not os.path.exists(source):
            raise AudioError(f"{name}: no such file")
        if os.path.isfile(source) and os.path.getsize(source) == 0:
            raise AudioError(f"{name}: empty or undecodable audio (the file is empty)")
    elif not source:
        raise AudioError(f"{name}: empty or undecodable audio (no bytes)")
    try:
        data, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32",
                           always_2d=True)
    except Exception as e:  # soundfile raises several types for corrupt files; all mean the same here
        why = getattr(e, "error_string", None) or str(e)
        # libsndfile says "File does not exist" of an existing file it cannot parse (an empty or cut MP3)
        detail = "" if "does not exist" in why else f" ({why})"
        raise AudioError(f"{name}: empty or undecodable audio{detail}") from e
    if data.shape[0] == 0:
        raise AudioError(f"{name}: empty or undecodable audio (0 samples decoded)")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sampling_rate:
        wave = soxr.resample(wave, sr, sampling_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)


def to_int16(wave: np.ndarray) -> np.ndarray:
    """float32 (N,) in [-1, 1) -> int16 PCM (N,), as prepared data stores it (rounded, clipped)."""
    return np.clip(np.rint(wave * INT16_SCALE), -INT16_SCALE, INT16_SCALE - 1).astype(np.int16)


def to_float(audio) -> np.ndarray:
    """A prepared `audio` value -> float32 (N,) in [-1, 1): int16 PCM is scaled by 1/32768; float audio
    (datasets built in memory, older files) passes through. Every reader of the `audio` column uses it."""
    a = np.asarray(audio)
    if a.dtype.kind in "iu":
        return np.multiply(a, np.float32(1.0 / INT16_SCALE), dtype=np.float32)  # one pass, no int copy
    return a.astype(np.float32, copy=False)


def waves_of(audios: Iterable) -> list[np.ndarray]:
    """A batch of prepared `audio` values (a column slice, or one per example) -> float32 waves, for `pad_waves`."""
    return [to_float(a) for a in audios]


def ctc_min_frames(text: str) -> int:
    """Frames CTC needs for a label sequence: one per character plus a blank between repeated ones."""
    return len(text) + sum(a == b for a, b in zip(text, text[1:]))


# --------------------------------------------------------------------------------------------- sources
def _speaker(rec: dict) -> str:
    return next((str(rec[c]) for c in SPEAKER_COLUMNS if rec.get(c) not in (None, "")), "")


def _read_delimited(path: Path, delimiter: str, quoting: int) -> Iterator[tuple[int, dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        for i, rec in enumerate(reader, start=2):
            yield i, rec


def _commonvoice_tsv(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise UsageError(f"data.root={root} is not a folder; point it at a Common Voice language folder")
    tsv = root / f"{split}.tsv"
    if not tsv.is_file():
        found = sorted(p.stem for p in root.glob("*.tsv"))
        raise UsageError(f"{tsv} not found. Point data.root at a Common Voice language folder "
                         f"(clips/ + train.tsv ...); TSVs there: {found or 'none'}")
    return tsv


def read_commonvoice(root: Path, split: str) -> Iterator[RawRow]:
    """Rows of `<root>/<split>.tsv`. Common Voice writes sentences raw (no CSV quoting): a sentence may
    start with a `"` that a CSV reader would treat as an opening quote and swallow lines with.
    Paths are file names inside clips/: one that leads out of it is refused (`path_escape`)."""
    tsv = _commonvoice_tsv(root, split)
    clips = root / "clips"
    for line, rec in _read_delimited(tsv, "\t", csv.QUOTE_NONE):
        path = rec.get("path") or ""
        yield RawRow(id=Path(path).stem or f"{split}-{line}", sentence=rec.get("sentence") or "",
                     file=str(tsv), line=line, path=path, base=str(clips), contained=True, speaker=_speaker(rec))


def _manifest_file(files, split: str) -> Path:
    if split not in files:
        raise UsageError(f"no manifest for split {split!r}: set data.files.{split}=<csv|tsv|jsonl>")
    file = Path(files[split])
    if not file.is_file():
        raise UsageError(f"manifest {file} not found (set data.files.{split}=<path>)")
    return file


def read_manifest(file: Path, audio_column: str, text_column: str, root: Path | None) -> Iterator[RawRow]:
    """Rows of a CSV (quoted), TSV (unquoted) or JSONL manifest. Audio paths may be absolute; relative ones
    (`../` and symlinked folders included) resolve against `root`, or the manifest's own folder."""
    if not file.is_file():
        raise UsageError(f"manifest {file} not found (set data.files.<split>=<path>)")
    base = root or file.parent
    if file.suffix == ".jsonl":
        def records():
            with file.open(encoding="utf-8") as f:
                for i, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            yield i, json.loads(line)
                        except json.JSONDecodeError as e:
                            raise UsageError(f"{file}:{i}: not valid JSON ({e}); fix or remove the line") from e
        items = records()
    else:
        tsv = file.suffix == ".tsv"
        items = _read_delimited(file, "\t" if tsv else ",", csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    for line, rec in items:
        if audio_column not in rec or text_column not in rec:
            raise UsageError(f"{file}:{line}: needs columns {audio_column!r} and {text_column!r} "
                             f"(set data.audio_column/data.text_column); found {sorted(rec)}")
        path = str(rec[audio_column] or "")
        yield RawRow(id=str(rec.get("id") or Path(path).stem or line), sentence=str(rec[text_column] or ""),
                     file=str(file), line=line, path=path, base=str(base), speaker=_speaker(rec))


def _open_hf(name: str, config: str | None, split: str, audio_column: str, text_column: str):
    """A `datasets` split with its audio column left undecoded (`Audio(decode=False)`): datasets 5 decodes
    only through torchcodec + FFmpeg, so we decode the bytes with soundfile ourselves."""
    import datasets

    local = Path(name)
    if local.exists() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
        ds = datasets.load_from_disk(str(local))
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name, config, split=split)
    for col in (audio_column, text_column):
        if col not in ds.column_names:
            raise UsageError(f"dataset {name} split {split} has no column {col!r}; columns: {ds.column_names} "
                             "(set data.audio_column / data.text_column)")
    if isinstance(ds.features[audio_column], datasets.Audio):
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    return ds


def read_hf(name: str, config: str | None, split: str, audio_column: str, text_column: str) -> Iterator[RawRow]:
    """Rows of a `datasets` split, audio as the stored bytes (or the path when only a path is stored)."""
    ds = _open_hf(name, config, split, audio_column, text_column)
    for i, rec in enumerate(ds):
        audio = rec[audio_column]
        audio = audio if isinstance(audio, dict) else {"path": audio, "bytes": None}
        yield RawRow(id=str(rec.get("id") or rec.get("path") or i), sentence=str(rec[text_column] or ""),
                     file=f"{name}:{split}", line=i, path=audio.get("path"), audio_bytes=audio.get("bytes"),
                     speaker=_speaker(rec))


def read_split(data_cfg: DictConfig, split: str) -> Iterator[RawRow]:
    source = data_cfg.source
    if source == "commonvoice":
        rows = read_commonvoice(Path(data_cfg.root), split)
    elif source == "manifest":
        rows = read_manifest(_manifest_file(data_cfg.files, split), data_cfg.audio_column, data_cfg.text_column,
                             Path(data_cfg.root) if data_cfg.root else None)
    elif source == "hf":
        rows = read_hf(data_cfg.name, data_cfg.get("config"), split, data_cfg.audio_column, data_cfg.text_column)
    else:
        raise UsageError(f"data.source={source!r}: choose data=commonvoice, data=hf or data=manifest")
    if data_cfg.get("limit"):
        rows = islice(rows, int(data_cfg.limit))
    return rows


# --------------------------------------------------------------------------------------------- rows
def _resolve(row: RawRow) -> Path | None:
    """The audio path, or None when a contained path leads out of its folder (never read such a file).

    Paths are compared normalised (`a/../b` -> `b`) without resolving symlinks: a clips/ folder that is
    a symlink, or a clip that is one, is the user's layout, not an escape."""
    if row.base is None:
        return Path(row.path)
    path = Path(os.path.normpath(os.path.join(os.path.abspath(row.base), row.path)))
    if row.contained:
        base = os.path.normpath(os.path.abspath(row.base))
        if os.path.commonpath([base, str(path)]) != base or str(path) == base:
            return None
    return path


@dataclass(frozen=True)
class _Rules:
    """Everything deciding whether a row is kept; picklable, handed to each decoding process once."""

    normalizer: Normalizer
    sampling_rate: int
    min_duration: float
    max_duration: float
    frames: dict  # the architecture's frame arithmetic (see features.ctc_output_frames)

    @classmethod
    def from_config(cls, cfg: DictConfig, normalizer: Normalizer) -> _Rules:
        from .model import architecture_config

        arch = architecture_config(cfg.model)
        keys = ("add_adapter", "adapter_kernel_size", "adapter_stride", "num_adapter_layers")
        return cls(normalizer, int(cfg.data.sampling_rate), float(cfg.data.min_duration),
                   float(cfg.data.max_duration), {k: getattr(arch, k) for k in keys})


class _Frames:
    """The attributes of a model config that `ctc_output_frames` reads."""

    def __init__(self, frames: dict):
        self.__dict__.update(frames)


def _process(row: RawRow, rules: _Rules) -> tuple[dict | None, str, str]:
    """-> (example or None, skip reason, detail). Checks are ordered cheapest first. The example's audio is
    int16 PCM (N,)."""
    path = None
    if row.audio_bytes is None:
        if not row.path:
            return None, "missing_file", "no audio path in the row"
        path = _resolve(row)
        if path is None:
            return None, "path_escape", f"{row.path!r} points outside {row.base}; refusing to read it"
    normalizer = rules.normalizer
    if normalizer.digits == "drop_row" and normalizer.has_digits(row.sentence):
        return None, "contains_digits", f"{row.sentence!r} has digits and text.digits=drop_row"
    text = normalizer(row.sentence)
    if not text:
        return None, "empty_text", f"{row.sentence!r} is empty after normalisation"
    if path is not None and not path.is_file():
        return None, "missing_file", f"{path} does not exist"
    try:
        wave = load_audio(row.audio_bytes if row.audio_bytes is not None else path, rules.sampling_rate)
    except AudioError as e:
        return None, "undecodable_audio", str(e) if path else f"{row.file} row {row.line}: {e}"
    duration = len(wave) / rules.sampling_rate
    if not rules.min_duration <= duration <= rules.max_duration:
        return None, "duration", (f"{duration:.2f} s is outside data.min_duration={rules.min_duration} .. "
                                  f"data.max_duration={rules.max_duration}")
    frames, needed = ctc_output_frames(len(wave), _Frames(rules.frames)), ctc_min_frames(text)
    if needed > frames:
        return None, "transcript_too_long", (f"{len(text)} characters need {needed} CTC frames, "
                                             f"the {duration:.2f} s clip gives {frames}")
    return {"id": row.id, "path": str(path or row.path or ""), "sentence": row.sentence, "text": text,
            "duration": duration, "speaker": row.speaker, "audio": to_int16(wave)}, "", ""


# Set once in each decoding process by the pool's initializer (and in-process when num_proc is 1).
_RULES: _Rules | None = None


def _init_worker(rules: _Rules) -> None:
    global _RULES
    _RULES = rules


def _process_chunk(rows: list[RawRow]) -> list[tuple[dict | None, str, str]]:
    return [_process(row, _RULES) for row in rows]


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


class Decoder:
    """Runs `_process` over rows, in `num_proc` processes or in this one, and yields the results in row
    order. At most 2 chunks per process are in flight, so memory stays bounded whatever the split's size.

    Usage:
        with Decoder(rules, num_proc=4) as decoder:
            for row, (example, reason, detail) in decoder.map(rows): ...
    """

    def __init__(self, rules: _Rules, num_proc: int = 1):
        self.rules, self.num_proc, self.pool = rules, num_proc, None

    def __enter__(self) -> Decoder:
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
                yield from zip(chunk, _process_chunk(chunk))
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, self.pool.apply_async(_process_chunk, (chunk,))))
            if len(pending) >= 2 * self.num_proc:
                done, result = pending.popleft()
                yield from zip(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get())


# --------------------------------------------------------------------------------------------- writing
def _features():
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "path": datasets.Value("string"), "sentence": datasets.Value("string"),
        "text": datasets.Value("string"), "duration": datasets.Value("float32"), "speaker": datasets.Value("string"),
        "audio": datasets.List(datasets.Value("int16")),
    })


def _table(examples: list[dict], schema):
    """Kept examples -> one Arrow table; the audio column is built from the int16 arrays without copies
    through Python lists."""
    import pyarrow as pa

    audio = [e["audio"] for e in examples]
    offsets = np.zeros(len(audio) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in audio], out=offsets[1:])
    columns = {k: [e[k] for e in examples] for k in COLUMNS if k != "audio"}
    columns["audio"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(audio)))
    return pa.table(columns, schema=schema)


def prepare_split(cfg: DictConfig, split: str, normalizer: Normalizer, out_file: Path,
                  decoder: Decoder | None = None, rows: Iterable[RawRow] | None = None,
                  vocab: set[str] | None = None) -> tuple[SplitReport, list[str]]:
    """Read, filter and write one split. -> (report, normalised texts kept). rows: read these instead of
    the split's source; vocab: skip rows with other characters (pseudo-labels, data.extra_train).

    Results are streamed to the Arrow file in row order, one table per CHUNK_ROWS kept rows. A full disk
    gives one error naming the free space and the folder, after removing the partial file."""
    if decoder is None:
        with Decoder(_Rules.from_config(cfg, normalizer), num_processes(cfg.data.get("num_proc"))) as decoder:
            return prepare_split(cfg, split, normalizer, out_file, decoder, rows, vocab)
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    report, texts, kept = SplitReport(), [], []
    out_file.parent.mkdir(parents=True, exist_ok=True)
    features = _features()
    with disk_full_guard(out_file.parent, cleanup=[out_file], advice="then run the command again"), \
            ArrowWriter(features=features, path=str(out_file)) as writer, \
            tqdm(desc=f"prepare {split}", unit="clip", mininterval=2) as bar:  # shows clips/s
        for row, (example, reason, detail) in decoder.map(read_split(cfg.data, split) if rows is None else rows):
            report.rows += 1
            bar.update()
            if example is not None and vocab is not None and set(example["text"]) - vocab - {" "}:
                oov = "".join(sorted(set(example["text"]) - vocab - {" "}))
                example, reason, detail = None, "out_of_vocabulary", f"{oov!r} not in the labelled train vocabulary"
            if example is None:
                report.skip(row, reason, detail, cfg.data.report_examples)
                continue
            report.kept += 1
            report.seconds += example["duration"]
            texts.append(example["text"])
            kept.append(example)
            if len(kept) == CHUNK_ROWS:
                writer.write_table(_table(kept, features.arrow_schema))
                kept = []
        if kept:
            writer.write_table(_table(kept, features.arrow_schema))
        writer.finalize()
    return report, texts


def _merge_arrow(parts: list[Path], target: Path) -> None:
    """Concatenate per-source Arrow files into one split file (a rename when there is one part)."""
    if len(parts) == 1:
        os.replace(parts[0], target)
        return
    import datasets
    from datasets.arrow_writer import ArrowWriter

    tmp = target.with_name(target.name + ".tmp")
    with disk_full_guard(target.parent, cleanup=[tmp, *parts], advice="then run the command again"):
        merged = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in parts])
        with ArrowWriter(features=merged.features, path=str(tmp)) as w:
            for table in merged.with_format("arrow").iter(batch_size=CHUNK_ROWS):
                w.write_table(table)
            w.finalize()
        os.replace(tmp, target)
    for p in parts:
        p.unlink()


# --------------------------------------------------------------------------------------------- fingerprint
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _audio_digest(paths: Iterable[str | Path | None]) -> str:
    """(path, size, mtime) of every audio file the rows name: a stat each, never a decode."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p) if p else None
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode() if st else f"{p}\0-\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


def _hf_audio_paths(column, limit: int | None) -> Iterator[str]:
    """Paths of the first `limit` rows of a `datasets` audio column (Arrow) that store a path and no bytes,
    read without touching the bytes."""
    import pyarrow as pa

    seen = 0
    for chunk in column.chunks:
        if limit is not None and seen >= limit:
            return
        chunk = chunk.slice(0, None if limit is None else limit - seen)
        seen += len(chunk)
        if pa.types.is_struct(chunk.type) and {"bytes", "path"} <= {f.name for f in chunk.type}:
            no_bytes = chunk.field("bytes").is_null().to_pylist()
            yield from (p for p, nb in zip(chunk.field("path").to_pylist(), no_bytes) if nb)
        elif pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
            yield from chunk.to_pylist()


def _input_digests(data_cfg: DictConfig, sources: Iterable[str]) -> dict[str, str]:
    """What prepare reads, by a name users recognise -> digest: each TSV or manifest (its bytes), the
    audio files its rows name (path, size, mtime), a `datasets` split (its fingerprint and cache files)."""
    out: dict[str, str] = {}
    limit = int(data_cfg.limit) if data_cfg.get("limit") else None
    for split in sources:
        if data_cfg.source in ("commonvoice", "manifest"):
            if data_cfg.source == "commonvoice":
                file = _commonvoice_tsv(Path(data_cfg.root), split)
            else:
                file = _manifest_file(data_cfg.files, split)
            name = file.name if file.name not in out else str(file)
            out[name] = _file_digest(file)
            rows = read_split(data_cfg, split)  # data.limit applied, as prepare reads them
            out[f"audio of {name}"] = _audio_digest(_resolve(r) if r.path else None for r in rows)
        elif data_cfg.source == "hf":
            ds = _open_hf(data_cfg.name, data_cfg.get("config"), split, data_cfg.audio_column,
                          data_cfg.text_column)
            files = [f["filename"] for f in ds.cache_files]
            key = f"{data_cfg.name}:{split}"
            out[key] = _digest([ds._fingerprint, limit, _audio_digest(files)])
            paths = list(_hf_audio_paths(ds.data.column(data_cfg.audio_column), limit))
            if paths:  # rows that store only a path: those files are inputs too
                out[f"audio of {key}"] = _audio_digest(paths)
        else:
            raise UsageError(f"data.source={data_cfg.source!r}: choose data=commonvoice, data=hf or data=manifest")
    return out


def _fingerprint(cfg: DictConfig) -> dict:
    """What the prepared data depends on: the storage format, the settings (data source and filters, text
    rules, the CTC frame rate) and every input file. Kept in prepared/DONE to say what changed later."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in RUN_ONLY_KEYS}
    rules = _Rules.from_config(cfg, Normalizer.from_config(cfg.text))
    settings = {"data settings": _digest(data), "text settings": _digest(OmegaConf.to_container(cfg.text, resolve=True)),
                "model frame rate": _digest(rules.frames)}
    sources = dict.fromkeys(s for srcs in splits_of(cfg.data).values() for s in srcs)
    stamp = {"format": PREPARED_FORMAT, "columns": list(COLUMNS), "settings": settings,
             "inputs": {**_input_digests(cfg.data, sources), **_extra_train_digests(cfg.data)}}
    stamp["fingerprint"] = _digest(stamp)
    return stamp


def _what_changed(old: dict | None, new: dict) -> str | None:
    """None when `old` matches `new`, else a short phrase naming what changed."""
    if old is None:
        return "no prepared data yet"
    if old.get("format") != new["format"]:
        return f"prepared data has an older format ({old.get('format', 1)} -> {new['format']})"
    if old.get("columns") != new["columns"]:
        return f"prepared columns changed ({', '.join(old.get('columns') or [])} -> {', '.join(new['columns'])})"
    changed = [k for group in ("settings", "inputs") for k in {**old.get(group, {}), **new[group]}
               if old.get(group, {}).get(k) != new[group].get(k)]
    return f"{', '.join(changed)} changed" if changed else None


def _read_stamp(stamp: Path) -> dict | None:
    if not stamp.is_file():
        return None
    try:
        old = json.loads(stamp.read_text())
    except ValueError:  # a plain fingerprint string: written before the inputs were tracked
        return {"format": 1}
    return old if isinstance(old, dict) else {"format": 1}


def _extra_train_digests(data_cfg: DictConfig) -> dict[str, str]:
    """data.extra_train manifests by content: a new round's pseudo-labels under the same name re-prepare."""
    out = {}
    for manifest in data_cfg.get("extra_train") or []:
        path = Path(manifest)
        if not path.is_file():
            raise UsageError(f"data.extra_train: {path} not found (a manifest from `w2vbert-asr pseudolabel`)")
        out[f"extra_train {path}"] = _file_digest(path)
    return out


def extra_train_rows(data_cfg: DictConfig) -> Iterator[RawRow]:
    """Rows of the data.extra_train manifests (columns `path` and `text`, e.g. pseudo.tsv)."""
    for manifest in data_cfg.get("extra_train") or []:
        yield from read_manifest(Path(manifest), "path", "text", None)


# --------------------------------------------------------------------------------------------- prepare
def splits_of(data_cfg: DictConfig) -> dict[str, list[str]]:
    """Prepared split name -> source splits: train merges data.train_splits; eval/test stay separate."""
    out = {"train": list(data_cfg.train_splits)}
    for s in (data_cfg.eval_split, data_cfg.test_split):
        if s and s not in out:
            out[s] = [s]
    return out


def prepare(cfg: DictConfig) -> dict:
    """Prepare every split, write the processor and report. Skips the work when the same settings and
    inputs were prepared before (`data.force_prepare=true` to redo it anyway), and says why it redoes it."""
    out = Path(cfg.output_dir)
    prepared = out / PREPARED
    stamp_file = prepared / STAMP
    stamp = _fingerprint(cfg)
    changed = _what_changed(_read_stamp(stamp_file), stamp)
    complete = (out / REPORT).is_file() and all((prepared / f"{s}.arrow").is_file() for s in splits_of(cfg.data))
    if changed is None and complete and not cfg.data.get("force_prepare", False):
        log.info("prepared data in %s is up to date (fingerprint %s)", prepared, stamp["fingerprint"])
        return json.loads((out / REPORT).read_text())
    if cfg.data.get("force_prepare", False):
        changed = "data.force_prepare=true"
    if changed != "no prepared data yet":
        print(f"{changed}: re-preparing {prepared}")
    stamp_file.unlink(missing_ok=True)
    normalizer = Normalizer.from_config(cfg.text)
    source = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in RUN_ONLY_KEYS}
    report: dict = {"source": source, "fingerprint": stamp["fingerprint"],
                    "splits": {}, "oov": {}}
    texts: dict[str, list[str]] = {}
    rules = _Rules.from_config(cfg, normalizer)
    with Decoder(rules, num_processes(cfg.data.get("num_proc"))) as decoder:
        for name, sources in splits_of(cfg.data).items():
            merged, kept_texts = SplitReport(), []
            parts = [prepared / f"{name}.{i}.arrow.tmp" for i in range(len(sources))]
            for src, part in zip(sources, parts):
                r, t = prepare_split(cfg, src, normalizer, part, decoder)
                merged.add(r)
                kept_texts += t
            report["splits"][name] = merged.to_dict()
            texts[name] = kept_texts
            if name == "train" and cfg.data.get("extra_train"):
                # Pseudo-labelled rows join train only, after the labelled ones, and only with characters of
                # the labelled vocabulary (which they never extend: texts["train"] stays the labelled text).
                parts.append(prepared / "train.extra.arrow.tmp")
                vocab = set(Vocabulary.build(kept_texts, cfg.text.min_char_count).chars)
                extra, _ = prepare_split(cfg, "extra_train", normalizer, parts[-1], decoder,
                                         extra_train_rows(cfg.data), vocab)
                report["extra_train"] = extra.to_dict()
                _print_summary({"extra_train": report["extra_train"]})
            _merge_arrow(parts, prepared / f"{name}.arrow")
    _print_summary(report["splits"])
    empty = [s for s, r in report["splits"].items() if r["kept"] == 0]
    if empty:
        atomic_write_json(out / REPORT, report)  # the error below sends the user to it
        raise UsageError(f"split(s) {empty} have no usable rows after filtering; see {out / REPORT} "
                         "for the reasons (most common: wrong data.root, audio paths, or duration bounds)")
    vocab = Vocabulary.build(texts["train"], cfg.text.min_char_count)
    processor_dir = out / PROCESSOR
    build_processor(vocab, processor_dir, cfg.data.sampling_rate)
    normalizer.save(processor_dir)
    report["vocab"] = {"size": len(vocab.token_to_id()), "chars": vocab.chars, "rare_to_unk": vocab.rare}
    for name in texts:
        if name != "train":
            report["oov"][name] = vocab.out_of_vocabulary(texts[name])
            if report["oov"][name]["chars"]:
                log.warning("split %s: characters outside the vocabulary (rate %.3f%%): %s", name,
                            100 * report["oov"][name]["rate"], "".join(report["oov"][name]["chars"]))
    atomic_write_json(out / REPORT, report)
    atomic_write_json(stamp_file, stamp)
    return report


def prepare_eval_split(cfg: DictConfig, split: str, normalizer: Normalizer, results_dir: Path):
    """Read one source split for scoring a finished model (its own normaliser), report skips, -> Dataset."""
    import datasets

    out_file = results_dir / PREPARED / f"{split}.arrow"
    report, _ = prepare_split(cfg, split, normalizer, out_file)
    _print_summary({split: report.to_dict()})
    report_file = atomic_write_json(results_dir / f"eval_{split}_report.json", report.to_dict())
    if report.kept == 0:
        raise UsageError(f"split {split!r} has no usable rows; reasons: {dict(report.skipped)} (see {report_file})")
    return _numpy_view(datasets.Dataset.from_file(str(out_file)))


def load_prepared(output_dir: str | Path, split: str):
    """A prepared split as a memory-mapped `datasets.Dataset` in numpy format; its `audio` is int16 PCM:
    read it through `to_float` / `waves_of`."""
    import datasets

    path = Path(output_dir) / PREPARED / f"{split}.arrow"
    if not path.is_file():
        raise UsageError(f"{path} not found: run `w2vbert-asr prepare` with the same output_dir first")
    return _numpy_view(datasets.Dataset.from_file(str(path)))


def _numpy_view(ds):
    """numpy format keeping the stored dtypes: by default datasets widens every integer array to int64,
    which would make reading int16 audio 4x the memory traffic."""
    return ds.with_format("numpy", dtype=None)


def _print_summary(splits: dict) -> None:
    reasons = sorted({r for s in splits.values() for r in s["skipped"]}, key=REASONS.index)
    header = ["split", "rows", "kept", "hours", *reasons]
    lines = [header] + [[name, s["rows"], s["kept"], f"{s['hours']:.3f}", *(s["skipped"].get(r, 0) for r in reasons)]
                        for name, s in splits.items()]
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    print("\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in lines))
    total = sum(sum(s["skipped"].values()) for s in splits.values())
    if total:
        print(f"skipped {total} rows; reasons and examples (file, row) are in {REPORT}")
