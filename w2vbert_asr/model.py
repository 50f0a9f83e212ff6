"""The CTC model: the pretrained W2v-BERT 2.0 encoder (or a tiny copy built from config) plus a CTC head.

The base checkpoint's config is a trap for fine-tuning (SpecAugment off, CTC loss "sum", vocab_size
unset, no adapter); `config_overrides` in conf/model/*.yaml replaces those values on every load.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForCTC

log = logging.getLogger(__name__)


def _overrides(model_cfg: DictConfig) -> dict:
    return OmegaConf.to_container(model_cfg.config_overrides, resolve=True) if model_cfg.config_overrides else {}


def architecture_config(model_cfg: DictConfig) -> Wav2Vec2BertConfig:
    """The architecture without touching the Hub: the tiny config, or the defaults (which are the
    600M W2v-BERT 2.0 shape) with the overrides. Used to compute CTC frame counts during prepare."""
    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True) if model_cfg.get("architecture") else {}
    return Wav2Vec2BertConfig(**arch, **_overrides(model_cfg))


def build_model(model_cfg: DictConfig, tokenizer) -> Wav2Vec2BertForCTC:
    """Load the pretrained encoder (Hub id or local dir) or build the tiny one; new CTC head sized to the vocab."""
    ctc = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    attn = model_cfg.get("attn_implementation") or "eager"
    if model_cfg.get("architecture"):
        config = architecture_config(model_cfg)
        for k, v in ctc.items():
            setattr(config, k, v)
        model = Wav2Vec2BertForCTC._from_config(config, attn_implementation=attn)
    else:
        if not model_cfg.get("name_or_path"):
            raise ValueError("set model.name_or_path (Hub id or local dir) or model.architecture")
        # The base checkpoint has no CTC head, and a CTC checkpoint of another language has one of the
        # wrong size: either way the head is newly initialised for this vocabulary (listed in the log).
        model = Wav2Vec2BertForCTC.from_pretrained(
            model_cfg.name_or_path, attn_implementation=attn, use_safetensors=True, ignore_mismatched_sizes=True,
            **_overrides(model_cfg), **ctc
        )
    configure_trainable(model, model_cfg)
    if model_cfg.get("gradient_checkpointing"):
        # Recompute each layer's activations in the backward: ~30% slower, but the 600M model fits 16 GB.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def configure_trainable(model: Wav2Vec2BertForCTC, model_cfg: DictConfig) -> None:
    """Freeze what the recipe asks (Wav2Vec2BertForCTC has no freeze_feature_encoder: it has no CNN)."""
    w2v = model.wav2vec2_bert
    if model_cfg.get("train_head_only"):
        for p in model.parameters():
            p.requires_grad = False
        for module in (model.lm_head, w2v.adapter):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad = True
    n_frozen = int(model_cfg.get("freeze_encoder_layers") or 0)
    if n_frozen:
        for module in (w2v.feature_projection, *w2v.encoder.layers[:n_frozen]):
            for p in module.parameters():
                p.requires_grad = False
    trainable, total = count_parameters(model)
    print(f"parameters: {trainable:,} trainable / {total:,} total ({100 * trainable / total:.1f}%)")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """-> (trainable, total)"""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def ctc_greedy_ids(logits: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """logits (B, T, V), lengths (B,) valid frames -> argmax ids per utterance, padding frames removed.
    The tokenizer's decode collapses repeats and drops blanks."""
    ids = logits.argmax(dim=-1).cpu()
    return [row[:n].tolist() for row, n in zip(ids, lengths.cpu().tolist())]
