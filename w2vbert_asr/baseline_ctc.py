"""The CTC part of `w2vbert-asr baseline` (baseline.py holds the shared path): omniASR-CTC and MMS zero-shot.

Both are scored exactly as `evaluate` scores our own models: batched by duration (eval.max_batch_seconds,
baseline.batch_size clips at most), each clip's own frames only (geometry.FrameGeometry), greedy CTC decoding
with the checkpoint's tokenizer. omniASR-CTC takes no language: it transcribes whatever it hears. MMS loads the
adapter and vocabulary of the language (`languages.mms_language`: the recipe's code as ISO 639-3, checked
against the checkpoint's languages); adapters are read as safetensors only.
"""

from __future__ import annotations

import torch

from . import UsageError
from .evaluate import decode_dataset, greedy_decoder
from .families import FAMILIES, blank_id
from .languages import mms_language
from .waveform import featurizer_for


def align_blank(tokenizer, config) -> None:
    """Make the tokenizer's pad token the model's CTC blank, so that decoding drops blanks (transformers' CTC
    tokenizers drop the pad token): omniASR configs name the blank (`blank_token_id`) apart from the pad."""
    blank = blank_id(config)
    if tokenizer.pad_token_id != blank:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(blank)


def load(name_or_path: str, device: torch.device, dtype: torch.dtype, bcfg):
    family = FAMILIES[str(bcfg.family)]
    model_class, _, processor_class = family.classes()
    try:
        processor = processor_class.from_pretrained(name_or_path)
        model = model_class.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load a {family.model_class} checkpoint from {name_or_path!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}). Set baseline.name_or_path to a Hub id or "
                         "a local folder holding config.json, model.safetensors and the processor files") from e
    if model.config.model_type != family.model_type:
        raise UsageError(f"{name_or_path} is a {model.config.model_type!r} model, not {family.model_type!r}; set "
                         f"baseline.name_or_path to a {family.name} checkpoint or baseline=<its family>")
    align_blank(processor.tokenizer, model.config)
    return model.to(device).eval(), processor


def language(code: str, model, processor, name_or_path: str) -> dict:
    """MMS: the adapter and vocabulary of `code`; omniASR-CTC has no language input."""
    if model.config.model_type != FAMILIES["mms"].model_type:
        return {"code": None}
    found = mms_language(code, list(processor.tokenizer.vocab), name_or_path)
    try:
        model.load_adapter(found, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"{name_or_path} has no safetensors adapter for {found!r} ({str(e).splitlines()[0]})") from e
    processor.tokenizer.set_target_lang(found)
    align_blank(processor.tokenizer, model.config)
    return {"code": found}


class _Cast:
    """A featurizer whose float inputs are cast to the model's dtype (a float16 model on a GPU)."""

    def __init__(self, featurizer, dtype: torch.dtype):
        self.featurizer, self.dtype = featurizer, dtype

    def model_inputs(self, waves, lengths) -> dict:
        return {k: v.to(self.dtype) if v.is_floating_point() else v
                for k, v in self.featurizer.model_inputs(waves, lengths).items()}


def transcribe(model, processor, dataset, cfg, device: torch.device, dtype: torch.dtype,
               lang: dict) -> tuple[list[str], float, dict]:
    """-> (texts in dataset order, wall seconds, metrics.json header entries)."""
    featurizer = _Cast(featurizer_for(processor.feature_extractor).to(device), dtype)
    hyps, seconds = decode_dataset(model, dataset, featurizer, greedy_decoder(processor.tokenizer), device,
                                   float(cfg.eval.max_batch_seconds), int(cfg.baseline.batch_size))
    header = {"max_batch_seconds": float(cfg.eval.max_batch_seconds)}
    if lang["code"]:
        header["language"] = lang["code"]
    return hyps, seconds, header
