"""Synthetic Common Voice release generator (espeak-ng speech from small word lists).

Builds a directory that looks like one language of a Common Voice download
(`clips/*.mp3` at 48 kHz plus `train.tsv`, `dev.tsv`, `test.tsv`, `validated.tsv`, ...),
so the whole toolkit can be exercised offline, in tests and demos, without the real corpus.
Speech comes from libespeak-ng shipped by the PyPI package `espeakng-loader`, driven via ctypes.
Languages are whatever `w2vbert_asr/wordlists/<lang>.txt` files exist; nothing here names one.

Usage:
    python -m w2vbert_asr.synth --list
    python -m w2vbert_asr.synth --lang sw --num-clips 300 --out data/synth_cv/sw
    python -m w2vbert_asr.synth --lang ky --num-clips 300 --seed 1 --out data/synth_cv/ky
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import espeakng_loader
import numpy as np
import soundfile as sf
import soxr

from .espeak import VOICE_DIRECTIVE, speak
from .plant import FAULTS_FILE, plan_faults, write_faults

# --- Common Voice layout --------------------------------------------------------------------
CV_SAMPLE_RATE = 48_000  # Common Voice ships 48 kHz MP3
# Column order of Common Voice 17+ release TSVs (train/dev/test/validated/invalidated/other).
CV_COLUMNS = (
    "client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
    "down_votes", "age", "gender", "accents", "variant", "locale", "segment",
)
SPLITS = ("train", "dev", "test")
UNLABELLED = "other"  # Common Voice's recorded-but-not-yet-validated clips: the pseudo-labelling pool
EMPTY_TSVS = ("invalidated.tsv",)  # present in real releases; we reject nothing
POOL_STREAM = 4_051  # rng stream of the unlabelled pool's plan: adding a pool never changes train/dev/test
CLIP_ID_BASE = 30_000_000  # CV clip ids are ~8-digit integers
AGES = ("", "teens", "twenties", "thirties", "fourties", "fifties")  # CV's own spelling

WORDLIST_DIR = Path(__file__).with_name("wordlists")

# --- Speaker / clip variation (per speaker, then small per-clip jitter) ---------------------
# espeak variants (voices/!v files; None = the language's default voice). Variants with a
# "breath" line (f2, f3, f5, ...) are left out: with espeak-ng 1.52 their audio differs between
# identical calls (depends on unrelated earlier process activity), breaking reproducibility.
VOICE_VARIANTS = (None, "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
                  "f1", "f4", "Annie", "belinda", "linda", "steph")
CV_GENDER = {"male": "male_masculine", "female": "female_feminine"}  # CV 17+ labels
RATE_WPM = (140, 195)        # espeak words/minute; default is 175
RATE_JITTER_WPM = 8          # per-clip wobble around the speaker's rate
PITCH = (30, 70)             # espeak base pitch 0..100, default 50
PITCH_RANGE = (30, 80)       # espeak intonation range 0..100, default 50
CLIPS_PER_SPEAKER = 10       # ~CV-like: a handful of clips per contributor
LEAD_SILENCE_S = (0.10, 0.35)
TRAIL_SILENCE_S = (0.10, 0.40)
NOISE_DBFS = (-65.0, -45.0)  # room tone: audible in silence, far below speech
PEAK = (0.35, 0.9)           # loudness varies between recordings

# --- Sentence text variety (the spoken words never change, only the written form) ----------
CAPITALISE_P = 0.7
COMMA_P = 0.12               # per word boundary
QUOTE_P = 0.1
QUOTES = (("«", "»"), ("“", "”"), ("„", "“"))
END_PUNCT = (".", "?", "!", "")
END_PUNCT_P = (0.55, 0.15, 0.1, 0.2)



# --- Word lists -----------------------------------------------------------------------------
def available_languages() -> list[str]:
    """Language codes with a word list shipped in `w2vbert_asr/wordlists/`."""
    return sorted(p.stem for p in WORDLIST_DIR.glob("*.txt"))


def load_words(lang: str) -> tuple[list[str], str]:
    """Return (NFC words, espeak voice name) from `wordlists/<lang>.txt`.

    One word per line; blank lines and `#` comments ignored; `# voice: <name>` overrides the
    espeak voice (default: `lang` itself).
    """
    path = WORDLIST_DIR / f"{lang}.txt"
    if not path.is_file():
        raise ValueError(
            f"no word list for language {lang!r} (looked for {path}); available: "
            f"{available_languages()}. Add one word per line to that file to support it."
        )
    words, voice = [], lang
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.lower().startswith(VOICE_DIRECTIVE):
            voice = line[len(VOICE_DIRECTIVE):].strip()
        elif line and not line.startswith("#"):
            words.append(unicodedata.normalize("NFC", line))
    if not words:
        raise ValueError(f"word list {path} is empty; add one word per line")
    return words, voice


def make_sentence(rng: np.random.Generator, words: Sequence[str], num_words: tuple[int, int]) -> tuple[str, str]:
    """Random sentence -> (written text with CV-like punctuation/case, text to speak).

    Both contain the same words; the written form adds capitalisation, a comma, final
    punctuation and sometimes typographic quotes so a text normaliser has real work.
    """
    n = int(rng.integers(num_words[0], num_words[1] + 1))
    # No repeated word within a sentence (reads more natural) unless the list is too short.
    chosen = [words[i] for i in rng.choice(len(words), n, replace=n > len(words))]
    tokens = [w + ("," if i < n - 1 and rng.random() < COMMA_P else "") for i, w in enumerate(chosen)]
    end = str(rng.choice(END_PUNCT, p=END_PUNCT_P))
    spoken = " ".join(tokens) + end
    written = spoken
    if rng.random() < CAPITALISE_P:
        written = written[0].title() + written[1:]  # title(): no-op for caseless scripts
    if rng.random() < QUOTE_P:
        left, right = QUOTES[int(rng.integers(len(QUOTES)))]
        written = f"{left}{written}{right}"
    return written, spoken


# --- Audio + TSV helpers (also used by w2vbert_asr.testing) ---------------------------------
def finish_audio(rng: np.random.Generator, audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resample `(T,)` speech to 48 kHz, pad with silence, scale, add room tone -> `(T',)` float32."""
    x = soxr.resample(audio, sample_rate, CV_SAMPLE_RATE)
    lead = np.zeros(int(rng.uniform(*LEAD_SILENCE_S) * CV_SAMPLE_RATE), np.float32)
    trail = np.zeros(int(rng.uniform(*TRAIL_SILENCE_S) * CV_SAMPLE_RATE), np.float32)
    x = np.concatenate([lead, x, trail])
    x *= rng.uniform(*PEAK) / max(float(np.abs(x).max()), 1e-6)
    x += rng.standard_normal(x.size).astype(np.float32) * np.float32(10 ** (rng.uniform(*NOISE_DBFS) / 20))
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def write_clip(path: str | os.PathLike, audio: np.ndarray, **mp3_options) -> float:
    """Write 48 kHz `(T,)` audio as MP3; returns the duration in seconds."""
    sf.write(path, audio, CV_SAMPLE_RATE, format="MP3", **mp3_options)
    return audio.size / CV_SAMPLE_RATE


def client_id(lang: str, seed: int, speaker: int) -> str:
    """128-hex-digit id like Common Voice's (a SHA-512), stable for (lang, seed, speaker)."""
    return hashlib.sha512(f"synth:{lang}:{seed}:{speaker}".encode()).hexdigest()


def make_row(client: str, path: str, sentence: str, locale: str, age: str = "", gender: str = "") -> dict[str, str]:
    """One Common Voice TSV row (all `CV_COLUMNS`)."""
    return {
        "client_id": client, "path": path,
        "sentence_id": hashlib.sha256(sentence.encode()).hexdigest(),
        "sentence": sentence, "sentence_domain": "", "up_votes": "2", "down_votes": "0",
        "age": age, "gender": gender, "accents": "", "variant": "", "locale": locale, "segment": "",
    }


def write_tsv(path: str | os.PathLike, rows: Iterable[dict], columns: Sequence[str] = CV_COLUMNS,
              append: bool = False) -> None:
    """Write rows raw, tab-separated, no quoting (as Common Voice does); header unless appending."""
    lines = [] if append else ["\t".join(columns)]
    for row in rows:
        fields = [str(row.get(c, "")) for c in columns]
        if any(ch in f for f in fields for ch in "\t\r\n"):
            raise ValueError(f"{path}: field contains a tab or newline, cannot write raw TSV: {fields}")
        lines.append("\t".join(fields))
    with open(path, "a" if append else "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + "\n" for line in lines))


# --- Corpus planning ------------------------------------------------------------------------
def _split_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts per split summing to `total`; rounding leftovers go to the largest split."""
    counts = [int(total * f) for f in fractions]
    counts[int(np.argmax(fractions))] += total - sum(counts)
    return counts


def _variant_gender(variant: str | None) -> str:
    """The `gender` line of an espeak variant file ("male"/"female"), "" if none."""
    if not variant:
        return ""
    text = (Path(espeakng_loader.get_data_path()) / "voices" / "!v" / variant).read_text(errors="replace")
    fields = next((line.split() for line in text.splitlines() if line.lower().startswith("gender")), [])
    return fields[1].lower() if len(fields) > 1 else ""


def _plan_speakers(rng: np.random.Generator, lang: str, seed: int, clip_counts: list[int]) -> list[list[dict]]:
    """Speakers per split, disjoint across splits (as in Common Voice); each non-empty split has >= 1."""
    total = sum(clip_counts)
    n_speakers = max(sum(c > 0 for c in clip_counts), total // CLIPS_PER_SPEAKER)
    per_split = [min(c, max(1, round(n_speakers * c / total))) for c in clip_counts]
    speakers, k = [], 0
    for count in per_split:
        group = []
        for _ in range(count):
            variant = VOICE_VARIANTS[int(rng.integers(len(VOICE_VARIANTS)))]
            group.append({
                "client_id": client_id(lang, seed, k), "variant": variant,
                "rate": int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
                "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1)),
                "range": int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
                "gender": CV_GENDER.get(_variant_gender(variant), ""),
                "age": AGES[int(rng.integers(len(AGES)))],
            })
            k += 1
        speakers.append(group)
    return speakers


def _plan_clips(rng: np.random.Generator, pool_rng: np.random.Generator, speakers: list[list[dict]],
                clip_counts: list[int], words: Sequence[str], words_per_sentence: tuple[int, int],
                num_unlabelled: int) -> list[tuple[str, dict, str, str]]:
    """(split, speaker, written, spoken) per clip, in clip order: every speaker of a split gets a clip, then
    random ones; the unlabelled pool (spoken by the first non-empty split's speakers) comes last, planned on
    its own stream so that adding a pool never changes the labelled splits."""
    plan = []
    for split, count, group in zip(SPLITS, clip_counts, speakers):
        for j in range(count):
            spk = group[j] if j < len(group) else group[int(rng.integers(len(group)))]
            plan.append((split, spk, *make_sentence(rng, words, words_per_sentence)))
    voices = next(g for g in speakers if g)
    for _ in range(num_unlabelled):
        plan.append((UNLABELLED, voices[int(pool_rng.integers(len(voices)))],
                     *make_sentence(pool_rng, words, words_per_sentence)))
    return plan


def _write_tsvs(out: Path, rows: dict[str, list[dict]], durations: list[dict]) -> None:
    """The release's TSVs: one per split and the pool, validated.tsv (their union), the empty ones, durations."""
    for split in (*SPLITS, UNLABELLED):
        write_tsv(out / f"{split}.tsv", rows[split])
    write_tsv(out / "validated.tsv", [r for s in SPLITS for r in rows[s]])
    for name in EMPTY_TSVS:
        write_tsv(out / name, [])
    write_tsv(out / "clip_durations.tsv", durations, columns=("clip", "duration[ms]"))


def _write_clips(out: Path, lang: str, seed: int, voice: str, plan: list, faults: dict) -> tuple[dict, dict, list]:
    """Speak and write every planned clip (a planted fault changes its text, voice or speech) -> (TSV rows per
    split, seconds per split, clip_durations rows)."""
    rows: dict[str, list[dict]] = {s: [] for s in (*SPLITS, UNLABELLED)}
    seconds = {s: 0.0 for s in (*SPLITS, UNLABELLED)}
    durations = []
    for clip_index, (split, spk, written, spoken) in enumerate(plan):
        # Per-clip stream: audio variation never shifts the planning stream above.
        clip_rng = np.random.default_rng([seed, clip_index])
        rate = spk["rate"] + int(clip_rng.integers(-RATE_JITTER_WPM, RATE_JITTER_WPM + 1))
        fault = faults.get(clip_index)
        written, spoken, clip_voice = fault.text(written, spoken, voice) if fault else (written, spoken, voice)
        audio, sr = speak(spoken, clip_voice, spk["variant"], rate, spk["pitch"], spk["range"])
        audio = fault.audio(audio) if fault else audio
        name = f"common_voice_{lang}_{CLIP_ID_BASE + clip_index}.mp3"
        if fault:
            fault.record = {"path": name, "split": split, "sentence": written, "spoken": spoken}
        dur = write_clip(out / "clips" / name, finish_audio(clip_rng, audio, sr))
        seconds[split] += dur
        durations.append({"clip": name, "duration[ms]": str(round(dur * 1000))})
        rows[split].append(make_row(spk["client_id"], name, written, lang, spk["age"], spk["gender"]))
    return rows, seconds, durations


def synthesize_corpus(
    out_dir: str | os.PathLike, lang: str, num_clips: int = 300, seed: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1), words_per_sentence: tuple[int, int] = (2, 5),
    num_unlabelled: int = 0, faulty_fraction: float = 0.0,
) -> dict:
    """Write a Common Voice release layout for `lang` under `out_dir`.

    Creates `clips/*.mp3` (48 kHz), `train.tsv`, `dev.tsv`, `test.tsv`, `validated.tsv`
    (their union), header-only `invalidated.tsv`, `other.tsv` and `clip_durations.tsv`.
    `num_unlabelled` clips go to `other.tsv` (the pool `w2vbert-asr pseudolabel` reads): spoken by
    the train split's speakers from the same word list, planned on their own random stream, so the
    labelled splits are identical with or without a pool. As in real releases, other.tsv carries the
    prompted sentence; pseudo-labelling never reads it, so it is the pool's hidden true text.
    `faulty_fraction` of the labelled clips get a planted fault, listed in planted_faults.tsv (plant.py).
    TSVs use `CV_COLUMNS`, tab-separated, sentences written raw (no csv quoting). Same seed -> identical
    TSVs and (with the same espeak-ng/LAME builds) identical MP3s.
    Returns {"lang", "out_dir", "counts": {split: clips}, "speakers": {split: n}, "hours", "split_hours"}.
    """
    if len(split_fractions) != len(SPLITS) or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1 (train, dev, test), got {split_fractions}")
    if num_clips < 1 or num_unlabelled < 0:
        raise ValueError(f"num_clips must be >= 1 and num_unlabelled >= 0, got {num_clips}, {num_unlabelled}")
    lo, hi = words_per_sentence
    if not 1 <= lo <= hi:
        raise ValueError(f"words_per_sentence must be (min, max) with 1 <= min <= max, got {words_per_sentence}")
    words, voice = load_words(lang)

    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)  # plan (speakers, sentences) first: TSVs depend on it alone
    clip_counts = _split_counts(num_clips, split_fractions)
    speakers = _plan_speakers(rng, lang, seed, clip_counts)

    plan = _plan_clips(rng, np.random.default_rng([seed, POOL_STREAM]), speakers, clip_counts, words, (lo, hi),
                       num_unlabelled)
    faults = plan_faults(seed, [p[0] for p in plan], faulty_fraction, SPLITS, words,
                         lambda r, w: make_sentence(r, w, (lo, hi)),
                         lambda: {c: load_words(c) for c in available_languages() if c != lang})
    rows, seconds, durations = _write_clips(out, lang, seed, voice, plan, faults)
    _write_tsvs(out, rows, durations)
    write_faults(out / FAULTS_FILE, faults) if faults else (out / FAULTS_FILE).unlink(missing_ok=True)
    return {
        "lang": lang, "out_dir": str(out),
        "counts": {s: len(rows[s]) for s in SPLITS},
        "speakers": {s: len(g) for s, g in zip(SPLITS, speakers)},
        "unlabelled": len(rows[UNLABELLED]),
        "hours": sum(seconds[s] for s in SPLITS) / 3600,
        "split_hours": {s: seconds[s] / 3600 for s in SPLITS},
        "unlabelled_hours": seconds[UNLABELLED] / 3600, "faults": len(faults),
    }


def synth(cfg) -> dict:
    """`w2vbert-asr synth recipe=demo`: the corpus for cfg.lang into cfg.synth.output_dir (default data.root)."""
    out = Path(cfg.synth.output_dir)
    if (out / "train.tsv").is_file() and not cfg.synth.overwrite:
        print(f"{out} already holds a release; keeping it (synth.overwrite=true to write it again)")
        return {"out_dir": str(out), "skipped": True}
    if cfg.lang not in available_languages():
        from . import UsageError

        raise UsageError(f"no word list for lang={cfg.lang!r}; synthetic corpora exist for "
                         f"{', '.join(available_languages())} (add w2vbert_asr/wordlists/<lang>.txt for more)")
    summary = synthesize_corpus(out, cfg.lang, num_clips=cfg.synth.num_clips, seed=cfg.seed,
                                num_unlabelled=int(cfg.synth.num_unlabelled),
                                faulty_fraction=float(cfg.synth.faulty_fraction))
    pool = f" + {summary['unlabelled']} unlabelled in {UNLABELLED}.tsv" if summary["unlabelled"] else ""
    pool += f"; {summary['faults']} planted faults listed in {out / FAULTS_FILE}" if summary["faults"] else ""
    print(f"wrote {sum(summary['counts'].values())} clips ({summary['hours']:.2f} h) to {out}: {summary['counts']}{pool}")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Synthesise a Common-Voice-shaped release with espeak-ng.")
    parser.add_argument("--lang", help="language code = word list name (see --list)")
    parser.add_argument("--out", help="output directory (the language folder of a CV release)")
    parser.add_argument("--num-clips", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-unlabelled", type=int, default=0, help="clips in other.tsv (the unlabelled pool)")
    parser.add_argument("--faulty-fraction", type=float, default=0.0,
                        help="share of labelled clips given a planted fault (planted_faults.tsv; plant.py)")
    parser.add_argument("--list", action="store_true", help="print the languages with a word list")
    args = parser.parse_args(argv)
    if args.list:
        print(" ".join(available_languages()))
        return
    if not (args.lang and args.out):
        parser.error("--lang and --out are required (or use --list)")
    start = time.perf_counter()
    summary = synthesize_corpus(args.out, args.lang, args.num_clips, args.seed, num_unlabelled=args.num_unlabelled,
                                faulty_fraction=args.faulty_fraction)
    summary["seconds_taken"] = round(time.perf_counter() - start, 2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
