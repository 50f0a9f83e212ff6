"""`w2vbert-asr compare` (w2vbert_asr.report) on hand-written result folders with known numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose
from w2vbert_asr.report import compare

REFS = {"u1": "a b c d", "u2": "e f", "u3": "g h i j"}   # 10 reference words in all
OURS = {"u1": ("a b c d", 0.0, 0.0), "u2": ("e x", 0.5, 1 / 3), "u3": ("g h i j", 0.0, 0.0)}      # 1 error: 10 %
WHISPER = {"u1": ("a b c d", 0.0, 0.0), "u2": ("e f", 0.0, 0.0), "u3": ("x y z j", 0.75, 3 / 7)}  # 3 errors: 30 %


def write_run(folder: Path, header: dict, hyps: dict, wer: float, cer: float, rtfx: float, refs=REFS) -> Path:
    """A result folder in the format evaluate/baseline write (metrics.json + predictions/test.jsonl)."""
    (folder / "predictions").mkdir(parents=True)
    rows = [{"id": i, "reference": refs[i], "hypothesis": h, "wer": w, "cer": c, "duration": 2.0}
            for i, (h, w, c) in hyps.items()]
    hours = 2.0 * len(rows) / 3600
    metrics = {**header, "splits": {"test": {"wer": wer, "cer": cer, "utterances": len(rows), "audio_hours": hours,
                                             "decode_seconds": 6.0 / rtfx, "rtf": 1 / rtfx, "rtfx": rtfx,
                                             "decoding": "greedy"}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


OURS_HEADER = {"system": "w2v-bert-2.0-ctc", "model": "outputs/sw/model", "parameters": 605_000_000,
               "device": "NVIDIA H100 80GB HBM3", "max_batch_seconds": 400.0, "max_batch_size": 32}
WHISPER_HEADER = {"system": "whisper", "model": "openai/whisper-large-v3", "parameters": 1_543_490_560,
                  "device": "NVIDIA H100 80GB HBM3", "batch_size": 8}


@pytest.fixture
def two_runs(tmp_path):
    ours = write_run(tmp_path / "ours", OURS_HEADER, OURS, 0.1, 0.05, 250.0)
    whisper = write_run(tmp_path / "whisper", WHISPER_HEADER, WHISPER, 0.3, 0.12, 20.0)
    return tmp_path, ours, whisper


def run_compare(runs: list[Path], out: Path | None, *extra: str) -> dict:
    overrides = [f"compare.runs=[{','.join(str(r) for r in runs)}]", "compare.split=test", *extra]
    return compare(compose(overrides + ([f"compare.output_dir={out}"] if out else [])))


def test_table_json_and_png(two_runs):
    tmp, ours, whisper = two_runs
    report = run_compare([ours, whisper], tmp / "cmp")
    md = (tmp / "cmp" / "comparison.md").read_text()
    assert ("| w2v-bert-2.0-ctc | outputs/sw/model | 10.00 | 5.00 | 3 | 0.002 | 605.0 M | 250.0 | "
            "NVIDIA H100 80GB HBM3, batches <= 400 s, <= 32 clips |") in md
    assert ("| whisper | openai/whisper-large-v3 | 30.00 | 12.00 | 3 | 0.002 | 1.54 B | 20.0 | "
            "NVIDIA H100 80GB HBM3, batch 8 |") in md
    assert "Warning" not in md
    saved = json.loads((tmp / "cmp" / "comparison.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [r["wer"] for r in saved["runs"]] == [0.1, 0.3]
    assert [r["rtfx"] for r in saved["runs"]] == [250.0, 20.0]
    assert saved["common_utterances"] == 3 and saved["warnings"] == []
    png = tmp / "cmp" / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_disagreements_ordered_by_wer_spread(two_runs):
    tmp, ours, whisper = two_runs
    report = run_compare([ours, whisper], tmp / "cmp")
    dis = report["disagreements"]
    assert [d["id"] for d in dis] == ["u3", "u2"]          # u1: both perfect, not a disagreement
    assert dis[0]["wer_spread"] == pytest.approx(0.75)
    assert dis[0]["reference"] == "g h i j"
    assert dis[0]["hypotheses"] == {"w2v-bert-2.0-ctc": {"hypothesis": "g h i j", "wer": 0.0, "cer": 0.0},
                                    "whisper": {"hypothesis": "x y z j", "wer": 0.75, "cer": 3 / 7}}
    md = (tmp / "cmp" / "comparison.md").read_text()
    assert md.index("`u3`") < md.index("`u2`")
    assert "   - whisper (WER 75 %, CER 43 %): x y z j" in md
    top1 = run_compare([ours, whisper], tmp / "cmp1", "compare.top_disagreements=1")
    assert [d["id"] for d in top1["disagreements"]] == ["u3"]


def test_warns_about_devices_utterance_sets_and_references(two_runs):
    tmp, ours, _ = two_runs
    other = write_run(tmp / "cpu_run", {**WHISPER_HEADER, "device": "cpu (2 threads)"},
                      {k: WHISPER[k] for k in ("u1", "u2")}, 0.0, 0.0, 0.5,
                      refs={**REFS, "u2": "E F"})
    report = run_compare([ours, other], tmp / "cmp")
    text = " ".join(report["warnings"])
    assert "different devices" in text
    assert "different utterance sets (w2v-bert-2.0-ctc: 3, whisper: 2; 2 in common)" in text
    assert "different references" in text
    assert report["common_utterances"] == 2
    assert "u3" not in {d["id"] for d in report["disagreements"]}
    md = (tmp / "cmp" / "comparison.md").read_text()
    assert "> **Warning (!):**" in md
    assert "| 3 (!) | 0.002 | 605.0 M | 250.0 (!) |" in md


def test_same_system_twice_gets_distinct_labels(two_runs):
    tmp, _, whisper = two_runs
    ft = write_run(tmp / "ft", {**WHISPER_HEADER, "model": "someone/whisper-large-v3-ft-sw"}, WHISPER, 0.2, 0.1, 20.0)
    report = run_compare([whisper, ft], tmp / "cmp")
    assert [r["label"] for r in report["runs"]] == ["whisper (whisper-large-v3)", "whisper (whisper-large-v3-ft-sw)"]


def test_default_output_dir_without_recipe(two_runs):
    """No lang/recipe: output_dir cannot resolve, so the report goes next to the first run."""
    tmp, ours, whisper = two_runs
    run_compare([ours, whisper], None)
    assert (ours / "compare" / "comparison.md").is_file()


def test_bad_inputs_are_usage_errors(two_runs):
    tmp, ours, whisper = two_runs
    with pytest.raises(UsageError, match="at least 2"):
        run_compare([ours], tmp / "cmp")
    with pytest.raises(UsageError, match=r"metrics\.json not found"):
        run_compare([ours, tmp / "nowhere"], tmp / "cmp")
    with pytest.raises(UsageError, match=r"no split 'dev' \(it has \['test'\]\)"):
        compare(compose([f"compare.runs=[{ours},{whisper}]", "compare.split=dev", f"compare.output_dir={tmp}"]))
    (whisper / "predictions" / "test.jsonl").write_text('{"id": "u1"}\nnot json\n')
    with pytest.raises(UsageError, match=r"test\.jsonl:2"):
        run_compare([ours, whisper], tmp / "cmp")
