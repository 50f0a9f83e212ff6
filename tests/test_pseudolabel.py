"""Unlabelled pool (synth), pseudo-labelling, and training on train + pseudo-labels, offline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose
from w2vbert_asr.prepared import PREPARED, load_prepared
from w2vbert_asr.prepare import prepare
from w2vbert_asr.pseudolabel import POOL, PSEUDO, REPORT, label_pool, pool_rows
from w2vbert_asr.synth import SPLITS, synthesize_corpus

from conftest import SMALL_CORPUS_CLIPS

POOL_CLIPS = 6


def _tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def pool_corpus(tmp_path_factory, sw_corpus):
    """The shared test corpus again (same seed), now with an unlabelled pool in other.tsv."""
    root = tmp_path_factory.mktemp("pool_corpus")
    summary = synthesize_corpus(root, "sw", num_clips=SMALL_CORPUS_CLIPS, seed=0, num_unlabelled=POOL_CLIPS)
    assert summary["unlabelled"] == POOL_CLIPS
    return root


def test_pool_leaves_the_labelled_release_unchanged(pool_corpus, sw_corpus):
    for name in (*SPLITS, "validated"):
        assert (pool_corpus / f"{name}.tsv").read_bytes() == (sw_corpus / f"{name}.tsv").read_bytes(), name
    first = _tsv(sw_corpus / "train.tsv")[0]["path"]
    assert (pool_corpus / "clips" / first).read_bytes() == (sw_corpus / "clips" / first).read_bytes()
    other = _tsv(pool_corpus / "other.tsv")
    assert len(other) == POOL_CLIPS and all(r["sentence"].strip() for r in other)
    labelled = {r["path"] for s in SPLITS for r in _tsv(pool_corpus / f"{s}.tsv")}
    assert not labelled & {r["path"] for r in other}
    assert all((pool_corpus / "clips" / r["path"]).is_file() for r in other)
    train_speakers = {r["client_id"] for r in _tsv(pool_corpus / "train.tsv")}
    assert {r["client_id"] for r in other} <= train_speakers  # the same voices


@pytest.fixture(scope="module")
def random_model(tmp_path_factory, prepared_run):
    """A randomly initialised tiny model with the small corpus's processor: it emits garbage, but garbage
    made of the vocabulary's characters, which is all the pipeline's checks need."""
    from transformers import Wav2Vec2BertProcessor

    from w2vbert_asr.model import build_model
    from w2vbert_asr.text import Normalizer

    d = tmp_path_factory.mktemp("random_model") / "model"
    processor = Wav2Vec2BertProcessor.from_pretrained(Path(prepared_run.output_dir) / "processor")
    torch.manual_seed(0)
    model = build_model(prepared_run.model, processor.tokenizer)
    with torch.no_grad():  # a random head emits [UNK] now and then; make it never the argmax
        model.lm_head.bias[processor.tokenizer.unk_token_id] = -100.0
    model.save_pretrained(d, safe_serialization=True)
    processor.save_pretrained(d)
    Normalizer.load(Path(prepared_run.output_dir) / "processor").save(d)
    return d


def test_pseudolabel_then_train_on_train_plus_labels(tmp_path, pool_corpus, random_model, run_overrides):
    """The offline loop: pool -> pseudo.tsv (+ report) -> train with data.extra_train."""
    labelled_clip = _tsv(pool_corpus / "train.tsv")[0]["path"]
    extra_row = "\t".join(["speaker", labelled_clip, "", "ignored", *[""] * 9])  # already in train
    (pool_corpus / "other_plus.tsv").write_text((pool_corpus / "other.tsv").read_text() + extra_row + "\n")
    # max_prob: a random model's entropies sit near their maximum, so its top probability spreads more.
    cfg = compose(run_overrides(tmp_path / "label", pool_corpus, "pseudolabel.pool=other_plus",
                                "confidence.measure=max_prob"))
    report = label_pool(cfg, random_model, tmp_path / "label", threshold=0.0)
    assert report["rows"] == POOL_CLIPS + 1
    assert report["skipped"].get("in_labelled_split") == 1
    assert report["kept"] + sum(report["skipped"].values()) == report["rows"]
    assert report["kept"] >= 1
    kept = _tsv(tmp_path / "label" / PSEUDO)
    assert len(kept) == report["kept"] and set(kept[0]) == {"path", "text", "confidence", "source"}
    assert all(Path(r["path"]).is_file() and r["text"] and 0 <= float(r["confidence"]) <= 1 for r in kept)
    assert labelled_clip not in {Path(r["path"]).name for r in kept}
    records = [json.loads(line) for line in (tmp_path / "label" / POOL).read_text().splitlines()]
    assert len(records) == report["rows"]
    assert all("reference" in r for r in records)  # other.tsv's own sentences, kept for scoring only
    assert "kept_cer" in report and report["ladder"][0]["threshold"] == 0.0

    # A higher threshold keeps exactly the clips at or above it.
    confs = sorted(float(r["confidence"]) for r in kept)
    assert len(set(confs)) > 1, confs
    mid = (confs[0] + confs[-1]) / 2
    stricter = label_pool(cfg, random_model, tmp_path / "strict", threshold=mid)
    assert stricter["kept"] == sum(c >= mid for c in confs)
    assert stricter["skipped"]["low_confidence"] == sum(c < mid for c in confs)
    capped = label_pool(cfg, random_model, tmp_path / "capped", threshold=0.0, max_clips=1)
    assert capped["kept"] == 1 and capped["skipped"]["over_cap"] == report["kept"] - 1
    assert float(_tsv(tmp_path / "capped" / PSEUDO)[0]["confidence"]) == pytest.approx(confs[-1], abs=1e-4)

    # A pseudo-label with a character the labelled vocabulary lacks is skipped and counted.
    manifest = tmp_path / "label" / PSEUDO
    rows = manifest.read_text().splitlines()
    rows.append("\t".join([kept[0]["path"], "qqq xx", "0.99", "extra:1"]))
    manifest.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    train_cfg = compose(run_overrides(run, pool_corpus, f"data.extra_train=[{manifest}]", "train.max_steps=2",
                                      "train.eval_steps=100", "train.warmup_steps=1"))
    plain = prepare(compose(run_overrides(tmp_path / "plain", pool_corpus)))
    from w2vbert_asr.train import train

    train(train_cfg)
    prep = json.loads((run / "prepare_report.json").read_text())
    labelled_vocab = (tmp_path / "plain" / "processor" / "vocab.json").read_text()
    assert (run / "processor" / "vocab.json").read_text() == labelled_vocab  # pseudo-labels never extend it
    assert not set("qx") & set(prep["vocab"]["chars"])  # the Swahili word list has neither
    assert prep["extra_train"]["skipped"] == {"out_of_vocabulary": 1}
    assert prep["extra_train"]["kept"] == len(rows) - 2  # header and the row with q and x
    assert len(load_prepared(run, "train")) == plain["splits"]["train"]["kept"] + prep["extra_train"]["kept"]
    for split in ("dev", "test"):  # never receive pseudo-labels
        assert len(load_prepared(run, split)) == plain["splits"][split]["kept"]
    preds = [json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert all(0 <= p["confidence"] <= 1 and len(p["word_confidence"]) == len(p["hypothesis"].split()) for p in preds)

    # New labels under the same manifest name re-prepare (the fingerprint hashes the manifest).
    manifest.write_text("\n".join(rows[:2]) + "\n")
    assert prepare(train_cfg)["extra_train"]["rows"] == 1


def test_pool_never_labels_a_dev_or_test_clip(tmp_path, pool_corpus, random_model, run_overrides):
    """The pool's exclusion compares real paths and audio, not the paths as written: a symlink to a dev clip
    in a folder pool, byte-identical copies of test clips (in a folder, in a TSV pool), and absolute or `../`
    paths to held-out clips are never labelled."""
    import os

    clips = pool_corpus / "clips"
    dev, test, other = (_tsv(pool_corpus / f"{s}.tsv") for s in ("dev", "test", "other"))
    folder = tmp_path / "pool"
    folder.mkdir()
    (folder / "link_dev.mp3").symlink_to(clips / dev[0]["path"])
    (folder / "testcopy_0.mp3").write_bytes((clips / test[0]["path"]).read_bytes())
    (folder / "fresh.mp3").write_bytes((clips / other[0]["path"]).read_bytes())
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    (manifest / "testcopy_1.mp3").write_bytes((clips / test[1]["path"]).read_bytes())
    paths = ["testcopy_1.mp3", str(clips / test[2]["path"]), os.path.relpath(clips / dev[1]["path"], manifest),
             str(clips / other[1]["path"])]
    (manifest / "pool.tsv").write_text("path\n" + "".join(f"{p}\n" for p in paths))
    for pool, held_out, fresh in ((folder, 2, "fresh.mp3"), (manifest / "pool.tsv", 3, other[1]["path"])):
        cfg = compose(run_overrides(tmp_path / "run", pool_corpus, f"pseudolabel.pool={pool}",
                                    "confidence.measure=max_prob"))
        out = tmp_path / Path(pool).stem
        report = label_pool(cfg, random_model, out, threshold=0.0)
        assert report["rows"] == held_out + 1
        assert report["skipped"].get("in_labelled_split") == held_out, report["skipped"]
        assert {Path(r["path"]).name for r in _tsv(out / PSEUDO)} <= {fresh}
        details = " ".join(e["detail"] for e in report["examples"]["in_labelled_split"])
        assert "dev" in details and "test" in details


def test_pool_sources_and_errors(tmp_path, pool_corpus, run_overrides):
    cfg = compose(run_overrides(tmp_path, pool_corpus))
    assert len(list(pool_rows(cfg))) == POOL_CLIPS  # default: other.tsv of data.root
    folder = tmp_path / "audio"
    folder.mkdir()
    other = _tsv(pool_corpus / "other.tsv")
    for r in other[:2]:
        (folder / r["path"]).write_bytes((pool_corpus / "clips" / r["path"]).read_bytes())
    rows = list(pool_rows(compose(run_overrides(tmp_path, pool_corpus, f"pseudolabel.pool={folder}"))))
    assert len(rows) == 2 and all(Path(r.path).is_file() for r in rows)
    jsonl = tmp_path / "pool.jsonl"
    jsonl.write_text("".join(json.dumps({"audio": str(pool_corpus / "clips" / r["path"])}) + "\n" for r in other))
    rows = list(pool_rows(compose(run_overrides(tmp_path, pool_corpus, f"pseudolabel.pool={jsonl}",
                                                "pseudolabel.audio_column=audio"))))
    assert len(rows) == POOL_CLIPS
    with pytest.raises(UsageError, match="not a TSV"):
        list(pool_rows(compose(run_overrides(tmp_path, pool_corpus, "pseudolabel.pool=nothing_here"))))
    with pytest.raises(UsageError, match="no audio column"):
        list(pool_rows(compose(run_overrides(tmp_path, pool_corpus, f"pseudolabel.pool={jsonl}"))))


def test_cli_pseudolabel_needs_a_model(tmp_path, capsys):
    from w2vbert_asr.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pseudolabel", f"model={tmp_path}", f"data.root={tmp_path}"])
    assert e.value.code == 2 and "not a model folder" in capsys.readouterr().err


@pytest.mark.parametrize("threshold", ["1.1", "-0.5"])
def test_cli_threshold_outside_0_1_is_one_error_line(tmp_path, capsys, threshold):
    """At 1.1 the whole pool would be transcribed to keep nothing: refused before anything runs."""
    from w2vbert_asr.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pseudolabel", f"model={tmp_path}", f"data.root={tmp_path}", f"pseudolabel.threshold={threshold}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: pseudolabel.threshold={threshold}: give a number within [0, 1]"), err


def test_self_training_rounds_continue_from_the_last_model(tmp_path, pool_corpus, random_model, run_overrides):
    """The driver: round 0 (here: an existing model) -> an n-gram of the labelled text -> label the pool with
    it -> train round 1 from round 0's weights on train + labels; self_training.json lists both rounds."""
    import shutil

    from w2vbert_asr.pseudolabel import SUMMARY, self_train

    base = tmp_path / "round0"
    shutil.copytree(random_model, base / "model")
    prepare(compose(run_overrides(base, pool_corpus)))
    from w2vbert_asr.evaluate import evaluate

    evaluate(compose(run_overrides(base, pool_corpus, f"model_dir={base / 'model'}", "eval.split=test",
                                   f"eval.results_dir={base}")))
    cfg = compose(run_overrides(tmp_path, pool_corpus, "self_training.thresholds=[0.0]", "self_training.restart=false",
                                "self_training.max_ratio=0.05", "self_training.lm=true", "train.max_steps=1",
                                "train.eval_steps=100",
                                "train.warmup_steps=1"))
    killed = tmp_path / "round1" / "tensorboard"  # what a round killed mid-training left: its curve
    killed.mkdir(parents=True)
    (killed / "events.out.tfevents.1.killed.1.0").write_bytes(b"")
    summary = self_train(cfg)
    events = sorted(p.name for p in killed.glob("events.out.tfevents.*"))
    assert len(events) == 1 and "killed" not in events[0], events  # one curve for the round: the rerun's
    labelled = json.loads((base / "prepare_report.json").read_text())["splits"]["train"]["kept"]
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["rounds"][1]["pseudo_labels"] == int(0.05 * labelled)  # the cap
    assert "initialised from" in (tmp_path / "round1" / "train.log").read_text()
    assert summary["lm"] == str(base / "lm") and (base / "lm" / "lm_info.json").is_file()
    labels = json.loads((tmp_path / "round1" / "pseudo" / REPORT).read_text())
    assert labels["decoding"] == "beam+lm"
    assert (tmp_path / "round1" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / SUMMARY).read_text())["rounds"][1]["test"]["utterances"] == 6
    prep = json.loads((tmp_path / "round1" / "prepare_report.json").read_text())
    assert prep["extra_train"]["kept"] == summary["rounds"][1]["pseudo_labels"]
    # The rounds are compared on the test split with intervals and a paired verdict, in one command.
    comparison = json.loads((tmp_path / "compare" / "comparison.json").read_text())
    assert summary["comparison"] == str(tmp_path / "compare")
    assert [Path(r["dir"]).name for r in comparison["runs"]] == ["round0", "round1"]
    assert all(r["cer_interval"] for r in comparison["runs"]) and len(comparison["pairs"]) == 1


def test_init_from_a_model_of_another_vocabulary_is_a_usage_error(tmp_path, random_model, prepared_run):
    from w2vbert_asr.model import build_model, load_weights
    from w2vbert_asr.text import Vocabulary, build_processor

    other = build_processor(Vocabulary.build(["xy"]), tmp_path / "p").tokenizer
    model = build_model(prepared_run.model, other)
    with pytest.raises(UsageError, match="does not fit"):
        load_weights(model, random_model)
    with pytest.raises(UsageError, match="no model.safetensors"):
        load_weights(model, tmp_path)
