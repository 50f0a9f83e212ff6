"""The Whisper baseline (w2vbert_asr.baseline) through its real code path, with a tiny offline Whisper.

`w2vbert_asr.testing.build_tiny_whisper` writes a Whisper checkpoint folder (model, generation config, tokenizer, feature
extractor) built from config, nothing downloaded. Its decoder is scripted: every layer is a no-op,
token embeddings are zero and the position embeddings are one-hot, so the logits depend on the decoder
position alone. It therefore always writes `transcript` after a four-token prompt (start, language,
task, no-timestamps), and, if asked to detect the language instead, picks <|en|>: a run that did not
force the recipe's language shows a different prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch

from w2vbert_asr import UsageError
from w2vbert_asr.baseline import _PromptRecorder, baseline, load_whisper, transcribe_dataset, whisper_language
from w2vbert_asr.cli import compose
from w2vbert_asr.synth import synthesize_corpus
from w2vbert_asr.testing import TINY_WHISPER_DETECTED_LANGUAGE, TINY_WHISPER_TRANSCRIPT, build_tiny_whisper

TRANSCRIPT = TINY_WHISPER_TRANSCRIPT  # what the scripted decoder writes ...
NORMALISED = "habari dunia"         # ... and what the default text normaliser makes of it
DETECTED_LANGUAGE = TINY_WHISPER_DETECTED_LANGUAGE  # what it would pick if the language were detected
PROMPT = ["<|startoftranscript|>", "<|sw|>", "<|transcribe|>", "<|notimestamps|>"]


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny_whisper"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_whisper_dir):
    """One baseline run on a 20-clip synthetic corpus (10 test clips) -> (cfg, returned summary)."""
    tmp = tmp_path_factory.mktemp("baseline")
    corpus = tmp / "corpus"
    synthesize_corpus(corpus, "sw", num_clips=20, seed=0, split_fractions=(0.4, 0.1, 0.5))
    cfg = compose(["recipe=demo", f"output_dir={tmp}", f"data.root={corpus}",
                   f"baseline.name_or_path={tiny_whisper_dir}", "baseline.batch_size=4", "baseline.max_new_tokens=40"])
    return cfg, baseline(cfg)


def _results(cfg) -> tuple[dict, list[dict]]:
    results = Path(cfg.baseline.results_dir)
    metrics = json.loads((results / "metrics.json").read_text())
    rows = [json.loads(line) for line in (results / "predictions" / "test.jsonl").read_text().splitlines()]
    return metrics, rows


def test_language_token_is_forced(run):
    cfg, _ = run
    metrics, _ = _results(cfg)
    assert metrics["decoder_prompt"] == PROMPT
    assert metrics["language"] == "<|sw|>" and metrics["task"] == "transcribe"


def test_tiny_whisper_detects_another_language_when_not_forced(tiny_whisper_dir):
    """Guards the test above: the same checkpoint, left to detect the language, picks <|en|>."""
    model, processor = load_whisper(str(tiny_whisper_dir), torch.device("cpu"), torch.float32)
    recorder = _PromptRecorder(model.get_decoder())
    feats = processor.feature_extractor([np.zeros(16_000, np.float32)], sampling_rate=16_000, return_tensors="pt")
    model.generate(feats.input_features, max_new_tokens=5)
    prompt = processor.tokenizer.convert_ids_to_tokens(recorder.ids)
    assert prompt[:2] == ["<|startoftranscript|>", f"<|{DETECTED_LANGUAGE}|>"]


def test_hypotheses_go_through_the_normaliser(run):
    cfg, _ = run
    _, rows = _results(cfg)
    assert len(rows) == 10
    assert {r["hypothesis"] for r in rows} == {NORMALISED}


def test_results_have_evaluate_format(run):
    cfg, summary = run
    metrics, rows = _results(cfg)
    split = metrics["splits"]["test"]
    assert set(split) >= {"wer", "cer", "utterances", "audio_hours", "decode_seconds", "rtf", "rtfx", "decoding"}
    assert summary["test"]["wer"] == split["wer"]
    assert split["utterances"] == len(rows) and split["decoding"] == "greedy"
    assert split["rtfx"] == pytest.approx(split["audio_hours"] * 3600 / split["decode_seconds"])
    assert split["rtf"] == pytest.approx(1 / split["rtfx"])
    assert metrics["system"] == "whisper" and metrics["model"] == str(cfg.baseline.name_or_path)
    assert metrics["batch_size"] == 4 and metrics["device"].startswith("cpu")
    assert metrics["parameters"] > 0
    for r in rows:
        assert set(r) == {"id", "reference", "hypothesis", "wer", "cer", "duration", "speaker"}  # corpus names speakers
        assert r["wer"] == pytest.approx(jiwer.wer(r["reference"], r["hypothesis"]))
    refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
    assert split["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert split["audio_hours"] == pytest.approx(sum(r["duration"] for r in rows) / 3600, rel=1e-3)


def test_long_clips_use_long_form_decoding(tiny_whisper_dir):
    """A clip over Whisper's 30 s window is decoded sequentially, window after window, not cut at 30 s; order
    is kept. The scripted decoder writes its transcript once per window it is given, so a 35 s clip reads it
    twice and a 65 s clip three times (cut at 30 s, each would read it once), and a short clip once."""
    import math

    import datasets

    model, processor = load_whisper(str(tiny_whisper_dir), torch.device("cpu"), torch.float32)
    durations = [2.0, 65.0, 35.0, 3.0]  # batches of 2, longest first: {65 s, 35 s} long-form, {3 s, 2 s} not
    waves = [np.zeros(int(16_000 * d), np.float32) for d in durations]
    ds = datasets.Dataset.from_dict({"duration": durations, "audio": waves}).with_format("numpy")
    texts, seconds = transcribe_dataset(model, processor, ds, 2, {"language": "sw", "task": "transcribe",
                                                                  "max_new_tokens": 20}, torch.device("cpu"),
                                        torch.float32)
    assert [t.count(TRANSCRIPT) for t in texts] == [math.ceil(d / 30) for d in durations] == [1, 3, 2, 1], texts
    assert [t.replace(TRANSCRIPT, "").strip() for t in texts] == [""] * 4 and seconds > 0


@pytest.mark.parametrize("code, expected", [("sw", "sw"), ("sv-SE", "sv"), ("zh-CN", "zh"), ("pa_IN", "pa"),
                                            ("yue", "yue"), ("Swahili", "sw"), ("haitian-creole", "ht")])
def test_language_codes_map_to_whisper(code, expected):
    assert whisper_language(code) == expected


def test_language_whisper_lacks_is_a_usage_error():
    with pytest.raises(UsageError, match=r"baseline\.language=") as e:
        whisper_language("ky")
    assert "'ky'" in str(e.value)
    with pytest.raises(UsageError, match=r"no <\|yue\|> token"):
        whisper_language("yue", available=["en", "zh"])


def test_baseline_refuses_unknown_language_before_reading_data(tmp_path, tiny_whisper_dir):
    cfg = compose(["recipe=demo", f"output_dir={tmp_path}", f"data.root={tmp_path / 'missing'}",
                   f"baseline.name_or_path={tiny_whisper_dir}", "baseline.language=ky"])
    with pytest.raises(UsageError, match="Whisper has no language 'ky'"):
        baseline(cfg)


def test_missing_checkpoint_is_a_usage_error(tmp_path):
    cfg = compose(["recipe=demo", f"output_dir={tmp_path}", f"baseline.name_or_path={tmp_path / 'nothing'}"])
    with pytest.raises(UsageError, match="baseline.name_or_path"):
        baseline(cfg)


def test_outdated_generation_config_still_forces_language(run, tmp_path, tiny_whisper_dir):
    """Older fine-tuned checkpoints ship a generation config without the language/task tables, often with
    `forced_decoder_ids` pinning another language: the tables are rebuilt from the tokenizer and the
    recipe's language still wins."""
    import copy
    import shutil

    cfg, _ = run
    old = shutil.copytree(tiny_whisper_dir, tmp_path / "old_whisper")
    gen_file = old / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    en, transcribe, no_ts = gen["lang_to_id"]["<|en|>"], gen["task_to_id"]["transcribe"], gen["no_timestamps_token_id"]
    for key in ("lang_to_id", "task_to_id", "no_timestamps_token_id", "is_multilingual"):
        gen.pop(key)
    gen["forced_decoder_ids"] = [[1, en], [2, transcribe], [3, no_ts]]
    gen_file.write_text(json.dumps(gen))
    out = tmp_path / "results"
    cfg = copy.deepcopy(cfg)  # the module's run fixture stays untouched
    cfg.baseline.name_or_path, cfg.baseline.results_dir = str(old), str(out)
    baseline(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decoder_prompt"] == PROMPT
