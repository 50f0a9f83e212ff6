"""What prepared data was made from, so `prepare` redoes its work exactly when something it read changed.

The stamp (prepared/DONE) holds the storage format, digests of the settings (data source and filters, text
rules, the model's frame geometry, the row rules) and of every input (each TSV or manifest by its bytes,
the audio files its rows name by path, size and modification time, a `datasets` split by its fingerprint
and cache files).
A later run compares stamps and says what changed.

Usage:
    from w2vbert_asr.fingerprint import fingerprint, what_changed, read_stamp
    changed = what_changed(read_stamp(prepared / "DONE"), fingerprint(cfg, rules))   # None: up to date
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from omegaconf import OmegaConf

from . import UsageError
from .prepared import COLUMNS, PREPARED_FORMAT
from .rows import REASONS
from .sources import commonvoice_tsv, extra_train_manifests, manifest_file, open_hf, read_split, resolve, splits_of

# Settings that change how prepare runs but not what it writes: left out of the fingerprint.
RUN_ONLY_KEYS = ("num_proc", "force_prepare")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
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


def _input_digests(data_cfg, sources: Iterable[str]) -> dict[str, str]:
    """What prepare reads, by a name users recognise -> digest."""
    out: dict[str, str] = {}
    limit = int(data_cfg.limit) if data_cfg.limit else None
    for split in sources:
        if data_cfg.source in ("commonvoice", "manifest"):
            if data_cfg.source == "commonvoice":
                file = commonvoice_tsv(Path(data_cfg.root), split)
            else:
                file = manifest_file(data_cfg.files, split)
            name = file.name if file.name not in out else str(file)
            out[name] = file_digest(file)
            rows = read_split(data_cfg, split)  # data.limit applied, as prepare reads them
            out[f"audio of {name}"] = _audio_digest(resolve(r) if r.path else None for r in rows)
        elif data_cfg.source == "hf":
            ds = open_hf(data_cfg.name, data_cfg.config, split, data_cfg.audio_column, data_cfg.text_column)
            files = [f["filename"] for f in ds.cache_files]
            key = f"{data_cfg.name}:{split}"
            out[key] = digest([ds._fingerprint, limit, _audio_digest(files)])
            paths = list(_hf_audio_paths(ds.data.column(data_cfg.audio_column), limit))
            if paths:  # rows that store only a path: those files are inputs too
                out[f"audio of {key}"] = _audio_digest(paths)
        else:
            raise UsageError(f"data.source={data_cfg.source!r}: choose data=commonvoice, data=hf or data=manifest")
    return out


def _extra_train_digests(data_cfg) -> dict[str, str]:
    """data.extra_train manifests by content: a new round's pseudo-labels under the same name re-prepare."""
    return {f"extra_train {path}": file_digest(path) for path in extra_train_manifests(data_cfg)}


def data_settings(data_cfg) -> dict:
    """The data config as prepare's report shows it: everything but the run-only keys."""
    return {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in RUN_ONLY_KEYS}


def fingerprint(cfg, rules) -> dict:
    """What the prepared data depends on: the storage format, the settings (data source and filters, text
    rules, the frame geometry of `rules`) and every input file. Kept in prepared/DONE to say what changed later."""
    settings = {"data settings": digest(data_settings(cfg.data)),
                "text settings": digest(OmegaConf.to_container(cfg.text, resolve=True)),
                "model frame rate": digest(dataclasses.asdict(rules.geometry)),
                # A new rule (the held-out clips kept out of train) may drop rows an older prepare kept.
                "row rules": digest(list(REASONS))}
    excludes = [Path(p) for p in cfg.data.get("exclude") or []]  # audit.tsv files and the threshold applied to them
    if excludes:
        settings["audit.threshold"] = digest(float(cfg.audit.threshold))
    sources = dict.fromkeys(s for srcs in splits_of(cfg.data).values() for s in srcs)
    stamp = {"format": PREPARED_FORMAT, "columns": list(COLUMNS), "settings": settings,
             "inputs": {**_input_digests(cfg.data, sources), **_extra_train_digests(cfg.data),
                        **{f"exclude {p}": file_digest(p) if p.is_file() else "missing" for p in excludes}}}
    stamp["fingerprint"] = digest(stamp)
    return stamp


def what_changed(old: dict | None, new: dict) -> str | None:
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


def read_stamp(stamp: Path) -> dict | None:
    if not stamp.is_file():
        return None
    try:
        old = json.loads(stamp.read_text())
    except ValueError:  # a plain fingerprint string: written before the inputs were tracked
        return {"format": 1}
    return old if isinstance(old, dict) else {"format": 1}
