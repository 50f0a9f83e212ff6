"""Fine-tune W2v-BERT 2.0 with a CTC head in one explicit accelerate loop.

Usage:
    w2vbert-asr train recipe=demo                                   # offline demo (tiny model, CPU)
    w2vbert-asr train recipe=mn data.root=/data/cv-corpus-21.0/mn train=v100_16gb
    w2vbert-asr train recipe=mn data.root=/data/cv-corpus-21.0/mn resume=true
    accelerate launch --num_processes 2 -m w2vbert_asr.cli train recipe=mn data.root=...

Writes under output_dir: prepared data and processor (see data.py), checkpoints/step-*/ (accelerate
state + trainer_state.json, each renamed into place only when complete), model/ (save_pretrained
model + processor + normalizer.json, safetensors), metrics.json, predictions/<split>.jsonl,
tensorboard/, curves.png, train.log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from transformers import Wav2Vec2BertProcessor, get_scheduler

from .batching import DurationBatchSampler
from .data import PROCESSOR, load_prepared, prepare
from .evaluate import decode_dataset, evaluate_model, greedy_decoder, score
from .features import BatchFeatureExtractor, pad_waves
from .model import build_model
from .text import Normalizer

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
IGNORE_INDEX = -100  # label padding that CTC loss ignores


@dataclass
class TrainerState:
    """Everything beyond accelerate's state that a resumed run needs to continue exactly."""

    step: int = 0                     # optimizer steps done
    epoch: int = 0
    sampler: dict = field(default_factory=dict)
    best_wer: float = math.inf
    best_cer: float = math.inf        # breaks WER ties (early on WER sits at 100 % while CER falls)
    best_step: int = -1
    nonfinite_losses: int = 0         # micro-batches skipped because the loss was NaN/inf
    nonfinite_grads: int = 0          # optimizer steps skipped because the gradient norm was NaN/inf
    audio_seconds: float = 0.0
    history: list = field(default_factory=list)


class Collator:
    """Examples -> padded waves (B, N), lengths (B,), labels (B, L) with IGNORE_INDEX padding.

    Features are computed later on the training device by `BatchFeatureExtractor` (batched, GPU)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, examples: list[dict]) -> dict:
        waves, lengths = pad_waves([e["audio"] for e in examples])
        ids = self.tokenizer([str(e["text"]) for e in examples]).input_ids
        labels = torch.full((len(ids), max(map(len, ids))), IGNORE_INDEX, dtype=torch.long)
        for row, seq in zip(labels, ids):
            row[: len(seq)] = torch.tensor(seq)
        seconds = float(sum(float(e["duration"]) for e in examples))
        return {"waves": waves, "lengths": lengths, "labels": labels, "seconds": seconds}


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        # Emulated bf16 (e.g. V100) is slow: only native support counts.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "no"


def _optimizer(model, tcfg) -> torch.optim.Optimizer:
    # No weight decay on biases and norms: decaying them only hurts (standard transformer practice).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.cuda.is_available()  # one kernel for all parameters: faster on GPU, unavailable on CPU builds
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                             fused=fused)


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / STATE_FILE).is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def train(cfg: DictConfig) -> dict:
    """Prepare data (cached), train, keep the best checkpoint, export model/ and score eval + test."""
    handler_box: list[logging.Handler] = []
    try:
        return _train(cfg, handler_box)
    finally:
        for handler in handler_box:
            logging.getLogger("w2vbert_asr").removeHandler(handler)
            handler.close()


def _train(cfg: DictConfig, handler_box: list) -> dict:
    tcfg = cfg.train
    out = Path(cfg.output_dir)
    if cfg.push.after_train and not cfg.push.repo_id:  # fail now, not after hours of training
        from . import UsageError

        raise UsageError("push.after_train=true needs push.repo_id=<user/name>")
    # A distributed launch on a machine without CUDA (`accelerate launch --multi_gpu --num_processes 2`)
    # must ask for CPU explicitly, or every process would believe it is alone.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=_mixed_precision(tcfg.mixed_precision),
                              gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
                              log_with=tcfg.log_with, project_dir=str(out))
    main = accelerator.is_main_process
    print(f"process {accelerator.process_index} of {accelerator.num_processes} processes on {accelerator.device}")
    if not main:  # one voice on the terminal
        logging.getLogger("w2vbert_asr").setLevel(logging.WARNING)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        handler_box.append(_setup_logging(out / "train.log"))
        prepare(cfg)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)

    processor = Wav2Vec2BertProcessor.from_pretrained(out / PROCESSOR)
    normalizer = Normalizer.load(out / PROCESSOR)
    train_ds = load_prepared(out, "train")
    eval_ds = load_prepared(out, cfg.data.eval_split)
    model = build_model(cfg.model, processor.tokenizer)
    featurizer = BatchFeatureExtractor.from_hf(processor.feature_extractor).to(accelerator.device)

    sampler = DurationBatchSampler(train_ds["duration"], tcfg.max_batch_seconds, tcfg.max_batch_size,
                                   seed=cfg.seed, num_replicas=accelerator.num_processes,
                                   rank=accelerator.process_index)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=Collator(processor.tokenizer),
                                         num_workers=tcfg.num_workers,
                                         # Own generator: creating an iterator must not draw from the global
                                         # RNG, or a resumed run's dropout/SpecAugment streams would shift.
                                         generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = max(1, len(sampler) // tcfg.gradient_accumulation_steps)
    total_steps = tcfg.num_epochs * steps_per_epoch if tcfg.num_epochs else tcfg.max_steps
    optimizer = _optimizer(model, tcfg)
    scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                              num_training_steps=total_steps)
    # The scheduler is stepped by us once per optimizer step; accelerate would step it per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    state = TrainerState()
    ckpt_root = out / CHECKPOINTS
    if cfg.resume:
        latest = _latest_checkpoint(ckpt_root)
        if latest is None:
            log.warning("resume=true but no complete checkpoint in %s: starting from scratch", ckpt_root)
        else:
            accelerator.load_state(str(latest))
            state = TrainerState(**json.loads((latest / STATE_FILE).read_text()))
            sampler.load_state_dict(state.sampler)
            print(f"resumed from {latest} at step {state.step}")
    if main:
        accelerator.init_trackers("tensorboard", config=_flat_hparams(cfg))

    decode = greedy_decoder(processor.tokenizer)
    progress = _progress(total_steps, state.step, main)
    model.train()
    window_ok = False     # did any micro-batch in this accumulation window contribute a gradient?
    running, running_n, t_last, seconds_last = 0.0, 0, time.perf_counter(), state.audio_seconds
    while state.step < total_steps:
        sampler.set_epoch(state.epoch)
        for batch in loader:
            sampler.advance()
            with accelerator.accumulate(model):
                feats, mask = featurizer(batch["waves"].to(accelerator.device), batch["lengths"].to(accelerator.device))
                loss = model(input_features=feats, attention_mask=mask, labels=batch["labels"].to(accelerator.device)).loss
                # Every process must agree to skip, or DDP would wait forever for the others' gradients.
                finite = accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min().item() == 1.0
                if finite:
                    accelerator.backward(loss)
                    window_ok = True
                    running += loss.detach().float().item()
                    running_n += 1
                else:
                    state.nonfinite_losses += 1
                    log.warning("step %d: non-finite loss skipped (%d so far)", state.step, state.nonfinite_losses)
                state.audio_seconds += batch["seconds"] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                grad_norm = None
                if window_ok:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
                    if grad_norm is not None and not torch.isfinite(grad_norm):
                        # fp16's scaler skips such steps itself; bf16/fp32 have no scaler, so skip here.
                        if accelerator.scaler is None:
                            state.nonfinite_grads += 1
                            window_ok = False
                    if window_ok:
                        optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:
                            scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                window_ok = False
            state.step += 1
            progress.update(1)
            if state.step % tcfg.logging_steps == 0 and running_n:
                now = time.perf_counter()
                logs = {"train/loss": running / running_n, "train/lr": scheduler.get_last_lr()[0],
                        "train/epoch": state.epoch + sampler.state_dict()["batches_done"] / max(1, len(sampler)),
                        "train/audio_seconds_per_second": (state.audio_seconds - seconds_last) / (now - t_last),
                        "train/nonfinite_losses": state.nonfinite_losses}
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                accelerator.log(logs, step=state.step)
                state.history.append({"step": state.step, **logs})
                progress.set_postfix(loss=f"{logs['train/loss']:.3f}")
                log.info("step %d %s", state.step, json.dumps({k: round(v, 5) for k, v in logs.items()}))
                running, running_n, t_last, seconds_last = 0.0, 0, now, state.audio_seconds
            if state.step % tcfg.eval_steps == 0 or state.step == total_steps:
                _evaluate_and_checkpoint(cfg, accelerator, model, eval_ds, featurizer, decode, normalizer, state,
                                         sampler, ckpt_root)
            if state.step >= total_steps or state.step == tcfg.stop_at_step:
                break
        else:
            state.epoch += 1
            continue
        break
    progress.close()
    accelerator.wait_for_everyone()
    if tcfg.stop_at_step is not None and state.step < total_steps:
        if state.step % tcfg.eval_steps:  # make sure the stop point is resumable
            state.sampler = sampler.state_dict()
            save_checkpoint(accelerator, state, ckpt_root, tcfg.save_total_limit)
        print(f"stopped at step {state.step} of {total_steps}; continue with resume=true")
        accelerator.end_training()
        return {"steps": state.step, "stopped": True}
    result = {}
    if main:
        best = out / CHECKPOINTS / f"step-{state.best_step:08d}" if tcfg.select_best and state.best_step > 0 else None
        _export(accelerator, model, processor, normalizer, out / "model", best)
        accelerator.end_training()
        splits = {s: load_prepared(out, s) for s in dict.fromkeys([cfg.data.eval_split, cfg.data.test_split]) if s}
        result = evaluate_model(out / "model", cfg, splits, out)
        result["nonfinite_losses"] = state.nonfinite_losses
        result["nonfinite_grads"] = state.nonfinite_grads
        result["steps"] = state.step
        print(f"model: {out / 'model'}  (best eval WER {100 * state.best_wer:.2f}% at step {state.best_step})")
        if cfg.push.after_train:
            from .hub import push

            result["push"] = push(cfg)
    return result


def _evaluate_and_checkpoint(cfg, accelerator, model, eval_ds, featurizer, decode, normalizer, state, sampler,
                             ckpt_root: Path) -> None:
    hyps, _ = decode_dataset(model, eval_ds, featurizer, decode, accelerator.device, cfg.eval.max_batch_seconds,
                             cfg.eval.max_batch_size, accelerator)
    metrics, rows = score(eval_ds, hyps, normalizer)
    accelerator.log({"eval/wer": metrics["wer"], "eval/cer": metrics["cer"]}, step=state.step)
    state.history.append({"step": state.step, "eval/wer": metrics["wer"], "eval/cer": metrics["cer"]})
    log.info("step %d %s", state.step, json.dumps({"eval/wer": metrics["wer"], "eval/cer": metrics["cer"]}))
    print(f"\nstep {state.step}: eval WER {100 * metrics['wer']:.2f}%  CER {100 * metrics['cer']:.2f}%  "
          f"e.g. ref={rows[0]['reference']!r} hyp={rows[0]['hypothesis']!r}")
    if (metrics["wer"], metrics["cer"]) < (state.best_wer, state.best_cer):
        state.best_wer, state.best_cer, state.best_step = metrics["wer"], metrics["cer"], state.step
    state.sampler = sampler.state_dict()
    save_checkpoint(accelerator, state, ckpt_root, cfg.train.save_total_limit)
    if accelerator.is_main_process:
        _plot_curves(state.history, Path(cfg.output_dir) / "curves.png")


def save_checkpoint(accelerator, state: TrainerState, ckpt_root: Path, keep: int) -> Path:
    """Write accelerate's state into step-N.tmp, then rename: a kill mid-save leaves only a .tmp dir,
    which resume ignores, never a checkpoint that looks complete but is not."""
    final = ckpt_root / f"step-{state.step:08d}"
    tmp = ckpt_root / f"step-{state.step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(ckpt_root, keep, state.best_step)
    accelerator.wait_for_everyone()
    return final


def _prune(ckpt_root: Path, keep: int, best_step: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if not p.name.endswith(".tmp"))
    best = f"step-{best_step:08d}"
    removable = [p for p in done if p.name != best]
    for p in removable[: max(0, len(done) - max(keep, 1))]:
        shutil.rmtree(p, ignore_errors=True)


def _export(accelerator, model, processor, normalizer, model_dir: Path, best: Path | None) -> None:
    """save_pretrained model (safetensors) + processor + normalizer.json into model_dir, atomically."""
    unwrapped = accelerator.unwrap_model(model)
    if best is not None and best.is_dir():
        from safetensors.torch import load_file

        weights = best / "model.safetensors"
        unwrapped.load_state_dict(load_file(str(weights)))
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrapped.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    normalizer.save(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(7, 4))
    loss = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
    wer = [(h["step"], h["eval/wer"]) for h in history if "eval/wer" in h]
    if loss:
        ax1.plot(*zip(*loss), color="tab:blue", label="train/loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train/loss", color="tab:blue")
    ax2 = ax1.twinx()
    if wer:
        ax2.plot(*zip(*wer), "o-", color="tab:red", label="eval/wer")
    ax2.set_ylabel("eval/wer", color="tab:red")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _flat_hparams(cfg: DictConfig) -> dict:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + "/", v)
            elif isinstance(v, (int, float, str, bool)):
                flat[key] = v
    walk("", OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items() if k.split("/")[0] in ("train", "model", "text", "seed")}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, mininterval=2)


def _setup_logging(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("w2vbert_asr").addHandler(handler)
    logging.getLogger("w2vbert_asr").setLevel(logging.INFO)
    return handler
