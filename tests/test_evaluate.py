"""Scoring: known predictions give known metrics, files are written in the shared format, and a trained
model dir loads in plain transformers."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from w2vbert_asr.evaluate import error_rates, score, write_results
from w2vbert_asr.text import Normalizer


def _dataset(refs):
    return datasets.Dataset.from_dict({"id": [f"u{i}" for i in range(len(refs))], "text": refs,
                                       "duration": [2.0] * len(refs)}).with_format("numpy")


def test_known_predictions_give_known_metrics(tmp_path):
    refs = ["habari ya leo", "watoto wa shule"]
    hyps = ["Habari, ya LEO!", "watoto shule"]  # the normaliser makes the first exact
    metrics, rows = score(_dataset(refs), hyps, Normalizer())
    assert metrics["wer"] == pytest.approx(1 / 6)          # one deleted word out of six
    assert metrics["cer"] == pytest.approx(3 / 28)         # "wa " deleted: 3 of 28 characters
    assert metrics["utterances"] == 2 and metrics["audio_hours"] == pytest.approx(4 / 3600)
    assert rows[0] == {"id": "u0", "reference": "habari ya leo", "hypothesis": "habari ya leo", "wer": 0.0,
                       "cer": 0.0, "duration": 2.0}
    assert rows[1]["wer"] == pytest.approx(1 / 3)
    write_results(tmp_path, "test", metrics, rows, {"system": "x", "model": "m"})
    write_results(tmp_path, "dev", metrics, rows, {"system": "x", "model": "m"})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["splits"]) == {"test", "dev"} and saved["system"] == "x"
    lines = (tmp_path / "predictions" / "test.jsonl").read_text().splitlines()
    assert [json.loads(l)["id"] for l in lines] == ["u0", "u1"]


def test_error_rates_match_jiwer_definition():
    assert error_rates(["a b c d"], ["a x c"]) == {"wer": 0.5, "cer": pytest.approx(3 / 7)}
    # An empty reference has no words to be wrong about: it is left out of the corpus rates.
    assert error_rates(["", "a b c d", " "], ["x y", "a x c", ""]) == {"wer": 0.5, "cer": pytest.approx(3 / 7)}


def test_no_reference_words_give_nan_rates_that_are_written_and_printed(tmp_path, capsys):
    """External data whose references are all empty (blank or whitespace): no words to measure errors
    against, so WER and CER are NaN (not 0, which would read as perfect), and scoring, metrics.json and
    the printed table all cope."""
    import math

    from w2vbert_asr.evaluate import print_table

    rates = error_rates(["", "   "], ["habari", ""])
    assert set(rates) == {"wer", "cer"} and all(math.isnan(v) for v in rates.values())
    assert all(math.isnan(v) for v in error_rates([], []).values())

    metrics, rows = score(_dataset(["", " "]), ["Habari!", ""], Normalizer())
    assert math.isnan(metrics["wer"]) and math.isnan(metrics["cer"]) and metrics["utterances"] == 2
    # Per utterance: a hypothesis against an empty reference is all wrong, silence is right.
    assert [(r["wer"], r["cer"]) for r in rows] == [(1.0, 1.0), (0.0, 0.0)]
    write_results(tmp_path, "test", metrics, rows, {"system": "x"})
    saved = json.loads((tmp_path / "metrics.json").read_text())["splits"]["test"]
    assert math.isnan(saved["wer"]) and math.isnan(saved["cer"]) and saved["utterances"] == 2
    print_table({"test": metrics})
    assert "nan" in capsys.readouterr().out.splitlines()[1]


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory, prepared_run, run_overrides):
    import shutil
    from pathlib import Path

    from w2vbert_asr.cli import compose
    from w2vbert_asr.train import train

    out = tmp_path_factory.mktemp("trained")
    for name in ("prepared", "processor"):
        shutil.copytree(Path(prepared_run.output_dir) / name, out / name)
    shutil.copy(Path(prepared_run.output_dir) / "prepare_report.json", out)
    train(compose(run_overrides(out, prepared_run.data.root, "train.max_steps=3", "train.eval_steps=3")))
    return out


def test_model_dir_loads_in_plain_transformers_pipeline(trained_model_dir):
    from transformers import pipeline

    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.audio import to_float

    """transformers' own pipeline, given only the model folder, transcribes each test clip as the toolkit's
    batched decoding did at the end of training (predictions/test.jsonl), up to the model's normaliser."""
    asr = pipeline("automatic-speech-recognition", model=str(trained_model_dir / "model"), device="cpu")
    normalizer = Normalizer.load(trained_model_dir / "model")
    ours = {r["id"]: r["hypothesis"] for r in load_lines(trained_model_dir / "predictions" / "test.jsonl")}
    clips = load_prepared(trained_model_dir, "test")
    theirs = {str(c["id"]): normalizer(asr({"raw": to_float(c["audio"]), "sampling_rate": 16000})["text"])
              for c in clips}
    assert theirs == ours and len(theirs) == len(clips)
    assert any(theirs.values())  # a 3-step model still writes characters: the comparison is not of blanks


def test_evaluate_command_scores_a_split_from_the_source(trained_model_dir, prepared_run):
    from w2vbert_asr.cli import compose
    from w2vbert_asr.evaluate import evaluate

    cfg = compose(["recipe=demo", f"output_dir={trained_model_dir}", f"data.root={prepared_run.data.root}",
                   f"eval.results_dir={trained_model_dir / 'eval'}", "eval.split=dev"])
    summary = evaluate(cfg)
    saved = json.loads((trained_model_dir / "eval" / "metrics.json").read_text())
    assert saved["splits"]["dev"]["wer"] == pytest.approx(summary["dev"]["wer"])
    assert saved["splits"]["dev"]["utterances"] == len(load_lines(trained_model_dir / "eval" / "predictions" / "dev.jsonl"))
    # The metrics that training wrote for dev come from the same model and data: same numbers.
    trained = json.loads((trained_model_dir / "metrics.json").read_text())
    assert trained["splits"]["dev"]["wer"] == pytest.approx(summary["dev"]["wer"])


def load_lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]
