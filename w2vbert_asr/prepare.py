"""`w2vbert-asr prepare`: read a source, normalise and filter it, build the vocabulary and the processor.

Usage:
    w2vbert-asr prepare data.root=/data/cv-corpus-21.0/mn lang=mn output_dir=outputs/mn
    w2vbert-asr prepare recipe=mn data.root=/data/cv-corpus-21.0/mn data.num_proc=8
    w2vbert-asr prepare data=manifest data.files.train=train.csv data.files.dev=dev.csv data.files.test=test.csv lang=xx
    w2vbert-asr prepare data=hf data.name=/data/my_saved_dataset lang=xx

Sources (sources.py): a Common Voice release folder (clips/ + <split>.tsv), a `datasets` dataset (Hub id or
local folder) or CSV/TSV/JSONL manifests. Audio is decoded with soundfile and resampled with soxr to 16 kHz
mono, by `data.num_proc` processes (pool.py) over chunks of rows; the results are written in row order, so
the output does not depend on `num_proc`. Every row that cannot be used is skipped, counted by reason
(rows.py), listed in `prepare_report.json` and summarised on the terminal; the run only stops when a split
ends up empty (after writing the report). The evaluation splits are prepared first: a clip of theirs never
enters train (`held_out_clip`, whatever path or copy leads to it), and train transcripts that are also
theirs are listed under `shared_transcripts`.

Writes under `output_dir`:
    processor/                  Wav2Vec2BertProcessor (tokenizer + feature extractor) + normalizer.json
    prepared/<split>.arrow      see prepared.py
    prepared/DONE               what the prepared data was made from (fingerprint.py): a later run
                                re-prepares when any of it changed, and says what
    prepare_report.json         counts, skip reasons with examples, vocabulary and out-of-vocabulary rates
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from . import UsageError
from .exclusion import Exclusion
from .fingerprint import data_settings, fingerprint, read_stamp, what_changed
from .pool import DecodePool, num_processes
from .prepared import PREPARED, ROWS_PER_TABLE, features, merge_arrow, open_arrow, table_of
from .rows import REASONS, HeldOut, Rules, SplitReport
from .sources import RawRow, extra_train_rows, read_split, splits_of
from .storage import atomic_write_json, disk_full_guard
from .text import Normalizer, Vocabulary, build_processor

log = logging.getLogger(__name__)

PROCESSOR = "processor"
REPORT = "prepare_report.json"
STAMP = "DONE"


def prepare_split(cfg, split: str, rules: Rules, out_file: Path, pool: DecodePool | None = None,
                  rows: Iterable[RawRow] | None = None, vocab: set[str] | None = None, held_out: HeldOut | None = None,
                  hold_out_as: str | None = None, excluded: Exclusion | None = None) -> tuple[SplitReport, list[str]]:
    """Read, filter and write one split. -> (report, normalised texts kept). rows: read these instead of
    the split's source; vocab: skip rows with other characters (pseudo-labels, data.extra_train);
    held_out: add this split's clips to it under the name `hold_out_as` (an evaluation split), or, without
    that name, skip the clips it holds (train); excluded: skip the clips an audit flagged (data.exclude, train).

    Results are streamed to the Arrow file in row order, one table per ROWS_PER_TABLE kept rows. A full disk
    gives one error naming the free space and the folder, after removing the partial file."""
    if pool is None:
        with DecodePool(rules, num_processes(cfg.data.num_proc)) as pool:
            return prepare_split(cfg, split, rules, out_file, pool, rows, vocab, held_out, hold_out_as, excluded)
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    report, texts, kept = SplitReport(), [], []
    out_file.parent.mkdir(parents=True, exist_ok=True)
    schema = features()
    with disk_full_guard(out_file.parent, cleanup=[out_file], advice="then run the command again"), \
            ArrowWriter(features=schema, path=str(out_file)) as writer, \
            tqdm(desc=f"prepare {split}", unit="clip", mininterval=2) as bar:  # shows clips/s
        for row, (example, reason, detail) in pool.map(read_split(cfg.data, split) if rows is None else rows):
            report.rows += 1
            bar.update()
            if held_out is not None and hold_out_as:
                held_out.add(hold_out_as, row, example)
            elif held_out is not None and example is not None:
                reason, detail = held_out.check(row, example, cfg.data.report_examples)
                example = None if reason else example
            if excluded is not None and example is not None:
                reason, detail = excluded.check(row)
                example = None if reason else example
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
            if len(kept) == ROWS_PER_TABLE:
                writer.write_table(table_of(kept, schema.arrow_schema))
                kept = []
        if kept:
            writer.write_table(table_of(kept, schema.arrow_schema))
        writer.finalize()
    return report, texts


def _prepare_splits(cfg, rules: Rules, prepared: Path, report: dict) -> dict[str, list[str]]:
    """Every split (and data.extra_train, which joins train) into prepared/<split>.arrow -> kept texts per split."""
    texts: dict[str, list[str]] = {}
    splits, held_out = splits_of(cfg.data), HeldOut()
    excluded = Exclusion.load(cfg.data.exclude, cfg.audit.threshold) if cfg.data.get("exclude") else None
    with DecodePool(rules, num_processes(cfg.data.num_proc)) as pool:
        # The evaluation splits first, so that train (and data.extra_train) can leave out every clip they hold.
        for name in sorted(splits, key=lambda n: n == "train"):
            sources = splits[name]
            merged, kept_texts = SplitReport(), []
            parts = [prepared / f"{name}.{i}.arrow.tmp" for i in range(len(sources))]
            for src, part in zip(sources, parts):
                r, t = prepare_split(cfg, src, rules, part, pool, held_out=held_out,
                                     hold_out_as=None if name == "train" else name,
                                     excluded=excluded if name == "train" else None)
                merged.add(r)
                kept_texts += t
            report["splits"][name] = merged.to_dict()
            texts[name] = kept_texts
            if name == "train" and cfg.data.extra_train:
                # Pseudo-labelled rows join train only, after the labelled ones, and only with characters of
                # the labelled vocabulary (which they never extend: texts["train"] stays the labelled text).
                parts.append(prepared / "train.extra.arrow.tmp")
                vocab = set(Vocabulary.build(kept_texts, cfg.text.min_char_count).chars)
                extra, _ = prepare_split(cfg, "extra_train", rules, parts[-1], pool, extra_train_rows(cfg.data), vocab,
                                         held_out)
                report["extra_train"] = extra.to_dict()
                print_summary({"extra_train": report["extra_train"]})
            merge_arrow(parts, prepared / f"{name}.arrow")
    report["splits"] = {name: report["splits"][name] for name in splits}  # in the config's order
    report["shared_transcripts"] = held_out.shared
    if excluded is not None:  # flagged dev/test clips stay: counted here, listed in the audit for a person to fix
        report["audit_exclusion"] = excluded.summary()
    return texts


def _write_vocabulary(cfg, out: Path, normalizer: Normalizer, texts: dict[str, list[str]], report: dict) -> None:
    """The train characters -> processor/ (tokenizer + feature extractor + normaliser); OOV rates of the others."""
    vocab = Vocabulary.build(texts["train"], cfg.text.min_char_count)
    processor_dir = out / PROCESSOR
    build_processor(vocab, processor_dir)
    normalizer.save(processor_dir)
    report["vocab"] = {"size": len(vocab.token_to_id()), "chars": vocab.chars, "rare_to_unk": vocab.rare}
    for name in texts:
        if name != "train":
            report["oov"][name] = vocab.out_of_vocabulary(texts[name])
            if report["oov"][name]["chars"]:
                log.warning("split %s: characters outside the vocabulary (rate %.3f%%): %s", name,
                            100 * report["oov"][name]["rate"], "".join(report["oov"][name]["chars"]))


def prepare(cfg) -> dict:
    """Prepare every split, write the processor and report. Skips the work when the same settings and
    inputs were prepared before (`data.force_prepare=true` to redo it anyway), and says why it redoes it."""
    out = Path(cfg.output_dir)
    prepared = out / PREPARED
    stamp_file = prepared / STAMP
    normalizer = Normalizer.from_config(cfg.text)
    rules = Rules.from_config(cfg, normalizer)
    stamp = fingerprint(cfg, rules)
    changed = what_changed(read_stamp(stamp_file), stamp)
    complete = (out / REPORT).is_file() and all((prepared / f"{s}.arrow").is_file() for s in splits_of(cfg.data))
    if changed is None and complete and not cfg.data.force_prepare:
        log.info("prepared data in %s is up to date (fingerprint %s)", prepared, stamp["fingerprint"])
        return json.loads((out / REPORT).read_text())
    if cfg.data.force_prepare:
        changed = "data.force_prepare=true"
    if changed != "no prepared data yet":
        print(f"{changed}: re-preparing {prepared}")
    stamp_file.unlink(missing_ok=True)
    report: dict = {"source": data_settings(cfg.data), "fingerprint": stamp["fingerprint"], "splits": {}, "oov": {}}
    texts = _prepare_splits(cfg, rules, prepared, report)
    print_summary(report["splits"])
    for split, shared in report["shared_transcripts"].items():
        print(f"{shared['rows']} train rows have a transcript also in {split} (another clip, the same sentence); "
              f"listed under shared_transcripts in {REPORT}")
    empty = [s for s, r in report["splits"].items() if r["kept"] == 0]
    if empty:
        atomic_write_json(out / REPORT, report)  # the error below sends the user to it
        raise UsageError(f"split(s) {empty} have no usable rows after filtering; see {out / REPORT} "
                         "for the reasons (most common: wrong data.root, audio paths, or duration bounds)")
    _write_vocabulary(cfg, out, normalizer, texts, report)
    atomic_write_json(out / REPORT, report)
    atomic_write_json(stamp_file, stamp)
    return report


def prepare_eval_split(cfg, split: str, normalizer: Normalizer, results_dir: Path, rules: Rules | None = None):
    """Read one source split for scoring a finished model (its own normaliser), report skips, -> Dataset."""
    out_file = results_dir / PREPARED / f"{split}.arrow"
    report, _ = prepare_split(cfg, split, rules or Rules.from_config(cfg, normalizer), out_file)
    print_summary({split: report.to_dict()})
    report_file = atomic_write_json(results_dir / f"eval_{split}_report.json", report.to_dict())
    if report.kept == 0:
        raise UsageError(f"split {split!r} has no usable rows; reasons: {dict(report.skipped)} (see {report_file})")
    return open_arrow(out_file)


def print_summary(splits: dict) -> None:
    reasons = sorted({r for s in splits.values() for r in s["skipped"]}, key=REASONS.index)
    header = ["split", "rows", "kept", "hours", *reasons]
    lines = [header] + [[name, s["rows"], s["kept"], f"{s['hours']:.3f}", *(s["skipped"].get(r, 0) for r in reasons)]
                        for name, s in splits.items()]
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    print("\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in lines))
    total = sum(sum(s["skipped"].values()) for s in splits.values())
    if total:
        print(f"skipped {total} rows; reasons and examples (file, row) are in {REPORT}")

