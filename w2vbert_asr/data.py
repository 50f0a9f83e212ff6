"""Data preparation: read a source, normalise and filter it, build the vocabulary and the processor.

Usage:
    w2vbert-asr prepare data.root=/data/cv-corpus-21.0/mn lang=mn output_dir=outputs/mn
    w2vbert-asr prepare recipe=mn data.root=/data/cv-corpus-21.0/mn
    w2vbert-asr prepare data=manifest data.files.train=train.csv data.files.dev=dev.csv data.files.test=test.csv lang=xx
    w2vbert-asr prepare data=hf data.name=/data/my_saved_dataset lang=xx

Sources: a Common Voice release folder (clips/ + <split>.tsv), a `datasets` dataset (Hub id or local
folder) or CSV/TSV/JSONL manifests. Audio is decoded with soundfile and resampled with soxr to 16 kHz
mono. Every row that cannot be used is skipped, counted by reason, listed in `prepare_report.json`
and summarised on the terminal; the run only stops when a split ends up empty.

Writes under `output_dir`:
    processor/                  Wav2Vec2BertProcessor (tokenizer + feature extractor) + normalizer.json
    prepared/<split>.arrow      id, path, sentence (raw), text (normalised), duration, speaker ("" if unknown),
                                audio (16 kHz float32)
    prepare_report.json         counts, skip reasons with examples, vocabulary and out-of-vocabulary rates
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import UsageError
from .features import SAMPLING_RATE, ctc_output_frames
from .model import architecture_config
from .storage import atomic_write_json
from .text import Normalizer, Vocabulary, build_processor

log = logging.getLogger(__name__)

PREPARED = "prepared"
PROCESSOR = "processor"
REPORT = "prepare_report.json"
# Skip reasons, in the order they are checked (cheap checks first: no decoding for a bad path or text).
REASONS = ("path_escape", "empty_text", "contains_digits", "missing_file", "undecodable_audio", "duration",
           "transcript_too_long")
# Columns naming who spoke a row (Common Voice: client_id); `compare` resamples whole speakers when known.
SPEAKER_COLUMNS = ("client_id", "speaker_id", "speaker")
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
    base: str | None = None      # folder that path must stay inside
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

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "hours": round(self.seconds / 3600, 4),
                "skipped": dict(self.skipped), "examples": {k: v for k, v in self.examples.items()}}


# --------------------------------------------------------------------------------------------- audio
def load_audio(source: str | Path | bytes, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Decode any format soundfile reads (WAV, FLAC, OGG, MP3) to mono float32 at `sampling_rate`: (N,)."""
    data, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32",
                       always_2d=True)
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sampling_rate:
        wave = soxr.resample(wave, sr, sampling_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)


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


def read_commonvoice(root: Path, split: str) -> Iterator[RawRow]:
    """Rows of `<root>/<split>.tsv`. Common Voice writes sentences raw (no CSV quoting): a sentence may
    start with a `"` that a CSV reader would treat as an opening quote and swallow lines with."""
    tsv = root / f"{split}.tsv"
    if not tsv.is_file():
        found = sorted(p.stem for p in root.glob("*.tsv"))
        raise UsageError(f"{tsv} not found. Point data.root at a Common Voice language folder "
                         f"(clips/ + train.tsv ...); TSVs there: {found or 'none'}")
    clips = root / "clips"
    for line, rec in _read_delimited(tsv, "\t", csv.QUOTE_NONE):
        path = rec.get("path") or ""
        yield RawRow(id=Path(path).stem or f"{split}-{line}", sentence=rec.get("sentence") or "",
                     file=str(tsv), line=line, path=path, base=str(clips), speaker=_speaker(rec))


def read_manifest(file: Path, audio_column: str, text_column: str, root: Path | None) -> Iterator[RawRow]:
    """Rows of a CSV (quoted), TSV (unquoted) or JSONL manifest; relative audio paths resolve against root."""
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


def read_hf(name: str, config: str | None, split: str, audio_column: str, text_column: str) -> Iterator[RawRow]:
    """Rows of a `datasets` split. Audio stays undecoded (`Audio(decode=False)`): datasets 5 decodes only
    through torchcodec + FFmpeg, so we decode the bytes with soundfile ourselves."""
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
    for i, rec in enumerate(ds):
        audio = rec[audio_column]
        audio = audio if isinstance(audio, dict) else {"path": audio, "bytes": None}
        yield RawRow(id=str(rec.get("id") or rec.get("path") or i), sentence=str(rec[text_column] or ""),
                     file=f"{name}:{split}", line=i, path=audio.get("path"), audio_bytes=audio.get("bytes"),
                     speaker=_speaker(rec))


def read_split(data_cfg: DictConfig, split: str) -> Iterator[RawRow]:
    source = data_cfg.source
    if source == "commonvoice":
        root = Path(data_cfg.root)
        if not root.is_dir():
            raise UsageError(f"data.root={root} is not a folder; point it at a Common Voice language folder")
        rows = read_commonvoice(root, split)
    elif source == "manifest":
        files = data_cfg.files
        if split not in files:
            raise UsageError(f"no manifest for split {split!r}: set data.files.{split}=<csv|tsv|jsonl>")
        rows = read_manifest(Path(files[split]), data_cfg.audio_column, data_cfg.text_column,
                             Path(data_cfg.root) if data_cfg.root else None)
    elif source == "hf":
        rows = read_hf(data_cfg.name, data_cfg.get("config"), split, data_cfg.audio_column, data_cfg.text_column)
    else:
        raise UsageError(f"data.source={source!r}: choose data=commonvoice, data=hf or data=manifest")
    if data_cfg.get("limit"):
        rows = (r for i, r in zip(range(int(data_cfg.limit)), rows))
    return rows


# --------------------------------------------------------------------------------------------- rows
def _resolve(row: RawRow) -> Path | None:
    """The audio path, or None when it escapes its base folder (never read such a file)."""
    if row.base is None:
        return Path(row.path)
    base = Path(row.base).resolve()
    path = (base / row.path).resolve()
    return path if path.is_relative_to(base) else None


def _process(row: RawRow, normalizer: Normalizer, data_cfg, model_config) -> tuple[dict | None, str, str]:
    """-> (example or None, skip reason, detail). Checks are ordered cheapest first."""
    path = None
    if row.audio_bytes is None:
        if not row.path:
            return None, "missing_file", "no audio path in the row"
        path = _resolve(row)
        if path is None:
            return None, "path_escape", f"{row.path!r} points outside {row.base}; refusing to read it"
    if normalizer.digits == "drop_row" and normalizer.has_digits(row.sentence):
        return None, "contains_digits", f"{row.sentence!r} has digits and text.digits=drop_row"
    text = normalizer(row.sentence)
    if not text:
        return None, "empty_text", f"{row.sentence!r} is empty after normalisation"
    if path is not None and not path.is_file():
        return None, "missing_file", f"{path} does not exist"
    try:
        wave = load_audio(row.audio_bytes if row.audio_bytes is not None else path, data_cfg.sampling_rate)
    except Exception as e:  # soundfile raises several types for corrupt files; all mean the same here
        return None, "undecodable_audio", f"{path or row.file}: {type(e).__name__}: {e}"
    duration = len(wave) / data_cfg.sampling_rate
    if not data_cfg.min_duration <= duration <= data_cfg.max_duration:
        return None, "duration", (f"{duration:.2f} s is outside data.min_duration={data_cfg.min_duration} .. "
                                  f"data.max_duration={data_cfg.max_duration}")
    frames, needed = ctc_output_frames(len(wave), model_config), ctc_min_frames(text)
    if needed > frames:
        return None, "transcript_too_long", (f"{len(text)} characters need {needed} CTC frames, "
                                             f"the {duration:.2f} s clip gives {frames}")
    return {"id": row.id, "path": str(path or row.path or ""), "sentence": row.sentence, "text": text,
            "duration": duration, "speaker": row.speaker, "audio": wave}, "", ""


def _features():
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "path": datasets.Value("string"), "sentence": datasets.Value("string"),
        "text": datasets.Value("string"), "duration": datasets.Value("float32"), "speaker": datasets.Value("string"),
        "audio": datasets.List(datasets.Value("float32")),
    })


def prepare_split(cfg: DictConfig, split: str, normalizer: Normalizer, out_file: Path | None) -> tuple[SplitReport, list[str]]:
    """Read, filter and (when out_file is given) write one split. -> (report, normalised texts kept)."""
    from datasets.arrow_writer import ArrowWriter

    model_config = architecture_config(cfg.model)
    report, texts = SplitReport(), []
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrowWriter(features=_features(), path=str(out_file)) if out_file else None
    rows = read_split(cfg.data, split)
    for row in tqdm(rows, desc=f"prepare {split}", unit="clip", mininterval=2):
        report.rows += 1
        example, reason, detail = _process(row, normalizer, cfg.data, model_config)
        if example is None:
            report.skip(row, reason, detail, cfg.data.report_examples)
            continue
        report.kept += 1
        report.seconds += example["duration"]
        texts.append(example["text"])
        if writer is not None:  # ArrowWriter defines __len__: an empty one is falsy
            writer.write(example)
    if writer is not None:
        writer.finalize()
        writer.close()
    return report, texts


def _fingerprint(cfg: DictConfig) -> str:
    """What the prepared data depends on: the data source, the text rules, the CTC frame rate and the
    columns (data prepared before a column existed is prepared again rather than read without it)."""
    keys = {"data": OmegaConf.to_container(cfg.data, resolve=True), "text": OmegaConf.to_container(cfg.text, resolve=True),
            "frames": str(architecture_config(cfg.model).to_dict()), "columns": sorted(_features())}
    blob = json.dumps(keys, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def splits_of(data_cfg: DictConfig) -> dict[str, list[str]]:
    """Prepared split name -> source splits: train merges data.train_splits; eval/test stay separate."""
    out = {"train": list(data_cfg.train_splits)}
    for s in (data_cfg.eval_split, data_cfg.test_split):
        if s and s not in out:
            out[s] = [s]
    return out


def prepare(cfg: DictConfig) -> dict:
    """Prepare every split, write the processor and report. Skips work when the same inputs are prepared."""
    out = Path(cfg.output_dir)
    prepared = out / PREPARED
    stamp = prepared / "DONE"
    fingerprint = _fingerprint(cfg)
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        log.info("prepared data in %s is up to date (fingerprint %s)", prepared, fingerprint)
        return json.loads((out / REPORT).read_text())
    stamp.unlink(missing_ok=True)
    normalizer = Normalizer.from_config(cfg.text)
    report: dict = {"source": OmegaConf.to_container(cfg.data, resolve=True), "fingerprint": fingerprint,
                    "splits": {}, "oov": {}}
    texts: dict[str, list[str]] = {}
    for name, sources in splits_of(cfg.data).items():
        merged, kept_texts = SplitReport(), []
        for i, src in enumerate(sources):
            tmp_file = prepared / f"{name}.{i}.arrow.tmp"
            r, t = prepare_split(cfg, src, normalizer, tmp_file)
            merged.rows += r.rows
            merged.kept += r.kept
            merged.seconds += r.seconds
            merged.skipped.update(r.skipped)
            for k, v in r.examples.items():
                merged.examples[k].extend(v)
            kept_texts += t
        report["splits"][name] = merged.to_dict()
        texts[name] = kept_texts
        _merge_arrow([prepared / f"{name}.{i}.arrow.tmp" for i in range(len(sources))], prepared / f"{name}.arrow")
    _print_summary(report["splits"])
    empty = [s for s, r in report["splits"].items() if r["kept"] == 0]
    if empty:
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
    stamp.write_text(fingerprint)
    return report


def _merge_arrow(parts: list[Path], target: Path) -> None:
    """Concatenate per-source Arrow files into one split file (a rename when there is one part)."""
    if len(parts) == 1:
        os.replace(parts[0], target)
        return
    import datasets

    merged = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in parts])
    tmp = target.with_suffix(".tmp")
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=merged.features, path=str(tmp)) as w:
        for batch in merged.iter(batch_size=256):
            w.write_batch(batch)
        w.finalize()
    os.replace(tmp, target)
    for p in parts:
        p.unlink()


def prepare_eval_split(cfg: DictConfig, split: str, normalizer: Normalizer, results_dir: Path):
    """Read one source split for scoring a finished model (its own normaliser), report skips, -> Dataset."""
    import datasets

    out_file = results_dir / PREPARED / f"{split}.arrow"
    report, _ = prepare_split(cfg, split, normalizer, out_file)
    _print_summary({split: report.to_dict()})
    if report.kept == 0:
        raise UsageError(f"split {split!r} has no usable rows; reasons: {dict(report.skipped)}")
    atomic_write_json(results_dir / f"eval_{split}_report.json", report.to_dict())
    return datasets.Dataset.from_file(str(out_file)).with_format("numpy")


def load_prepared(output_dir: str | Path, split: str):
    """A prepared split as a memory-mapped `datasets.Dataset` in numpy format."""
    import datasets

    path = Path(output_dir) / PREPARED / f"{split}.arrow"
    if not path.is_file():
        raise UsageError(f"{path} not found: run `w2vbert-asr prepare` with the same output_dir first")
    return datasets.Dataset.from_file(str(path)).with_format("numpy")


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
