"""Score a CTC model: greedy (or n-gram beam) decoding, WER/CER with jiwer, predictions per utterance.

Usage:
    w2vbert-asr evaluate recipe=demo                           # the demo model on the synthetic test split
    w2vbert-asr evaluate model=outputs/mn/model recipe=mn data.root=/data/cv/mn eval.split=dev
    w2vbert-asr evaluate model=outputs/mn/model eval.lm=outputs/mn/lm   # also WER with the n-gram LM
    w2vbert-asr evaluate recipe=demo eval.backend=onnx export.quantize=int8   # onnxruntime (`export` first)

Writes into `eval.results_dir` (default: output_dir):
    metrics.json                  per split: wer, cer, utterances, audio_hours, rtf, rtfx, device ...
    predictions/<split>.jsonl     id, reference, hypothesis, wer, cer, duration, speaker (when the data names one),
                                  confidence (utterance), word_confidence (one per hypothesis word; confidence.py)
The Whisper baseline (`w2vbert-asr baseline`) writes the very same files, so `compare` can read both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jiwer
import torch
from omegaconf import DictConfig

from .confidence import Confidence, Hypothesis, greedy_hypothesis
from .batching import DurationBatchSampler
from .audio import waves_of
from .devices import device_name, pick_device
from .families import family_of_model, load_processor
from .features import pad_waves
from .geometry import FrameGeometry
from .model import check_model_dir, ctc_greedy_ids, load_ctc_model
from .onnx_model import check_backend, load_onnx_model
from .storage import atomic_write_json, atomic_write_text
from .text import Normalizer

log = logging.getLogger(__name__)
METRICS = "metrics.json"
PREDICTIONS = "predictions"


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus WER/CER (errors over reference words/characters, as jiwer computes them). Utterances with an
    empty reference are left out; with no reference word at all the rates are undefined: NaN."""
    # jiwer refuses empty references; prepare never keeps one, but guard for external data.
    pairs = [(r, h) for r, h in zip(references, hypotheses) if r.strip()]
    if not pairs:
        return {"wer": float("nan"), "cer": float("nan")}
    r, h = zip(*pairs)
    return {"wer": jiwer.wer(list(r), list(h)), "cer": jiwer.cer(list(r), list(h))}


def utterance_rates(reference: str, hypothesis: str) -> dict:
    if not reference.strip():
        return {"wer": float(bool(hypothesis.strip())), "cer": float(bool(hypothesis.strip()))}
    return {"wer": jiwer.wer(reference, hypothesis), "cer": jiwer.cer(reference, hypothesis)}


@torch.no_grad()
def decode_dataset(model, dataset, featurizer, decode: Callable[[torch.Tensor, torch.Tensor], list[str]],
                   device, max_batch_seconds: float, max_batch_size: int, accelerator=None) -> tuple[list[str], float]:
    """Transcribe a prepared split. -> (hypotheses in dataset order, wall seconds).

    decode: (logits (B, T, V), valid lengths (B,)) -> texts. Under accelerate every process decodes an
    equal share of the batches (sharded models need every rank in every forward) and the results are
    gathered, so this also serves FSDP/DeepSpeed runs.
    """
    sampler = DurationBatchSampler(dataset["duration"], max_batch_seconds, max_batch_size, shuffle=False)
    batches = sampler.rank_batches(0)
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    per_rank = -(-len(batches) // world)
    padded = batches + [batches[-1]] * (per_rank * world - len(batches))  # repeats are dropped on gather
    mine = list(range(rank, len(padded), world))
    was_training = model.training
    model.eval()
    results: list[tuple[int, str]] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in mine:
        idx = padded[b]
        waves, lengths = pad_waves(waves_of(dataset[idx]["audio"]))  # one Arrow read per batch; int16 -> float32
        logits = model(**featurizer.model_inputs(waves.to(device), lengths.to(device))).logits
        out_lengths = FrameGeometry.of(_unwrap(model).config).output_frames(lengths)
        if b < len(batches):
            results += list(zip(idx, decode(logits.float(), out_lengths)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if accelerator and world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
        seconds = max(gather_object([seconds]))
    model.train(was_training)
    hyps = dict(results)
    return [hyps[i] for i in range(len(dataset))], seconds


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def greedy_decoder(tokenizer, confidence: Confidence | None = None) -> Callable[[torch.Tensor, torch.Tensor], list]:
    """(logits (B, T, V), lengths (B,)) -> texts, or `Hypothesis` objects (with confidences) when given a measure."""
    def decode(logits: torch.Tensor, lengths: torch.Tensor) -> list:
        if confidence is not None:
            rows = logits.detach().float().cpu()
            return [greedy_hypothesis(row[:n], tokenizer, confidence) for row, n in zip(rows, lengths.tolist())]
        return [tokenizer.decode(ids) for ids in ctc_greedy_ids(logits, lengths)]

    return decode


def score(dataset, hypotheses: list, normalizer: Normalizer) -> tuple[dict, list[dict]]:
    """-> (split metrics, per-utterance rows). References are the prepared (normalised) texts; hypotheses
    (texts or `Hypothesis` objects, whose confidences the rows then carry) go through the same normaliser
    so every system is scored identically."""
    refs = [str(t) for t in dataset["text"]]
    hyps = [normalizer(h.text if isinstance(h, Hypothesis) else h) for h in hypotheses]
    durations = [float(d) for d in dataset["duration"]]
    rows = [{"id": str(i), "reference": r, "hypothesis": h, **utterance_rates(r, h), "duration": round(d, 3)}
            for i, r, h, d in zip(dataset["id"], refs, hyps, durations)]
    if "speaker" in dataset.column_names:  # datasets built outside `prepare` may have no such column
        for row, spk in zip(rows, dataset["speaker"]):
            if spk:
                row["speaker"] = str(spk)
    for row, h in zip(rows, hypotheses):
        if isinstance(h, Hypothesis):
            row["confidence"] = round(h.confidence, 4)
            row["word_confidence"] = [round(w[3], 4) for w in h.words]
    metrics = {**error_rates(refs, hyps), "utterances": len(refs), "audio_hours": sum(durations) / 3600}
    return metrics, rows


def write_results(results_dir: str | Path, split: str, metrics: dict, rows: list[dict], header: dict) -> None:
    """Merge this split into metrics.json and write predictions/<split>.jsonl (both atomically)."""
    results_dir = Path(results_dir)
    (results_dir / PREDICTIONS).mkdir(parents=True, exist_ok=True)
    path = results_dir / METRICS
    existing = json.loads(path.read_text()) if path.is_file() else {}
    existing.update(header)
    existing.setdefault("splits", {})[split] = metrics
    atomic_write_json(path, existing)
    atomic_write_text(results_dir / PREDICTIONS / f"{split}.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def evaluate_model(model_dir: str | Path, cfg: DictConfig, datasets: dict, results_dir: str | Path,
                   lm_dir: str | Path | None = None) -> dict:
    """Score a saved model dir (any family) on prepared splits ({name: Dataset}) and write metrics.json +
    predictions."""
    from .waveform import featurizer_for

    model_dir = check_model_dir(model_dir, "evaluate")
    device = pick_device(cfg.eval.device)
    family = family_of_model(model_dir)
    processor = load_processor(model_dir, family)
    backend = check_backend(cfg.eval.backend)
    if backend == "onnx":
        model = load_onnx_model(model_dir, cfg.eval.quantize, output_dir=cfg.export.output_dir)
        n_params = model.num_parameters()
    else:
        model = load_ctc_model(model_dir, device, family)
        n_params = sum(p.numel() for p in model.parameters())
    normalizer = Normalizer.load(model_dir)
    featurizer = featurizer_for(processor.feature_extractor).to(device)
    confidence = Confidence.from_config(cfg.confidence)
    decoders = {"": greedy_decoder(processor.tokenizer, confidence)}
    if lm_dir:
        from .lm import beam_decoder

        decoders["lm"] = beam_decoder(processor.tokenizer, lm_dir, confidence=confidence)
    header = {"system": family.system, "model": str(model_dir), "parameters": n_params, "license": family.license,
              "device": device_name(device) if backend == "torch" else f"cpu (onnxruntime, {model.path.name})",
              "max_batch_seconds": cfg.eval.max_batch_seconds, "max_batch_size": cfg.eval.max_batch_size}
    summary = {}
    for split, ds in datasets.items():
        for suffix, decode in decoders.items():
            hyps, seconds = decode_dataset(model, ds, featurizer, decode, device, cfg.eval.max_batch_seconds,
                                           cfg.eval.max_batch_size)
            metrics, rows = score(ds, hyps, normalizer)
            audio_s = metrics["audio_hours"] * 3600
            metrics.update(decode_seconds=seconds, rtf=seconds / audio_s, rtfx=audio_s / seconds,
                           decoding="greedy" if not suffix else f"beam+{suffix}")
            name = split if not suffix else f"{split}+{suffix}"
            write_results(results_dir, name, metrics, rows, header)
            summary[name] = metrics
    print_table(summary)
    return summary


def print_table(summary: dict) -> None:
    print(f"{'split':<14}{'WER %':>8}{'CER %':>8}{'utts':>7}{'hours':>8}{'RTFx':>9}")
    for name, m in summary.items():
        print(f"{name:<14}{100 * m['wer']:>8.2f}{100 * m['cer']:>8.2f}{m['utterances']:>7}"
              f"{m['audio_hours']:>8.3f}{m.get('rtfx', float('nan')):>9.1f}")


def evaluate(cfg: DictConfig) -> dict:
    """`w2vbert-asr evaluate`: read the split from the configured source with the model's own normaliser
    (skipped rows are reported like in prepare), then score it."""
    from transformers import AutoConfig

    from .prepare import prepare_eval_split
    from .rows import Rules

    model_dir = check_model_dir(cfg.model_dir, "evaluate")
    normalizer = Normalizer.load(model_dir)
    rules = Rules.from_config(cfg, normalizer, FrameGeometry.of(AutoConfig.from_pretrained(model_dir)))
    ds = prepare_eval_split(cfg, cfg.eval.split, normalizer, Path(cfg.eval.results_dir), rules)
    return evaluate_model(model_dir, cfg, {cfg.eval.split: ds}, cfg.eval.results_dir, cfg.eval.lm)
