"""Fine-tune W2v-BERT 2.0 with a CTC head in one explicit accelerate loop.

Usage:
    w2vbert-asr train recipe=demo                                   # offline demo (tiny model, CPU)
    w2vbert-asr train recipe=mn data.root=/data/cv-corpus-21.0/mn train=v100_16gb
    w2vbert-asr train recipe=mn data.root=/data/cv-corpus-21.0/mn resume=true
    accelerate launch --num_processes 2 -m w2vbert_asr.cli train recipe=mn data.root=...

    from w2vbert_asr.train import train
    result = train(compose(["recipe=demo"]))       # -> metrics of the saved model on dev and test

Writes under output_dir: prepared data and processor (prepare.py), checkpoints/step-*/ and model/
(checkpoint.py), metrics.json, predictions/<split>.jsonl, tensorboard/, curves.png, train.log (tracking.py).

The stages, as in icefall's train.py: `compute_loss` (one micro-batch -> CTC loss), `train_step` (one
optimizer step over an accumulation window), `train_one_epoch`, and `train` / `run` around them. Only the
main process writes; every process runs every stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, extract_model_from_parallel, set_seed
from transformers import get_scheduler

from . import UsageError
from .average import final_weights, kept_checkpoints, record_choice
from .batching import DurationBatchSampler
from .checkpoint import CHECKPOINTS, MODEL, STATE_FILE, latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .devices import own_accelerator_state, resolve_mixed_precision
from .evaluate import decode_dataset, evaluate_model, greedy_decoder, score
from .loss import Collator, ctc_loss
from .model import build_model, load_weights, require_pretrained
from .optim import make_optimizer
from .perturb import durations, set_epoch, train_inputs
from .prepare import PROCESSOR, prepare
from .prepared import load_prepared
from .redact import config_yaml
from .storage import atomic_write_text, remove_paths
from .text import Normalizer
from .tracking import flat_hparams, open_train_log, plot_curves, progress
from .vocabulary import training_processor, write_processor
from .waveform import featurizer_for

log = logging.getLogger(__name__)
# From-scratch architectures need a far higher learning rate than fine-tuning (recipes/demo.yaml uses 2e-3).
FROM_SCRATCH_MIN_LR = 1e-4
# The folder the TensorBoard tracker writes into (output_dir/tensorboard); other trackers get the run's name.
TENSORBOARD_DIR = "tensorboard"


class TrainHooks:
    """Points where a test injects faults into a run (tests/faults.py); these defaults do nothing."""

    def after_step(self, step: int) -> None:
        """After optimizer step `step` and its evaluation/checkpoint."""

    def during_checkpoint(self, step: int) -> None:
        """Inside the write of checkpoint `step`, after accelerate's state, before the rename."""

    def during_model_save(self) -> None:
        """Inside the write of model/, before the rename."""

    def poisoned(self, step: int, rank: int) -> frozenset[int]:
        """Micro-batches of step `step` on process `rank` whose loss is made NaN."""
        return frozenset()


@dataclass
class TrainerState:
    """Everything beyond accelerate's state that a resumed run needs to continue exactly, and to log
    exactly what the uninterrupted run logs."""

    step: int = 0                     # optimizer steps done (accumulation windows, dropped ones included)
    epoch: int = 0
    sampler: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)  # LR scheduler state_dict(): plain numbers, no pickle
    best_wer: float = math.inf
    best_cer: float = math.inf        # breaks WER ties (early on WER sits at 100 % while CER falls)
    best_step: int = -1
    nonfinite_losses: int = 0         # micro-batches whose loss was NaN/inf
    nonfinite_grads: int = 0          # optimizer steps skipped because the gradient norm was NaN/inf
    dropped_windows: int = 0          # accumulation windows dropped (on every rank) for a non-finite loss
    audio_seconds: float = 0.0
    # The running-loss window since the last logged step (what the next train/* log line shows).
    window_loss_sum: float = 0.0
    window_micro_batches: int = 0
    window_audio_seconds: float = 0.0  # audio_seconds when the window opened
    window_elapsed: float = 0.0       # wall seconds of training in the window when the checkpoint was written
    history: list = field(default_factory=list)


@dataclass
class StepOutput:
    """What one optimizer step (an accumulation window) did."""

    loss_sum: float = 0.0             # sum of the finite micro-batch losses
    finite: int = 0                   # micro-batches with a finite loss
    nonfinite: int = 0                # micro-batches with a NaN/inf loss (on any rank)
    dropped: bool = False             # the window was dropped: no optimizer step, gradients zeroed
    nonfinite_grad: bool = False      # the gradient norm was NaN/inf (step skipped)
    stepped: bool = False             # the optimizer updated the weights
    grad_norm: float | None = None


@dataclass
class Session:
    """The objects a training run is made of (icefall's `params` + model/optimizer/...)."""

    cfg: object
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    featurizer: torch.nn.Module
    sampler: DurationBatchSampler
    loader: torch.utils.data.DataLoader
    processor: object
    normalizer: Normalizer
    eval_ds: object
    total_steps: int
    out: Path
    hooks: TrainHooks
    window_start: float = field(default_factory=time.perf_counter)  # perf_counter when the log window opened
    progress: object = None

    @property
    def ckpt_root(self) -> Path:
        return self.out / CHECKPOINTS


def compute_loss(model, batch: dict, featurizer, device) -> torch.Tensor:
    """One micro-batch (the Collator's dict: waves (B, N), lengths (B,), labels (B, L)) -> scalar CTC loss.

    featurizer: waveform.featurizer_for's, whose model_inputs(waves (B, N), lengths (B,)) are the model's
    inputs on `device` (W2v-BERT's fbank features and mask, omniASR's normalised samples and mask). A batch with
    "keys" (the Collator's, when the fbank's log-mel cache is on) passes them on."""
    lengths = batch["lengths"].to(device)
    keys = {"keys": batch["keys"]} if "keys" in batch else {}
    logits = model(**featurizer.model_inputs(batch["waves"].to(device), lengths, **keys)).logits
    return ctc_loss(logits, lengths, batch["labels"].to(device), extract_model_from_parallel(model).config)


# ------------------------------------------------------------------------------------------- one step
def train_step(accelerator: Accelerator, model, optimizer, scheduler, micro_batches: list[dict], featurizer,
               max_grad_norm: float, poison: frozenset[int] = frozenset()) -> StepOutput:
    """One optimizer step over `micro_batches` (one accumulation window, len = gradient_accumulation_steps).

    A micro-batch whose loss is non-finite on any rank (all ranks agree through a gather) drops the whole
    window on every rank: its backward would be the one that all-reduces when it is the last, and the
    earlier ones ran under no_sync, so stepping anyway would step each rank on its own gradients.
    `poison`: micro-batch indices whose loss is made NaN (fault injection for tests).
    """
    out = StepOutput()
    device = accelerator.device
    for k, batch in enumerate(micro_batches):
        with accelerator.accumulate(model):  # no_sync except on the window's last micro-batch
            loss = compute_loss(model, batch, featurizer, device)
            if k in poison:
                loss = loss * float("nan")
            finite = accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min().item() == 1.0
            if not finite:
                out.nonfinite += 1
                out.dropped = True
                continue
            out.finite += 1
            out.loss_sum += loss.detach().float().item()
            if not out.dropped:
                accelerator.backward(loss)
    if not accelerator.sync_gradients:
        raise RuntimeError(f"{len(micro_batches)} micro-batches do not end an accumulation window of "
                           f"{accelerator.gradient_accumulation_steps}")
    if not out.dropped:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        out.grad_norm = None if norm is None else float(norm)
        # fp16's scaler skips such steps itself; bf16/fp32 have no scaler, so skip here.
        if norm is not None and not math.isfinite(out.grad_norm) and accelerator.scaler is None:
            out.nonfinite_grad = True
        else:
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
                out.stepped = True
    optimizer.zero_grad(set_to_none=True)
    return out


# --------------------------------------------------------------------------------------------- stages
def train(cfg, hooks: TrainHooks | None = None) -> dict:
    """Prepare data (cached), train, keep the best checkpoint, save model/ and score eval + test."""
    if cfg.push.after_train and not cfg.push.repo_id:  # fail now, not after hours of training
        raise UsageError("push.after_train=true needs push.repo_id=<user/name>")
    require_pretrained(cfg.model, "train")  # cached or reachable, before any data is prepared
    with own_accelerator_state():
        accelerator = make_accelerator(cfg)
        out = Path(cfg.output_dir)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        else:  # one voice on the terminal
            logging.getLogger("w2vbert_asr").setLevel(logging.WARNING)
        with open_train_log(out / "train.log" if accelerator.is_main_process else None):
            return run(cfg, accelerator, hooks or TrainHooks())


def make_accelerator(cfg) -> Accelerator:
    tcfg = cfg.train
    # A distributed launch on a machine without CUDA (`accelerate launch --multi_gpu --num_processes 2`)
    # must ask for CPU explicitly, or every process would believe it is alone.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    tracker = None if tcfg.log_with == "none" else tcfg.log_with
    return Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(tcfg.mixed_precision),
                       gradient_accumulation_steps=tcfg.gradient_accumulation_steps, log_with=tracker,
                       project_dir=str(cfg.output_dir))


def run(cfg, accelerator: Accelerator, hooks: TrainHooks) -> dict:
    s = setup(cfg, accelerator, hooks)
    state = resume(s) if cfg.resume else TrainerState()
    s.progress = progress(s.total_steps, state.step, s.accelerator.is_main_process)
    s.model.train()
    window: list[dict] = []  # micro-batches of the open accumulation window (it may span epochs)
    while state.step < s.total_steps and not train_one_epoch(s, state, window):
        pass
    s.progress.close()
    s.accelerator.wait_for_everyone()
    if cfg.train.stop_at_step is not None and state.step < s.total_steps:
        if state.step % cfg.train.eval_steps:  # make sure the stop point is resumable
            checkpoint(s, state)
        print(f"stopped at step {state.step} of {s.total_steps}; continue with resume=true")
        s.accelerator.end_training()
        return {"steps": state.step, "stopped": True}
    return finish(s, state)


def setup(cfg, accelerator: Accelerator, hooks: TrainHooks) -> Session:
    """Prepared data, model, optimizer, scheduler, sampler, loader and tracker."""
    tcfg, out = cfg.train, Path(cfg.output_dir)
    # Dropout and SpecAugment draw from the global RNGs: each process its own stream (seed + rank), or
    # every replica would mask the same frames. The sampler and the loader have their own global seed.
    process_seed = cfg.seed + accelerator.process_index
    print(f"process {accelerator.process_index} of {accelerator.num_processes} processes on {accelerator.device}"
          f" (seed {process_seed}, mixed precision {accelerator.mixed_precision})")
    if accelerator.is_main_process:
        prepare(cfg)
        write_processor(cfg)
        atomic_write_text(out / "config.yaml", config_yaml(cfg))  # secrets redacted
        _warn_learning_rate(cfg)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)  # the same initial weights on every process

    processor = training_processor(cfg)
    model = build_model(cfg.model, processor.tokenizer)
    if tcfg.init_from:
        load_weights(model, tcfg.init_from)
    featurizer = featurizer_for(processor.feature_extractor).to(accelerator.device)
    train_ds, cache = train_inputs(load_prepared(out, "train"), cfg, model.config, featurizer,
                                   accelerator.num_processes)  # perturbed on the fly, or cached (perturb.py)
    sampler = DurationBatchSampler(durations(train_ds), tcfg.max_batch_seconds, tcfg.max_batch_size,
                                   seed=cfg.seed, num_replicas=accelerator.num_processes,
                                   rank=accelerator.process_index)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler,
                                         collate_fn=Collator(processor.tokenizer, keys=bool(cache)),
                                         num_workers=tcfg.num_workers,
                                         # Own generator: creating an iterator must not draw from the global
                                         # RNG, or a resumed run's dropout/SpecAugment streams would shift.
                                         generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = max(1, len(sampler) // tcfg.gradient_accumulation_steps)
    total_steps = tcfg.num_epochs * steps_per_epoch if tcfg.num_epochs else tcfg.max_steps
    optimizer = make_optimizer(model, tcfg)
    # Stepped by us once per optimizer step, and saved in trainer_state.json: not registered with
    # accelerate, which would pickle it (custom_checkpoint_0.pkl) and unpickle it with weights_only=False.
    scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(process_seed)
    if accelerator.is_main_process and accelerator.log_with:
        name = TENSORBOARD_DIR if tcfg.log_with == "tensorboard" else f"w2vbert-asr-{out.resolve().name}"
        if tcfg.log_with == "tensorboard" and not cfg.resume:  # a fresh run: a killed run's curve would show too
            remove_paths([out / TENSORBOARD_DIR])
        accelerator.init_trackers(name, config=flat_hparams(cfg))
    return Session(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                   featurizer=featurizer, sampler=sampler, loader=loader, processor=processor,
                   normalizer=Normalizer.load(out / PROCESSOR), eval_ds=load_prepared(out, cfg.data.eval_split),
                   total_steps=total_steps, out=out, hooks=hooks)


def resume(s: Session) -> TrainerState:
    """The newest complete checkpoint's state (model, optimizer, RNG, data position, scheduler, log
    window), or a fresh state when there is none."""
    latest = latest_checkpoint(s.ckpt_root)
    if latest is None:
        log.warning("resume=true but no complete checkpoint in %s: starting from scratch", s.ckpt_root)
        return TrainerState()
    state = TrainerState(**json.loads((latest / STATE_FILE).read_text()))
    if not state.scheduler:
        raise UsageError(f"{latest / STATE_FILE} has no LR scheduler state (written by an older version, which "
                         "kept it in a pickle); it cannot be resumed exactly: start again without resume=true")
    load_checkpoint(s.accelerator, latest)
    s.scheduler.load_state_dict(state.scheduler)
    s.sampler.load_state_dict(state.sampler)
    s.window_start = time.perf_counter() - state.window_elapsed
    print(f"resumed from {latest} at step {state.step}")
    return state


def train_one_epoch(s: Session, state: TrainerState, window: list[dict]) -> bool:
    """Train on the rest of the current epoch: steps, logging, evaluation + checkpoints.
    -> True when training stops (all steps done, or stop_at_step reached)."""
    tcfg, accelerator = s.cfg.train, s.accelerator
    s.sampler.set_epoch(state.epoch)
    set_epoch(s.loader.dataset, state.epoch)  # a perturbed train split draws its noise per epoch
    for batch in s.loader:
        s.sampler.advance()
        window.append(batch)
        state.audio_seconds += batch["seconds"] * accelerator.num_processes
        if len(window) < tcfg.gradient_accumulation_steps:
            continue
        out = train_step(accelerator, s.model, s.optimizer, s.scheduler, window, s.featurizer, tcfg.max_grad_norm,
                         poison=s.hooks.poisoned(state.step + 1, accelerator.process_index))
        window.clear()
        _record(state, out)
        state.step += 1
        s.progress.update(1)
        if state.step % tcfg.logging_steps == 0 and state.window_micro_batches:
            log_window(s, state, out)
        if state.step % tcfg.eval_steps == 0 or state.step == s.total_steps:
            evaluate_and_checkpoint(s, state)
        s.hooks.after_step(state.step)
        if state.step >= s.total_steps or state.step == tcfg.stop_at_step:
            return True
    state.epoch += 1
    return False


def _record(state: TrainerState, out: StepOutput) -> None:
    state.window_loss_sum += out.loss_sum
    state.window_micro_batches += out.finite
    if out.nonfinite:
        state.nonfinite_losses += out.nonfinite
        state.dropped_windows += 1
        log.warning("step %d: non-finite loss in %d micro-batch(es): window dropped on every process "
                    "(%d non-finite losses, %d windows dropped so far)", state.step + 1, out.nonfinite,
                    state.nonfinite_losses, state.dropped_windows)
    if out.nonfinite_grad:
        state.nonfinite_grads += 1


def log_window(s: Session, state: TrainerState, out: StepOutput) -> None:
    """Log the running-loss window (train/*) and open a new one."""
    now = time.perf_counter()
    logs = {"train/loss": state.window_loss_sum / state.window_micro_batches,
            "train/lr": s.scheduler.get_last_lr()[0],
            "train/epoch": state.epoch + s.sampler.state_dict()["batches_done"] / max(1, len(s.sampler)),
            "train/audio_seconds_per_second": (state.audio_seconds - state.window_audio_seconds)
            / max(now - s.window_start, 1e-9),
            "train/nonfinite_losses": state.nonfinite_losses}
    if out.grad_norm is not None:
        logs["train/grad_norm"] = out.grad_norm
    s.accelerator.log(logs, step=state.step)
    state.history.append({"step": state.step, **logs})
    s.progress.set_postfix(loss=f"{logs['train/loss']:.3f}")
    log.info("step %d %s", state.step, json.dumps({k: round(v, 5) for k, v in logs.items()}))
    state.window_loss_sum, state.window_micro_batches = 0.0, 0
    state.window_audio_seconds, s.window_start = state.audio_seconds, now


def evaluate_and_checkpoint(s: Session, state: TrainerState) -> None:
    cfg, accelerator = s.cfg, s.accelerator
    decode = greedy_decoder(s.processor.tokenizer)
    hyps, _ = decode_dataset(s.model, s.eval_ds, s.featurizer, decode, accelerator.device,
                             cfg.eval.max_batch_seconds, cfg.eval.max_batch_size, accelerator)
    metrics, rows = score(s.eval_ds, hyps, s.normalizer)
    accelerator.log({"eval/wer": metrics["wer"], "eval/cer": metrics["cer"]}, step=state.step)
    state.history.append({"step": state.step, "eval/wer": metrics["wer"], "eval/cer": metrics["cer"]})
    log.info("step %d %s", state.step, json.dumps({"eval/wer": metrics["wer"], "eval/cer": metrics["cer"]}))
    print(f"\nstep {state.step}: eval WER {100 * metrics['wer']:.2f}%  CER {100 * metrics['cer']:.2f}%  "
          f"e.g. ref={rows[0]['reference']!r} hyp={rows[0]['hypothesis']!r}")
    # Strictly better only: on a tie the earlier checkpoint stays the best.
    if (metrics["wer"], metrics["cer"]) < (state.best_wer, state.best_cer):
        state.best_wer, state.best_cer, state.best_step = metrics["wer"], metrics["cer"], state.step
    checkpoint(s, state)
    if accelerator.is_main_process:
        plot_curves(state.history, s.out / "curves.png")


def checkpoint(s: Session, state: TrainerState) -> Path:
    """checkpoints/step-<N>/ with everything `resume` needs."""
    state.sampler = s.sampler.state_dict()
    state.scheduler = s.scheduler.state_dict()
    state.window_elapsed = time.perf_counter() - s.window_start
    return save_checkpoint(s.accelerator, s.ckpt_root, state.step, asdict(state), *kept_checkpoints(s.cfg.train, state),
                           during_write=lambda: s.hooks.during_checkpoint(state.step))


def finish(s: Session, state: TrainerState) -> dict:
    """Save model/ (the best checkpoint's weights when select_best), score eval + test, push."""
    cfg, accelerator, out = s.cfg, s.accelerator, s.out
    _check_replicas(accelerator, s.model)
    best, weights = final_weights(s, state)  # the best (or last) checkpoint, or an average of several (average.py)
    save_model(accelerator, s.model, s.processor, s.normalizer, out / MODEL, best, s.hooks.during_model_save)
    accelerator.end_training()
    result = {}
    if accelerator.is_main_process:
        splits = {n: load_prepared(out, n) for n in dict.fromkeys([cfg.data.eval_split, cfg.data.test_split]) if n}
        result = evaluate_model(out / MODEL, cfg, splits, out)
        result.update(nonfinite_losses=state.nonfinite_losses, nonfinite_grads=state.nonfinite_grads, steps=state.step,
                      dropped_windows=state.dropped_windows, model_weights=record_choice(out / "metrics.json", weights))
        print(f"model: {out / MODEL}  (best eval WER {100 * state.best_wer:.2f}% at step {state.best_step})")
        if cfg.push.after_train:
            from .push import push

            result["push"] = push(cfg)
    return result


def _check_replicas(accelerator: Accelerator, model) -> None:
    """Under data parallelism every process must end with the same weights: compare a digest of them."""
    if accelerator.num_processes == 1 or accelerator.distributed_type in (DistributedType.FSDP,
                                                                          DistributedType.DEEPSPEED):
        return  # single process, or sharded weights (each process holds a different part)
    digest = hashlib.sha256()
    for name, t in sorted(extract_model_from_parallel(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    mine = torch.tensor([int.from_bytes(digest.digest()[:7], "big")], device=accelerator.device)
    every = [f"{int(x):014x}" for x in accelerator.gather(mine).tolist()]
    if not accelerator.is_main_process:
        return
    if len(set(every)) == 1:
        print(f"weights identical on all {len(every)} processes (digest {every[0]})")
    else:
        log.error("weights differ between processes (digests %s): the replicas drifted apart", every)
        print(f"warning: weights differ between processes: digests {every}")


def _warn_learning_rate(cfg) -> None:
    if cfg.model.architecture and not cfg.model.name_or_path and cfg.train.learning_rate < FROM_SCRATCH_MIN_LR:
        log.warning("model.architecture is trained from scratch at learning_rate=%g, a fine-tuning rate: it will "
                    "learn next to nothing. From scratch needs >= %g (recipes/demo.yaml uses 2e-3)",
                    cfg.train.learning_rate, FROM_SCRATCH_MIN_LR)
