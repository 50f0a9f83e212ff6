"""`bakeoff`: zero-shot baselines, two backbones fine-tuned on the same data and budget, and the comparison of all;
each stage cached, a stopped training resumed, a baseline that cannot run skipped with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from w2vbert_asr.bakeoff import bakeoff
from w2vbert_asr.cli import compose


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, prepared_run):
    out = tmp_path_factory.mktemp("bakeoff")
    for name in ("prepared", "processor"):  # the baseline stand-ins learn their tokenizers from it
        shutil.copytree(Path(prepared_run.output_dir) / name, out / name)
    return ["recipe=demo", f"output_dir={out}", f"data.root={prepared_run.data.root}", "train.num_workers=0",
            "train.max_steps=2", "train.eval_steps=2", "baseline.random_standin=true", "baseline.max_new_tokens=8",
            "bakeoff.backbones=[tiny,omniasr_ctc_tiny]", "bakeoff.baselines=[omniasr_ctc,mms]"]


def _run(overrides, *more):
    every = [*overrides, *more]
    cfg = compose([*every, f"bakeoff.overrides=[{','.join(repr(o) for o in every)}]"])
    return cfg, bakeoff(cfg)


@pytest.fixture(scope="module")
def first(overrides):
    """Backbones stopped after one step (a time-boxed job), then the same command again."""
    _, stopped = _run(overrides, "train.stop_at_step=1")
    cfg, summary = _run(overrides)
    return cfg, stopped, summary


def test_a_stopped_stage_resumes_and_then_all_are_compared(first, capsys):
    cfg, stopped, summary = first
    assert [s["status"] for s in stopped["stages"]][-2:] == ["stopped", "stopped"] and stopped["compare"] is None
    assert [s["status"] for s in summary["stages"]] == ["cached"] * 2 + ["done", "done"]
    out = Path(cfg.bakeoff.output_dir)
    report = json.loads((out / "compare" / "comparison.json").read_text())
    assert len(report["runs"]) == 4 and len(report["pairs"]) == 6
    assert all(r["wer_interval"] and r["parameters"] and r["rtfx"] for r in report["runs"])
    labels = {r["label"] for r in report["runs"]}
    assert {"w2v-bert-2.0-ctc", "omniasr-ctc"} <= labels and "mms (random tiny stand-in)" in labels
    markdown = (out / "compare" / "comparison.md").read_text()
    assert "**Random weights:**" in markdown and "| cc-by-nc-4.0 |" in markdown
    for stage in summary["stages"][-2:]:
        assert stage["resumed_from"].endswith("step-00000001")
        assert json.loads((Path(stage["dir"]) / "metrics.json").read_text())["splits"]["test"]["utterances"] == 6


def test_a_rerun_does_nothing_again(first, overrides, capsys):
    _, summary = _run(overrides)
    assert {s["status"] for s in summary["stages"]} == {"cached"}
    assert "trained before, same settings" in capsys.readouterr().out


def test_a_baseline_that_cannot_run_is_skipped_with_its_reason(first, overrides, capsys):
    _, summary = _run(overrides, "bakeoff.baselines=[omniasr_ctc,mms]", "bakeoff.backbones=[tiny]",
                      "baseline.language=xyz")
    skipped = [s for s in summary["stages"] if s["status"] == "skipped"]
    assert [s["stage"] for s in skipped] == ["baseline mms"] and "does not cover language 'xyz'" in skipped[0]["reason"]
    assert "error: bakeoff: baseline mms skipped" in capsys.readouterr().out


def test_gpu_rows_script_runs_small_on_the_cpu(load_benchmark, tmp_path):
    """benchmarks/bakeoff_gpu.py (gpu_check.sh's bakeoff step) end to end in tiny shapes: a training step of the
    omniASR-CTC recipe and each baseline family's RTFx, the LLM's from a stand-in's config."""
    from w2vbert_asr.standins import build_tiny_omniasr_llm

    llm = build_tiny_omniasr_llm(tmp_path / "llm", ["habari ya leo rafiki"] * 10, ["swh_latn"])
    out = load_benchmark("bakeoff_gpu").main(["--small", "--device", "cpu", "--steps", "1", "--clips", "2",
                                              "--batch-size", "2", "--llm-config", str(llm)])
    assert out["train"]["audio_seconds_per_second"] > 0 and out["train"]["peak_gib"] is None
    assert set(out["infer"]["rtfx"]) == {"omniasr-ctc-300m", "omniasr-ctc-1b", "mms-1b-all", "omniasr-llm"}
