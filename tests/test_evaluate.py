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

    from w2vbert_asr.data import load_prepared, to_float

    asr = pipeline("automatic-speech-recognition", model=str(trained_model_dir / "model"), device="cpu")
    clip = load_prepared(trained_model_dir, "test")[0]
    out = asr({"raw": to_float(clip["audio"]), "sampling_rate": 16000})
    assert isinstance(out["text"], str)


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
