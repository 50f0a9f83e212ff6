"""w2vbert_asr.significance: error counts, block resampling and intervals on cases with a known answer."""

from __future__ import annotations

import jiwer
import numpy as np
import pytest
from omegaconf import OmegaConf

from w2vbert_asr import UsageError, significance
from w2vbert_asr.significance import (BETTER, SAME, WORSE, Bootstrap, blocks_of, bootstrap, error_counts,
                                      interval, paired, resampled_sums, system_intervals, verdict)

REFS = ["the cat sat", "on the mat today", "a", "hello there world"]
HYPS = ["the cat sat down", "on mat today", "", "hullo there word"]  # insertion, deletion, empty, substitutions


def test_counts_sum_to_jiwers_corpus_rates_on_any_subset():
    counts = error_counts(REFS, HYPS)
    for metric, rate in (("wer", jiwer.wer), ("cer", jiwer.cer)):
        assert counts[metric].shape == (4, 2)
        for subset in ([0, 1, 2, 3], [0, 3], [1], [2, 2, 3]):  # repeats: a bootstrap draws some twice
            errors, length = counts[metric][subset].sum(axis=0)
            assert errors / length == pytest.approx(rate([REFS[i] for i in subset], [HYPS[i] for i in subset]))
    assert counts["wer"][:, 1].tolist() == [3, 4, 1, 3]


def test_block_resampling_draws_whole_blocks(monkeypatch):
    """Utterance i's column counts how often it was drawn: utterances of one block always move together,
    and every resample draws exactly as many blocks as there are."""
    blocks = np.array([0, 0, 1, 1, 1, 2])
    sums = resampled_sums(blocks, np.eye(6), samples=500, seed=3)
    assert sums.shape == (500, 6)
    assert (sums[:, 0] == sums[:, 1]).all() and (sums[:, 2] == sums[:, 3]).all() and (sums[:, 3] == sums[:, 4]).all()
    assert (sums[:, [0, 2, 5]].sum(axis=1) == 3).all()
    assert len({tuple(row) for row in sums[:, [0, 2, 5]]}) == 10  # all 10 multisets of 3 blocks turn up
    assert (resampled_sums(blocks, np.eye(6), 500, 3) == sums).all()
    monkeypatch.setattr(significance, "MAX_WEIGHTS", 12)  # big test sets go in chunks of resamples
    chunked = resampled_sums(np.arange(6), np.eye(6), 51, 0)
    assert chunked.shape == (51, 6) and (chunked.sum(axis=1) == 6).all() and len({tuple(r) for r in chunked}) > 40


def test_speakers_are_blocks_only_when_all_known_and_enough():
    ids, unit = blocks_of(["b", "a", "b", "c"], min_speakers=3)
    assert unit == "speaker" and ids.tolist() == [1, 0, 1, 2]
    assert blocks_of(["b", "a", "b", "c"], min_speakers=4)[1] == "utterance"
    ids, unit = blocks_of(["b", None, "b", "c"], min_speakers=1)
    assert unit == "utterance" and ids.tolist() == [0, 1, 2, 3]
    assert blocks_of(["b", "b"], min_speakers=1)[1] == "utterance"


def rows(errors: list[int], speakers: list[str] | None = None) -> list[dict]:
    """One 4-word utterance per entry, with that many words wrong."""
    out = [{"reference": "w x y z", "hypothesis": " ".join(["q"] * e + ["w", "x", "y", "z"][e:])} for e in errors]
    for row, spk in zip(out, speakers or []):
        row["speaker"] = spk
    return out


def test_interval_brackets_the_corpus_rate_and_shrinks_with_more_data():
    settings = Bootstrap(samples=1000, confidence=0.95, seed=0, min_speakers=10)
    small = system_intervals(dict(enumerate(rows([1, 0, 0, 0] * 10))), settings)
    large = system_intervals(dict(enumerate(rows([1, 0, 0, 0] * 250))), settings)
    for ci in (small, large):
        assert ci["wer"][0] < 1 / 16 < ci["wer"][1] and ci["unit"] == "utterance"
    assert large["wer"][1] - large["wer"][0] < (small["wer"][1] - small["wer"][0]) / 3  # ~ 1/sqrt(25)
    assert large["blocks"] == large["utterances"] == 1000
    shuffled = rows([1, 0, 0, 0] * 10)
    assert system_intervals(dict(reversed(list(enumerate(shuffled)))), settings) == small  # file order: no matter


def test_paired_verdicts_and_empty_references():
    settings = Bootstrap(samples=500, seed=1, min_speakers=2)
    a, b = rows([0] * 30), rows([1] * 15 + [0] * 15)
    b.append({"reference": " ", "hypothesis": "noise"})  # left out, as in the corpus WER
    a.append({"reference": " ", "hypothesis": ""})
    res = bootstrap([a, b], settings)
    assert res.utterances == 30 and res.point["wer"].tolist() == [0.0, 15 / 120]
    assert paired(res, 0, 1, 0.95)["wer"]["verdict"] == BETTER
    assert paired(res, 1, 0, 0.95)["wer"]["verdict"] == WORSE
    assert paired(res, 0, 0, 0.95)["wer"] == {"difference": 0.0, "interval": [0.0, 0.0], "verdict": SAME,
                                               "probability_of_improvement": 0.0}
    assert verdict(-0.02, 0.0) == SAME and verdict(-0.02, -0.001) == BETTER
    assert interval(np.arange(101.0), 0.9) == pytest.approx([5.0, 95.0])
    with pytest.raises(UsageError, match="non-empty reference"):
        bootstrap([[{"reference": "", "hypothesis": "x"}]], settings)


def test_settings_from_config_are_checked():
    cfg = OmegaConf.create({"bootstrap_samples": 200, "confidence": 0.9, "seed": 5, "min_speakers": 3})
    assert Bootstrap.from_config(cfg) == Bootstrap(200, 0.9, 5, 3)
    for bad in ({"bootstrap_samples": 0}, {"confidence": 1.0}):
        with pytest.raises(UsageError, match="compare.bootstrap_samples"):
            Bootstrap.from_config(OmegaConf.merge(cfg, bad))
