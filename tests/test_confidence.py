"""Word and utterance confidence from CTC posteriors (w2vbert_asr.confidence) and where it shows up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from w2vbert_asr import UsageError
from w2vbert_asr.confidence import AGGREGATIONS, Confidence, aggregate, beam_hypothesis, ctc_word_spans, greedy_hypothesis
from w2vbert_asr.confidence_study import candidate_measures, word_errors
from w2vbert_asr.text import Vocabulary, build_processor

V = 12


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(rows, dtype=torch.float32))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_processor(Vocabulary.build(["ab ba", "habari ya asubuhi", "jambo"]), tmp_path_factory.mktemp("p")).tokenizer


def spelled(tokenizer, text: str, doubt: dict[int, dict[str, float]] | None = None) -> torch.Tensor:
    """(T, V) logits spelling `text`, one frame per character then a blank frame; character i's frame has the
    probabilities `doubt[i]` instead of 0.95 for the character itself."""
    vocab = tokenizer.get_vocab()
    rows = []
    for i, ch in enumerate(text):
        row = np.full(len(vocab), 1e-4)
        for c, p in (doubt or {}).get(i, {"|" if ch == " " else ch: 0.95}).items():
            row[vocab[c]] = p
        blank = np.full(len(vocab), 1e-4)
        blank[vocab["[PAD]"]] = 0.95
        rows += [row, blank]
    return torch.log(torch.tensor(np.array(rows), dtype=torch.float32))


@pytest.mark.parametrize("measure", candidate_measures()[:: len(AGGREGATIONS)], ids=lambda m: m.name)
def test_every_measure_maps_uniform_to_0_one_hot_to_1_and_is_monotonic(measure):
    uniform = torch.zeros(V)
    one_hot = torch.full((V,), -1e4)
    one_hot[3] = 0.0
    assert float(measure.frames(uniform)) == pytest.approx(0.0, abs=1e-5)
    assert float(measure.frames(one_hot)) == pytest.approx(1.0, abs=1e-5)
    # Sharper posteriors (lower temperature) never lower the confidence.
    base = torch.randn(V, generator=torch.Generator().manual_seed(0))
    conf = [float(measure.frames(base * s)) for s in (0.5, 1, 2, 4, 8)]
    assert conf == sorted(conf) and conf[0] < conf[-1], conf


def test_entropy_measures_see_the_tail_max_prob_does_not():
    """Same top probability, different spread of the rest: entropy-based confidence tells them apart."""
    concentrated = [0.6, 0.4] + [1e-6] * (V - 2)
    spread = [0.6] + [0.4 / (V - 1)] * (V - 1)
    a, b = _logits([concentrated]), _logits([spread])
    assert float(Confidence("max_prob").frames(a)) == pytest.approx(float(Confidence("max_prob").frames(b)), abs=1e-4)
    for m in ("gibbs", "tsallis", "renyi"):
        c = Confidence(m, alpha=0.33, normalization="lin")
        assert float(c.frames(a)) > float(c.frames(b)) + 0.05, m


def test_word_confidence_uses_non_blank_frames_and_aggregates():
    c = Confidence("max_prob", word_aggregation="min", utterance_aggregation="mean")
    rest = [1e-6] * (V - 3)
    sure = [0.015, 0.97, 0.015] + rest      # emits token 1
    unsure = [1e-6, 0.7, 0.3] + rest        # emits token 1, less sure
    blank = [0.55, 1e-6, 0.45] + rest       # the blank (token 0) wins
    logits = _logits([sure, unsure, blank, sure])
    frame = c.frames(logits)
    words, utt = c.score(logits, [(0, 2), (2, 4)], blank_id=0)
    assert words[0] == pytest.approx(float(frame[1]))  # min over frames 0 and 1
    assert words[1] == pytest.approx(float(frame[3]))  # frame 2 is a blank frame: left out
    assert utt == pytest.approx(sum(words) / 2)
    assert aggregate([0.5, 0.5], "prod") == pytest.approx(0.25)
    assert aggregate([0.2, 0.6], "mean") == pytest.approx(0.4)
    assert aggregate([0.2, 0.6], "min") == pytest.approx(0.2)
    # A span of blank frames only is judged on all its frames; no words: the mean frame confidence.
    assert c.score(logits, [(2, 3)], blank_id=0)[0][0] == pytest.approx(float(frame[2]))
    assert c.score(logits, [], blank_id=0) == ([], pytest.approx(float(frame.mean())))


def test_greedy_hypothesis_marks_the_doubtful_word(tokenizer):
    """'habarj ya asubuhi' where the j/i frame was a coin toss: that word is the least confident."""
    logits = spelled(tokenizer, "habari ya asubuhi", {5: {"j": 0.5, "i": 0.45}})
    for measure in ("max_prob", "tsallis", "renyi", "gibbs"):
        hyp = greedy_hypothesis(logits, tokenizer, Confidence(measure))
        assert hyp.text == "habarj ya asubuhi"
        assert [w[0] for w in hyp.words] == ["habarj", "ya", "asubuhi"]
        confs = [w[3] for w in hyp.words]
        assert confs[0] < min(confs[1:]) - 0.1, (measure, confs)
        assert 0.0 <= hyp.confidence <= 1.0
        assert hyp.words[1][1] == 14 and hyp.words[1][2] == 17  # frame span of "ya": 'y' at 14, 'a' at 16


def test_ctc_word_spans_equal_the_tokenizers_word_offsets(tokenizer):
    """Our numpy greedy grouping must give exactly `decode(output_word_offsets=True)`'s words and frame spans,
    on id sequences rich in what trips grouping: repeats, blanks between repeats, leading/trailing/double
    delimiters, [UNK], all-blank and empty inputs."""
    rng = np.random.default_rng(0)
    vocab = len(tokenizer)
    special = [tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(tokenizer.word_delimiter_token),
               tokenizer.unk_token_id]
    cases = [[], [tokenizer.pad_token_id] * 5, [special[1]] * 3]
    for n in range(300):
        length = int(rng.integers(1, 80))
        pool = special * 3 + list(range(vocab)) if n % 2 else list(range(vocab))
        ids = rng.choice(pool, size=length).tolist()
        cases.append([i for i in ids for _ in range(int(rng.integers(1, 4)))])  # runs of repeats
    for ids in cases:
        ours = ctc_word_spans(ids, tokenizer)
        theirs = tokenizer.decode(ids, output_word_offsets=True).word_offsets
        assert ours == [(w["word"], int(w["start_offset"]), int(w["end_offset"])) for w in theirs], ids


def test_beam_hypothesis_scores_the_beams_words(tokenizer):
    logits = spelled(tokenizer, "ab ba", {3: {"b": 0.5, "a": 0.45}})
    beam = ("ab ba", None, [("ab", (0, 3)), ("ba", (6, 9))], -1.0, -1.0)
    hyp = beam_hypothesis(logits, beam, tokenizer.pad_token_id, Confidence("max_prob"))
    assert [w[:3] for w in hyp.words] == [("ab", 0, 3), ("ba", 6, 9)]
    assert hyp.words[1][3] < hyp.words[0][3]
    assert hyp.text == "ab ba"


def _toolkit_roc_auc():
    """The toolkit's roc_auc, wherever it lives (the AUC study may move to confidence_study)."""
    import importlib

    for name in ("w2vbert_asr.confidence_study", "w2vbert_asr.confidence"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "roc_auc"):
            return module.roc_auc
    raise AssertionError("no roc_auc in w2vbert_asr.confidence_study or w2vbert_asr.confidence")


@pytest.mark.parametrize("positive_share", [0.1, 0.5, 0.9])
def test_roc_auc_equals_scikit_learns(positive_share):
    """Against scikit-learn's roc_auc_score on random scores with many ties (scores on a coarse grid, as
    confidences rounded to 4 digits tie), rare and common positives, and informative or useless scores."""
    from sklearn.metrics import roc_auc_score

    roc_auc = _toolkit_roc_auc()
    rng = np.random.default_rng(int(positive_share * 100))
    for trial in range(40):
        n = int(rng.integers(3, 300))
        positives = rng.random(n) < positive_share
        positives[:2] = [True, False]  # both classes present
        signal = rng.choice([0.0, 0.5, 2.0])  # useless, weak or strong scores
        scores = np.round(rng.normal(signal * positives, 1.0) * rng.choice([1, 2, 8])) / 8  # a coarse grid: ties
        scores[1] = scores[0]  # at least one tie across the classes
        ours = roc_auc(scores.tolist(), positives.tolist())
        assert ours == pytest.approx(roc_auc_score(positives, scores), abs=1e-12), (trial, n, signal)
    assert math.isnan(roc_auc([0.1, 0.2], [True, True]))  # one class only: undefined (sklearn raises)
    assert math.isnan(roc_auc([0.1, 0.2], [False, False]))


def test_word_errors():
    assert word_errors("a b c d", "a x c d e") == [False, True, False, False, True]
    assert word_errors("a b c", "a c") == [False, False]  # a deletion marks no hypothesis word
    assert word_errors("", "a") == [True]


def test_bad_settings_are_usage_errors():
    with pytest.raises(UsageError, match="confidence.measure"):
        Confidence("entropy")
    with pytest.raises(UsageError, match="alpha"):
        Confidence("tsallis", alpha=1.0)
    assert Confidence.from_config({"measure": "renyi", "alpha": "0.5", "other": 1}) == Confidence("renyi", 0.5)


def test_transcript_json_carries_confidence():
    from w2vbert_asr.transcribe import Transcript, Word

    t = Transcript("ab ba", [Word("ab", 0.0, 0.1, 0.91234), Word("ba", 0.2, 0.3, 0.5)], 1.0, confidence=0.7)
    d = t.to_dict()
    assert d["confidence"] == 0.7 and [w["confidence"] for w in d["words"]] == [0.9123, 0.5]
    assert "confidence" not in Transcript("", [], 1.0).to_dict()


def test_auc_table_ranks_the_doubtful_wrong_word_lowest(tokenizer):
    from w2vbert_asr.confidence_study import auc_table

    logits = [spelled(tokenizer, "habari ya", {5: {"j": 0.5, "i": 0.45}}), spelled(tokenizer, "jambo ya"),
              spelled(tokenizer, "ab ba", {0: {"a": 0.6, "b": 0.35}})]
    refs = ["habari ya", "jambo ya", "ab ba"]   # the doubtful 'ab' happens to be right
    rows = auc_table(logits, refs, tokenizer, measures=[Confidence("max_prob"), Confidence("tsallis")])
    for r in rows:
        assert r["words"] == 6 and r["wrong_words"] == 1 and r["wrong_utterances"] == 1
        assert r["word_auc"] == 1.0  # habarj (wrong) is less confident than every right word, 'ab' included
        assert set(r) >= {"utterance_auc_min", "utterance_auc_mean", "utterance_auc_prod"}
