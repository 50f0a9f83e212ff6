"""Planted faults for a synthetic release: a test bench for `audit` with its ground truth.

`synth.faulty_fraction` of the labelled clips (train, dev and test) get one fault each, of the kinds Common
Voice's validated clips still hold, in equal shares:

    other_sentence   the transcript is another sentence than the one spoken (read for another prompt)
    words_changed    one or two words dropped from, or inserted into, the transcript
    audio_cut        the recording stops early: the last 30-60 % of the speech is cut off
    other_language   the clip is a sentence of another language spoken with that language's voice; its
                     transcript in that language's spelling (another word list of w2vbert_asr/wordlists)
    no_speech        silence or noise instead of speech, the transcript unchanged

The faulty clips and their kinds are drawn on a random stream of their own, and a clean clip is made exactly
as without faults: with `faulty_fraction=0` the release is byte-identical to one made before this existed.
The ground truth goes beside the TSVs, in `planted_faults.tsv` (path, split, kind, detail, transcript as
written, the sentence really spoken).

Usage:
    w2vbert-asr synth recipe=demo output_dir=bench synth.faulty_fraction=0.1
    from w2vbert_asr.plant import read_faults
    faults = read_faults("bench/corpus")        # {clip file name: {"split", "kind", "detail", ...}}
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FAULTS_FILE = "planted_faults.tsv"
KINDS = ("other_sentence", "words_changed", "audio_cut", "other_language", "no_speech")
FAULT_STREAM = 7_919  # rng stream of the fault plan: the clean clips' streams never see it
CUT_SHARE = (0.3, 0.6)  # share of the speech an `audio_cut` clip loses, from its end
COLUMNS = ("path", "split", "kind", "detail", "sentence", "spoken")


@dataclass
class Fault:
    """One planted fault: how it changes a clip's transcript, voice and speech audio."""

    kind: str
    rng: np.random.Generator
    words: Sequence[str]
    sentence: Callable  # (rng, words) -> (written, spoken): synth's sentence maker
    other: tuple[str, Sequence[str], str] | None = None  # (language, its words, its espeak voice)
    detail: str = ""
    record: dict = field(default_factory=dict)

    def text(self, written: str, spoken: str, voice: str) -> tuple[str, str, str]:
        """(written, spoken, voice) of the clean clip -> those of the faulty one."""
        if self.kind == "other_sentence":
            new = written
            while new.lower().strip(".?!,") == written.lower().strip(".?!,"):
                new, _ = self.sentence(self.rng, self.words)
            self.detail = "transcript of another sentence"
            return new, spoken, voice
        if self.kind == "words_changed":
            return self._change_words(written), spoken, voice
        if self.kind == "other_language" and self.other is not None:
            lang, words, other_voice = self.other
            written, spoken = self.sentence(self.rng, words)
            self.detail = f"spoken and written in {lang}"
            return written, spoken, other_voice
        return written, spoken, voice

    def _change_words(self, written: str) -> str:
        tokens = written.split(" ")
        k = int(self.rng.integers(1, 3))
        if len(tokens) > k and self.rng.random() < 0.5:
            gone = sorted(self.rng.choice(len(tokens), k, replace=False).tolist())
            self.detail = f"dropped {' '.join(tokens[i] for i in gone)!r}"
            return " ".join(t for i, t in enumerate(tokens) if i not in gone)
        added = [self.words[int(i)] for i in self.rng.choice(len(self.words), k)]
        for word in added:
            tokens.insert(int(self.rng.integers(0, len(tokens) + 1)), word)
        self.detail = f"inserted {' '.join(added)!r}"
        return " ".join(tokens)

    def audio(self, speech: np.ndarray) -> np.ndarray:
        """The speech audio `(T,)` of the clip (before silences and room tone) -> the faulty one."""
        if self.kind == "audio_cut":
            share = float(self.rng.uniform(*CUT_SHARE))
            self.detail = f"last {100 * share:.0f} % of the speech cut"
            return speech[: max(1, int(round(speech.size * (1 - share))))]
        if self.kind == "no_speech":
            if self.rng.random() < 0.5:
                self.detail = "silence"
                return np.zeros_like(speech)
            self.detail = "noise"
            noise = self.rng.standard_normal(speech.size).astype(np.float32)
            return np.convolve(noise, np.ones(4, np.float32) / 4, mode="same")  # a little duller than white
        return speech


def plan_faults(seed: int, splits: Sequence[str], fraction: float, labelled: Sequence[str], words: Sequence[str],
                sentence: Callable, languages: Callable[[], dict]) -> dict[int, Fault]:
    """{clip index: Fault} for `fraction` of the clips whose split (`splits[i]`) is one of `labelled`; each kind
    gets an equal share (the remainder in KINDS order). Nothing is drawn from any other stream.
    sentence: (rng, words) -> (written, spoken); languages: () -> {other language: (its words, its voice)}."""
    if fraction <= 0:
        return {}
    rng = np.random.default_rng([seed, FAULT_STREAM])
    candidates = [i for i, s in enumerate(splits) if s in labelled]
    count = min(len(candidates), int(round(fraction * len(candidates))))
    chosen = sorted(rng.choice(candidates, count, replace=False).tolist()) if count else []
    foreign = languages()
    others = sorted(foreign)
    kinds = [k for k in KINDS if others or k != "other_language"]
    order = rng.permutation([kinds[j % len(kinds)] for j in range(count)]).tolist()
    faults = {}
    for index, kind in zip(chosen, order):
        clip_rng = np.random.default_rng([seed, FAULT_STREAM, index])
        other = None
        if kind == "other_language":
            code = others[int(clip_rng.integers(len(others)))]
            other = (code, *foreign[code])
        faults[index] = Fault(kind, clip_rng, words, sentence, other)
    return faults


def write_faults(path: Path, faults: dict[int, Fault]) -> None:
    """planted_faults.tsv: one row per faulty clip (fault.record holds path, split, sentence, spoken); raw
    tab-separated like the release's TSVs (no field holds a tab or a newline)."""
    rows = [{**f.record, "kind": f.kind, "detail": f.detail} for _, f in sorted(faults.items())]
    lines = ["\t".join(COLUMNS)] + ["\t".join(str(r.get(c, "")) for c in COLUMNS) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_faults(release: str | Path) -> dict[str, dict]:
    """The planted faults of a release folder: {clip file name: row of planted_faults.tsv}; {} when none."""
    path = Path(release) / FAULTS_FILE
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
