"""The prepared data on disk: one Arrow file per split, written by `prepare`, read by training and scoring.

    prepared/<split>.arrow   id, path, sentence (raw), text (normalised), duration, speaker ("" if unknown),
                             audio (16 kHz int16 PCM: read it with `audio.to_float` / `audio.waves_of`)

Usage:
    from w2vbert_asr.prepared import load_prepared
    train = load_prepared("demo_out", "train")       # memory-mapped datasets.Dataset, numpy format
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import UsageError
from .storage import disk_full_guard

PREPARED = "prepared"
# Bump when what prepare writes changes meaning, so that older prepared folders are re-prepared.
# 2: audio stored as int16 PCM (was float32).
PREPARED_FORMAT = 2
COLUMNS = ("id", "path", "sentence", "text", "duration", "speaker", "audio")
# Kept rows per Arrow record batch: small tables keep memory flat while a split is streamed to disk.
ROWS_PER_TABLE = 16


def features():
    """The `datasets.Features` of a prepared split (COLUMNS)."""
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "path": datasets.Value("string"), "sentence": datasets.Value("string"),
        "text": datasets.Value("string"), "duration": datasets.Value("float32"), "speaker": datasets.Value("string"),
        "audio": datasets.List(datasets.Value("int16")),
    })


def table_of(examples: list[dict], schema):
    """Kept examples -> one Arrow table; the audio column is built from the int16 arrays without copies
    through Python lists."""
    import pyarrow as pa

    audio = [e["audio"] for e in examples]
    offsets = np.zeros(len(audio) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in audio], out=offsets[1:])
    columns = {k: [e[k] for e in examples] for k in COLUMNS if k != "audio"}
    columns["audio"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(audio)))
    return pa.table(columns, schema=schema)


def merge_arrow(parts: list[Path], target: Path) -> None:
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
            for table in merged.with_format("arrow").iter(batch_size=ROWS_PER_TABLE):
                w.write_table(table)
            w.finalize()
        os.replace(tmp, target)
    for p in parts:
        p.unlink()


def load_prepared(output_dir: str | Path, split: str):
    """A prepared split as a memory-mapped `datasets.Dataset` in numpy format; its `audio` is int16 PCM:
    read it through `to_float` / `waves_of`."""
    path = Path(output_dir) / PREPARED / f"{split}.arrow"
    if not path.is_file():
        raise UsageError(f"{path} not found: run `w2vbert-asr prepare` with the same output_dir first")
    return open_arrow(path)


def open_arrow(path: Path):
    """numpy format keeping the stored dtypes: by default datasets widens every integer array to int64,
    which would make reading int16 audio 4x the memory traffic."""
    import datasets

    return datasets.Dataset.from_file(str(path)).with_format("numpy", dtype=None)
