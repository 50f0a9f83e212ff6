"""Training-step throughput, peak GPU memory and MFU of the 600M W2v-BERT 2.0 CTC model.

Usage:
    python benchmarks/train_step.py                       # GPU: 600M, fp16, 16 GiB cap; no GPU: --small on CPU
    python benchmarks/train_step.py --attn both           # eager vs SDPA side by side, same batches and init
    python benchmarks/train_step.py --dtype bf16 --memory-cap-gib 0   # bf16 on the whole GPU
    python benchmarks/train_step.py --device cpu --small --attn both --threads 1

What one step is: ``gradient_accumulation_steps`` micro-batches, each = random 16 kHz noise moved to the
device, features computed there by ``BatchFeatureExtractor`` (timed), forward + CTC loss under autocast,
backward (gradient checkpointing recomputes each Conformer layer), then GradScaler unscale, gradient
clipping and a fused AdamW step: ``w2vbert_asr.train.train_step`` itself, the training loop's step,
under an ``Accelerator`` set up as the loop sets it up (mixed precision, accumulation).

Model: ``Wav2Vec2BertForCTC`` built by ``w2vbert_asr.model.build_model`` with random weights in the
w2v-bert-2.0 shape and the overrides of conf/model/w2v_bert_2.yaml (adapter, mean CTC loss, SpecAugment,
gradient checkpointing); 40-token character vocabulary. ``--small`` uses conf/model/tiny.yaml's shape.

Batches: durations log-normal (median 4.5 s, clipped to 1-10 s, as Common Voice) batched by
``DurationBatchSampler`` at conf/train/v100_16gb.yaml's caps (max_batch_seconds, max_batch_size,
gradient_accumulation_steps); labels are random characters, 12 per second of audio. The first warmup
micro-batch is the one holding the longest clip: attention memory grows with batch x frames^2, so that
batch is the worst case the sampler can produce and the reported peak covers it.

Measured: audio seconds trained per wall second (real, unpadded audio), peak GPU memory
(``max_memory_allocated`` / ``max_memory_reserved``; target <= 15 GiB under a 16 GiB cap standing in for a
V100 16 GB), and MFU = model FLOPs / time / the GPU's dense fp16/bf16 peak. Model FLOPs are analytic:
6 x params x frames for everything that is a weight multiply (forward 2, backward 4; biases and norms
are counted as if weights, < 0.1 % of the parameters), plus the attention terms the parameter count
misses: per Conformer layer and utterance 2 x T^2 x d each for Q K^T, attention x V and the relative_key
position scores (query x distance embedding), times 3 for forward + backward; the adapter layers run at
their subsampled frame rate. HFU adds the forward that gradient checkpointing recomputes.
tests/test_benchmarks_smoke.py checks the forward and the recomputed part against torch's FlopCounterMode
(not the backward: FlopCounterMode counts a grouped convolution's weight gradient as if ungrouped, so
the depthwise convolution's backward comes out ``groups`` = hidden_size times too high).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install; also makes benchmarks.* importable

from benchmarks.batching import MAX_SECONDS, MIN_SECONDS, corpus_durations  # noqa: E402
from w2vbert_asr.batching import DurationBatchSampler  # noqa: E402
from w2vbert_asr.cli import compose  # noqa: E402
from w2vbert_asr.geometry import SAMPLING_RATE, FrameGeometry  # noqa: E402
from w2vbert_asr.features import BatchFeatureExtractor  # noqa: E402
from w2vbert_asr.model import architecture_config, build_model, count_parameters  # noqa: E402
from w2vbert_asr.text import Vocabulary, build_processor  # noqa: E402
from w2vbert_asr.train import train_step  # noqa: E402

GIB = 2**30
NOISE_STD = 0.1  # random "speech": Gaussian noise well inside [-1, 1]
CHARS_PER_SECOND = 12.0  # read speech in alphabetic scripts: ~2.5 words/s of ~5 characters incl. spaces
# 37 characters + [PAD], [UNK] and "|" = 40 tokens, the size of a typical alphabetic character vocabulary.
CHARS = "abcdefghijklmnopqrstuvwxyz'-" + "àáâäçèéêí"
CORPUS_UTTERANCES = 20_000  # ~27 h: ~750 batches an epoch at 160 s per batch, so no batch repeats
TARGET_PEAK_GIB = 15.0  # leaves ~1 GiB of a 16 GB card for the CUDA context, cuDNN/cuBLAS workspaces
DEFAULT_CAP_GIB = 16.0

# The w2v-bert-2.0 (600M) shape, equal to Wav2Vec2BertConfig()'s defaults and facebook/w2v-bert-2.0's
# config.json; spelled out because build_model builds from config only when model.architecture is set.
FULL_ARCHITECTURE = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "output_hidden_size": 1024,
    "conv_depthwise_kernel_size": 31,
    "num_adapter_layers": 1,
    "left_max_position_embeddings": 64,
    "right_max_position_embeddings": 8,
}
# Caps for --small on CPU, so the default CPU run takes seconds (the GPU caps come from the YAML).
SMALL_CAPS = {"max_batch_seconds": 20.0, "max_batch_size": 8, "gradient_accumulation_steps": 2}

# Dense (no sparsity) fp16/bf16 tensor-core peak in TFLOP/s, matched as a whole word in
# torch.cuda.getdevice_name() (an "L40S" is no "L4"); more specific names first (an "H100 PCIe" is no SXM).
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("V100", 125.0),
    ("A10G", 125.0),
    ("L4", 121.0),
    ("T4", 65.0),
]
# Score-sized matmuls per attention layer besides Q K^T and attention x V, by position embedding type:
# relative_key adds query x distance embedding ("bhld,lrd->bhlr"); Transformer-XL "relative" adds the
# (T x 2T) position-score matmul, ~2 score-sized matmuls; rotary adds none.
POSITION_SCORE_MATMULS = {"relative_key": 1, "relative": 2}
TRAIN_FLOPS_PER_FORWARD = 3  # backward = 2 x forward: gradients for activations and for weights


def peak_tflops(device_name: str) -> float | None:
    """Dense fp16/bf16 peak of a GPU by name, or None when the name is not in the table."""
    for key, tflops in PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", device_name, flags=re.IGNORECASE):
            return tflops
    return None


def _weight_params(module: torch.nn.Module) -> int:
    """Parameters used once per frame (weights, biases, norms, convolutions); embeddings are gathered
    per (query, key) pair instead and are counted in the attention terms."""
    modules = [m for m in module.modules() if not isinstance(m, torch.nn.Embedding)]
    return sum(p.numel() for m in modules for p in m.parameters(recurse=False))


def _position_flops(layer, cfg, b: int, t: int) -> float:
    """The position bias's matmul FLOPs in one Conformer layer. `model.fast_position_bias` (our
    `relative_key_bias`) multiplies each query with the left + right + 1 distance embeddings and gathers;
    transformers' own contracts each query with a (T, T, D) lookup, a score-sized matmul."""
    kind = cfg.position_embeddings_type
    if kind == "relative_key" and getattr(layer.self_attn, "_w2vbert_fast_bias", False):
        width = cfg.left_max_position_embeddings + cfg.right_max_position_embeddings + 1
        return 2 * b * t * width * cfg.hidden_size
    return POSITION_SCORE_MATMULS.get(kind, 0) * 2 * b * t * t * cfg.hidden_size


def forward_flops(model, batch_size: int, frames: int) -> tuple[float, float]:
    """Forward FLOPs of ``Wav2Vec2BertForCTC`` on ``(batch_size, frames, 160)`` padded features.

    -> (forward FLOPs, the part gradient checkpointing recomputes: the Conformer layers).
    """
    cfg, w2v = model.config, model.wav2vec2_bert
    b, t = batch_size, frames
    layers = 0.0
    for layer in w2v.encoder.layers:
        layers += (2 * _weight_params(layer) * b * t + 2 * 2 * b * t * t * cfg.hidden_size  # Q K^T, attention x V
                   + _position_flops(layer, cfg, b, t))
    pre = 2 * _weight_params(w2v.feature_projection) * b * t
    if w2v.intermediate_ffn is not None:
        pre += 2 * _weight_params(w2v.intermediate_ffn) * b * t
    adapter = 0.0
    if w2v.adapter is not None:
        if w2v.adapter.proj is not None:
            pre += 2 * (_weight_params(w2v.adapter.proj) + _weight_params(w2v.adapter.proj_layer_norm)) * b * t
        k, s = cfg.adapter_kernel_size, cfg.adapter_stride
        for layer in w2v.adapter.layers:
            t = (t + 2 * (s // 2) - k) // s + 1  # the strided convolutions' output frames (padding = stride // 2)
            adapter += 2 * _weight_params(layer) * b * t + 2 * 2 * b * t * t * cfg.output_hidden_size
    head = 2 * _weight_params(model.lm_head) * b * t
    return pre + layers + adapter + head, layers


def step_flops(model, shapes: list[tuple[int, int]], checkpointing: bool) -> tuple[float, float]:
    """Training FLOPs of one optimizer step over micro-batch feature shapes ``[(B, T), ...]``.

    -> (model FLOPs for MFU, hardware FLOPs for HFU = model FLOPs + the recomputed forward).
    """
    model_f = hw_f = 0.0
    for b, t in shapes:
        fwd, recomputed = forward_flops(model, b, t)
        model_f += TRAIN_FLOPS_PER_FORWARD * fwd
        hw_f += TRAIN_FLOPS_PER_FORWARD * fwd + (recomputed if checkpointing else 0.0)
    return model_f, hw_f


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class MicroBatch:
    """waves ``(B, N)`` float32, lengths ``(B,)`` samples, labels ``(B, L)`` with -100 padding (CPU)."""

    waves: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    seconds: float  # real audio
    padded_seconds: float


def make_micro_batch(durations: np.ndarray, vocab_size: int, model_config, seed: int) -> MicroBatch:
    """Noise clips of ``durations`` seconds with random character labels, 12 per second (fewer if the
    clip has too few CTC frames, as data.prepare filters)."""
    rng = np.random.default_rng(seed)
    lengths = np.round(durations * SAMPLING_RATE).astype(np.int64)
    waves = torch.zeros(len(lengths), int(lengths.max()))
    label_rows = []
    for i, n in enumerate(lengths):
        waves[i, :n] = torch.from_numpy(rng.normal(0.0, NOISE_STD, n).astype(np.float32))
        # Random labels rarely repeat, so CTC needs about one frame per label; keep a frame spare.
        n_labels = max(1, min(round(CHARS_PER_SECOND * n / SAMPLING_RATE), FrameGeometry.of(model_config).output_frames(int(n)) - 1))
        label_rows.append(rng.integers(2, vocab_size, n_labels))  # ids >= 2: "|" and characters
    labels = torch.full((len(lengths), max(map(len, label_rows))), -100, dtype=torch.long)
    for row, ids in zip(labels, label_rows):
        row[: len(ids)] = torch.from_numpy(ids)
    seconds = float(lengths.sum()) / SAMPLING_RATE
    padded = len(lengths) * float(lengths.max()) / SAMPLING_RATE
    return MicroBatch(waves, torch.from_numpy(lengths), labels, seconds, padded)


def plan_batches(
    max_seconds: float, max_batch_size: int, num_micro: int, seed: int, max_duration: float = MAX_SECONDS
) -> tuple[list[np.ndarray], float]:
    """Durations of ``num_micro`` micro-batches from a shuffled epoch of DurationBatchSampler, the batch
    holding the longest clip first. -> (list of ``(B,)`` durations, padding share of the epoch)."""
    durations = np.clip(corpus_durations(CORPUS_UTTERANCES, seed), MIN_SECONDS, max_duration)
    sampler = DurationBatchSampler(durations, max_seconds, max_batch_size, shuffle=True, seed=seed)
    batches, epoch = [], 0
    while len(batches) < num_micro:
        batches += sampler.rank_batches(epoch)
        epoch += 1
    longest = max(range(len(batches)), key=lambda i: durations[batches[i]].max())
    batches.insert(0, batches.pop(longest))
    epoch0 = sampler.rank_batches(0)
    padded = sum(len(b) * durations[b].max() for b in epoch0)
    return [durations[b] for b in batches[:num_micro]], float(1.0 - durations.sum() / padded)


# ------------------------------------------------------------------------------------------------ running


@dataclass
class RunResult:
    attn: str
    status: str = "ok"  # ok | OOM | unsupported | failed
    note: str = ""
    losses: list[float] = field(default_factory=list)  # mean micro-batch loss per step, warmup included
    audio_seconds: float = 0.0  # measured steps only
    padded_seconds: float = 0.0
    seconds: float = 0.0
    feature_seconds: float = 0.0
    model_flops: float = 0.0
    hardware_flops: float = 0.0
    skipped_steps: int = 0  # no update: GradScaler found inf/NaN gradients, or a non-finite loss dropped the window
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    steps: int = 0


class _Stopwatch:
    """Times a region without synchronising mid-step: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.spans.append(time.perf_counter() - t0)

    def total(self) -> float:
        """Seconds; call after a synchronize."""
        if self.cuda:
            return sum(s.elapsed_time(e) for s, e in self.spans) / 1000.0
        return float(sum(self.spans))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model, tcfg, device: torch.device) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW as w2vbert_asr.train._optimizer (no decay on biases and norms), fused when the build allows."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": tcfg.learning_rate, "betas": tuple(tcfg.adam_betas), "eps": tcfg.adam_eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs), True
    except (RuntimeError, TypeError, ValueError):  # fused needs a recent torch and a supported device
        return torch.optim.AdamW(groups, **kwargs), False


def _build(model_cfg: DictConfig, tokenizer, attn: str, device, seed: int, init_state: dict | None):
    """-> model on ``device`` with ``attn``; raises on refusal. Same seed and state -> identical init."""
    cfg = model_cfg.copy()
    cfg.attn_implementation = attn
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer)
    if init_state is not None:
        model.load_state_dict(init_state)
    got = getattr(model.config, "_attn_implementation", attn)
    if got != attn:
        raise ValueError(f"transformers built the model with attn_implementation={got!r} instead of {attn!r}")
    return model.to(device).train()


def _train_step(accelerator, model, optimizer, scheduler, batches: list[MicroBatch], setup: dict, seed: int):
    """One optimizer step over ``batches`` (gradient accumulation) by the training loop's own
    ``w2vbert_asr.train.train_step`` (loss, backward, GradScaler, clipping, AdamW step). -> (step output,
    mean finite micro-batch loss, feature shapes ``[(B, T), ...]``, a callable giving the
    feature-extraction seconds once the device is synchronised).

    A function of its own so that after an OOM its activations die with its frame."""
    device = setup["device"]
    feature_watch = _Stopwatch(device)
    shapes = []

    class Featurizer:  # the real extractor behind the loop's interface, timed, shapes recorded
        @staticmethod
        def model_inputs(waves, lengths, **keys):
            with feature_watch():
                inputs = setup["featurizer"].model_inputs(waves, lengths, **keys)
            shapes.append(tuple(inputs["input_features"].shape[:2]))
            return inputs

    featurizer = Featurizer()

    # SpecAugment draws its masks from numpy's global RNG and dropout from torch's: seeding both per step
    # gives every attention implementation the very same masks.
    np.random.seed(seed)
    torch.manual_seed(seed)
    micro = [{"waves": mb.waves, "lengths": mb.lengths, "labels": mb.labels} for mb in batches]
    out = train_step(accelerator, model, optimizer, scheduler, micro, featurizer, setup["train_cfg"].max_grad_norm)
    loss = out.loss_sum / out.finite if out.finite else float("nan")
    return out, loss, shapes, feature_watch.total


def run(attn: str, setup: dict, args, init_state: dict | None) -> tuple[RunResult, dict | None]:
    """Warm up and time ``args.steps`` optimizer steps with one attention implementation.

    -> (result, the model's initial state dict on CPU when ``init_state`` was None, for the next run).
    """
    device, dtype, tcfg = setup["device"], setup["dtype"], setup["train_cfg"]
    res = RunResult(attn)
    try:
        model = _build(setup["model_cfg"], setup["tokenizer"], attn, device, args.seed, init_state)
    except (ValueError, ImportError, NotImplementedError) as err:
        res.status, res.note = "unsupported", f"{type(err).__name__}: {err}"
        print(f"[{attn}] attention implementation unsupported: {res.note}")
        return res, None
    first_state = None
    if init_state is None and args.attn == "both":
        first_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    optimizer, fused = make_optimizer(model, tcfg, device)
    setup.setdefault("fused", fused)
    setup.setdefault("parameters", count_parameters(model)[1])
    # The real loop's accelerate setup: autocast, fp16 GradScaler and accumulation come from it.
    accelerator = setup["accelerator"]
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant: warmup is not timed
    accum = setup["accum"]
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    micro = setup["micro_batches"]
    step, batches = 0, []
    try:
        for step in range(args.warmup + args.steps):
            batches = micro[step * accum : (step + 1) * accum]
            measured = step >= args.warmup
            _sync(device)
            t0 = time.perf_counter()
            out, loss, shapes, feature_seconds = _train_step(accelerator, model, optimizer, scheduler, batches,
                                                             setup, seed=args.seed + step * accum)
            _sync(device)
            elapsed = time.perf_counter() - t0
            res.losses.append(float(loss))
            skipped = not out.stepped
            if measured:
                res.steps += 1
                res.seconds += elapsed
                res.feature_seconds += feature_seconds()
                res.audio_seconds += sum(mb.seconds for mb in batches)
                res.padded_seconds += sum(mb.padded_seconds for mb in batches)
                m, h = step_flops(model, shapes, setup["checkpointing"])
                res.model_flops += m
                res.hardware_flops += h
                res.skipped_steps += int(skipped)
            tag = "step" if measured else "warmup"
            print(f"[{attn}] {tag} {step + 1}/{args.warmup + args.steps}: loss {res.losses[-1]:.4f}, "
                  f"{elapsed:.3f} s, batches {shapes}{' (no update: inf/NaN)' if skipped else ''}")
    except torch.cuda.OutOfMemoryError as err:  # the same class as torch.OutOfMemoryError
        first = str(err).splitlines()[0]
        shapes = [tuple(mb.waves.shape) for mb in batches]
        res.status, res.note = "OOM", f"step {step + 1} (micro-batch waves {shapes}): {first}"
        print(f"[{attn}] out of memory at {res.note}; lower train.max_batch_seconds")
    except RuntimeError as err:
        if attn == "eager":
            raise
        res.status, res.note = "failed", f"{type(err).__name__}: {str(err).splitlines()[0]}"
        print(f"[{attn}] failed at step {step + 1}: {res.note}")
    if device.type == "cuda":
        res.peak_allocated_gib = torch.cuda.max_memory_allocated(device) / GIB
        res.peak_reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
    for p in model.parameters():  # an OOM mid-step leaves gradients behind
        p.grad = None
    accelerator.free_memory()  # forgets the prepared model/optimizer and resets the accumulation counter
    del model, optimizer, scheduler
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res, first_state


# ------------------------------------------------------------------------------------------------ report


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def print_results(results: list[RunResult], setup: dict, argv: list[str]) -> None:
    device, peak = setup["device"], setup["peak_tflops"]
    head = (f"{'attn':<7}{'status':<9}{'audio s/s':>10}{'padded s/s':>11}{'s/step':>8}{'features':>9}"
            f"{'TFLOP/s':>9}{'MFU':>9}{'HFU':>9}{'peak alloc':>11}{'peak resv':>10}{'skipped':>8}")
    print("\n" + head)
    print("-" * len(head))
    for r in results:
        if r.steps:
            tflops = r.model_flops / r.seconds / 1e12
            mfu = _fmt(tflops / peak if peak else None, ".1%", "unknown")
            hfu = _fmt(r.hardware_flops / r.seconds / 1e12 / peak if peak else None, ".1%", "unknown")
            cells = (f"{r.audio_seconds / r.seconds:>10.1f}{r.padded_seconds / r.seconds:>11.1f}"
                     f"{r.seconds / r.steps:>8.3f}{r.feature_seconds / r.seconds:>9.1%}{tflops:>9.3g}{mfu:>9}{hfu:>9}")
        else:
            cells = f"{'-':>10}{'-':>11}{'-':>8}{'-':>9}{'-':>9}{'-':>9}{'-':>9}"
        print(f"{r.attn:<7}{r.status:<9}{cells}{_fmt(r.peak_allocated_gib, '.2f'):>9} G"
              f"{_fmt(r.peak_reserved_gib, '.2f'):>8} G{r.skipped_steps:>8}")
    print("audio s/s: real (unpadded) audio seconds trained per second; features: share of step time in feature "
          "extraction; MFU/HFU vs " + (f"{peak:g} TFLOP/s dense fp16/bf16" if peak else "an unknown peak")
          + (" (this run is fp32)" if setup["dtype"] == torch.float32 and peak else ""))
    for r in results:
        if r.note:
            print(f"{r.attn}: {r.note}")

    ok = [r for r in results if r.status == "ok" and r.steps]
    if len(ok) == 2:
        eager, sdpa = ok
        ratio = (sdpa.audio_seconds / sdpa.seconds) / (eager.audio_seconds / eager.seconds)
        print(f"\nsdpa / eager speed (audio s/s, same batches, same init): {ratio:.2f}x")
        n = min(len(eager.losses), len(sdpa.losses))
        diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager.losses[:n], sdpa.losses[:n])]
        print(f"loss step 1: eager {eager.losses[0]:.6f}, sdpa {sdpa.losses[0]:.6f} (rel. diff {diffs[0]:.2e}); "
              f"step {n}: eager {eager.losses[n - 1]:.6f}, sdpa {sdpa.losses[n - 1]:.6f} "
              f"(max rel. diff over {n} steps {max(diffs):.2e})")
    if device.type == "cuda":
        cap = setup["cap_gib"]
        for r in results:
            if r.peak_reserved_gib is not None:
                verdict = "OK" if r.status == "ok" and r.peak_reserved_gib <= TARGET_PEAK_GIB else "OVER"
                print(f"{r.attn}: peak reserved {r.peak_reserved_gib:.2f} GiB vs target <= {TARGET_PEAK_GIB:g} GiB"
                      f" (cap {_fmt(cap, 'g', 'none')} GiB): {verdict}")
    print("\ncommand: python " + shlex.join([_script_path(), *argv]))


def _script_path() -> str:
    try:
        return str(Path(__file__).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(Path(__file__).resolve())


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="default: the YAML's mixed_precision on GPU (fp16 for v100_16gb), fp32 on CPU")
    p.add_argument("--attn", choices=["eager", "sdpa", "both"], default="eager")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help=f"GPU only: cap this process's memory (default {DEFAULT_CAP_GIB:g}, a V100 16 GB; 0 = no cap)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 20 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 1 CPU; >= 1)")
    p.add_argument("--small", action=argparse.BooleanOptionalAction, default=None,
                   help="conf/model/tiny.yaml's shape and small caps (default on CPU)")
    p.add_argument("--train", default="v100_16gb", help="conf/train/<name>.yaml with the batch settings")
    p.add_argument("--max-batch-seconds", type=float, default=None, help="override the YAML / small caps")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--max-duration", type=float, default=None,
                   help=f"clip the synthetic corpus to this many seconds (default {MAX_SECONDS:g}, as Common Voice)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu")
    on_gpu = args.device == "cuda"
    args.small = (not on_gpu) if args.small is None else args.small
    args.steps = (20 if on_gpu else 3) if args.steps is None else args.steps
    args.warmup = (5 if on_gpu else 1) if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first warmup step runs the worst-case batch)")
    return args


def _has_bf16(device: torch.device) -> bool:
    """Native bf16 (compute capability >= 8). torch.cuda.is_bf16_supported() also says True for a V100,
    where bf16 only runs emulated (slowly), unless including_emulation=False."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def _resolve_dtype(args, train_cfg, device: torch.device) -> torch.dtype:
    name = args.dtype
    if name is None:
        setting = train_cfg.mixed_precision if device.type == "cuda" else "no"
        if setting == "auto":
            setting = "bf16" if _has_bf16(device) else "fp16"
        name = {"no": "fp32"}.get(setting, setting)
    if name == "bf16" and device.type == "cuda" and not _has_bf16(device):
        raise SystemExit(f"{torch.cuda.getdevice_name(device)} has no bf16; use --dtype fp16")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def main(argv: list[str] | None = None) -> list[RunResult]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"train={args.train}", "lang=xx"] + (["model=tiny"] if args.small else [])
    cfg = compose(overrides)
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    if not args.small:
        model_cfg.architecture = FULL_ARCHITECTURE
    model_cfg.gradient_checkpointing = True  # the v100_16gb setting; tiny.yaml turns it off
    caps = {k: cfg.train[k] for k in SMALL_CAPS}
    caps_source = f"conf/train/{args.train}.yaml"
    if args.small:
        caps.update(SMALL_CAPS)
        caps_source = "small CPU caps"
    for key, value in (("max_batch_seconds", args.max_batch_seconds), ("max_batch_size", args.max_batch_size),
                       ("gradient_accumulation_steps", args.grad_accum)):
        if value is not None and value != caps[key]:
            caps[key] = value
            caps_source = caps_source.split(" + ")[0] + " + command line"
    dtype = _resolve_dtype(args, cfg.train, device)

    cap_gib = None
    device_name, total_gib = "cpu", None
    if device.type == "cuda":
        device_name = torch.cuda.getdevice_name(device)
        total_gib = torch.cuda.get_device_properties(device).total_memory / GIB
        cap_gib = DEFAULT_CAP_GIB if args.memory_cap_gib is None else args.memory_cap_gib
        if cap_gib and cap_gib < total_gib:
            torch.cuda.set_per_process_memory_fraction(cap_gib / total_gib, device)
        elif cap_gib:
            print(f"memory cap {cap_gib:g} GiB >= the device's {total_gib:.1f} GiB: not capped")
            cap_gib = None
        else:
            cap_gib = None
    elif args.memory_cap_gib:
        print("--memory-cap-gib applies to CUDA devices only; ignored on CPU")

    vocab = Vocabulary(chars=list(CHARS), counts={c: 1 for c in CHARS}, rare={})
    with tempfile.TemporaryDirectory() as tmp:
        processor = build_processor(vocab, tmp)
    tokenizer = processor.tokenizer
    arch = architecture_config(model_cfg)
    num_micro = (args.warmup + args.steps) * caps["gradient_accumulation_steps"]
    plan, padding = plan_batches(caps["max_batch_seconds"], caps["max_batch_size"], num_micro, args.seed,
                                 args.max_duration or MAX_SECONDS)
    micro = [make_micro_batch(d, len(tokenizer), arch, args.seed * 1_000_003 + i) for i, d in enumerate(plan)]
    from accelerate import Accelerator

    # Only to force CPU where CUDA exists; on a CPU-only machine accelerate picks the CPU by itself.
    accelerator = Accelerator(cpu=device.type == "cpu" and torch.cuda.is_available(),
                              mixed_precision={torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no"),
                              gradient_accumulation_steps=caps["gradient_accumulation_steps"])
    setup = {
        "accelerator": accelerator, "device": device, "dtype": dtype, "train_cfg": cfg.train, "model_cfg": model_cfg, "tokenizer": tokenizer,
        "featurizer": BatchFeatureExtractor.from_hf(processor.feature_extractor).to(device),
        "accum": caps["gradient_accumulation_steps"], "micro_batches": micro,
        "checkpointing": bool(model_cfg.gradient_checkpointing), "peak_tflops": peak_tflops(device_name)
        if device.type == "cuda" else None, "cap_gib": cap_gib,
    }
    print(f"device: {device_name}" + (f" ({total_gib:.1f} GiB, cap {_fmt(cap_gib, 'g', 'none')} GiB)"
                                      if total_gib else f" (threads: {torch.get_num_threads()})")
          + f"; peak {_fmt(setup['peak_tflops'], 'g', 'unknown')} TFLOP/s; dtype {str(dtype).removeprefix('torch.')}"
          + f"; torch {torch.__version__}")
    print(f"model: {'tiny (--small)' if args.small else 'w2v-bert-2.0 600M shape'}, random init, vocab "
          f"{len(tokenizer)}, gradient checkpointing, overrides from conf/model/w2v_bert_2.yaml")
    print(f"batches: max_batch_seconds {caps['max_batch_seconds']:g}, max_batch_size {caps['max_batch_size']}, "
          f"gradient_accumulation_steps {caps['gradient_accumulation_steps']} "
          f"({caps_source}); epoch padding {padding:.1%}; "
          f"{args.warmup} warmup + {args.steps} timed steps; first micro-batch: {len(plan[0])} x "
          f"{plan[0].max():.2f} s (holds the longest clip)")

    impls = ["eager", "sdpa"] if args.attn == "both" else [args.attn]
    results, init_state = [], None
    for attn in impls:
        res, state = run(attn, setup, args, init_state)
        init_state = init_state or state
        results.append(res)
    print(f"\nparameters: {setup.get('parameters', 0):,}; AdamW fused: {setup.get('fused')}")
    print_results(results, setup, argv)
    return results


if __name__ == "__main__":
    main()
