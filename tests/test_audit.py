"""Planted faults (synth.faulty_fraction), the alignment score, `w2vbert-asr audit` and data.exclude."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from w2vbert_asr.alignment import alignment, label_ids
from w2vbert_asr.cli import compose
from w2vbert_asr.plant import FAULTS_FILE, KINDS, read_faults
from w2vbert_asr.synth import SPLITS, synthesize_corpus

CLIPS = 40


def _tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def faulty_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty") / "corpus"
    summary = synthesize_corpus(root, "sw", num_clips=CLIPS, seed=0, faulty_fraction=0.25)
    return root, summary


# ------------------------------------------------------------------------------------------ planted faults
def test_planted_faults_every_kind_with_ground_truth_and_clean_clips_untouched(faulty_corpus):
    root, summary = faulty_corpus
    faults = read_faults(root)
    assert summary["faults"] == len(faults) == round(0.25 * CLIPS)
    assert sorted({f["kind"] for f in faults.values()}) == sorted(KINDS)  # 10 faults, 5 kinds: two of each
    rows = {r["path"]: r for s in SPLITS for r in _tsv(root / f"{s}.tsv")}
    # The same seed without faults: every clip without a fault is byte-identical, audio and row.
    plain = synthesize_corpus(root.parent / "plain", "sw", num_clips=CLIPS, seed=0)
    assert plain["faults"] == 0 and not (root.parent / "plain" / FAULTS_FILE).exists()
    plain_rows = {r["path"]: r for s in SPLITS for r in _tsv(root.parent / "plain" / f"{s}.tsv")}
    for path, row in rows.items():
        same_audio = (root / "clips" / path).read_bytes() == (root.parent / "plain" / "clips" / path).read_bytes()
        if path not in faults:
            assert row == plain_rows[path] and same_audio, path
            continue
        f = faults[path]
        assert f["split"] in SPLITS and row["sentence"] == f["sentence"] and f["detail"]
        if f["kind"] in ("other_sentence", "words_changed", "other_language"):
            assert row["sentence"] != plain_rows[path]["sentence"]
        if f["kind"] in ("audio_cut", "no_speech", "other_language"):
            assert not same_audio
        if f["kind"] == "words_changed":
            delta = len(row["sentence"].split()) - len(plain_rows[path]["sentence"].split())
            assert abs(delta) in (1, 2)
    cut = [p for p, f in faults.items() if f["kind"] == "audio_cut"]
    import soundfile as sf

    for p in cut:  # the speech lost 30-60 %: the clip is shorter (its silences are drawn as before)
        assert sf.info(str(root / "clips" / p)).frames < sf.info(str(root.parent / "plain" / "clips" / p)).frames


# ------------------------------------------------------------------------------------------ the score
SHARP = 8.0  # the oracle's logit margin: about what a frame costs when it must spell a character it does not hear


def _oracle(tokenizer, spoken: str, vocab_size: int, frames_per_char: int = 3, sharp: float = SHARP) -> torch.Tensor:
    """Logits (T, V) of a model that clearly hears `spoken`: each character on one frame, blanks around."""
    blank = tokenizer.pad_token_id
    ids = tokenizer(spoken).input_ids
    seq = [blank] * 2
    for i in ids:
        seq += [i] + [blank] * (frames_per_char - 1)
    seq += [blank] * 2
    logits = torch.zeros(len(seq), vocab_size)
    logits[torch.arange(len(seq)), torch.tensor(seq)] = sharp
    return logits


def _score(logits: torch.Tensor, text: str, tokenizer, config) -> float:
    from w2vbert_asr.geometry import FrameGeometry

    geometry, t = FrameGeometry.of(config), logits.shape[0]
    n = t * geometry.samples_per_frame
    while int(geometry.output_frames(torch.tensor([n]))[0]) < t:
        n += geometry.samples_per_frame // 4
    return float(alignment(logits[None], torch.tensor([n]), label_ids(tokenizer, [text]), config).score[0])


def test_alignment_score_is_near_zero_for_the_heard_text_and_low_for_every_fault_kind(tmp_path):
    from w2vbert_asr.model import build_model
    from w2vbert_asr.text import Vocabulary, build_processor

    processor = build_processor(Vocabulary.build(["kula mama paka leo sisi"]), tmp_path / "processor")
    tok = processor.tokenizer
    config = build_model(compose(["recipe=demo"]).model, tok).config
    heard = _oracle(tok, "kula mama leo", config.vocab_size)
    assert _score(heard, "kula mama leo", tok, config) > -0.05
    faults = {
        "other_sentence": _score(heard, "paka sisi", tok, config),
        "word dropped": _score(heard, "kula leo", tok, config),
        "word inserted": _score(heard, "kula mama sisi leo", tok, config),
        "audio_cut": _score(_oracle(tok, "kula", config.vocab_size), "kula mama leo", tok, config),
        "other_language": _score(heard, "эне ак", tok, config),  # characters the vocabulary lacks: [UNK]
        "no_speech": _score(_oracle(tok, "", config.vocab_size), "kula mama leo", tok, config),
    }
    # The score is a per-frame gap, so its scale is the oracle's sharpness: every frame that hears a character the
    # transcript lacks (or must spell one it does not hear) costs about SHARP nats. The mildest fault, one word of
    # three dropped, mismatches that word's characters ("mama ": 5 frames); every fault costs at least that much.
    # audit.threshold is calibrated on trained models (the bench of planted faults in recipes/README.md), whose
    # margins are not this oracle's, so it is not the bound here.
    one_word = SHARP * len("mama ") / heard.shape[0]
    assert all(s < -0.9 * one_word for s in faults.values()), (faults, one_word)
    assert faults["word dropped"] == max(faults.values())  # a dropped word is the hardest kind to see


def test_planted_recall_counts_flagged_and_rule_skipped_clips_per_kind():
    from w2vbert_asr.audit import planted_recall

    faults = {"a.mp3": {"kind": "audio_cut"}, "b.mp3": {"kind": "no_speech"}, "c.mp3": {"kind": "no_speech"}}
    ranked = [{"path": "/r/a.mp3", "score": -3.0}, {"path": "/r/b.mp3", "score": -0.1},
              {"path": "/r/d.mp3", "score": -2.0}, {"path": "/r/e.mp3", "score": -0.01}]
    skipped = [{"path": "c.mp3", "reason": "transcript_too_long"}]
    out = planted_recall(ranked, skipped, -1.0, faults)
    assert (out["planted"], out["true_positives"], out["caught"]) == (3, 2, 3)
    assert math.isclose(out["precision"], 2 / 3) and math.isclose(out["recall"], 2 / 3)
    assert out["kinds"]["no_speech"] == {"planted": 2, "flagged": 0, "skipped_by_rules": 1, "recall": 0.5}
    assert out["false_positives"] == ["d.mp3"] and out["missed"] == ["b.mp3"]


# ------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def audited(tmp_path_factory, faulty_corpus, run_overrides):
    """A 2-step model of the faulty corpus, and its audit (the threshold set to flag about a quarter)."""
    from w2vbert_asr.audit import audit
    from w2vbert_asr.train import train

    root, _ = faulty_corpus
    out = tmp_path_factory.mktemp("audited")
    train(compose(run_overrides(out, root, "train.max_steps=2", "train.eval_steps=2", "train.warmup_steps=1",
                                "data.test_split=null")))
    cfg = compose(run_overrides(out, root, f"model_dir={out / 'model'}", "audit.worst=5", "audit.folds=0"))
    first = audit(cfg)
    scores = [float(r["score"]) for r in _tsv(out / "audit" / "audit.tsv") if r["score"]]
    threshold = float(np.quantile(scores, 0.25))
    # Cross-fitted: the train clips scored by two 2-step fold models, each trained without them.
    cfg = compose(run_overrides(out, root, f"model_dir={out / 'model'}", "audit.worst=5", f"audit.threshold={threshold}",
                                "audit.folds=2", "train.max_steps=2", "train.eval_steps=2", "train.warmup_steps=1",
                                "data.test_split=null", "audit.splits=[train,dev,test]"))
    return out, root, audit(cfg), first


def test_audit_ranks_every_clip_and_writes_an_offline_report(audited):
    out, root, summary, _ = audited
    rows = _tsv(out / "audit" / "audit.tsv")
    assert len(rows) == CLIPS and {r["split"] for r in rows} == set(SPLITS)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores) and [int(r["rank"]) for r in rows] == list(range(1, CLIPS + 1))
    assert all(r["flagged"] == str(int(float(r["score"]) < summary["threshold"])) for r in rows)
    for r in rows:  # beside the score: CER, characters per second, duration, the greedy transcript
        assert 0 <= float(r["cer"]) and float(r["duration"]) > 0
        assert math.isclose(float(r["chars_per_second"]), len(r["reference"].replace(" ", "")) / float(r["duration"]),
                            rel_tol=1e-3)
    assert summary["flagged"] == sum(r["flagged"] == "1" for r in rows) > 0
    assert summary["planted"]["planted"] == len(read_faults(root))
    assert set(summary["planted"]["kinds"]) == set(KINDS)
    saved = json.loads((out / "audit" / "audit_summary.json").read_text())
    assert saved["threshold"] == summary["threshold"] and saved["distribution"]["quantiles"]
    page = (out / "audit" / "audit.html").read_text()
    assert page.count("<audio controls") == 5 and page.count('src="data:audio/mpeg;base64,') == 5
    assert "http://" not in page and "https://" not in page and "<script" not in page  # works offline
    assert "<del>" in page or "<ins>" in page  # a 2-step model's hypotheses differ from the references


def test_train_clips_are_scored_by_the_fold_that_never_trained_on_them(audited):
    from w2vbert_asr.prepared import load_prepared

    out, root, summary, first = audited
    assert first["folds"] == [] and len(summary["folds"]) == 2
    train_paths = {r["path"] for r in _tsv(out / "audit" / "audit.tsv") if r["split"] == "train"}
    held = [{r["path"] for r in _tsv(out / "audit" / f"fold{f}" / "held_out.tsv")} for f in (0, 1)]
    assert held[0] and held[1] and not held[0] & held[1] and held[0] | held[1] == train_paths
    for f in (0, 1):  # each fold model trained on the other fold's clips only
        trained = {str(p) for p in load_prepared(out / "audit" / f"fold{f}", "train")["path"]}
        assert trained == held[1 - f]
    speakers = {r["path"]: r["client_id"] for r in _tsv(root / "train.tsv")}
    by_speaker = [{speakers[Path(p).name] for p in h} for h in held]
    assert not by_speaker[0] & by_speaker[1]  # speakers kept whole


def test_folds_keep_speakers_whole_and_balance_clips():
    from w2vbert_asr.crossfit import assign_folds
    from w2vbert_asr.sources import RawRow

    rows = [RawRow(id=f"c{i}", sentence="x", file="t", line=i, path=f"/a/c{i}.mp3", speaker=f"s{i % 7}")
            for i in range(70)] + [RawRow(id=f"n{i}", sentence="x", file="t", line=i, path=f"/a/n{i}.mp3")
                                   for i in range(5)]
    folds = assign_folds(rows, 3)
    assert sorted(set(folds.values())) == [0, 1, 2]
    for spk in range(7):
        assert len({folds[f"/a/c{i}.mp3"] for i in range(spk, 70, 7)}) == 1
    sizes = [list(folds.values()).count(f) for f in range(3)]
    assert max(sizes) - min(sizes) <= 10
    assert assign_folds(list(reversed(rows)), 3) == folds  # row order does not matter


def test_exclude_drops_flagged_train_clips_only_and_counts_them(audited, run_overrides, tmp_path):
    from w2vbert_asr.prepare import prepare

    out, root, summary, _ = audited
    audit_tsv = out / "audit" / "audit.tsv"
    flagged = [r for r in _tsv(audit_tsv) if r["flagged"] == "1"]
    flagged_train = [r for r in flagged if r["split"] == "train"]
    assert flagged_train
    cfg = compose(run_overrides(tmp_path, root, f"data.exclude=[{audit_tsv}]", f"audit.threshold={summary['threshold']}"))
    report = prepare(cfg)
    train_rows = len(_tsv(root / "train.tsv"))
    assert report["splits"]["train"]["skipped"].get("excluded_by_audit") == len(flagged_train)
    assert report["splits"]["train"]["kept"] == train_rows - len(flagged_train)
    examples = report["splits"]["train"]["examples"]["excluded_by_audit"]
    assert {e["id"] for e in examples} <= {r["id"] for r in flagged_train}
    for split in ("dev", "test"):  # reported, never changed
        assert "excluded_by_audit" not in report["splits"][split]["skipped"]
        assert report["splits"][split]["kept"] == len(_tsv(root / f"{split}.tsv"))
    per_split = report["audit_exclusion"]["flagged_per_split"]
    assert per_split == {s: sum(r["split"] == s for r in flagged) for s in {r["split"] for r in flagged}}
    # Another threshold (or another audit.tsv) is another input: prepared again, not reused.
    again = prepare(compose(run_overrides(tmp_path, root, f"data.exclude=[{audit_tsv}]", "audit.threshold=-1000")))
    assert "excluded_by_audit" not in again["splits"]["train"]["skipped"]


def test_pseudolabel_filter_by_alignment_keeps_only_labels_that_fit_their_audio(audited, run_overrides, tmp_path):
    import shutil

    from transformers import AutoConfig

    from w2vbert_asr.families import load_processor
    from w2vbert_asr.geometry import FrameGeometry
    from w2vbert_asr.pseudolabel import POOL, _judge, _Pool, label_pool
    from w2vbert_asr.rows import Rules
    from w2vbert_asr.sources import RawRow
    from w2vbert_asr.text import Normalizer
    from w2vbert_asr.transcribe import Transcript

    out, root, _, _ = audited
    pool = tmp_path / "pool"
    pool.mkdir()
    for r in _tsv(root / "train.tsv")[:4]:  # copies of train clips under other names: a pool may hold those
        shutil.copy(root / "clips" / r["path"], pool / f"copy_{r['path']}")
    cfg = compose(run_overrides(out, root, f"pseudolabel.pool={pool}", "pseudolabel.filter=alignment"))
    report = label_pool(cfg, out / "model", tmp_path / "labels", 0.0)
    records = [json.loads(line) for line in (tmp_path / "labels" / POOL).read_text().splitlines()]
    assert report["filter"] == "alignment" and len(records) == 4
    assert all(isinstance(r["alignment"], float) for r in records)  # every transcribed clip is scored
    # The filter itself: confidence, alignment or both decide, each with its own threshold.
    normalizer, tokenizer = Normalizer.load(out / "model"), load_processor(out / "model").tokenizer
    rules = Rules.from_config(cfg, normalizer, FrameGeometry.of(AutoConfig.from_pretrained(out / "model")))
    clips = [(0.9, -0.1), (0.9, -3.0), (0.2, -0.1), (0.2, -3.0)]  # (confidence, alignment score)
    for how, kept in (("confidence", [0, 1]), ("alignment", [0, 2]), ("both", [0])):
        judged = _Pool(normalizer, 5)
        items = [((RawRow(id=f"c{i}", sentence="", file="p", line=i), Path(f"/p/c{i}.mp3"), 48_000),
                  Transcript("kula mama", [], 3.0, confidence=c), fit) for i, (c, fit) in enumerate(clips)]
        _judge(judged, items, rules, tokenizer, 0.5, how, -1.0)
        assert [int(c[0].id[1:]) for c in judged.candidates] == kept, how
        assert set(judged.report.skipped) <= {"low_confidence", "low_alignment"}
