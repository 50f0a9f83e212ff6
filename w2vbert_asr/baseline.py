"""Zero-shot Whisper baseline, scored on the same split, source and normaliser as `evaluate`.

Usage:
    w2vbert-asr baseline recipe=demo                                       # openai/whisper-large-v3
    w2vbert-asr baseline recipe=mn data.root=/data/cv-corpus-21.0/mn eval.split=test
    w2vbert-asr baseline recipe=mn data.root=/data/cv-corpus-21.0/mn \
        baseline.name_or_path=sanchit-gandhi/whisper-large-v3-ft-cv16-mn baseline.results_dir=outputs/mn/whisper-ft
    w2vbert-asr baseline lang=sv-SE data.root=/data/cv/sv-SE               # Common Voice code -> <|sv|>
    w2vbert-asr baseline recipe=demo baseline.num_beams=5 baseline.batch_size=16 baseline.dtype=bfloat16
    w2vbert-asr compare compare.runs=[demo_out,demo_out/baseline]          # side by side with our model

The language is forced (never detected) from `baseline.language` (default: the recipe's `lang`), with
task = transcribe and no timestamps. Any Whisper checkpoint works: a Hub id or a local folder with
safetensors weights, fine-tuned ones included; code from the Hub is never run.

Writes into `baseline.results_dir` (default output_dir/baseline) exactly what `evaluate` writes:
    metrics.json                  header (system, model, parameters, device, batch_size, language,
                                  decoder_prompt ...) + per split wer, cer, utterances, audio_hours,
                                  decode_seconds, rtf, rtfx (audio seconds / wall seconds), decoding
    predictions/<split>.jsonl     id, reference, hypothesis (normalised), wer, cer, duration
The clock covers feature extraction, generation and detokenisation (as in `evaluate`), not model loading.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from . import UsageError
from .data import waves_of
from .evaluate import _device_name, print_table, score, write_results
from .text import Normalizer

log = logging.getLogger(__name__)

SYSTEM = "whisper"
TASK = "transcribe"
CHUNK_SECONDS = 30.0  # Whisper's fixed input window; longer clips need sequential long-form decoding
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Whisper's prompt tokens, looked up in the tokenizer when a checkpoint's generation config lacks them.
TASK_TOKENS = {"transcribe": "<|transcribe|>", "translate": "<|translate|>"}
NO_TIMESTAMPS_TOKEN = "<|notimestamps|>"
# The forced prompt's shape: start, language, task, no-timestamps.
PROMPT_TOKENS = ("<|startoftranscript|>", "<|language|>", TASK_TOKENS[TASK], NO_TIMESTAMPS_TOKEN)


# --------------------------------------------------------------------------------------------- language
def whisper_language(code: str, available: Iterable[str] | None = None) -> str:
    """Our language code -> Whisper's language code, e.g. 'sv-SE' -> 'sv', 'zh-CN' -> 'zh', 'french' -> 'fr'.

    Tries the whole code, then its primary subtag (Common Voice writes region-tagged codes such as
    'sv-SE'); Whisper's language names ('swedish') are accepted too. `available`: the codes the
    checkpoint has tokens for (older checkpoints lack some, e.g. 'yue' before large-v3).
    """
    raw = str(code).strip()
    key = raw.lower().replace("_", "-")
    candidates = [key, key.split("-")[0]]
    found = next((c for c in candidates if c in LANGUAGES), None)
    found = found or next((TO_LANGUAGE_CODE[c] for c in (key, key.replace("-", " ")) if c in TO_LANGUAGE_CODE), None)
    available = set(available) if available is not None else set(LANGUAGES)
    if found is None or found not in available:
        codes = ", ".join(f"{c} ({LANGUAGES.get(c, '?')})" for c in sorted(available))
        why = (f"Whisper has no language {raw!r}" if found is None
               else f"this checkpoint has no <|{found}|> token")
        raise UsageError(
            f"{why}, so it cannot be forced to transcribe it. Set baseline.language=<whisper code> to a "
            f"language it knows (the closest relative, or the one whose script and spelling your references "
            f"use) and say so when you report the baseline. Whisper codes: {codes}")
    return found


def _ensure_prompt_config(model, tokenizer) -> list[str]:
    """Fill the generation config's language/task tables from the tokenizer when a (fine-tuned)
    checkpoint ships an outdated one, so `generate(language=..., task=...)` works. -> language codes."""
    gc = model.generation_config
    unk = tokenizer.unk_token_id

    def token_id(token: str) -> int | None:
        i = tokenizer.convert_tokens_to_ids(token)
        return None if i is None or (i == unk and token != tokenizer.unk_token) else int(i)

    if not getattr(gc, "lang_to_id", None):
        ids = {f"<|{c}|>": token_id(f"<|{c}|>") for c in LANGUAGES}
        gc.lang_to_id = {t: i for t, i in ids.items() if i is not None}
    if not getattr(gc, "task_to_id", None):
        gc.task_to_id = {task: token_id(tok) for task, tok in TASK_TOKENS.items() if token_id(tok) is not None}
    if getattr(gc, "no_timestamps_token_id", None) is None and token_id(NO_TIMESTAMPS_TOKEN) is not None:
        gc.no_timestamps_token_id = token_id(NO_TIMESTAMPS_TOKEN)
    if getattr(gc, "is_multilingual", None) is None:
        gc.is_multilingual = bool(gc.lang_to_id)
    return [t[2:-2] for t in gc.lang_to_id]


# --------------------------------------------------------------------------------------------- model
def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """'auto' device: cuda when present. 'auto' dtype: float16 on GPU (Whisper's release precision), else float32."""
    from .model import pick_device

    try:
        dev = pick_device(device)
    except UsageError as e:
        raise UsageError(f"baseline.device: {e}") from None
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"baseline.dtype={dtype!r}: choose auto, {', '.join(DTYPES)}")
    return dev, DTYPES[dtype]


def load_whisper(name_or_path: str, device: torch.device, dtype: torch.dtype):
    """-> (WhisperForConditionalGeneration in eval mode on device, WhisperProcessor). Safetensors only."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    try:
        processor = WhisperProcessor.from_pretrained(name_or_path)
        model = WhisperForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load a Whisper checkpoint from {name_or_path!r} ({type(e).__name__}: {e}). "
                         "Set baseline.name_or_path to a Hub id or a local folder holding config.json, "
                         "model.safetensors and the processor files (only safetensors weights are loaded)") from e
    if model.config.model_type != "whisper":
        raise UsageError(f"{name_or_path} is a {model.config.model_type!r} model, not Whisper; "
                         "set baseline.name_or_path to a Whisper checkpoint")
    return model.to(device).eval(), processor


class _PromptRecorder:
    """Records the decoder prompt (start, language, task, no-timestamps) that generation really fed,
    so metrics.json shows what Whisper was asked to do. The prompt is the first decoder input longer
    than one token (later steps feed one token each, from the cache); language detection, when it
    runs, feeds <|startoftranscript|> alone first."""

    def __init__(self, decoder: torch.nn.Module):
        self.ids: list[int] | None = None
        self._handle = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        if self.ids is None or ids.shape[-1] > 1:
            self.ids = ids[0].tolist()
        if ids.shape[-1] > 1:
            self._handle.remove()


# --------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def transcribe_dataset(model, processor, dataset, batch_size: int, generate_kwargs: dict, device: torch.device,
                       dtype: torch.dtype) -> tuple[list[str], float]:
    """Transcribe every clip of a prepared split. -> (texts in dataset order, wall seconds).

    Clips are batched longest first, so similar lengths share a batch (fewer decoder steps wasted on
    finished rows) and an out-of-memory error shows on the first batch. Batches with a clip over
    30 s use Whisper's sequential long-form decoding (which needs timestamps).
    """
    fe = processor.feature_extractor
    durations = np.asarray(dataset["duration"], dtype=np.float64)
    order = np.argsort(-durations, kind="stable")
    texts: dict[int, str] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = [int(i) for i in order[b:b + batch_size]]
        waves = waves_of(dataset[i]["audio"] for i in idx)  # int16 PCM -> float32
        long_form = max(len(w) for w in waves) > CHUNK_SECONDS * fe.sampling_rate
        # Short form: every clip padded to the 30 s window (3000 frames), as Whisper was trained.
        feats = fe(waves, sampling_rate=fe.sampling_rate, return_tensors="pt", return_attention_mask=True,
                   device=device.type, **({"truncation": False, "padding": "longest"} if long_form else {}))
        kwargs = dict(generate_kwargs, return_timestamps=True) if long_form else generate_kwargs
        out = model.generate(feats.input_features.to(device, dtype), attention_mask=feats.attention_mask.to(device),
                             **kwargs)
        sequences = out["sequences"] if isinstance(out, dict) else out
        for i, text in zip(idx, processor.batch_decode(sequences, skip_special_tokens=True)):
            texts[i] = text
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return [texts[i] for i in range(len(dataset))], seconds


def baseline(cfg: DictConfig) -> dict:
    """`w2vbert-asr baseline`: score a Whisper checkpoint zero-shot on `eval.split`. -> {split: metrics}."""
    from .data import prepare_eval_split

    bcfg = cfg.baseline
    if int(bcfg.batch_size) < 1 or int(bcfg.num_beams) < 1 or int(bcfg.max_new_tokens) < 1:
        raise UsageError("baseline.batch_size, baseline.num_beams and baseline.max_new_tokens must be >= 1")
    results_dir = Path(bcfg.results_dir)
    device, dtype = resolve_device_dtype(str(bcfg.get("device") or "auto"), str(bcfg.dtype))
    model, processor = load_whisper(str(bcfg.name_or_path), device, dtype)
    if processor.feature_extractor.sampling_rate != cfg.data.sampling_rate:
        raise UsageError(f"{bcfg.name_or_path} expects {processor.feature_extractor.sampling_rate} Hz audio; "
                         f"set data.sampling_rate={processor.feature_extractor.sampling_rate}")
    available = _ensure_prompt_config(model, processor.tokenizer)
    multilingual = bool(model.generation_config.is_multilingual and available)
    language = whisper_language(bcfg.language, available if multilingual else None)
    if not multilingual and language != "en":
        raise UsageError(f"{bcfg.name_or_path} is an English-only Whisper checkpoint and cannot transcribe "
                         f"<|{language}|>; set baseline.name_or_path to a multilingual one "
                         "(e.g. openai/whisper-large-v3)")
    # The prompt and the new tokens share the decoder's positions (448 in released checkpoints).
    max_new_tokens = min(int(bcfg.max_new_tokens), model.config.max_target_positions - len(PROMPT_TOKENS))
    if max_new_tokens < int(bcfg.max_new_tokens):
        log.warning("baseline.max_new_tokens=%s lowered to %d: the decoder has %d positions", bcfg.max_new_tokens,
                    max_new_tokens, model.config.max_target_positions)
    generate_kwargs = {"num_beams": int(bcfg.num_beams), "max_new_tokens": max_new_tokens}
    if multilingual:  # English-only checkpoints (*.en) take no language or task tokens
        generate_kwargs.update(language=language, task=TASK)

    normalizer = Normalizer.from_config(cfg.text)
    split = str(cfg.eval.split)
    dataset = prepare_eval_split(cfg, split, normalizer, results_dir)
    log.info("whisper %s on %d clips of %s (language <|%s|>, %s, %s)", bcfg.name_or_path, len(dataset), split,
             language, device, dtype)
    recorder = _PromptRecorder(model.get_decoder())
    hyps, seconds = transcribe_dataset(model, processor, dataset, int(bcfg.batch_size), generate_kwargs, device, dtype)
    prompt = processor.tokenizer.convert_ids_to_tokens(recorder.ids or [])
    if multilingual and f"<|{language}|>" not in prompt:
        raise RuntimeError(f"Whisper was not prompted with <|{language}|> (decoder prompt {prompt}); "
                           "the checkpoint's generation config overrides the language")

    metrics, rows = score(dataset, hyps, normalizer)
    audio_s = metrics["audio_hours"] * 3600
    metrics.update(decode_seconds=seconds, rtf=seconds / audio_s, rtfx=audio_s / seconds,
                   decoding="greedy" if int(bcfg.num_beams) == 1 else f"beam{int(bcfg.num_beams)}")
    header = {"system": SYSTEM, "model": str(bcfg.name_or_path),
              "parameters": sum(p.numel() for p in model.parameters()), "device": _device_name(device),
              "batch_size": int(bcfg.batch_size), "dtype": str(dtype).removeprefix("torch."),
              "num_beams": int(bcfg.num_beams), "max_new_tokens": max_new_tokens,
              "language": f"<|{language}|>", "task": TASK, "decoder_prompt": prompt}
    write_results(results_dir, split, metrics, rows, header)
    print_table({split: metrics})
    print(f"wrote {results_dir / 'metrics.json'} and {results_dir / 'predictions' / (split + '.jsonl')}")
    return {split: metrics}
