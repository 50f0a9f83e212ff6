"""The accelerate training loop on the tiny architecture: it learns, resumes exactly, skips bad losses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from w2vbert_asr.cli import compose
from w2vbert_asr.prepared import PREPARED
from w2vbert_asr.audio import to_float
from w2vbert_asr.train import train



def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _history(out: Path, key: str) -> list[float]:
    rows = [json.loads(line[line.index("{"):]) for line in (out / "train.log").read_text().splitlines()
            if f'"{key}"' in line]
    return [r[key] for r in rows]


def test_trains_after_an_accelerator_of_another_precision(tmp_path, run_overrides, prepared_run, sw_corpus):
    # accelerate's process-wide state refuses a second precision: an Accelerator built earlier in the
    # process (a notebook, another tool) must not stop train() from using its own, and vice versa.
    from accelerate import Accelerator

    Accelerator(cpu=True, mixed_precision="no")
    _clone_prepared(prepared_run, tmp_path)
    result = train(compose(run_overrides(tmp_path, sw_corpus, "train.max_steps=2", "train.eval_steps=2",
                                         "train.warmup_steps=1", "train.mixed_precision=bf16")))
    assert result["steps"] == 2 and (tmp_path / "model" / "model.safetensors").is_file()
    assert Accelerator(cpu=True, mixed_precision="no").mixed_precision == "no"


def _clone_prepared(src_cfg, dst: Path) -> None:
    """Reuse the prepared data of the `prepared_run` fixture (decoding MP3 again would only cost time)."""
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


@pytest.mark.slow
def test_tiny_model_overfits_a_few_clips(tmp_path, run_overrides, sw_corpus):
    from w2vbert_asr.prepare import prepare

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
    # Logged every 2 steps and stopped at step 3: the window logged at step 4 straddles the stop.
    common = ["train.max_steps=8", "train.eval_steps=100", "train.warmup_steps=2", "train.select_best=false",
              "train.max_batch_seconds=30", "train.logging_steps=2"]
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
    # Each logged step once (nothing redone), and the running-loss window resumed with the run:
    # the losses logged, the one straddling the stop included, are the uninterrupted run's.
    assert [log.count(f' step {i} {{"train/loss"') for i in range(2, 9, 2)] == [1] * 4
    assert _history(interrupted, "train/loss") == _history(straight, "train/loss")
    a, b = _weights(straight / "model"), _weights(interrupted / "model")
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched
    state = json.loads((interrupted / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 8  # the LR scheduler's state travels in trainer_state.json
    assert not list((interrupted / "checkpoints").rglob("custom_checkpoint_*"))


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
    # Prepared audio is int16, which has no NaN: the poisoned file stores float audio (to_float passes it on).
    features = datasets.Features({**ds.features, "audio": datasets.List(datasets.Value("float32"))})
    poisoned = ds.map(lambda ex, i: {"audio": [float("nan")] * len(ex["audio"]) if i in bad else to_float(ex["audio"])},
                      with_indices=True, features=features)
    poisoned.to_pandas()  # materialise before overwriting the file it maps
    tmp = tmp_path / "poisoned.arrow"
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=features, path=str(tmp)) as w:
        for row in poisoned:
            w.write(row)
        w.finalize()
    os.replace(tmp, train_file)
    result = train(compose(run_overrides(tmp_path, sw_corpus, f"train.max_steps={steps}", "train.eval_steps=100",
                                         "train.max_batch_size=1", "train.max_batch_seconds=30", "seed=42",
                                         "push.commit_message=hf_neverwrittenneverwrittenneverwritten")))
    assert result["nonfinite_losses"] == expected
    assert "neverwritten" not in (tmp_path / "config.yaml").read_text()  # token-shaped values are redacted
    weights = _weights(tmp_path / "model")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path, run_overrides, prepared_run, sw_corpus):
    _clone_prepared(prepared_run, tmp_path)
    # --multi_gpu selects accelerate's torchrun launcher; without GPUs it runs 2 CPU processes over gloo
    # (--cpu alone would start a single process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           # Step 2's syncing micro-batch (the second of its window) has a NaN loss on rank 1 only: every rank
           # must drop that window, or each would step on its own un-reduced gradients and the replicas drift.
           str(Path(__file__).with_name("faults.py")), "nonfinite@2:1:1",
           *run_overrides(tmp_path, sw_corpus, "train.max_steps=4", "train.eval_steps=2", "train.max_batch_seconds=30",
                          "train.gradient_accumulation_steps=2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) >= 1
    last = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    state = json.loads(last.joinpath("trainer_state.json").read_text())
    assert state["step"] == 4
    assert (state["nonfinite_losses"], state["dropped_windows"]) == (1, 1)
    # Both ranks saved their RNG state (so a resumed 2-process run continues each stream), each its own.
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(last))
    assert "of 2 processes" in proc.stdout
    assert "(seed 42," in proc.stdout and "(seed 43," in proc.stdout  # own dropout/SpecAugment stream per rank
    # Every rank ends with the same weights (a digest of each rank's weights, gathered at the end).
    assert "weights identical on all 2 processes" in proc.stdout, proc.stdout[-3000:]


# ------------------------------------------------------------------------------ the step, without data
def _tiny(tmp_path, *overrides):
    from w2vbert_asr.features import BatchFeatureExtractor
    from w2vbert_asr.model import build_model
    from w2vbert_asr.text import Vocabulary, build_processor

    processor = build_processor(Vocabulary.build(["habari ya leo watoto"]), tmp_path / "proc")
    torch.manual_seed(0)
    model = build_model(compose(["model=tiny", *overrides]).model, processor.tokenizer)
    return model, BatchFeatureExtractor.from_hf(processor.feature_extractor)


def _batch(sample_lengths: list[int], vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(sample_lengths), max(sample_lengths))
    for row, n in zip(waves, sample_lengths):
        row[:n] = 0.1 * torch.randn(n, generator=g)
    labels = torch.full((len(sample_lengths), 6), -100)
    for i, n_labels in enumerate([6, 4, 5, 3][: len(sample_lengths)]):
        labels[i, :n_labels] = torch.randint(2, vocab, (n_labels,), generator=g)
    return {"waves": waves, "lengths": torch.tensor(sample_lengths), "labels": labels, "seconds": 1.0}


# fbank frames = (samples - 400) // 160 + 1: 100 and 60 frames are even, 81 is odd.
EVEN_100, EVEN_60, ODD_81 = 400 + 160 * 99, 400 + 160 * 59, 400 + 160 * 80 + 50


def test_compute_loss_counts_every_frame_of_a_clip(tmp_path):
    from w2vbert_asr.geometry import FrameGeometry
    from w2vbert_asr.train import compute_loss
    from w2vbert_asr.loss import ctc_loss

    model, featurizer = _tiny(tmp_path)
    model.eval()  # no dropout or SpecAugment: the two losses see the same logits
    vocab = model.config.vocab_size
    even = _batch([EVEN_100, EVEN_60], vocab)
    feats, mask = featurizer(even["waves"], even["lengths"])
    theirs = model(input_features=feats, attention_mask=mask, labels=even["labels"]).loss
    assert torch.equal(compute_loss(model, even, featurizer, "cpu"), theirs)  # no odd clip: transformers' loss

    odd = _batch([EVEN_100, ODD_81], vocab)
    feats, mask = featurizer(odd["waves"], odd["lengths"])
    out = model(input_features=feats, attention_mask=mask, labels=odd["labels"])
    frames = FrameGeometry.of(model.config).output_frames(odd["lengths"])
    masked = model._get_feat_extract_output_lengths(mask.sum(-1))
    assert frames.tolist() == [masked[0].item(), masked[1].item() + 1]  # the odd clip has one frame more
    logits = out.logits.detach().requires_grad_()
    ours = ctc_loss(logits, odd["lengths"], odd["labels"], model.config)
    assert not torch.allclose(ours, out.loss)
    ours.backward()
    last = int(frames[1]) - 1
    assert logits.grad[1, last].abs().sum() > 0  # the loss reads the clip's last frame ...
    assert logits.grad[1, last + 1:].abs().sum() == 0  # ... and nothing after it


def _accelerator(accum: int):
    from accelerate import Accelerator

    return Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=accum)


def _sgd_step(tmp_path, batches: list[dict], accum: int, poison=frozenset()):
    from w2vbert_asr.train import train_step

    model, featurizer = _tiny(tmp_path, "model.config_overrides.mask_time_prob=0.0")
    model.eval()  # no dropout: the same gradients whichever way the clips are batched
    accelerator = _accelerator(accum)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_step(accelerator, model, optimizer, scheduler, batches, featurizer, max_grad_norm=1e9, poison=poison)
    accelerator.free_memory()
    return before, model.state_dict(), out


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    vocab = 8
    both = _batch([EVEN_100, EVEN_60], vocab)
    one = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in both.items()}
    two = {k: (v[1:] if torch.is_tensor(v) else v) for k, v in both.items()}
    two["waves"] = two["waves"][:, :EVEN_60]
    _, big, out_big = _sgd_step(tmp_path, [both], accum=1)
    _, accumulated, out_acc = _sgd_step(tmp_path, [one, two], accum=2)
    assert out_big.stepped and out_acc.stepped and out_acc.finite == 2
    # 'mean' CTC: the mean of two 1-clip losses, accumulated as halves, is the 2-clip batch's mean loss.
    worst = max((big[k] - accumulated[k]).abs().max().item() for k in big)
    assert worst < 1e-5, worst
    before, after, _ = _sgd_step(tmp_path, [one, two], accum=2)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_loss_on_the_syncing_micro_batch_drops_the_window(tmp_path):
    vocab = 8
    batches = [_batch([EVEN_100], vocab, seed=1), _batch([EVEN_60], vocab, seed=2)]
    before, after, out = _sgd_step(tmp_path, batches, accum=2, poison=frozenset({1}))
    assert out.dropped and not out.stepped and (out.finite, out.nonfinite) == (1, 1)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed  # the first micro-batch's gradient was not applied either


# ------------------------------------------------------------------------------ checkpoints kept
def _fake_checkpoints(root: Path, steps: list[int]) -> None:
    for step in steps:
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "trainer_state.json").write_text(json.dumps({"step": step}))


def _kept(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_prune_keeps_the_newest_and_the_best_with_ties(tmp_path):
    from w2vbert_asr.checkpoint import latest_checkpoint, prune

    # WER and CER tie at 1.0 early on; a tie keeps the earlier checkpoint as the best (step 20).
    root, best = tmp_path / "checkpoints", 20
    for step in (20, 40, 60):
        _fake_checkpoints(root, [step])
        prune(root, keep=1, best_step=best)
        assert latest_checkpoint(root).name == f"step-{step:08d}"  # what stop_at_step / a kill resumes from
    assert _kept(root) == ["step-00000020", "step-00000060"]  # keep=1 leaves two folders: best + newest
    prune(root, keep=1, best_step=60)  # the best is the newest: one folder
    assert _kept(root) == ["step-00000060"]
    _fake_checkpoints(root, [80, 100, 120])
    (root / "step-00000140.tmp").mkdir()  # a save killed half-way: never trusted, removed on the next prune
    (root / "step-00000160").mkdir()  # no trainer_state.json: not complete, never resumed from
    prune(root, keep=2, best_step=60)
    assert _kept(root) == ["step-00000060", "step-00000100", "step-00000120", "step-00000160"]
    assert latest_checkpoint(root).name == "step-00000120"


def test_select_best_exports_an_older_best_checkpoint(tmp_path, monkeypatch, caplog, run_overrides, prepared_run,
                                                      sw_corpus):
    import w2vbert_asr.train as train_module

    _clone_prepared(prepared_run, tmp_path)
    real_score = train_module.score
    wers = iter([0.5, 0.9])  # step 2 is the best, step 4 (the last) is worse

    def score(dataset, hyps, normalizer):
        metrics, rows = real_score(dataset, hyps, normalizer)
        return {**metrics, "wer": next(wers), "cer": 0.5}, rows

    monkeypatch.setattr(train_module, "score", score)
    # From scratch at a fine-tuning learning rate: warned, naming the demo recipe's rate.
    result = train(compose(run_overrides(tmp_path, sw_corpus, "train.max_steps=4", "train.eval_steps=2",
                                         "train.warmup_steps=1", "train.max_batch_seconds=20",
                                         "train.gradient_accumulation_steps=2", "train.learning_rate=5e-5",
                                         "train.save_total_limit=1", "train.select_best=true")))
    assert any("recipes/demo.yaml" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert result["steps"] == 4
    root = tmp_path / "checkpoints"
    assert _kept(root) == ["step-00000002", "step-00000004"]  # keep=1: the best and the newest
    exported = _weights(tmp_path / "model")
    best, last = _weights(root / "step-00000002"), _weights(root / "step-00000004")
    assert all(torch.equal(exported[k], best[k]) for k in exported)
    assert any(not torch.equal(best[k], last[k]) for k in best)  # the reload really changed the weights
    state = json.loads((root / "step-00000004" / "trainer_state.json").read_text())
    assert state["best_step"] == 2 and state["scheduler"]["last_epoch"] == 4  # 4 optimizer steps of 2 micro-batches


# ------------------------------------------------------------------------------ data loading, epochs, precision
FEW_STEPS = ["train.eval_steps=100", "train.warmup_steps=1", "data.test_split=null"]  # evaluated once, on dev


def test_worker_processes_give_the_in_process_run_also_across_a_resume(tmp_path, run_overrides, prepared_run,
                                                                       sw_corpus):
    """train.num_workers=2 (the default; the other tests use 0): two DataLoader processes collate and prefetch
    ahead of the step. The run finishes with the in-process run's losses and weights, also when stopped
    mid-epoch and resumed (prefetched batches are not counted as trained) and across an epoch boundary (the
    demo's caps make 3 batches an epoch): the collator is deterministic and the sampler seeded."""
    steps = ["train.max_steps=5", *FEW_STEPS]
    in_process, workers = tmp_path / "in_process", tmp_path / "workers"
    for d in (in_process, workers):
        _clone_prepared(prepared_run, d)
    train(compose(run_overrides(in_process, sw_corpus, *steps)))
    two = [*steps, "train.num_workers=2"]
    assert train(compose(run_overrides(workers, sw_corpus, *two, "train.stop_at_step=2"))) == {"steps": 2, "stopped": True}
    assert train(compose(run_overrides(workers, sw_corpus, *two, "resume=true")))["steps"] == 5
    losses = _history(workers, "train/loss")
    assert len(losses) == 5 and losses == _history(in_process, "train/loss")
    a, b = _weights(in_process / "model"), _weights(workers / "model")
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched


def test_num_epochs_trains_whole_epochs(tmp_path, run_overrides, prepared_run, sw_corpus):
    """train.num_epochs replaces max_steps: epochs x (batches per epoch) optimizer steps, every clip once per
    epoch, the sampler moved on to the second epoch and ended on its last batch."""
    from w2vbert_asr.batching import DurationBatchSampler
    from w2vbert_asr.prepared import load_prepared

    _clone_prepared(prepared_run, tmp_path)
    cfg = compose(run_overrides(tmp_path, sw_corpus, "train.num_epochs=2", "train.max_steps=1", *FEW_STEPS))
    durations = [float(d) for d in load_prepared(tmp_path, "train")["duration"]]
    per_epoch = len(DurationBatchSampler(durations, cfg.train.max_batch_seconds, cfg.train.max_batch_size))
    result = train(cfg)
    assert result["steps"] == 2 * per_epoch and per_epoch > 1
    state = json.loads((tmp_path / "checkpoints" / f"step-{2 * per_epoch:08d}" / "trainer_state.json").read_text())
    assert state["sampler"] == {"epoch": 1, "batches_done": per_epoch}
    assert state["audio_seconds"] == pytest.approx(2 * sum(durations))  # each clip trained on twice
    # Logged after every step: the epoch counter climbs 1/per_epoch a step, through 1.0 into the second epoch.
    assert _history(tmp_path, "train/epoch") == pytest.approx([i / per_epoch for i in range(1, 2 * per_epoch + 1)],
                                                              abs=1e-5)


def test_fp16_loss_scale_is_checkpointed_and_restored(tmp_path, monkeypatch, capsys, run_overrides, prepared_run,
                                                      sw_corpus):
    """train.mixed_precision=fp16 trains under a GradScaler whose state (the loss scale: halved after an
    overflow, doubled after 2000 clean steps) is saved in the checkpoint (scaler.pt) and restored on resume.

    accelerate builds that scaler (and fp16 autocast) on CUDA only: on the CPU, fp16 trains as fp32 with no
    scaler at all. Where accelerate built none, the test hands the Accelerator the torch.amp.GradScaler it
    would build on CUDA, with the forward left in fp32 (CPU fp16 kernels are too slow for a test): scaling,
    unscaling before clipping, the overflow check and the checkpoint are then accelerate's own code paths."""
    from accelerate.utils import AutocastKwargs

    import w2vbert_asr.train as train_module

    real_accelerator = train_module.make_accelerator

    def with_scaler(cfg):
        accelerator = real_accelerator(cfg)
        if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
            accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler(accelerator.device.type), True
            accelerator.autocast_handler = AutocastKwargs(enabled=False)
        return accelerator

    monkeypatch.setattr(train_module, "make_accelerator", with_scaler)
    _clone_prepared(prepared_run, tmp_path)
    fp16 = ["train.mixed_precision=fp16", "train.max_steps=4", *FEW_STEPS]
    assert train(compose(run_overrides(tmp_path, sw_corpus, *fp16, "train.stop_at_step=2")))["stopped"]
    assert "mixed precision fp16" in capsys.readouterr().out
    step2 = tmp_path / "checkpoints" / "step-00000002"
    saved = torch.load(step2 / "scaler.pt", weights_only=True)
    fresh = torch.amp.GradScaler("cpu").state_dict()  # where a scaler starts: 2**16, no clean step counted
    assert saved["_growth_tracker"] > 0 or saved["scale"] < fresh["scale"]  # the 2 steps went through it
    # Plant a loss scale no fresh scaler could reach in 2 steps (it at most halves per step from 2**16).
    torch.save({**saved, "scale": 4.0}, step2 / "scaler.pt")
    result = train(compose(run_overrides(tmp_path, sw_corpus, *fp16, "resume=true")))
    assert result["steps"] == 4
    resumed = torch.load(tmp_path / "checkpoints" / "step-00000004" / "scaler.pt", weights_only=True)
    # Carried on from the checkpoint: its scale (no overflow at x4), its clean-step count plus steps 3 and 4.
    assert (resumed["scale"], resumed["_growth_tracker"]) == (4.0, saved["_growth_tracker"] + 2), resumed
    losses = _history(tmp_path, "train/loss")
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    before, after = _weights(step2), _weights(tmp_path / "model")
    assert all(torch.isfinite(w).all() for w in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the resumed steps updated the weights


def test_push_after_train_stages_the_exported_model_with_its_card(tmp_path, run_overrides, prepared_run, sw_corpus):
    """push.after_train=true with push.dry_run=true: when training ends, the exported model/ is staged for the
    Hub exactly (nothing from the checkpoints) with a model card whose model-index holds the run's scores."""
    import yaml

    _clone_prepared(prepared_run, tmp_path)
    result = train(compose(run_overrides(tmp_path, sw_corpus, "train.max_steps=2", *FEW_STEPS, "push.after_train=true",
                                         "push.dry_run=true", "push.repo_id=someone/w2v-bert-demo-sw")))
    pushed = result["push"]
    assert pushed["repo_id"] == "someone/w2v-bert-demo-sw" and pushed["uploaded"] is False
    staging, model = Path(pushed["staging_dir"]), tmp_path / "model"
    assert staging.resolve() == (tmp_path / "push").resolve()  # push.staging_dir's default, in the run folder
    model_files = sorted(p.name for p in model.iterdir())
    assert "model.safetensors" in model_files
    assert sorted(pushed["files"]) == sorted(p.name for p in staging.iterdir()) == sorted([*model_files, "README.md"])
    for name in model_files:
        assert (staging / name).read_bytes() == (model / name).read_bytes(), name
    _, front_matter, body = (staging / "README.md").read_text(encoding="utf-8").split("---\n", 2)
    card = yaml.safe_load(front_matter)
    scores = {(r["dataset"]["split"], m["type"]): m["value"] for r in card["model-index"][0]["results"]
              for m in r["metrics"]}
    metrics = json.loads((tmp_path / "metrics.json").read_text())["splits"]
    assert scores == {(split, k): round(100 * m[k], 2) for split, m in metrics.items() for k in ("wer", "cer")}
    assert "w2v-bert-demo-sw" in body


def test_push_after_train_without_a_repo_id_is_refused_before_training(tmp_path, run_overrides, sw_corpus):
    from w2vbert_asr import UsageError

    run = tmp_path / "run"
    with pytest.raises(UsageError, match=r"^push\.after_train=true needs push\.repo_id=<user/name>$"):
        train(compose(run_overrides(run, sw_corpus, "push.after_train=true")))
    assert not run.exists()  # refused at once: nothing prepared, trained or written
