"""Where transcribed clips come from: a Common Voice release folder, CSV/TSV/JSONL manifests, or a `datasets`
dataset; each read as `RawRow`s, nothing decoded yet.

Usage:
    from w2vbert_asr.sources import read_split, resolve
    for row in read_split(cfg.data, "train"):       # RawRow(id, sentence, file, line, path, ...)
        path = resolve(row)                          # None when the path leads out of its folder

Common Voice writes sentences raw (no CSV quoting), so its TSVs are read without quoting; a manifest's
TSV likewise, its CSV with standard quoting, its JSONL one object per line (`read_records`: the one parser
of manifest files, for the data sources and for pseudolabel's pool).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from . import UsageError

# Columns naming who spoke a row (Common Voice: client_id); `compare` resamples whole speakers when known.
SPEAKER_COLUMNS = ("client_id", "speaker_id", "speaker")
# The columns of an extra training manifest (pseudolabel's pseudo.tsv).
EXTRA_AUDIO_COLUMN, EXTRA_TEXT_COLUMN = "path", "text"
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


def resolve(row: RawRow) -> Path | None:
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


def speaker_of(rec: dict) -> str:
    return next((str(rec[c]) for c in SPEAKER_COLUMNS if rec.get(c) not in (None, "")), "")


# --------------------------------------------------------------------------------------------- files
def read_records(file: Path) -> Iterator[tuple[int, dict]]:
    """(line, record) of a CSV (quoted), TSV (unquoted, as Common Voice writes it) or JSONL file; line is
    1-based (a delimited file's header is line 1)."""
    if file.suffix == ".jsonl":
        with file.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UsageError(f"{file}:{i}: not valid JSON ({e}); fix or remove the line") from e
        return
    tsv = file.suffix == ".tsv"
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        yield from enumerate(reader, start=2)


def commonvoice_tsv(root: Path, split: str) -> Path:
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
    tsv = commonvoice_tsv(root, split)
    clips = root / "clips"
    for line, rec in read_records(tsv):
        path = rec.get("path") or ""
        yield RawRow(id=Path(path).stem or f"{split}-{line}", sentence=rec.get("sentence") or "",
                     file=str(tsv), line=line, path=path, base=str(clips), contained=True, speaker=speaker_of(rec))


def manifest_file(files, split: str) -> Path:
    if split not in files:
        raise UsageError(f"no manifest for split {split!r}: set data.files.{split}=<csv|tsv|jsonl>")
    file = Path(files[split])
    if not file.is_file():
        raise UsageError(f"manifest {file} not found (set data.files.{split}=<path>)")
    return file


def read_manifest(file: Path, audio_column: str, text_column: str, root: Path | None) -> Iterator[RawRow]:
    """Rows of a CSV, TSV or JSONL manifest. Audio paths may be absolute; relative ones (`../` and
    symlinked folders included) resolve against `root`, or the manifest's own folder."""
    if not file.is_file():
        raise UsageError(f"manifest {file} not found (set data.files.<split>=<path>)")
    base = root or file.parent
    for line, rec in read_records(file):
        if audio_column not in rec or text_column not in rec:
            raise UsageError(f"{file}:{line}: needs columns {audio_column!r} and {text_column!r} "
                             f"(set data.audio_column/data.text_column); found {sorted(rec)}")
        path = str(rec[audio_column] or "")
        yield RawRow(id=str(rec.get("id") or Path(path).stem or line), sentence=str(rec[text_column] or ""),
                     file=str(file), line=line, path=path, base=str(base), speaker=speaker_of(rec))


def open_hf(name: str, config: str | None, split: str, audio_column: str, text_column: str):
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
    ds = open_hf(name, config, split, audio_column, text_column)
    for i, rec in enumerate(ds):
        audio = rec[audio_column]
        audio = audio if isinstance(audio, dict) else {"path": audio, "bytes": None}
        yield RawRow(id=str(rec.get("id") or rec.get("path") or i), sentence=str(rec[text_column] or ""),
                     file=f"{name}:{split}", line=i, path=audio.get("path"), audio_bytes=audio.get("bytes"),
                     speaker=speaker_of(rec))


# --------------------------------------------------------------------------------------------- splits
def read_split(data_cfg, split: str) -> Iterator[RawRow]:
    """The rows of one source split, as `data.source` says, at most `data.limit` of them."""
    source = data_cfg.source
    if source == "commonvoice":
        rows = read_commonvoice(Path(data_cfg.root), split)
    elif source == "manifest":
        rows = read_manifest(manifest_file(data_cfg.files, split), data_cfg.audio_column, data_cfg.text_column,
                             Path(data_cfg.root) if data_cfg.root else None)
    elif source == "hf":
        rows = read_hf(data_cfg.name, data_cfg.config, split, data_cfg.audio_column, data_cfg.text_column)
    else:
        raise UsageError(f"data.source={source!r}: choose data=commonvoice, data=hf or data=manifest")
    if data_cfg.limit:
        rows = islice(rows, int(data_cfg.limit))
    return rows


def splits_of(data_cfg) -> dict[str, list[str]]:
    """Prepared split name -> source splits: train merges data.train_splits; eval/test stay separate."""
    out = {"train": list(data_cfg.train_splits)}
    for s in (data_cfg.eval_split, data_cfg.test_split):
        if s and s not in out:
            out[s] = [s]
    return out


def extra_train_manifests(data_cfg) -> list[Path]:
    """data.extra_train (e.g. pseudolabel's pseudo.tsv), each checked to exist."""
    paths = [Path(m) for m in data_cfg.extra_train or []]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"data.extra_train: {path} not found (a manifest from `w2vbert-asr pseudolabel`)")
    return paths


def extra_train_rows(data_cfg) -> Iterator[RawRow]:
    """Rows of the data.extra_train manifests (columns `path` and `text`)."""
    for manifest in extra_train_manifests(data_cfg):
        yield from read_manifest(manifest, EXTRA_AUDIO_COLUMN, EXTRA_TEXT_COLUMN, None)
