"""The omniASR-CTC, MMS and omniASR LLM baselines through `baseline`'s one path, offline with tiny random models
(standins.py): language codes, coverage, memory, the clear errors, and what metrics.json says."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from w2vbert_asr import UsageError
from w2vbert_asr.baseline import baseline
from w2vbert_asr.cli import compose
from w2vbert_asr.languages import iso639_3, mms_language, omniasr_language, primary_subtag


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared_run):
    """An output_dir holding the prepared demo corpus (the stand-ins' tokenizers learn its train text)."""
    out = tmp_path_factory.mktemp("baselines")
    shutil.copytree(Path(prepared_run.output_dir) / "prepared", out / "prepared")
    return out


def _cfg(run_dir, prepared_run, *overrides):
    return compose(["recipe=demo", f"output_dir={run_dir}", f"data.root={prepared_run.data.root}",
                    "baseline.random_standin=true", "baseline.max_new_tokens=12", *overrides])


def _metrics(cfg) -> dict:
    return json.loads((Path(cfg.baseline.results_dir) / "metrics.json").read_text())


@pytest.mark.parametrize("family, system, language", [("omniasr_ctc", "omniasr-ctc", None), ("mms", "mms", "swh"),
                                                      ("omniasr_llm", "omniasr-llm", "swh_latn")])
def test_each_family_runs_the_shared_path(run_dir, prepared_run, family, system, language):
    cfg = _cfg(run_dir, prepared_run, f"baseline={family}")
    summary = baseline(cfg)
    metrics = _metrics(cfg)
    split = metrics["splits"]["test"]
    assert summary["test"]["wer"] == split["wer"] and split["utterances"] == 6
    assert split["rtfx"] == pytest.approx(split["audio_hours"] * 3600 / split["decode_seconds"])
    assert metrics["system"] == f"{system} (random tiny stand-in)" and metrics["weights"].startswith("random")
    assert metrics["license"] == {"mms": "cc-by-nc-4.0"}.get(family, "apache-2.0")
    assert metrics.get("language") == language and metrics["char_coverage"] == 1.0 and metrics["parameters"] > 0
    rows = [json.loads(line) for line in (Path(cfg.baseline.results_dir) / "predictions" / "test.jsonl").open()]
    assert len(rows) == 6 and {"reference", "hypothesis", "wer", "cer"} <= set(rows[0])


@pytest.mark.parametrize("code, three, primary", [("sw", "swh", "sw"), ("sv-SE", "swe", "sv"), ("kab", "kab", "kab"),
                                                  ("swh_Latn", "swh", "swh_latn"), ("zh_CN", "cmn", "zh")])
def test_codes_map_through_the_libraries_table(code, three, primary):
    assert iso639_3(code) == three and primary_subtag(code) == primary


def test_omniasr_llm_codes_need_the_script_only_when_ambiguous():
    assert omniasr_language("sw", ["swh_latn", "eng_latn"]) == "swh_latn"
    assert omniasr_language("kab", ["kab_latn", "eng_latn"]) == "kab_latn"  # 639-3, one script
    assert omniasr_language("uzb_cyrl", ["uzb_latn", "uzb_cyrl"]) == "uzb_cyrl"
    with pytest.raises(UsageError, match=r"in 2 scripts \(uzb_cyrl, uzb_latn\).*<code>_<script>"):
        omniasr_language("uzb", ["uzb_latn", "uzb_cyrl"])
    with pytest.raises(UsageError, match=r"does not cover language 'sw'.*baseline\.language="):
        omniasr_language("sw", ["eng_latn"])


def test_mms_codes_are_iso_639_3():
    assert mms_language("sv-SE", ["swe", "eng"]) == "swe" and mms_language("swh", ["swh"]) == "swh"
    with pytest.raises(UsageError, match="does not cover language 'sw'"):
        mms_language("sw", ["eng", "fra"])


def test_a_language_the_model_lacks_is_one_error_line_before_any_data(tmp_path, train_texts_of):
    """The command line: an MMS checkpoint without the recipe's language stops with one `error:` line (exit 2), and
    nothing is read: data.root does not even exist."""
    from w2vbert_asr.standins import build_tiny_mms

    mms = build_tiny_mms(tmp_path / "mms", train_texts_of, ["eng", "fra"])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "w2vbert_asr.cli", "baseline", "recipe=demo", f"output_dir={out}",
                           f"data.root={tmp_path / 'nowhere'}", "baseline=mms", f"baseline.name_or_path={mms}"],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "does not cover language 'sw'" in lines[0]
    assert not (out / "baseline-mms" / "prepared").exists()


@pytest.fixture(scope="module")
def train_texts_of(prepared_run) -> list[str]:
    from w2vbert_asr.prepared import load_prepared

    return [str(t) for t in load_prepared(prepared_run.output_dir, "train")["text"]]


def test_a_vocabulary_without_the_script_is_not_covered(tmp_path, run_dir, prepared_run, train_texts_of):
    from w2vbert_asr.standins import build_tiny_omniasr_ctc

    latin_less = build_tiny_omniasr_ctc(tmp_path / "ctc", ["ελληνικά γράμματα μόνο"] * 20)
    cfg = _cfg(run_dir, prepared_run, "baseline=omniasr_ctc", "baseline.random_standin=false",
               f"baseline.name_or_path={latin_less}", f"baseline.results_dir={tmp_path / 'res'}")
    with pytest.raises(UsageError, match=r"does not cover this language's writing: its vocabulary writes 0\.0 %"):
        baseline(cfg)


def test_the_llm_says_what_fits_when_its_weights_do_not(tmp_path, monkeypatch, train_texts_of):
    from w2vbert_asr import baseline_llm
    from w2vbert_asr.standins import build_tiny_omniasr_llm

    llm = build_tiny_omniasr_llm(tmp_path / "llm", train_texts_of, ["swh_latn"])
    need, params = baseline_llm.weight_bytes(str(llm), torch.bfloat16, None)
    assert need == 2 * params and params == sum(
        p.numel() for p in __import__("transformers").OmniASRForConditionalGeneration.from_pretrained(llm).parameters())
    monkeypatch.setattr(baseline_llm, "free_bytes", lambda device: need * (0.6 if device.type == "cuda" else 10))
    with pytest.raises(UsageError, match=r"needs ~.* GB in bfloat16, cuda:0 has .* GB free; what fits: baseline\."
                                         r"quantize=8bit .* or baseline\.quantize=4bit .* or baseline\.device=cpu"):
        baseline_llm.check_fits(str(llm), torch.device("cuda:0"), torch.bfloat16, None)
    bcfg = compose(["recipe=demo", "baseline=omniasr_llm", "baseline.quantize=8bit"]).baseline
    with pytest.raises(UsageError, match="bitsandbytes on a CUDA GPU"):
        baseline_llm.load(str(llm), torch.device("cpu"), torch.bfloat16, bcfg)


def test_llm_batches_give_what_each_clip_gives_alone(tmp_path, train_texts_of):
    """Left-padded prompts: a clip's greedy transcript does not depend on its batch."""
    import datasets

    from w2vbert_asr import baseline_llm
    from w2vbert_asr.standins import build_tiny_omniasr_llm

    llm = build_tiny_omniasr_llm(tmp_path / "llm", train_texts_of, ["swh_latn"])
    cfg = compose(["recipe=demo", "baseline=omniasr_llm", "baseline.max_new_tokens=8", "baseline.batch_size=3"])
    model, processor = baseline_llm.load(str(llm), torch.device("cpu"), torch.float32, cfg.baseline)
    rng = np.random.default_rng(0)
    durations = [2.0, 1.0, 3.0]
    audio = [(0.1 * rng.standard_normal(int(16_000 * d))).astype(np.float32) for d in durations]
    ds = datasets.Dataset.from_dict({"duration": durations, "audio": audio}).with_format("numpy")
    lang = baseline_llm.language("sw", model, processor, str(llm))
    batched, _, _ = baseline_llm.transcribe(model, processor, ds, cfg, torch.device("cpu"), torch.float32, lang)
    cfg.baseline.batch_size = 1
    alone, _, _ = baseline_llm.transcribe(model, processor, ds, cfg, torch.device("cpu"), torch.float32, lang)
    assert batched == alone and any(batched)


def test_quantize_is_for_the_llm_only():
    from w2vbert_asr.checks import ConfigError

    with pytest.raises(ConfigError, match="baseline.quantize=8bit applies to baseline=omniasr_llm only"):
        compose(["recipe=demo", "baseline=mms", "baseline.quantize=8bit"])
