"""The accelerate training loop on the tiny architecture: it learns, resumes exactly, skips bad losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file

from w2vbert_asr.cli import compose
from w2vbert_asr.data import PREPARED
from w2vbert_asr.train import train



def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _history(out: Path, key: str) -> list[float]:
    rows = [json.loads(line[line.index("{"):]) for line in (out / "train.log").read_text().splitlines()
            if f'"{key}"' in line]
    return [r[key] for r in rows]


def _clone_prepared(src_cfg, dst: Path) -> None:
    """Reuse the session's prepared data (decoding MP3 again would only cost time)."""
    import shutil

    shutil.copytree(Path(src_cfg.output_dir) / PREPARED, dst / PREPARED)
    shutil.copytree(Path(src_cfg.output_dir) / "processor", dst / "processor")
    shutil.copy(Path(src_cfg.output_dir) / "prepare_report.json", dst / "prepare_report.json")


def _save_init_model(cfg, path: Path) -> Path:
    """A saved random tiny model: training from it exercises the from_pretrained path of the real model."""
    from transformers import Wav2Vec2BertProcessor

    from w2vbert_asr.model import build_model

    torch.manual_seed(0)
    processor = Wav2Vec2BertProcessor.from_pretrained(Path(cfg.output_dir) / "processor")
    build_model(cfg.model, processor.tokenizer).save_pretrained(path)
    return path


def test_tiny_model_overfits_a_few_clips(tmp_path, run_overrides, sw_corpus):
    from w2vbert_asr.data import prepare

    few = ["data.limit=8", "data.eval_split=train", "data.test_split=null"]  # a handful of clips, scored on themselves
    prepare(compose(run_overrides(tmp_path, sw_corpus, *few)))
    init_model = _save_init_model(compose(run_overrides(tmp_path, sw_corpus)), tmp_path / "init")
    cfg = compose(run_overrides(tmp_path, sw_corpus, *few, f"model.name_or_path={init_model}", "model.architecture=null",
                                "train.max_steps=120", "train.eval_steps=60", "train.warmup_steps=20",
                                "train.learning_rate=3e-3", "train.max_batch_seconds=40", "train.select_best=false"))
    result = train(cfg)
    losses = _history(tmp_path, "train/loss")
    assert losses[-1] < 0.5 * losses[0], losses
    cers = _history(tmp_path, "eval/cer")
    assert cers[-1] < cers[0] or cers[-1] < 0.5, cers
    assert result["train"]["cer"] < 0.5
    before, after = _weights(init_model), _weights(tmp_path / "model")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    # Outputs: safetensors model + processor + normaliser, TensorBoard events, curves, metrics, predictions.
    assert (tmp_path / "model" / "normalizer.json").is_file()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents*"))
    assert (tmp_path / "curves.png").stat().st_size > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["splits"]["train"]) >= {"wer", "cer", "utterances", "audio_hours", "rtf"}
    preds = [json.loads(l) for l in (tmp_path / "predictions" / "train.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["splits"]["train"]["utterances"] and {"id", "reference", "hypothesis"} <= set(preds[0])


def test_resume_continues_exactly(tmp_path, capsys, run_overrides, prepared_run, sw_corpus):
    common = ["train.max_steps=8", "train.eval_steps=100", "train.warmup_steps=2", "train.select_best=false",
              "train.max_batch_seconds=30"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for d in (straight, interrupted):
        _clone_prepared(prepared_run, d)
    train(compose(run_overrides(straight, sw_corpus, *common)))
    stopped = train(compose(run_overrides(interrupted, sw_corpus, *common, "train.stop_at_step=3")))
    assert stopped == {"steps": 3, "stopped": True}
    assert not (interrupted / "model").exists()
    # A half-written checkpoint (killed mid-save) must be ignored by resume.
    (interrupted / "checkpoints" / "step-00000099.tmp").mkdir()
    train(compose(run_overrides(interrupted, sw_corpus, *common, "resume=true")))
    assert "resumed from" in capsys.readouterr().out
    log = (interrupted / "train.log").read_text()
    # Steps 1-3 ran once (before the stop), steps 4-8 once (after resume): nothing was redone.
    assert [log.count(f' step {i} {{"train/loss"') for i in range(1, 9)] == [1] * 8
    a, b = _weights(straight / "model"), _weights(interrupted / "model")
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched


def test_nonfinite_loss_batch_is_skipped(tmp_path, run_overrides, prepared_run, sw_corpus):
    _clone_prepared(prepared_run, tmp_path)
    train_file = tmp_path / PREPARED / "train.arrow"
    ds = datasets.Dataset.from_file(str(train_file))
    from w2vbert_asr.batching import DurationBatchSampler

    # Corrupt every other clip (NaN audio -> NaN loss), and count how many the first steps will meet.
    steps, bad = 6, set(range(0, len(ds), 2))
    first = DurationBatchSampler(ds["duration"], 30, 1, seed=42).rank_batches(0)[:steps]
    expected = sum(b[0] in bad for b in first)
    assert 0 < expected < steps
    poisoned = ds.map(lambda ex, i: {"audio": [float("nan")] * len(ex["audio"]) if i in bad else ex["audio"]},
                      with_indices=True, features=ds.features)
    poisoned.to_pandas()  # materialise before overwriting the file it maps
    tmp = tmp_path / "poisoned.arrow"
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=ds.features, path=str(tmp)) as w:
        for row in poisoned:
            w.write(row)
        w.finalize()
    os.replace(tmp, train_file)
    result = train(compose(run_overrides(tmp_path, sw_corpus, f"train.max_steps={steps}", "train.eval_steps=100",
                                         "train.max_batch_size=1", "train.max_batch_seconds=30", "seed=42")))
    assert result["nonfinite_losses"] == expected
    weights = _weights(tmp_path / "model")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_two_process_accelerate_launch(tmp_path, run_overrides, prepared_run, sw_corpus):
    _clone_prepared(prepared_run, tmp_path)
    # --multi_gpu selects accelerate's torchrun launcher; without GPUs it runs 2 CPU processes over gloo
    # (--cpu alone would start a single process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "w2vbert_asr.cli", "train",
           *run_overrides(tmp_path, sw_corpus, "train.max_steps=4", "train.eval_steps=2", "train.max_batch_seconds=30")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) >= 1
    state = json.loads(sorted((tmp_path / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json").read_text())
    assert state["step"] == 4
    # Both ranks saved their RNG state (so a resumed 2-process run continues each stream).
    last = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(last))
    assert "of 2 processes" in proc.stdout
