"""Zero-shot baselines, scored on the same split, source and normaliser as `evaluate`: one path for every family.

Usage:
    w2vbert-asr baseline recipe=demo                                       # openai/whisper-large-v3
    w2vbert-asr baseline recipe=mn data.root=/data/cv-corpus-21.0/mn baseline=omniasr_ctc      # 300M, zero-shot
    w2vbert-asr baseline recipe=mn data.root=... baseline=omniasr_ctc_1b
    w2vbert-asr baseline recipe=mn data.root=... baseline=mms               # mms-1b-all + the language's adapter
    w2vbert-asr baseline recipe=mn data.root=... baseline=omniasr_llm baseline.quantize=8bit   # 7B on a 16 GB GPU
    w2vbert-asr baseline recipe=mn data.root=... \
        baseline.name_or_path=sanchit-gandhi/whisper-large-v3-ft-cv16-mn baseline.results_dir=outputs/mn/whisper-ft
    w2vbert-asr baseline lang=sv-SE data.root=/data/cv/sv-SE               # Common Voice code -> <|sv|>, swe, swe_latn
    w2vbert-asr compare compare.runs=[demo_out,demo_out/baseline]          # side by side with our model

The path: load the checkpoint (safetensors only, no code from the Hub) -> map the recipe's language to the model's
code and check the model covers it (before any data is read) -> read the split -> check that the model's
vocabulary can write the references' characters (`baseline.min_coverage`) -> transcribe -> score with the recipe's
normaliser -> write. The per-family part is small: baseline_whisper.py (forced language token, generate),
baseline_ctc.py (omniASR-CTC and MMS: greedy CTC through evaluate's decoding), baseline_llm.py (the omniASR LLM:
language-conditioned generate, a memory check, 8-bit loading). `baseline.random_standin=true` scores a tiny
random model of the family instead (standins.py: offline demos and tests), labelled as such everywhere.

Writes into `baseline.results_dir` exactly what `evaluate` writes:
    metrics.json                  header (system, model, parameters, license, weights, device, batch_size, dtype,
                                  language ...) + per split wer, cer, utterances, audio_hours, decode_seconds, rtf,
                                  rtfx (audio seconds / wall seconds), decoding
    predictions/<split>.jsonl     id, reference, hypothesis (normalised), wer, cer, duration
The clock covers feature extraction, the model and detokenisation (as in `evaluate`), not model loading.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from . import UsageError
from .baseline_whisper import _PromptRecorder, load_whisper, transcribe_dataset, whisper_language  # noqa: F401
from .devices import device_name, pick_device
from .evaluate import print_table, score, write_results
from .geometry import SAMPLING_RATE
from .text import Normalizer

log = logging.getLogger(__name__)

# baseline.family -> (module of its part, `system` in metrics.json)
PARTS = {"whisper": ("baseline_whisper", "whisper"), "omniasr_ctc": ("baseline_ctc", "omniasr-ctc"),
         "mms": ("baseline_ctc", "mms"), "omniasr_llm": ("baseline_llm", "omniasr-llm")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STANDIN_DIR = "standin"  # in results_dir: the random stand-in's folder (baseline.random_standin)


def resolve_device_dtype(device: str, dtype: str, family: str = "whisper") -> tuple[torch.device, torch.dtype]:
    """'auto' device: cuda when present. 'auto' dtype: float16 on GPU (the release precision of Whisper, MMS and
    omniASR-CTC), float32 on CPU; the omniASR LLM bfloat16 on both (in float32 7B would need 31 GB)."""
    try:
        dev = pick_device(device)
    except UsageError as e:
        raise UsageError(f"baseline.device: {e}") from None
    if dtype == "auto":
        if family == "omniasr_llm":
            return dev, torch.bfloat16
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"baseline.dtype={dtype!r}: choose auto, {', '.join(DTYPES)}")
    return dev, DTYPES[dtype]


def _standin(cfg, family: str, results_dir: Path) -> str:
    """Build (once) the tiny random model of `family` that random_standin scores, its tokenizer learnt from the
    prepared train transcripts (never the scored split's), covering the recipe's language."""
    from .languages import standin_language
    from .prepare import prepare
    from .prepared import load_prepared
    from .standins import build_standin, is_standin

    folder = results_dir / STANDIN_DIR
    if not is_standin(folder):
        if not (Path(cfg.output_dir) / "prepared" / "train.arrow").is_file():
            prepare(cfg)
        texts = [str(t) for t in load_prepared(cfg.output_dir, "train")["text"]]
        build_standin(family, folder, texts, standin_language(family, str(cfg.baseline.language)))
    return str(folder)


def check_coverage(processor, dataset, min_coverage: float, name: str) -> float | None:
    """The share of the references' characters the model's vocabulary can write (None for Whisper's byte-level
    one, which writes anything); below min_coverage the language is not covered: one UsageError."""
    from collections import Counter

    from .families import emittable_chars

    tokenizer = processor.tokenizer
    if type(tokenizer).__name__.startswith("Whisper"):
        return None
    known = emittable_chars(tokenizer)
    counts = Counter(c for t in dataset["text"] for c in str(t) if c != " ")
    total = sum(counts.values())
    missing = {c: n for c, n in counts.most_common() if c not in known}
    rate = 1.0 - sum(missing.values()) / total if total else 1.0
    if rate < min_coverage:
        raise UsageError(f"{name} does not cover this language's writing: its vocabulary writes {100 * rate:.1f} % of "
                         f"the reference characters (missing {''.join(list(missing)[:20])!r}); baseline.min_coverage="
                         f"{min_coverage}. Choose another baseline for this language")
    return rate


def baseline(cfg) -> dict:
    """`w2vbert-asr baseline`: score a checkpoint of baseline.family zero-shot on `eval.split`. -> {split: metrics}."""
    from .prepare import prepare_eval_split
    from .standins import is_standin

    bcfg = cfg.baseline
    family = str(bcfg.family)
    module, system = PARTS[family]
    part = importlib.import_module(f"w2vbert_asr.{module}")
    results_dir = Path(bcfg.results_dir)
    if not bcfg.random_standin:  # cached or reachable, before any data is read
        from .weights import hub_ids, require

        require(hub_ids([bcfg.name_or_path]), "baseline")
    name = _standin(cfg, family, results_dir) if bcfg.random_standin else str(bcfg.name_or_path)
    device, dtype = resolve_device_dtype(str(bcfg.device), str(bcfg.dtype), family)
    model, processor = part.load(name, device, dtype, bcfg)
    if processor.feature_extractor.sampling_rate != SAMPLING_RATE:
        raise UsageError(f"{name} expects {processor.feature_extractor.sampling_rate} Hz audio; the toolkit "
                         f"prepares {SAMPLING_RATE} Hz")
    lang = part.language(str(bcfg.language), model, processor, name)  # before any data is read

    normalizer = Normalizer.from_config(cfg.text)
    split = str(cfg.eval.split)
    dataset = prepare_eval_split(cfg, split, normalizer, results_dir)
    coverage = check_coverage(processor, dataset, float(bcfg.min_coverage), name)
    log.info("%s %s on %d clips of %s (language %s, %s, %s)", family, name, len(dataset), split, lang["code"],
             device, dtype)
    hyps, seconds, extra = part.transcribe(model, processor, dataset, cfg, device, dtype, lang)

    metrics, rows = score(dataset, hyps, normalizer)
    audio_s = metrics["audio_hours"] * 3600
    metrics.update(decode_seconds=seconds, rtf=seconds / audio_s, rtfx=audio_s / seconds,
                   decoding="greedy" if int(bcfg.num_beams) == 1 or family in ("omniasr_ctc", "mms")
                   else f"beam{int(bcfg.num_beams)}")
    standin = is_standin(name)
    header = {"system": system + (" (random tiny stand-in)" if standin else ""), "model": name,
              "parameters": sum(p.numel() for p in model.parameters()), "license": str(bcfg.license),
              "weights": "random (tiny stand-in, not the real model)" if standin else "pretrained",
              "device": device_name(device), "batch_size": int(bcfg.batch_size),
              "dtype": str(dtype).removeprefix("torch."), "char_coverage": coverage, **extra}
    write_results(results_dir, split, metrics, rows, header)
    print_table({split: metrics})
    print(f"wrote {results_dir / 'metrics.json'} and {results_dir / 'predictions' / (split + '.jsonl')}")
    return {split: metrics}
