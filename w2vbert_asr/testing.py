"""Helpers for tests, notebooks and demos: small synthetic corpora with known defects."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np

from w2vbert_asr import synth

# make_faulty_release: what each injected row looks like.
FAULT_STREAM = 7_919           # rng stream id, keeps faults independent of the corpus plan
FAULTY_SPEAKER_BASE = 100_000  # speaker ids far above any corpus speaker (one per split)
TOO_SHORT_S = 0.1
TOO_LONG_S = 40.0
# transcript_too_long: 1.2 s = ~60 W2v-BERT frames (20 ms/frame) for >= 150 characters, far more
# than CTC can align; 1.2 s stays above any sensible minimum-duration filter (Common Voice ~1 s).
TRANSCRIPT_CLIP_S = 1.2
TRANSCRIPT_MIN_CHARS = 150
EMPTY_SENTENCE = "?!…"         # punctuation only: nothing left after normalisation
ESCAPING_PATH = "../../etc/passwd"
UNDECODABLE_BYTES = b"this is not audio\n" * 64  # ASCII only: no 0xFF byte, so no MPEG frame sync
COMBINING_ACUTE = "\u0301"
# Long mostly-silent MP3 at the lowest MPEG-1 bitrate (32 kbit/s): ~160 KB for 40 s.
SMALL_MP3 = {"bitrate_mode": "CONSTANT", "compression_level": 0.99}


def _nfd_sentence(words: list[str], sentence: str) -> str:
    """`sentence` in NFD with at least one decomposed letter when the script allows it.

    Prefers a real word that decomposes (e.g. a letter with a diacritic); otherwise adds an
    acute to the first letter that has a precomposed acute form (e.g. 'e' -> 'e' + U+0301);
    caseless scripts without either just stay as they are (the row is still valid).
    """
    decomposable = [w for w in words if unicodedata.normalize("NFD", w) != w]
    if decomposable:
        return unicodedata.normalize("NFD", f"{decomposable[0]} {sentence}")
    composable = [(ord(unicodedata.normalize("NFC", ch + COMBINING_ACUTE)), i) for i, ch in enumerate(sentence)
                  if len(unicodedata.normalize("NFC", ch + COMBINING_ACUTE)) == 1]
    if not composable:
        return sentence
    _, i = min(composable)  # lowest code point: the most common accented letter ('é' before 'ḿ')
    return unicodedata.normalize("NFD", sentence[: i + 1] + COMBINING_ACUTE + sentence[i + 1 :])


def _fit(audio: np.ndarray, seconds: float) -> np.ndarray:
    """Cut or zero-pad 48 kHz `(T,)` audio to exactly `seconds`."""
    n = int(round(seconds * synth.CV_SAMPLE_RATE))
    return np.pad(audio[:n], (0, max(0, n - audio.size)))


def make_faulty_release(root: str | os.PathLike, lang: str = "sw", num_clips: int = 40, seed: int = 0) -> dict[str, int]:
    """Synthesise a small release under `root`, then append faulty and tricky rows to its TSVs.

    Faulty rows (prepare must skip each, under the returned reason):
      train: empty_text, path_escape, 2x duration (0.1 s and 40 s clips), transcript_too_long
      dev:   missing_file;  test: undecodable_audio
    Valid-but-tricky rows in train (prepare must KEEP them): a sentence opening with a bare '"'
    and never closing it, and a sentence in NFD (decomposed letters).
    Rows are also appended to validated.tsv (= union of the splits, as in Common Voice).

    Returns expected skip counts per reason.
    """
    root = Path(root)
    synth.synthesize_corpus(root, lang, num_clips=num_clips, seed=seed)
    words, voice = synth.load_words(lang)
    rng = np.random.default_rng([seed, FAULT_STREAM])
    clips = root / "clips"

    def speech(spoken: str) -> np.ndarray:
        audio, sr = synth.speak(spoken, voice)
        return synth.finish_audio(rng, audio, sr)

    def sentence() -> tuple[str, str]:
        return synth.make_sentence(rng, words, (3, 5))

    def clip(name: str, audio: np.ndarray, **mp3) -> str:
        synth.write_clip(clips / name, audio, **mp3)
        return name

    prefix = f"common_voice_{lang}_faulty"
    rows: dict[str, list[tuple[str, str]]] = {s: [] for s in synth.SPLITS}  # split -> (path, sentence)

    written, spoken = sentence()
    rows["train"].append((clip(f"{prefix}_empty_text.mp3", speech(spoken)), EMPTY_SENTENCE))
    rows["train"].append((ESCAPING_PATH, written))

    written, spoken = sentence()
    rows["train"].append((clip(f"{prefix}_too_short.mp3", _fit(speech(spoken), TOO_SHORT_S)), written))

    written, spoken = sentence()
    long_audio = _fit(speech(spoken), TOO_LONG_S)  # speech, then digital silence up to 40 s
    rows["train"].append((clip(f"{prefix}_too_long.mp3", long_audio, **SMALL_MP3), written))

    long_words: list[str] = []
    while len(" ".join(long_words)) < TRANSCRIPT_MIN_CHARS:
        long_words.append(words[int(rng.integers(len(words)))])
    short_audio = _fit(speech(long_words[0]), TRANSCRIPT_CLIP_S)
    rows["train"].append((clip(f"{prefix}_transcript_too_long.mp3", short_audio), " ".join(long_words) + "."))

    _, spoken = sentence()  # unquoted form: the bare '"' must be the only quote
    rows["train"].append((clip(f"{prefix}_bare_quote.mp3", speech(spoken)), '"' + spoken))
    written, spoken = sentence()
    nfd = _nfd_sentence(words, written)
    rows["train"].append((clip(f"{prefix}_nfd.mp3", speech(unicodedata.normalize("NFC", nfd))), nfd))

    written, _ = sentence()
    rows["dev"].append((f"{prefix}_missing_file.mp3", written))

    written, _ = sentence()
    (clips / f"{prefix}_undecodable.mp3").write_bytes(UNDECODABLE_BYTES)
    rows["test"].append((f"{prefix}_undecodable.mp3", written))

    for k, split in enumerate(synth.SPLITS):
        client = synth.client_id(lang, seed, FAULTY_SPEAKER_BASE + k)
        tsv_rows = [synth.make_row(client, path, text, lang) for path, text in rows[split]]
        synth.write_tsv(root / f"{split}.tsv", tsv_rows, append=True)
        synth.write_tsv(root / "validated.tsv", tsv_rows, append=True)

    return {"missing_file": 1, "undecodable_audio": 1, "empty_text": 1, "path_escape": 1,
            "duration": 2, "transcript_too_long": 1}
