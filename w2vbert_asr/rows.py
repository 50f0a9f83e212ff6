"""The rules that decide whether a transcribed clip can be used, and the count of the ones that cannot.

Every row is checked cheapest first: its path, its text (normalised), its audio (decoded), its duration,
and whether CTC can align its characters to the frames the model will emit for it. A row that fails is
skipped, counted under its reason and listed with examples (`SplitReport`); nothing is dropped silently.

A clip of an evaluation split (dev, test) never enters train, whatever the route (`HeldOut`): a path
written another way (absolute, `../`) or a symlink is the same real path; a copy under another name has
the same decoded audio (`audio_digest`).

Usage:
    from w2vbert_asr.rows import Rules, check_row
    rules = Rules.from_config(cfg, normalizer)
    example, reason, detail = check_row(raw_row, rules)    # example None -> skipped for `reason`
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from .audio import AudioError, load_audio, to_int16
from .geometry import FrameGeometry
from .sources import RawRow, resolve
from .text import Normalizer

# Skip reasons, in the order they are checked (cheap checks first: no decoding for a bad path or text).
REASONS = ("path_escape", "empty_text", "contains_digits", "missing_file", "undecodable_audio", "duration",
           "transcript_too_long", "held_out_clip", "excluded_by_audit", "out_of_vocabulary")


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


@dataclass(frozen=True)
class Rules:
    """Everything deciding whether a row is kept; picklable, handed to each decoding process once."""

    normalizer: Normalizer
    geometry: FrameGeometry  # the frames the model emits for a clip: CTC feasibility
    min_duration: float
    max_duration: float

    @classmethod
    def from_config(cls, cfg, normalizer: Normalizer, geometry: FrameGeometry | None = None) -> Rules:
        """The rules of cfg.data; the geometry of cfg.model's architecture unless given (a loaded model's)."""
        if geometry is None:
            from .model import architecture_config

            geometry = FrameGeometry.of(architecture_config(cfg.model))
        return cls(normalizer, geometry, float(cfg.data.min_duration), float(cfg.data.max_duration))


def ctc_min_frames(text: str) -> int:
    """Frames CTC needs for a label sequence: one per character plus a blank between repeated ones."""
    return len(text) + sum(a == b for a, b in zip(text, text[1:]))


def check_text(sentence: str, normalizer: Normalizer) -> tuple[str | None, str, str]:
    """-> (normalised text or None, skip reason, detail)."""
    if normalizer.digits == "drop_row" and normalizer.has_digits(sentence):
        return None, "contains_digits", f"{sentence!r} has digits and text.digits=drop_row"
    text = normalizer(sentence)
    if not text:
        return None, "empty_text", f"{sentence!r} is empty after normalisation"
    return text, "", ""


def check_length(num_samples: int, text: str, rules: Rules) -> tuple[str, str]:
    """Duration bounds and CTC feasibility of a clip of `num_samples` samples -> (skip reason, detail),
    ("", "") when the clip can be used."""
    duration = num_samples / rules.geometry.sample_rate
    if not rules.min_duration <= duration <= rules.max_duration:
        return "duration", (f"{duration:.2f} s is outside data.min_duration={rules.min_duration} .. "
                            f"data.max_duration={rules.max_duration}")
    frames, needed = rules.geometry.output_frames(num_samples), ctc_min_frames(text)
    if needed > frames:
        return "transcript_too_long", (f"{len(text)} characters need {needed} CTC frames, "
                                       f"the {duration:.2f} s clip gives {frames}")
    return "", ""


def check_row(row: RawRow, rules: Rules) -> tuple[dict | None, str, str]:
    """-> (example or None, skip reason, detail). The example's audio is int16 PCM (N,)."""
    path = None
    if row.audio_bytes is None:
        if not row.path:
            return None, "missing_file", "no audio path in the row"
        path = resolve(row)
        if path is None:
            return None, "path_escape", f"{row.path!r} points outside {row.base}; refusing to read it"
    text, reason, detail = check_text(row.sentence, rules.normalizer)
    if text is None:
        return None, reason, detail
    if path is not None and not path.is_file():
        return None, "missing_file", f"{path} does not exist"
    try:
        wave = load_audio(row.audio_bytes if row.audio_bytes is not None else path, rules.geometry.sample_rate)
    except AudioError as e:
        return None, "undecodable_audio", str(e) if path else f"{row.file} row {row.line}: {e}"
    reason, detail = check_length(len(wave), text, rules)
    if reason:
        return None, reason, detail
    audio = to_int16(wave)
    return {"id": row.id, "path": str(path or row.path or ""), "sentence": row.sentence, "text": text,
            "duration": len(wave) / rules.geometry.sample_rate, "speaker": row.speaker, "audio": audio,
            "audio_digest": audio_digest(audio)}, "", ""


# --------------------------------------------------------------------------------------------- held out
def audio_digest(audio: np.ndarray) -> str:
    """sha256 of a clip's decoded 16 kHz int16 samples. A copy, a symlink, or the same MP3 with other tags
    decodes to the same samples (file bytes miss the re-tagged copy; a re-encoded copy escapes both: see
    docs/reliability.md); hashing ~2 s of samples costs ~5 % of the decode it follows."""
    return hashlib.sha256(np.ascontiguousarray(audio).tobytes()).hexdigest()


def real_path(row: RawRow) -> str | None:
    """The file a row reads, symlinks resolved; None when it reads stored bytes or leads out of its folder."""
    path = resolve(row) if row.audio_bytes is None and row.path else None
    return os.path.realpath(path) if path is not None else None


@dataclass
class HeldOut:
    """The clips and transcripts of the evaluation splits, to keep every one of them out of train.

    A clip is the same when its real path is (`../`, absolute or symlinked paths) or its decoded audio is (a
    copy under another name). Sentences are only reported: a manifest may reuse one with another voice."""

    paths: dict[str, str] = field(default_factory=dict)    # real path -> where it is held out
    audio: dict[str, str] = field(default_factory=dict)    # audio_digest -> where
    texts: dict[str, str] = field(default_factory=dict)    # normalised text -> split
    shared: dict[str, dict] = field(default_factory=dict)  # split -> train rows with one of its texts

    def add(self, split: str, row: RawRow, example: dict | None = None) -> None:
        """Hold out `row` of `split` (by real path), and its audio and text when it was decoded (`example`)."""
        where = f"{split} clip {row.id} ({os.path.basename(row.file)} row {row.line})"
        path = real_path(row)
        if path is not None:
            self.paths.setdefault(path, where)
        if example is not None:
            self.audio.setdefault(example["audio_digest"], where)
            self.texts.setdefault(example["text"], split)

    def match(self, row: RawRow, digest: str | None = None) -> str:
        """Why `row` (its decoded audio's `digest`, when known) is a held-out clip, or "" when it is not."""
        path = real_path(row)
        if path is not None and path in self.paths:
            return f"the same file as {self.paths[path]}: {path}"
        if digest is not None and digest in self.audio:
            return f"the same audio as {self.audio[digest]}"
        return ""

    def check(self, row: RawRow, example: dict, limit: int) -> tuple[str, str]:
        """A train row: ("held_out_clip", detail) when it is a held-out clip, else ("", ""); a kept row whose
        transcript is a held-out one is remembered under `shared`."""
        detail = self.match(row, example["audio_digest"])
        if detail:
            return "held_out_clip", detail
        split = self.texts.get(example["text"])
        if split is not None:
            shared = self.shared.setdefault(split, {"rows": 0, "examples": []})
            shared["rows"] += 1
            if len(shared["examples"]) < limit:
                shared["examples"].append({"file": row.file, "row": row.line, "id": row.id, "text": example["text"]})
        return "", ""
