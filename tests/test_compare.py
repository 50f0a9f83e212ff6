"""`w2vbert-asr compare` (w2vbert_asr.compare) on hand-written result folders with known numbers, and the
bootstrap intervals and paired verdicts on constructed cases whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from w2vbert_asr import UsageError
from w2vbert_asr.push import build_card
from w2vbert_asr.cli import compose
from w2vbert_asr.evaluate import error_rates
from w2vbert_asr.compare import compare
from w2vbert_asr.significance import BETTER, SAME, WORSE

REFS = {"u1": "a b c d", "u2": "e f", "u3": "g h i j"}   # 10 reference words in all
OURS = {"u1": ("a b c d", 0.0, 0.0), "u2": ("e x", 0.5, 1 / 3), "u3": ("g h i j", 0.0, 0.0)}      # 1 error: 10 %
WHISPER = {"u1": ("a b c d", 0.0, 0.0), "u2": ("e f", 0.0, 0.0), "u3": ("x y z j", 0.75, 3 / 7)}  # 3 errors: 30 %


def write_run(folder: Path, header: dict, hyps: dict, wer: float, cer: float, rtfx: float, refs=REFS,
              speakers: dict | None = None) -> Path:
    """A result folder in the format evaluate/baseline write (metrics.json + predictions/test.jsonl)."""
    (folder / "predictions").mkdir(parents=True)
    rows = [{"id": i, "reference": refs[i], "hypothesis": h, "wer": w, "cer": c, "duration": 2.0,
             **({"speaker": speakers[i]} if speakers else {})}
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
    # Intervals from 3 utterances: the resamples can drop every error (0 %) or draw the worst one 3 times.
    assert ("| w2v-bert-2.0-ctc | outputs/sw/model | 10.00 [0.00, 50.00] | 5.00 [0.00, 33.33] | 3 | 0.002 | "
            "605.0 M | ? | 250.0 | NVIDIA H100 80GB HBM3, batches <= 400 s, <= 32 clips |") in md
    assert ("| whisper | openai/whisper-large-v3 | 30.00 [0.00, 75.00] | 12.00 [0.00, 42.86] | 3 | 0.002 | "
            "1.54 B | ? | 20.0 | NVIDIA H100 80GB HBM3, batch 8 |") in md
    assert "1000 resamples of the 3 utterances, seed 0" in md
    assert "| w2v-bert-2.0-ctc | whisper | -20.00 [-75.00, 50.00] | not distinguishable |" in md
    assert "Warning" not in md
    saved = json.loads((tmp / "cmp" / "comparison.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [r["wer"] for r in saved["runs"]] == [0.1, 0.3]
    assert [r["rtfx"] for r in saved["runs"]] == [250.0, 20.0]
    assert saved["runs"][0]["wer_interval"] == [0.0, 0.5] and saved["runs"][0]["resampling"] == {
        "unit": "utterance", "blocks": 3}
    assert [(p["a"], p["b"]) for p in saved["pairs"]] == [("w2v-bert-2.0-ctc", "whisper")]
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
    assert "| 3 (!) | 0.002 | 605.0 M | ? | 250.0 (!) |" in md


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
    with pytest.raises(UsageError, match=r"compare.confidence=1.5"):
        run_compare([ours, whisper], tmp / "cmp", "compare.confidence=1.5")
    (whisper / "predictions" / "test.jsonl").write_text('{"id": "u1"}\nnot json\n')
    with pytest.raises(UsageError, match=r"test\.jsonl:2"):
        run_compare([ours, whisper], tmp / "cmp")


def test_the_same_run_listed_twice_is_one_error_line(two_runs, capsys):
    """Listed twice (even as another spelling of the same folder) it would be compared with itself."""
    from w2vbert_asr.cli import main

    tmp, ours, whisper = two_runs
    with pytest.raises(UsageError, match=r"compare.runs lists .*ours twice"):
        run_compare([ours, whisper, tmp / "whisper" / ".." / "ours"], tmp / "cmp")
    with pytest.raises(SystemExit) as e:
        main(["compare", f"compare.runs=[{ours},{whisper},{whisper}]", f"compare.output_dir={tmp / 'cmp'}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(errors) == 1 and errors[0].startswith("error: compare.runs lists"), errors
    assert not (tmp / "cmp").exists()


def test_empty_predictions_are_an_error_not_an_agreement(two_runs):
    tmp, ours, whisper = two_runs
    (whisper / "predictions" / "test.jsonl").write_text("")
    with pytest.raises(UsageError, match=r"test\.jsonl holds no predictions .*metrics\.json counts 3"):
        run_compare([ours, whisper], tmp / "cmp")


def test_counts_come_from_the_predictions_read(two_runs):
    """A predictions file shorter than metrics.json says (a copy cut short): the table counts what was read,
    and a warning says so; with no utterance in common nothing is called an agreement."""
    tmp, ours, whisper = two_runs
    lines = (whisper / "predictions" / "test.jsonl").read_text().splitlines()
    (whisper / "predictions" / "test.jsonl").write_text(lines[0] + "\n")
    report = run_compare([ours, whisper], tmp / "cmp")
    assert [r["utterances"] for r in report["runs"]] == [3, 1] and report["common_utterances"] == 1
    assert any("metrics.json counts 3 utterances" in w and "holds 1" in w for w in report["warnings"])
    other = write_run(tmp / "other", WHISPER_HEADER, {"v1": ("a", 0.0, 0.0)}, 0.0, 0.0, 20.0, refs={"v1": "a"})
    report = run_compare([ours, other], tmp / "cmp2")
    md = (tmp / "cmp2" / "comparison.md").read_text()
    assert report["common_utterances"] == 0 and report["pairs"] == []
    assert "agree on every common utterance" not in md and "No utterance is common to all runs" in md


# --------------------------------------------------------------------------------------------- significance
SENTENCE = "one two three four five"  # 5 reference words per utterance


def constructed(folder: Path, errors: dict[int, int], n: int = 60, speakers: int = 0) -> Path:
    """A run on n 5-word utterances; errors: utterance index -> words substituted. speakers: that many
    speakers own consecutive equal shares of the utterances (0: rows name no speaker)."""
    ids = [f"utt{i:03d}" for i in range(n)]
    words = SENTENCE.split()
    hyps = {u: (" ".join(["x"] * errors.get(i, 0) + words[errors.get(i, 0):]), errors.get(i, 0) / 5, 0.0)
            for i, u in enumerate(ids)}
    spk = {u: f"spk{i * speakers // n}" for i, u in enumerate(ids)} if speakers else None
    rates = error_rates([SENTENCE] * n, [h for h, _, _ in hyps.values()])
    return write_run(folder, {**OURS_HEADER, "system": folder.name}, hyps, rates["wer"], rates["cer"], 10.0,
                     refs=dict.fromkeys(ids, SENTENCE), speakers=spk)


def pair(report: dict, metric: str = "wer") -> dict:
    (p,) = report["pairs"]
    return p[metric]


def test_clear_difference_is_significant(tmp_path):
    """2 errors against 40 in 300 words: every interval of A minus B lies below 0, both ways round."""
    good = constructed(tmp_path / "good", {0: 1, 1: 1})
    bad = constructed(tmp_path / "bad", dict.fromkeys(range(40), 1))
    report = run_compare([good, bad], tmp_path / "cmp")
    d = pair(report)
    assert d["difference"] == pytest.approx(2 / 300 - 40 / 300)
    assert d["interval"][1] < 0 and d["verdict"] == BETTER and d["probability_of_improvement"] == 1.0
    assert pair(report, "cer")["verdict"] == BETTER
    assert pair(run_compare([bad, good], tmp_path / "cmp2"))["verdict"] == WORSE
    low, high = report["runs"][1]["wer_interval"]
    assert low < 40 / 300 < high and high - low < 0.15
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| good | bad | -12.67 [" in md and "| **better** |" in md


def test_small_difference_is_not_distinguishable(tmp_path):
    """10 errors against 11, on different utterances: the interval straddles 0, whatever the seed."""
    a = constructed(tmp_path / "a", dict.fromkeys(range(10), 1))
    b = constructed(tmp_path / "b", dict.fromkeys(range(10, 21), 1))
    for seed in (0, 1, 2):
        d = pair(run_compare([a, b], tmp_path / f"cmp{seed}", f"compare.seed={seed}"))
        assert d["difference"] == pytest.approx(-1 / 300)
        assert d["interval"][0] < 0 < d["interval"][1] and d["verdict"] == SAME
    md = (tmp_path / "cmp0" / "comparison.md").read_text()
    assert "| a | b | -0.33 [" in md and "| not distinguishable |" in md


def test_speaker_blocks_when_rows_name_speakers(tmp_path):
    """All of B's extra errors come from one of 10 speakers. Drawing utterances, a resample almost never
    misses all 6 of them (B looks worse); drawing speakers, a third of the resamples leave that speaker out,
    so the difference is not established. min_speakers decides which applies."""
    a = constructed(tmp_path / "a", {}, speakers=10)
    b = constructed(tmp_path / "b", dict.fromkeys(range(6), 3), speakers=10)
    by_speaker = run_compare([a, b], tmp_path / "spk")
    assert by_speaker["paired_resampling"] == {"unit": "speaker", "blocks": 10, "utterances": 60}
    assert by_speaker["runs"][1]["resampling"] == {"unit": "speaker", "blocks": 10}
    assert pair(by_speaker)["verdict"] == SAME and pair(by_speaker)["interval"][1] == 0.0
    by_utterance = run_compare([a, b], tmp_path / "utt", "compare.min_speakers=11")
    assert by_utterance["paired_resampling"]["unit"] == "utterance"
    assert pair(by_utterance)["verdict"] == BETTER
    spk_low, spk_high = by_speaker["runs"][1]["wer_interval"]
    utt_low, utt_high = by_utterance["runs"][1]["wer_interval"]
    assert spk_high - spk_low > utt_high - utt_low  # correlated errors: honest intervals are wider
    assert "1000 resamples of the 10 speakers, seed 0" in (tmp_path / "spk" / "comparison.md").read_text()
    no_ids = constructed(tmp_path / "c", {})  # rows without speakers: every utterance is its own block
    assert run_compare([no_ids, b], tmp_path / "mixed")["paired_resampling"]["unit"] == "speaker"


def test_intervals_are_seeded(tmp_path):
    a = constructed(tmp_path / "a", dict.fromkeys(range(10), 1))
    b = constructed(tmp_path / "b", dict.fromkeys(range(5, 25), 1))
    first = run_compare([a, b], tmp_path / "one")
    assert run_compare([a, b], tmp_path / "two") == first
    assert (tmp_path / "one" / "comparison.md").read_text() == (tmp_path / "two" / "comparison.md").read_text()
    other = run_compare([a, b], tmp_path / "three", "compare.seed=7")
    assert other["runs"][1]["wer_interval"] != first["runs"][1]["wer_interval"]
    assert other["runs"][1]["wer"] == first["runs"][1]["wer"]


def test_model_card_results_carry_intervals(tmp_path):
    """push's card: each WER/CER of metrics.json with its interval from the predictions next to it, the same
    as `compare` gives with the same settings."""
    from w2vbert_asr.significance import Bootstrap

    run = constructed(tmp_path / "run", dict.fromkeys(range(40), 1))
    card = build_card(run / "model", "me/m", compose(["recipe=demo"]).push, "sw",
                          Bootstrap.from_config(compose(["recipe=demo"]).compare)).text
    report = run_compare([run, constructed(tmp_path / "other", {})], tmp_path / "cmp")
    low, high = report["runs"][0]["wer_interval"]
    assert f"| test | greedy | 13.33 [{100 * low:.2f}, {100 * high:.2f}] | 8.70 [" in card
    assert "Brackets: test: 95 % percentile bootstrap intervals, 1000 resamples of the 60 utterances, seed 0." in card
    plain = build_card(run / "model", "me/m", compose(["recipe=demo"]).push, "sw").text
    assert "| test | greedy | 13.33 | 8.70 |" in plain


def test_speakers_flow_from_the_corpus_to_predictions(prepared_run, sw_corpus, tmp_path):
    """client_id of the Common Voice TSV -> the prepared `speaker` column -> predictions rows -> compare
    resamples those speakers."""
    import csv

    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.evaluate import score, write_results
    from w2vbert_asr.text import Normalizer

    with (sw_corpus / "train.tsv").open(newline="", encoding="utf-8") as f:  # the split with several speakers
        truth = {Path(r["path"]).stem: r["client_id"] for r in csv.DictReader(f, delimiter="\t",
                                                                              quoting=csv.QUOTE_NONE)}
    ds = load_prepared(prepared_run.output_dir, "train")
    texts = [str(t) for t in ds["text"]]
    runs = []
    for name, hyps in (("exact", texts), ("first-word-dropped", [t.split(" ", 1)[-1] for t in texts])):
        metrics, rows = score(ds, hyps, Normalizer())
        assert rows and {r["id"]: r["speaker"] for r in rows} == {r["id"]: truth[r["id"]] for r in rows}
        write_results(tmp_path / name, "train", metrics, rows, {**OURS_HEADER, "system": name})
        runs.append(tmp_path / name)
    speakers = len({truth[i] for i in ds["id"]})
    assert speakers > 1
    report = run_compare(runs, tmp_path / "cmp", f"compare.min_speakers={speakers}", "compare.split=train")
    assert report["paired_resampling"]["unit"] == "speaker" and report["paired_resampling"]["blocks"] == speakers
    assert report["runs"][0]["wer_interval"] == [0.0, 0.0] and report["pairs"][0]["wer"]["difference"] < 0
