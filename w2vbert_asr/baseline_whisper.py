"""The Whisper part of `w2vbert-asr baseline` (baseline.py holds the shared path): load a checkpoint, force
its language token, decode with `generate` (long-form past 30 s).

The language is forced (never detected) from `baseline.language` (default: the recipe's `lang`), with
task = transcribe and no timestamps. Any Whisper checkpoint works: a Hub id or a local folder with
safetensors weights, fine-tuned ones included; code from the Hub is never run. metrics.json records the
decoder prompt that generation really fed (language, task, no-timestamps).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import torch
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from . import UsageError
from .audio import waves_of

log = logging.getLogger(__name__)

SYSTEM = "whisper"
TASK = "transcribe"
CHUNK_SECONDS = 30.0  # Whisper's fixed input window; longer clips need sequential long-form decoding
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


# --------------------------------------------------------------------------------------------- the part
def load(name_or_path: str, device: torch.device, dtype: torch.dtype, bcfg):
    """-> (WhisperForConditionalGeneration, WhisperProcessor); bcfg: what the other families read."""
    return load_whisper(name_or_path, device, dtype)


def language(code: str, model, processor, name_or_path: str) -> dict:
    """Check that the checkpoint can be forced to `code` -> the generation settings (language, task) and what
    metrics.json shows. An English-only checkpoint (*.en) takes no language or task token."""
    available = _ensure_prompt_config(model, processor.tokenizer)
    multilingual = bool(model.generation_config.is_multilingual and available)
    found = whisper_language(code, available if multilingual else None)
    if not multilingual and found != "en":
        raise UsageError(f"{name_or_path} is an English-only Whisper checkpoint and cannot transcribe "
                         f"<|{found}|>; set baseline.name_or_path to a multilingual one "
                         "(e.g. openai/whisper-large-v3)")
    return {"code": found, "multilingual": multilingual}


def transcribe(model, processor, dataset, cfg, device: torch.device, dtype: torch.dtype,
               lang: dict) -> tuple[list[str], float, dict]:
    """-> (texts in dataset order, wall seconds, metrics.json header entries)."""
    bcfg = cfg.baseline
    # The prompt and the new tokens share the decoder's positions (448 in released checkpoints).
    max_new_tokens = min(int(bcfg.max_new_tokens), model.config.max_target_positions - len(PROMPT_TOKENS))
    if max_new_tokens < int(bcfg.max_new_tokens):
        log.warning("baseline.max_new_tokens=%s lowered to %d: the decoder has %d positions", bcfg.max_new_tokens,
                    max_new_tokens, model.config.max_target_positions)
    generate_kwargs = {"num_beams": int(bcfg.num_beams), "max_new_tokens": max_new_tokens}
    if lang["multilingual"]:
        generate_kwargs.update(language=lang["code"], task=TASK)
    recorder = _PromptRecorder(model.get_decoder())
    hyps, seconds = transcribe_dataset(model, processor, dataset, int(bcfg.batch_size), generate_kwargs, device, dtype)
    prompt = processor.tokenizer.convert_ids_to_tokens(recorder.ids or [])
    if lang["multilingual"] and f"<|{lang['code']}|>" not in prompt:
        raise RuntimeError(f"Whisper was not prompted with <|{lang['code']}|> (decoder prompt {prompt}); "
                           "the checkpoint's generation config overrides the language")
    header = {"num_beams": int(bcfg.num_beams), "max_new_tokens": max_new_tokens,
              "language": f"<|{lang['code']}|>", "task": TASK, "decoder_prompt": prompt}
    return hyps, seconds, header
