"""Fine-tune W2v-BERT 2.0 with a CTC head in one explicit accelerate loop.

Usage:
    w2vbert-asr train recipe=demo                                   # offline demo (tiny model, CPU)
    w2vbert-asr train recipe=mn data.root=/data/cv-corpus-21.0/mn train=v100_16gb
    w2vbert-asr train recipe=mn data.root=/data/cv-corpus-21.0/mn resume=true
    accelerate launch --num_processes 2 -m w2vbert_asr.cli train recipe=mn data.root=...

Writes under output_dir: prepared data and processor (see data.py), checkpoints/step-*/ (written into
step-N.tmp and renamed only when complete), model/ (save_pretrained model + processor +
normalizer.json, safetensors), metrics.json, predictions/<split>.jsonl, tensorboard/, curves.png,
train.log.

A checkpoint holds: model.safetensors (weights), optimizer.bin (AdamW moments), random_states_<rank>.pkl
(each process's Python/numpy/torch RNG and accelerate's micro-batch counter), scaler.pt (fp16 only) and
trainer_state.json (step, data position, LR scheduler state, best WER, the running-loss window, history).
optimizer.bin, random_states_*.pkl and scaler.pt are torch.save files; resume loads them only with
torch.load(weights_only=True), which accepts tensors, numbers and plain containers and runs no code.
Any other pickle in a checkpoint (custom_checkpoint_*.pkl, where accelerate keeps registered objects)
makes resume refuse.

The stages, as in icefall's train.py: `compute_loss` (one micro-batch -> CTC loss), `train_step` (one
optimizer step over an accumulation window), `train_one_epoch`, and `train` / `run` around them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, extract_model_from_parallel, set_seed
from omegaconf import DictConfig, OmegaConf
from transformers import Wav2Vec2BertProcessor, get_scheduler

from . import UsageError
from .batching import DurationBatchSampler
from .data import PROCESSOR, load_prepared, prepare, waves_of
from .evaluate import decode_dataset, evaluate_model, greedy_decoder, score
from .features import BatchFeatureExtractor, pad_waves
from .model import build_model, load_weights, output_lengths
from .redact import config_yaml
from .storage import atomic_write_json, atomic_write_text, disk_full_guard, free_bytes, human_bytes
from .text import Normalizer

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
IGNORE_INDEX = -100  # label padding that CTC loss ignores
# From-scratch architectures need a far higher learning rate than fine-tuning (recipes/demo.yaml uses 2e-3).
FROM_SCRATCH_MIN_LR = 1e-4
# Test-only fault injection (tests/test_faults.py, tests/test_train.py); unset in normal use. Comma-separated:
#   kill@step:N, kill@checkpoint:N, kill@export   SIGKILL this process at that point (after optimizer step N,
#                                                  inside the write of checkpoint N, inside the export)
#   nonfinite@N:K:R                               the loss of micro-batch K (0-based) of step N on rank R is NaN
FAULT_ENV = "W2VBERT_ASR_TEST_FAULT"
# train.adamw_impl -> torch.optim.AdamW arguments
ADAMW_IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


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

    cfg: DictConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    featurizer: BatchFeatureExtractor
    sampler: DurationBatchSampler
    loader: torch.utils.data.DataLoader
    processor: Wav2Vec2BertProcessor
    normalizer: Normalizer
    eval_ds: object
    total_steps: int
    out: Path
    faults: dict = field(default_factory=dict)
    window_start: float = field(default_factory=time.perf_counter)  # perf_counter when the log window opened
    progress: object = None

    @property
    def ckpt_root(self) -> Path:
        return self.out / CHECKPOINTS


class Collator:
    """Examples -> padded waves (B, N), lengths (B,), labels (B, L) with IGNORE_INDEX padding.

    Features are computed later on the training device by `BatchFeatureExtractor` (batched, GPU)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, examples: list[dict]) -> dict:
        waves, lengths = pad_waves(waves_of(e["audio"] for e in examples))  # int16 PCM -> float32
        ids = self.tokenizer([str(e["text"]) for e in examples]).input_ids
        labels = torch.full((len(ids), max(map(len, ids))), IGNORE_INDEX, dtype=torch.long)
        for row, seq in zip(labels, ids):
            row[: len(seq)] = torch.tensor(seq)
        seconds = float(sum(float(e["duration"]) for e in examples))
        return {"waves": waves, "lengths": lengths, "labels": labels, "seconds": seconds}


# ------------------------------------------------------------------------------------------- the loss
def ctc_loss(logits: torch.Tensor, sample_lengths: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """logits (B, T, V), sample_lengths (B,) samples per clip, labels (B, L) padded with IGNORE_INDEX
    -> scalar CTC loss, as transformers' Wav2Vec2BertForCTC computes it (log-softmax in float32, blank =
    pad_token_id, `ctc_loss_reduction` ('mean' divides each clip's loss by its target length, then
    averages), `ctc_zero_infinity`), except for the input lengths: `model.output_lengths`, every frame
    the clip alone yields. transformers counts the attention mask, which is one frame short for a clip
    with an odd number of fbank frames, so training would never see the frame that evaluation decodes."""
    if labels.max() >= config.vocab_size:
        raise ValueError(f"label id {int(labels.max())} >= vocab_size {config.vocab_size}")
    input_lengths = output_lengths(sample_lengths, config).to(logits.device).clamp(max=logits.shape[1])
    valid = labels >= 0
    targets = labels.masked_select(valid)
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)  # (T, B, V)
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's CTC needs all lengths equal to T
        return F.ctc_loss(log_probs, targets, input_lengths, valid.sum(-1), blank=config.pad_token_id,
                          reduction=config.ctc_loss_reduction, zero_infinity=config.ctc_zero_infinity)


def compute_loss(model, batch: dict, featurizer, device) -> torch.Tensor:
    """One micro-batch (the Collator's dict: waves (B, N), lengths (B,), labels (B, L)) -> scalar CTC loss.

    featurizer: (waves (B, N), lengths (B,)) -> (features (B, T, 160), attention mask (B, T)) on `device`."""
    lengths = batch["lengths"].to(device)
    feats, mask = featurizer(batch["waves"].to(device), lengths)
    logits = model(input_features=feats, attention_mask=mask).logits
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
def train(cfg: DictConfig) -> dict:
    """Prepare data (cached), train, keep the best checkpoint, export model/ and score eval + test."""
    from accelerate.state import AcceleratorState

    # accelerate keeps the mixed precision in a process-wide singleton and refuses any other value for
    # later Accelerators. So clear it on the way in (a notebook or test that built its own
    # Accelerator(mixed_precision="no") must still train at auto's bf16) and on the way out (and build
    # one again after training). The process group (PartialState) stays.
    AcceleratorState._reset_state()
    handler_box: list[logging.Handler] = []
    try:
        return run(cfg, handler_box)
    finally:
        for handler in handler_box:
            logging.getLogger("w2vbert_asr").removeHandler(handler)
            handler.close()
        AcceleratorState._reset_state()


def run(cfg: DictConfig, handler_box: list) -> dict:
    if cfg.push.after_train and not cfg.push.repo_id:  # fail now, not after hours of training
        raise UsageError("push.after_train=true needs push.repo_id=<user/name>")
    s = setup(cfg, handler_box)
    state = resume(s) if cfg.resume else TrainerState()
    s.progress = _progress(s.total_steps, state.step, s.accelerator.is_main_process)
    s.model.train()
    window: list[dict] = []  # micro-batches of the open accumulation window (it may span epochs)
    while state.step < s.total_steps and not train_one_epoch(s, state, window):
        pass
    s.progress.close()
    s.accelerator.wait_for_everyone()
    if cfg.train.stop_at_step is not None and state.step < s.total_steps:
        if state.step % cfg.train.eval_steps:  # make sure the stop point is resumable
            save_checkpoint(s, state)
        print(f"stopped at step {state.step} of {s.total_steps}; continue with resume=true")
        s.accelerator.end_training()
        return {"steps": state.step, "stopped": True}
    return finish(s, state)


def setup(cfg: DictConfig, handler_box: list) -> Session:
    """Accelerator, logging, prepared data, model, optimizer, scheduler, sampler and loader."""
    tcfg = cfg.train
    out = Path(cfg.output_dir)
    # A distributed launch on a machine without CUDA (`accelerate launch --multi_gpu --num_processes 2`)
    # must ask for CPU explicitly, or every process would believe it is alone.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=_mixed_precision(tcfg.mixed_precision),
                              gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
                              log_with=tcfg.log_with, project_dir=str(out))
    main = accelerator.is_main_process
    # Dropout and SpecAugment draw from the global RNGs: each process its own stream (seed + rank), or
    # every replica would mask the same frames. The sampler and the loader have their own global seed.
    process_seed = cfg.seed + accelerator.process_index
    print(f"process {accelerator.process_index} of {accelerator.num_processes} processes on {accelerator.device}"
          f" (seed {process_seed}, mixed precision {accelerator.mixed_precision})")
    if not main:  # one voice on the terminal
        logging.getLogger("w2vbert_asr").setLevel(logging.WARNING)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        handler_box.append(_setup_logging(out / "train.log"))
        prepare(cfg)
        atomic_write_text(out / "config.yaml", config_yaml(cfg))  # secrets redacted
        _warn_learning_rate(cfg)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)  # the same initial weights on every process

    processor = Wav2Vec2BertProcessor.from_pretrained(out / PROCESSOR)
    normalizer = Normalizer.load(out / PROCESSOR)
    train_ds = load_prepared(out, "train")
    eval_ds = load_prepared(out, cfg.data.eval_split)
    model = build_model(cfg.model, processor.tokenizer)
    if tcfg.get("init_from"):
        load_weights(model, tcfg.init_from)
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
    # Stepped by us once per optimizer step, and saved in trainer_state.json: not registered with
    # accelerate, which would pickle it (custom_checkpoint_0.pkl) and unpickle it with weights_only=False.
    scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(process_seed)
    if main:
        accelerator.init_trackers("tensorboard", config=_flat_hparams(cfg))
    return Session(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                   featurizer=featurizer, sampler=sampler, loader=loader, processor=processor,
                   normalizer=normalizer, eval_ds=eval_ds, total_steps=total_steps, out=out,
                   faults=_faults(accelerator.process_index))


def resume(s: Session) -> TrainerState:
    """The newest complete checkpoint's state (model, optimizer, RNG, data position, scheduler, log
    window), or a fresh state when there is none."""
    latest = _latest_checkpoint(s.ckpt_root)
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
    for batch in s.loader:
        s.sampler.advance()
        window.append(batch)
        state.audio_seconds += batch["seconds"] * accelerator.num_processes
        if len(window) < tcfg.gradient_accumulation_steps:
            continue
        out = train_step(accelerator, s.model, s.optimizer, s.scheduler, window, s.featurizer, tcfg.max_grad_norm,
                         poison=s.faults.get(("nonfinite", state.step + 1), frozenset()))
        window.clear()
        _record(state, out)
        state.step += 1
        s.progress.update(1)
        if state.step % tcfg.logging_steps == 0 and state.window_micro_batches:
            log_window(s, state, out)
        if state.step % tcfg.eval_steps == 0 or state.step == s.total_steps:
            evaluate_and_checkpoint(s, state)
        _kill_point(s, "step", state.step)
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
    save_checkpoint(s, state)
    if accelerator.is_main_process:
        _plot_curves(state.history, s.out / "curves.png")


def finish(s: Session, state: TrainerState) -> dict:
    """Export model/ (the best checkpoint's weights when select_best), score eval + test, push."""
    cfg, accelerator, out = s.cfg, s.accelerator, s.out
    _check_replicas(accelerator, s.model)
    best = None
    if cfg.train.select_best and state.best_step > 0 and state.best_step != state.step:
        best = s.ckpt_root / f"step-{state.best_step:08d}"
    export(s, out / "model", best)
    accelerator.end_training()
    result = {}
    if accelerator.is_main_process:
        splits = {n: load_prepared(out, n) for n in dict.fromkeys([cfg.data.eval_split, cfg.data.test_split]) if n}
        result = evaluate_model(out / "model", cfg, splits, out)
        result["nonfinite_losses"] = state.nonfinite_losses
        result["nonfinite_grads"] = state.nonfinite_grads
        result["dropped_windows"] = state.dropped_windows
        result["steps"] = state.step
        print(f"model: {out / 'model'}  (best eval WER {100 * state.best_wer:.2f}% at step {state.best_step})")
        if cfg.push.after_train:
            from .hub import push

            result["push"] = push(cfg)
    return result


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(s: Session, state: TrainerState) -> Path:
    """Write accelerate's state + trainer_state.json into step-N.tmp, then rename: a kill mid-save leaves
    only a .tmp dir, which resume ignores, never a checkpoint that looks complete but is not.

    A full disk (checked before the write against the size of the last checkpoint, and caught during
    it) removes the .tmp and raises one UsageError naming the free space, the folder and the last good
    checkpoint to resume from."""
    accelerator, root = s.accelerator, s.ckpt_root
    state.sampler = s.sampler.state_dict()
    state.scheduler = s.scheduler.state_dict()
    state.window_elapsed = time.perf_counter() - s.window_start
    final = root / f"step-{state.step:08d}"
    tmp = root / f"step-{state.step:08d}.tmp"
    last = _latest_checkpoint(root)
    advice = (f"then continue from {last} with resume=true" if last is not None
              else "then run again (no checkpoint was written yet)")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if last is not None and last != final:
            need, free = _tree_bytes(last), free_bytes(root)
            if free < need:
                raise UsageError(f"not enough disk space for a checkpoint in {root}: {human_bytes(free)} free, the "
                                 f"last one ({last.name}) took {human_bytes(need)}. Free some space, {advice}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    with disk_full_guard(root, cleanup=[tmp] if accelerator.is_main_process else [], advice=advice):
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        _kill_point(s, "checkpoint", state.step)
        if accelerator.is_main_process:
            atomic_write_json(tmp / STATE_FILE, asdict(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, s.cfg.train.save_total_limit, state.best_step)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    """accelerate.load_state(path), refusing anything that could run code (see `check_checkpoint_files`)."""
    check_checkpoint_files(path, accelerator.num_processes, accelerator.process_index)
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path}: a file holds more than tensors and plain data, and torch.load(weights_only=True)"
                         f" refused it ({str(e).splitlines()[0]}); delete that checkpoint folder") from e


# torch.distributed.checkpoint (FSDP's sharded state) reads its .metadata with plain pickle.load; these are
# the globals a real one names (its dataclasses, dtypes, torch.Size, a layout lookup, a path).
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Loads a DCP .metadata file only if it names nothing but the globals above."""

    def find_class(self, module, name):
        allowed = (module in _DCP_MODULES or (module, name) in _DCP_GLOBALS
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if allowed:
            found = super().find_class(module, name)
            if module not in _DCP_MODULES or isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def check_checkpoint_files(path: Path, num_processes: int, process_index: int) -> None:
    """Refuse (UsageError) a checkpoint that could run code on resume:
    - a pickle this toolkit does not write (custom_checkpoint_*.pkl: accelerate unpickles registered
      objects with weights_only=False);
    - this process's random_states_<rank>.pkl if torch.load(weights_only=True) rejects it (accelerate
      would swallow that failure and resume with fresh RNG streams, inexactly);
    - a torch.distributed.checkpoint .metadata file (FSDP, read with plain pickle) naming other globals.
    optimizer.bin and scaler.pt are loaded by accelerate with weights_only=True (see load_checkpoint)."""
    from accelerate.utils.other import load as weights_only_load

    ours = {f"random_states_{i}.pkl" for i in range(num_processes)}
    foreign = sorted(p.name for p in path.rglob("*.pkl") if p.name not in ours)
    if foreign:
        raise UsageError(f"{path} holds {', '.join(foreign)}: this toolkit never writes such pickles and will not "
                         "load one (it could run code); delete that checkpoint folder to resume from an older one")
    rng = path / f"random_states_{process_index}.pkl"
    for meta in [p for p in path.rglob("*") if p.name.endswith(".metadata") and p.is_file()]:
        try:
            with open(meta, "rb") as f:
                _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
            raise UsageError(f"{meta} is not plain checkpoint metadata ({e}); refusing to load it: delete that "
                             "checkpoint folder") from e
    try:
        if rng.exists():
            weights_only_load(rng)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path}: {rng.name} holds more than tensors and plain data, and "
                         f"torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}); delete that "
                         "checkpoint folder") from e


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = _complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def _complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """step-* folders with a trainer_state.json (renamed into place complete), oldest first."""
    return sorted(p for p in ckpt_root.glob("step-*") if not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())


def _prune(ckpt_root: Path, keep: int, best_step: int) -> None:
    """Keep the newest `keep` complete checkpoints (at least the newest one) plus the best, which may be
    older: keep=1 can leave two folders. Stale .tmp folders (a killed save) are removed."""
    done = _complete_checkpoints(ckpt_root)
    kept = set(done[-max(keep, 1):]) | {ckpt_root / f"step-{best_step:08d}"}
    for p in done:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob("step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- export
def export(s: Session, model_dir: Path, best: Path | None) -> None:
    """save_pretrained model (safetensors) + processor + normalizer.json into model_dir, atomically.

    Every process takes part: the best checkpoint is loaded back on all of them, and
    `accelerator.get_state_dict` gathers full weights under FSDP / DeepSpeed ZeRO-3 (where the main
    process alone holds only its shard); the main process writes."""
    accelerator = s.accelerator
    if best is not None and best.is_dir():
        load_checkpoint(accelerator, best)
    state_dict = accelerator.get_state_dict(s.model)
    if accelerator.is_main_process:
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        last = _latest_checkpoint(s.ckpt_root)
        advice = f"then run again with resume=true (it exports from {last})" if last else "then run again"
        with disk_full_guard(model_dir.parent, cleanup=[tmp], advice=advice):
            shutil.rmtree(tmp, ignore_errors=True)
            accelerator.unwrap_model(s.model).save_pretrained(tmp, state_dict=state_dict)
            s.processor.save_pretrained(tmp)
            s.normalizer.save(tmp)
            _kill_point(s, "export", None)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
    accelerator.wait_for_everyone()


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


# --------------------------------------------------------------------------------------------- helpers
def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        if torch.cuda.is_available():
            # Emulated bf16 (e.g. V100) is slow: only native support counts.
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        # CPU: bf16 autocast where the cores multiply bf16 natively (AVX-512 BF16 or AMX): over three
        # training seeds of the demo it trained 1.59x as fast as the reference script's Trainer (fp32
        # ours: ~1.1x) at the same dev CER (2.40 % vs fp32's 2.35 % and the reference's 2.45 %); see
        # benchmarks/README.md. Elsewhere bf16 is emulated and slower than fp32, so fp32.
        return "bf16" if cpu_native_bf16() else "no"
    if setting == "bf16" and not torch.cuda.is_available() and not cpu_native_bf16():
        log.warning("mixed_precision=bf16 on a CPU without AVX-512 BF16/AMX: bf16 is emulated there, slower than fp32")
    return setting


def cpu_native_bf16() -> bool:
    """Does this CPU have bf16 dot-product instructions (AVX-512 BF16 or AMX tiles)?"""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def _optimizer(model, tcfg) -> torch.optim.Optimizer:
    # No weight decay on biases and norms: decaying them only hurts (standard transformer practice).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = str(tcfg.get("adamw_impl", "fused"))
    if impl not in ADAMW_IMPLS:
        raise UsageError(f"train.adamw_impl={impl!r}: use one of {', '.join(ADAMW_IMPLS)}")
    # fused: one kernel over all parameters (CUDA and CPU); foreach: one op per step for all tensors;
    # for_loop: one op per tensor (torch's CPU default). Same update up to rounding.
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                             **ADAMW_IMPLS[impl])


def _warn_learning_rate(cfg: DictConfig) -> None:
    if cfg.model.get("architecture") and not cfg.model.get("name_or_path") \
            and cfg.train.learning_rate < FROM_SCRATCH_MIN_LR:
        log.warning("model.architecture is trained from scratch at learning_rate=%g, a fine-tuning rate: it will "
                    "learn next to nothing. From scratch needs >= %g (recipes/demo.yaml uses 2e-3)",
                    cfg.train.learning_rate, FROM_SCRATCH_MIN_LR)


def _faults(rank: int) -> dict:
    """Parse FAULT_ENV (test-only) -> {("kill", point): step or None, ("nonfinite", step): {micro-batch}}."""
    faults: dict = {}
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, where = item.partition("@")
        if kind == "kill":
            point, _, step = where.partition(":")
            faults[("kill", point)] = int(step) if step else None
        elif kind == "nonfinite":
            step, micro, on_rank = (int(x) for x in where.split(":"))
            if on_rank == rank:
                faults.setdefault(("nonfinite", step), set()).add(micro)
        else:
            raise ValueError(f"{FAULT_ENV}: unknown fault {item!r}")
    return {k: frozenset(v) if isinstance(v, set) else v for k, v in faults.items()}


def _kill_point(s: Session, point: str, step: int | None) -> None:
    key = ("kill", point)
    if key in s.faults and s.faults[key] in (None, step):
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


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
