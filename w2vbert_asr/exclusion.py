"""`data.exclude`: leave the clips an audit flagged out of train.

`w2vbert-asr audit` writes audit.tsv (audit.py), one row per clip with its alignment score. Given
`data.exclude=[<audit.tsv>, ...]`, prepare skips every train row whose clip one of those files scores below
`audit.threshold`, counted under the reason `excluded_by_audit` in prepare_report.json. dev and test are never
changed: their flagged clips stay in the audit's report for a person to fix at the source.

Clips are matched by their real path (symlinks resolved), or by id for rows that carry their audio as bytes.

Usage:
    from w2vbert_asr.exclusion import Exclusion
    excluded = Exclusion.load(["outputs/sw/audit/audit.tsv"], threshold=-0.5)
    reason, detail = excluded.check(raw_row)       # ("excluded_by_audit", why) or ("", "")
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import UsageError
from .sources import RawRow, resolve

REASON = "excluded_by_audit"
# audit.tsv's columns (audit.py writes them in this order).
AUDIT_COLUMNS = ("rank", "split", "id", "path", "score", "flagged", "cer", "chars_per_second", "duration", "frames",
                 "chars", "log_likelihood", "best_path", "confidence", "reference", "hypothesis", "reason")


def read_audit(path: str | Path) -> list[dict]:
    """The rows of an audit.tsv (raw tab-separated, like Common Voice's TSVs)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data.exclude: {path} not found (an audit.tsv written by `w2vbert-asr audit`)")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or not {"id", "path", "score"} <= set(reader.fieldnames):
            raise UsageError(f"data.exclude: {path} is not an audit.tsv (needs columns id, path, score; "
                             f"found {reader.fieldnames})")
        return list(reader)


def _score(value: str) -> float:
    try:
        return float(value)
    except ValueError:  # a clip the audit could not score (prepare's own rules drop it)
        return math.nan


@dataclass
class Exclusion:
    """The clips of some audit.tsv files scored below a threshold."""

    threshold: float
    paths: dict[str, str] = field(default_factory=dict)  # real path -> why
    ids: dict[str, str] = field(default_factory=dict)    # id (rows without a path) -> why
    flagged: dict[str, int] = field(default_factory=dict)  # audited split -> clips below the threshold
    files: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, files, threshold: float) -> Exclusion:
        out = cls(float(threshold))
        for file in files or []:
            out.files.append(str(file))
            for row in read_audit(file):
                score = _score(row["score"])
                if not score < out.threshold:  # nan (not scored) is never excluded here
                    continue
                out.flagged[row["split"]] = out.flagged.get(row["split"], 0) + 1
                why = f"alignment score {score:.3f} < audit.threshold={out.threshold:g} in {file}"
                if row["path"]:
                    out.paths[os.path.realpath(row["path"])] = why
                else:
                    out.ids[row["id"]] = why
        return out

    def summary(self) -> dict:
        """For prepare_report.json: the files, the threshold and the flagged clips per audited split (only train
        rows are skipped; the others are reported here and left in place)."""
        return {"files": self.files, "threshold": self.threshold, "flagged_per_split": self.flagged}

    def __len__(self) -> int:
        return len(self.paths) + len(self.ids)

    def check(self, row: RawRow) -> tuple[str, str]:
        """(REASON, detail) when `row` is an excluded clip, else ("", "")."""
        path = resolve(row) if row.audio_bytes is None and row.path else None
        why = self.paths.get(os.path.realpath(path)) if path is not None else self.ids.get(row.id)
        return (REASON, why) if why else ("", "")
