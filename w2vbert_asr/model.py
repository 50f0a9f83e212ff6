"""The CTC model: a pretrained encoder (or a tiny copy built from config) plus a CTC head.

`model.family` picks the family (families.py): W2v-BERT 2.0 (here) or omniASR-CTC (omniasr.py holds its own
part). The base checkpoint's config is a trap for fine-tuning (SpecAugment off, CTC loss "sum", vocab_size
unset, no adapter); `config_overrides` in conf/model/*.yaml replaces those values on every load.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import Wav2Vec2BertConfig

if TYPE_CHECKING:
    from transformers import Wav2Vec2BertForCTC

from . import UsageError

log = logging.getLogger(__name__)


def _overrides(model_cfg: DictConfig) -> dict:
    return OmegaConf.to_container(model_cfg.config_overrides, resolve=True) if model_cfg.config_overrides else {}


def architecture_config(model_cfg: DictConfig):
    """The architecture without touching the Hub: the tiny config, or the defaults (which are the
    600M W2v-BERT 2.0 shape, or omniASR-CTC's convolutions) with the overrides. Used to compute CTC frame counts
    during prepare."""
    if model_cfg.family == "omniasr_ctc":
        from . import omniasr

        return omniasr.architecture_config(model_cfg, _overrides(model_cfg))
    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True) if model_cfg.architecture else {}
    return Wav2Vec2BertConfig(**arch, **_overrides(model_cfg))


def build_model(model_cfg: DictConfig, tokenizer):
    """Load the pretrained encoder (Hub id or local dir) or build the tiny one; new CTC head sized to the vocab
    (omniASR-CTC may keep its own: omniasr.build_model)."""
    if model_cfg.family == "omniasr_ctc":
        from . import omniasr

        model = omniasr.build_model(model_cfg, tokenizer, _overrides(model_cfg))
    else:
        model = _build_w2v_bert(model_cfg, tokenizer)
    trainable, total = count_parameters(model)
    print(f"parameters: {trainable:,} trainable / {total:,} total ({100 * trainable / total:.1f}%)")
    if model_cfg.gradient_checkpointing:
        # Recompute each layer's activations in the backward: slower, but the 600M model fits a 16 GB card.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _build_w2v_bert(model_cfg: DictConfig, tokenizer) -> Wav2Vec2BertForCTC:
    # The modeling classes are imported where used: `prepare` needs only the config (frame arithmetic),
    # and the modeling stack costs seconds of start-up.
    from transformers import Wav2Vec2BertForCTC

    ctc = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    attn = model_cfg.attn_implementation
    if model_cfg.architecture:
        config = architecture_config(model_cfg)
        for k, v in ctc.items():
            setattr(config, k, v)
        model = Wav2Vec2BertForCTC._from_config(config, attn_implementation=attn)
    else:
        if not model_cfg.name_or_path:
            raise ValueError("set model.name_or_path (Hub id or local dir) or model.architecture")
        # The base checkpoint has no CTC head, and a CTC checkpoint of another language has one of the
        # wrong size: either way the head is newly initialised for this vocabulary (listed in the log).
        model = Wav2Vec2BertForCTC.from_pretrained(
            model_cfg.name_or_path, attn_implementation=attn, use_safetensors=True, ignore_mismatched_sizes=True,
            **_overrides(model_cfg), **ctc
        )
    configure_trainable(model, model_cfg)
    attach_padding_hooks(model)
    return use_fast_relative_key_bias(model, bool(model_cfg.fast_position_bias))


def require_pretrained(model_cfg: DictConfig, command: str) -> None:
    """Before any data is prepared: the pretrained checkpoint is cached or reachable (weights.require), unless the
    model is built from model.architecture."""
    from .weights import hub_ids, require

    require(hub_ids([] if model_cfg.architecture else [model_cfg.name_or_path]), command)


def load_weights(model: Wav2Vec2BertForCTC, model_dir) -> None:
    """Overwrite `model`'s weights with a saved model's (same architecture and vocabulary, safetensors)."""
    from safetensors.torch import load_file

    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"train.init_from={model_dir}: no model.safetensors there; give a trained model dir")
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise UsageError(f"train.init_from={model_dir} does not fit this model (other architecture or "
                         f"vocabulary?): {str(e).splitlines()[0]} ...") from e
    log.info("initialised from %s", path)


def configure_trainable(model: Wav2Vec2BertForCTC, model_cfg: DictConfig) -> None:
    """Freeze what the recipe asks (W2v-BERT has no CNN: its front end is the feature projection)."""
    w2v = model.wav2vec2_bert
    if model_cfg.train_head_only:
        for p in model.parameters():
            p.requires_grad = False
        for module in (model.lm_head, w2v.adapter):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad = True
    n_frozen = int(model_cfg.freeze_encoder_layers)
    frozen = [w2v.feature_projection] if model_cfg.freeze_feature_encoder else []
    if n_frozen:
        frozen += [w2v.feature_projection, *w2v.encoder.layers[:n_frozen]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad = False


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """-> (trainable, total)"""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def ctc_greedy_ids(logits: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """logits (B, T, V), lengths (B,) valid frames -> argmax ids per utterance, padding frames removed.
    The tokenizer's decode collapses repeats and drops blanks."""
    ids = logits.argmax(dim=-1).cpu()
    return [row[:n].tolist() for row, n in zip(ids, lengths.cpu().tolist())]


def check_model_dir(model_dir, command: str = "") -> Path:
    """`model_dir` as a Path when it is a saved model folder (it holds config.json), else one UsageError
    saying what to pass. command: the command's name, for the message."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        why = "it does not exist" if not model_dir.exists() else "no config.json"
        raise UsageError(f"{model_dir} is not a model folder ({why}); train first, or pass model=<trained model dir>"
                         + (f" to `w2vbert-asr {command}`" if command else ""))
    return model_dir


# --------------------------------------------------------------------------------------------- padding
def attach_padding_hooks(model: Wav2Vec2BertForCTC) -> Wav2Vec2BertForCTC:
    """Zero the padded frames right before each adapter convolution, so a clip's logits do not depend on
    what it is batched with.

    Why: each adapter layer convolves (kernel 3, stride 2) the LayerNorm of the encoder output, and the
    LayerNorm of a padded frame is not zero, so the last frame of a shorter clip reads padding; the
    adapter's self-attention then spreads that frame to all others. transformers masks padding in the
    Conformer's convolutions but not here.

    "Padded" means beyond the clip's own frames: a stacked frame that holds at least one real fbank
    frame is the clip's own (the extractor fills padding with its padding_value, 0.0), even when it is
    half padding and its mask bit is 0. So a clip alone (no batch padding) gives exactly what it gives
    in plain transformers, and in a batch it gives the same again.

    Idempotent; the hooks are not saved, so saved models stay plain transformers folders (our loaders
    call this again). Traceable: export keeps the zeroing in the graph.
    """
    w2v = model.wav2vec2_bert if hasattr(model, "wav2vec2_bert") else model
    adapter = getattr(w2v, "adapter", None)
    if adapter is None or getattr(adapter, "_w2vbert_padding_hooks", False):
        return model
    lengths: dict[str, torch.Tensor | None] = {"in": None, "conv": None}

    def encoder_pre(module, args, kwargs):
        feats = args[0] if args else kwargs.get("input_features")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is None or feats is None:  # no mask: a single clip, nothing padded
            lengths["in"] = None
            return
        half = feats.shape[-1] // 2  # the first fbank frame of each stacked pair
        own = (feats[..., :half] != 0).any(-1).sum(-1)
        lengths["in"] = torch.maximum(own, mask.sum(-1))  # a constant (all-zero) clip keeps its mask length

    def layer_pre(module, args, kwargs):
        lengths["conv"] = lengths["in"]
        if lengths["in"] is not None:  # this layer's output frames, as its convolutions count them
            k, s, p = module.residual_conv.kernel_size[0], module.residual_conv.stride[0], module.residual_conv.padding[0]
            lengths["in"] = torch.div(lengths["in"] + 2 * p - k, s, rounding_mode="floor") + 1

    def conv_pre(module, args):
        valid = lengths["conv"]
        if valid is None:
            return None
        x = args[0]  # (B, C, T)
        keep = torch.arange(x.shape[-1], device=x.device)[None, :] < valid.to(x.device)[:, None]
        return (x * keep[:, None, :].to(x.dtype),)

    w2v.register_forward_pre_hook(encoder_pre, with_kwargs=True)
    for layer in adapter.layers:
        layer.register_forward_pre_hook(layer_pre, with_kwargs=True)
        layer.residual_conv.register_forward_pre_hook(conv_pre)
        layer.self_attn_conv.register_forward_pre_hook(conv_pre)
    adapter._w2vbert_padding_hooks = True
    return model


# --------------------------------------------------------------------------------------------- position bias
def relative_key_bias(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor):
    """transformers' `_apply_relative_key_position_encoding` (W2v-BERT 2.0's position bias), same values,
    other order: query (B, H, Lq, D), key (B, H, Lk, D) -> (query, bias (B, H, Lq, Lk)).

    transformers looks up a D-vector for every (query, key) pair's clamped distance, an (Lq, Lk, D) tensor,
    and contracts every query with it: most of a long chunk's CPU time. Only left + right + 1 distances
    exist (73 for W2v-BERT 2.0), so each query meets those once (a MatMul, (B, H, Lq, 73)) and each (q, k)
    pair picks its column (a gather; under ONNX export one flat index_select, a single ONNX Gather).
    Training uses it too (`model.fast_position_bias`). Measurements: benchmarks/README.md.
    """
    left, right = int(module.left_max_position_embeddings), int(module.right_max_position_embeddings)
    width = left + right + 1
    q_len, k_len = query.shape[2], key.shape[2]
    # Scaled here, on the small table: the gather copies values, so this equals scaling the (B, H, Lq, Lk)
    # bias bit for bit, without a second bias-sized tensor.
    table = torch.matmul(query, module.distance_embedding.weight.to(query.dtype).t()) * module.scaling
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        # One flat index_select exports to a single ONNX Gather, which onnxruntime runs fast.
        rows = torch.arange(q_len, device=query.device)[:, None]
        column = (torch.arange(k_len, device=query.device)[None, :] - rows).clamp(-left, right) + left
        flat = (column + rows * width).reshape(-1)  # (Lq * Lk,) into (Lq * width)
        return query, torch.index_select(table.flatten(2), 2, flat).unflatten(2, (q_len, k_len))
    # In eager torch, gather with the index broadcast over (B, H) is an order of magnitude faster than that
    # index_select (benchmarks/README.md, long audio); same values.
    column = _distance_columns(q_len, k_len, left, right, query.device)
    return query, torch.gather(table, 3, column.expand(*table.shape[:2], q_len, k_len))


@functools.lru_cache(maxsize=8)
def _distance_columns(q_len: int, k_len: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    """(Lq, Lk) int64: the clamped distance's column for every (query, key) pair. Cached: a long file's chunks
    share one length, and rebuilding it in every layer is a visible share of a long chunk's forward."""
    rows = torch.arange(q_len, device=device)[:, None]
    return (torch.arange(k_len, device=device)[None, :] - rows).clamp(-left, right) + left


def use_fast_relative_key_bias(model: torch.nn.Module, enable: bool = True) -> torch.nn.Module:
    """Make THIS model's attention use `relative_key_bias` (or transformers' own again with enable=False).

    transformers calls a module-level function, so a dispatcher is installed there once; it picks ours
    only for attention modules marked here. Other models in the same process (a model being trained, a
    reference run) keep transformers' arithmetic, so no result depends on what else was loaded."""
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as w2v_bert

    original = getattr(w2v_bert, "_apply_relative_key_position_encoding", None)
    if original is None:  # a transformers without this function: nothing to replace
        return model
    if not getattr(original, "_w2vbert_dispatch", False):
        def dispatch(module, query, key):
            if getattr(module, "_w2vbert_fast_bias", False):
                return relative_key_bias(module, query, key)
            return original(module, query, key)

        dispatch._w2vbert_dispatch = True
        dispatch.transformers = original  # for the equivalence test
        w2v_bert._apply_relative_key_position_encoding = dispatch
    for module in model.modules():
        if hasattr(module, "distance_embedding"):
            module._w2vbert_fast_bias = enable
    return model


def load_ctc_model(model_dir, device: torch.device | str = "cpu", family=None):
    """A saved CTC model of any family (safetensors only), in eval mode on `device`. W2v-BERT gets its padding
    hooks, and attention uses `relative_key_bias` (same values, a fraction of the time on long chunks)."""
    from .families import family_of_model

    family = family or family_of_model(model_dir)
    model = family.classes()[0].from_pretrained(str(model_dir), use_safetensors=True)
    if family.name == "w2v_bert":
        model = use_fast_relative_key_bias(attach_padding_hooks(model))
    return model.to(device).eval()

