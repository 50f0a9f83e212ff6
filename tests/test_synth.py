"""Synthetic Common Voice release generator (w2vbert_asr.synth) and make_faulty_release."""

import csv
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from w2vbert_asr import synth
from w2vbert_asr.testing import make_faulty_release

NUM_CLIPS = 30
SPLIT_TSVS = [f"{s}.tsv" for s in synth.SPLITS]


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Read the way Common Voice TSVs must be read: tab-separated, no quote handling."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    assert all(len(r) == len(header) for r in body), f"{path}: ragged rows"
    return [dict(zip(header, r)) for r in body]


def is_non_latin(lang: str) -> bool:
    words, _ = synth.load_words(lang)
    return all(not unicodedata.name(ch).startswith("LATIN") for ch in "".join(words))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "sw"
    return out, synth.synthesize_corpus(out, "sw", num_clips=NUM_CLIPS, seed=3)


def test_layout_columns_and_counts(corpus):
    out, summary = corpus
    for name in [*SPLIT_TSVS, "validated.tsv", "invalidated.tsv", "other.tsv"]:
        header = (out / name).read_text(encoding="utf-8").splitlines()[0].split("\t")
        assert tuple(header) == synth.CV_COLUMNS, name
    rows = {s: read_tsv(out / f"{s}.tsv") for s in synth.SPLITS}
    assert {s: len(r) for s, r in rows.items()} == summary["counts"]
    assert sum(summary["counts"].values()) == NUM_CLIPS
    assert summary["counts"]["train"] > summary["counts"]["dev"] > 0
    assert summary["hours"] > 0
    validated = read_tsv(out / "validated.tsv")
    assert [r["path"] for r in validated] == [r["path"] for s in synth.SPLITS for r in rows[s]]
    for r in validated:
        assert (out / "clips" / r["path"]).is_file()
        assert r["locale"] == "sw" and len(r["client_id"]) == 128 and r["sentence"].strip()
    speakers = {s: {r["client_id"] for r in rows[s]} for s in synth.SPLITS}
    assert len(speakers["train"]) > 1
    assert not (speakers["train"] & speakers["dev"]) and not (speakers["train"] & speakers["test"])
    durations = read_tsv(out / "clip_durations.tsv")
    assert {d["clip"] for d in durations} == {r["path"] for r in validated}


def test_sentences_have_punctuation_and_case_variety(corpus):
    out, _ = corpus
    sentences = [r["sentence"] for r in read_tsv(out / "validated.tsv")]
    assert any(s[0].isupper() for s in sentences) and any(s[0].islower() for s in sentences)
    assert any(s[-1] in ".?!»”“" for s in sentences) and any("," in s for s in sentences)
    words, _ = synth.load_words("sw")
    for s in sentences:  # the written text holds only list words plus punctuation
        bare = "".join(ch for ch in s.lower() if ch.isalpha() or ch.isspace())
        assert set(bare.split()) <= set(words), s


def test_written_and_spoken_sentence_share_words():
    rng = np.random.default_rng(0)
    words, _ = synth.load_words("sw")
    for _ in range(50):
        written, spoken = synth.make_sentence(rng, words, (2, 5))
        strip = lambda t: "".join(ch for ch in t.lower() if ch.isalpha() or ch.isspace()).split()
        assert strip(written) == strip(spoken) and 2 <= len(strip(spoken)) <= 5


def test_mp3_decodes_at_48k_with_speech(corpus):
    out, _ = corpus
    durations = {d["clip"]: int(d["duration[ms]"]) for d in read_tsv(out / "clip_durations.tsv")}
    for row in read_tsv(out / "test.tsv"):
        audio, sr = sf.read(out / "clips" / row["path"], dtype="float32")
        assert sr == synth.CV_SAMPLE_RATE and audio.ndim == 1
        assert 0.4 < audio.size / sr < 10
        assert abs(audio.size / sr * 1000 - durations[row["path"]]) < 50
        assert np.sqrt(np.mean(audio**2)) > 0.01  # speech, not silence


def test_same_seed_same_tsvs_other_seed_differs(corpus, tmp_path):
    out, _ = corpus
    synth.synthesize_corpus(tmp_path / "again", "sw", num_clips=NUM_CLIPS, seed=3)
    synth.synthesize_corpus(tmp_path / "other", "sw", num_clips=NUM_CLIPS, seed=4)
    for name in [*SPLIT_TSVS, "validated.tsv", "clip_durations.tsv"]:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    for clip in sorted((out / "clips").iterdir()):  # espeak is loaded fresh per clip: bit-identical
        assert (tmp_path / "again" / "clips" / clip.name).read_bytes() == clip.read_bytes(), clip.name
    assert (tmp_path / "other" / "train.tsv").read_bytes() != (out / "train.tsv").read_bytes()


def test_ships_swahili_and_a_non_latin_language():
    langs = synth.available_languages()
    assert "sw" in langs
    assert any(is_non_latin(lang) for lang in langs)


@pytest.mark.parametrize("lang", synth.available_languages())
def test_every_shipped_language_speaks_a_consistent_reproducible_release(lang, tmp_path):
    """Each shipped word list gives a release whose MP3s decode to 48 kHz mono speech as long as
    clip_durations.tsv and the summary say, whose TSVs agree with each other and with the word list, whose
    splits share no speaker, and which the same seed writes again byte for byte."""
    import itertools

    def release(name):
        return tmp_path / name, synth.synthesize_corpus(tmp_path / name, lang, num_clips=8, seed=5,
                                                          split_fractions=(0.5, 0.25, 0.25))

    out, summary = release("a")
    rows = {s: read_tsv(out / f"{s}.tsv") for s in synth.SPLITS}
    assert {s: len(r) for s, r in rows.items()} == summary["counts"] and sum(summary["counts"].values()) == 8
    assert min(summary["counts"].values()) > 0
    validated = read_tsv(out / "validated.tsv")
    assert validated == [r for s in synth.SPLITS for r in rows[s]]
    listed = {d["clip"]: int(d["duration[ms]"]) for d in read_tsv(out / "clip_durations.tsv")}
    assert set(listed) == {r["path"] for r in validated} == {p.name for p in (out / "clips").iterdir()}
    words = {w.lower() for w in synth.load_words(lang)[0]}
    for split in synth.SPLITS:
        for r in rows[split]:
            audio, sr = sf.read(out / "clips" / r["path"], dtype="float32")
            assert sr == synth.CV_SAMPLE_RATE and audio.ndim == 1, r["path"]
            assert abs(audio.size / sr * 1000 - listed[r["path"]]) < 50, r["path"]  # MP3 frames pad a little
            assert np.sqrt(np.mean(audio**2)) > 0.01, r["path"]  # speech, not silence
            spoken = "".join(ch for ch in r["sentence"].lower() if ch.isalpha() or ch.isspace()).split()
            assert spoken and set(spoken) <= words and r["locale"] == lang, r["sentence"]
        seconds = sum(listed[r["path"]] for r in rows[split]) / 1000
        assert summary["split_hours"][split] * 3600 == pytest.approx(seconds, abs=1e-3 * len(rows[split]))
    speakers = {s: {r["client_id"] for r in rows[s]} for s in synth.SPLITS}
    assert {s: len(v) for s, v in speakers.items()} == summary["speakers"]
    assert not any(speakers[a] & speakers[b] for a, b in itertools.combinations(synth.SPLITS, 2))

    again, summary_again = release("b")
    assert summary_again["counts"] == summary["counts"] and summary_again["hours"] == summary["hours"]
    for name in [*SPLIT_TSVS, "validated.tsv", "clip_durations.tsv"]:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    for clip in sorted((out / "clips").iterdir()):
        assert (again / "clips" / clip.name).read_bytes() == clip.read_bytes(), clip.name


@pytest.mark.parametrize("lang", [l for l in synth.available_languages() if is_non_latin(l)])
def test_non_latin_language_synthesises(lang, tmp_path):
    summary = synth.synthesize_corpus(tmp_path, lang, num_clips=6, seed=0, split_fractions=(1.0, 0.0, 0.0))
    assert summary["counts"] == {"train": 6, "dev": 0, "test": 0}
    rows = read_tsv(tmp_path / "train.tsv")
    letters = [ch for r in rows for ch in r["sentence"] if ch.isalpha()]
    assert letters and not any(unicodedata.name(ch).startswith("LATIN") for ch in letters)
    audio, sr = sf.read(tmp_path / "clips" / rows[0]["path"])
    assert sr == synth.CV_SAMPLE_RATE and np.sqrt(np.mean(audio**2)) > 0.01


def test_speak_variants_differ_and_bad_input_is_named():
    a, sr = synth.speak("habari rafiki", "sw", "m1")
    b, _ = synth.speak("habari rafiki", "sw", "f3", rate=150, pitch=70)
    assert a.dtype == np.float32 and np.abs(a).max() <= 1.0 and a.size > sr // 4
    assert a.size != b.size or not np.allclose(a, b)
    again, _ = synth.speak("habari rafiki", "sw", "m1")
    assert np.array_equal(a, again)  # reproducible call to call
    with pytest.raises(ValueError, match="no voice variant"):
        synth.speak("x", "sw", "no_such_variant")
    with pytest.raises(ValueError, match="no voice 'zz_none'"):
        synth.speak("x", "zz_none")
    with pytest.raises(ValueError, match="no word list.*available"):
        synth.synthesize_corpus("/nonexistent", "zz_none", num_clips=1)
    with pytest.raises(ValueError, match="split_fractions"):
        synth.synthesize_corpus("/nonexistent", "sw", split_fractions=(0.5, 0.1, 0.1))


def test_make_faulty_release_rows(tmp_path):
    expected = make_faulty_release(tmp_path, "sw", num_clips=12, seed=0)
    assert expected == {"missing_file": 1, "undecodable_audio": 1, "empty_text": 1, "path_escape": 1,
                        "duration": 2, "transcript_too_long": 1}
    splits = {s: read_tsv(tmp_path / f"{s}.tsv") for s in synth.SPLITS}
    rows = [r for s in synth.SPLITS for r in splits[s]]
    assert len(read_tsv(tmp_path / "validated.tsv")) == len(rows) == 12 + 9
    clips = tmp_path / "clips"
    by_path = {r["path"]: r for r in rows}

    missing = [r for r in rows if not (clips / r["path"]).exists()]
    assert len(missing) == 2  # the missing file and the escaping path
    escaping = [r for r in rows if ".." in Path(r["path"]).parts or Path(r["path"]).is_absolute()]
    assert len(escaping) == 1 and escaping[0] in splits["train"]

    undecodable = []
    durations = {}
    for r in rows:
        if (clips / r["path"]).exists() and ".." not in r["path"]:
            try:
                durations[r["path"]] = sf.info(clips / r["path"]).duration
            except sf.LibsndfileError:
                undecodable.append(r["path"])
    assert len(undecodable) == 1
    assert sorted(d for d in durations.values() if d < 0.3 or d > 30) == [pytest.approx(0.1, abs=0.02),
                                                                         pytest.approx(40, abs=0.1)]
    assert (clips / max(durations, key=durations.get)).stat().st_size < 300_000  # kept small

    empty = [r for r in rows if not any(ch.isalnum() for ch in r["sentence"])]
    assert len(empty) == 1 and (clips / empty[0]["path"]).exists()
    # More characters than 20 ms CTC frames in the clip.
    cramped = [p for p, d in durations.items() if 0.3 < d < 30 and len(by_path[p]["sentence"]) > d / 0.020]
    assert len(cramped) == 1 and len(by_path[cramped[0]]["sentence"]) >= 2 * durations[cramped[0]] / 0.020

    # Valid-but-tricky rows live in train with real audio.
    bare_quote = [r for r in splits["train"] if r["sentence"].startswith('"')]
    assert len(bare_quote) == 1 and bare_quote[0]["sentence"].count('"') == 1
    nfd = [r for r in splits["train"] if unicodedata.normalize("NFC", r["sentence"]) != r["sentence"]]
    assert len(nfd) == 1
    for r in bare_quote + nfd:
        assert 0.5 < durations[r["path"]] < 10
