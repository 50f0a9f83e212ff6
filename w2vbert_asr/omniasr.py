"""The omniASR-CTC family's own part: its config, model, trainable parts, time masking, vocabulary and ONNX graph.

`OmniASRForCTC` (transformers' port of Omnilingual ASR's CTC models) reads the raw 16 kHz waveform, each clip
normalised to zero mean and unit variance (waveform.WaveNormalizer), through seven strided convolutions
(400 samples every 320, 20 ms frames; geometry.FrameGeometry.of_convolutions), a convolutional position
embedding and a Transformer. A clip's logits on its own frames do not depend on the batch it is in
(tests/test_omniasr.py checks it, as tests/test_padding.py does for W2v-BERT).

Vocabulary (`model.vocab`): `auto` keeps the checkpoint's tokenizer and CTC head when the tokenizer writes every
training transcript back exactly (every character covered); otherwise, with `new`, or for a model built from
`model.architecture`, the head is new and sized to prepare's character vocabulary, with [PAD] as the blank. The
choice and the coverage are printed and written to <output_dir>/vocabulary.json; the processor the model is
trained and saved with goes to <output_dir>/processor_omniasr_ctc/ (prepare's processor/ stays W2v-BERT's).

SpecAugment: transformers' OmniASRForCTC has none. With `mask_time_prob` > 0 in model.config_overrides (saved
in config.json, read only here) training replaces time spans of the convolutions' output with zeros, the spans
drawn as transformers' Wav2Vec2 draws them, within each clip's own frames.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import UsageError
from .geometry import FrameGeometry

PROCESSOR_DIR = "processor_omniasr_ctc"
VOCAB_REPORT = "vocabulary.json"
CHAR_TOKENIZER = "Wav2Vec2CTCTokenizer"  # prepare's character tokenizer: a model with it has a new head


# --------------------------------------------------------------------------------------------- config
def _audio_fields() -> set[str]:
    from transformers.models.omniasr.configuration_omniasr import OmniASRAudioConfig

    return set(OmniASRAudioConfig().to_dict())


def apply_overrides(config, overrides: dict):
    """Set each override on the config that has it: the encoder's (`audio_config`: dropouts, layerdrop ...) or
    the CTC model's (loss reduction, `mask_time_prob` ...). -> config"""
    audio = _audio_fields()
    for key, value in overrides.items():
        setattr(config.audio_config if key in audio else config, key, value)
    return config


def architecture_config(model_cfg: DictConfig, overrides: dict):
    """`OmniASRCTCConfig` from model.architecture (the encoder under `audio_config`), or the defaults: the
    300M/1B checkpoints' convolutions, which is all that prepare's frame arithmetic reads."""
    from transformers import OmniASRCTCConfig

    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True) if model_cfg.architecture else {}
    config = OmniASRCTCConfig(audio_config=arch.pop("audio_config", None))
    return apply_overrides(apply_overrides(config, arch), overrides)  # other keys: either config's, as overrides


def build_model(model_cfg: DictConfig, tokenizer, overrides: dict):
    """A pretrained checkpoint (keeping its head when `tokenizer` is its own, else a new head sized to the
    character vocabulary) or, with model.architecture, a randomly initialised model."""
    from transformers import AutoConfig, OmniASRForCTC

    keep = type(tokenizer).__name__ != CHAR_TOKENIZER
    attn = model_cfg.attn_implementation
    if model_cfg.architecture:
        config = architecture_config(model_cfg, overrides)
    else:
        config = apply_overrides(AutoConfig.from_pretrained(model_cfg.name_or_path), overrides)
    if keep and len(tokenizer) > config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens, the head of {model_cfg.name_or_path} "
                         f"{config.vocab_size}: set model.vocab=new")
    if not keep:  # blank = [PAD] = 0, as in the W2v-BERT vocabulary
        config.vocab_size = len(tokenizer)
        config.pad_token_id = config.blank_token_id = tokenizer.pad_token_id
    if model_cfg.architecture:
        model = init_from_scratch(OmniASRForCTC._from_config(config, attn_implementation=attn))
    else:
        model = OmniASRForCTC.from_pretrained(model_cfg.name_or_path, config=config, attn_implementation=attn,
                                              use_safetensors=True, ignore_mismatched_sizes=not keep)
    configure_trainable(model, model_cfg)
    return attach_time_masking(model)


@torch.no_grad()
def init_from_scratch(model):
    """Redraw the convolutions of a randomly initialised model. transformers' generic init gives every weight
    N(0, 0.02), under which the waveform convolutions and the position convolution start far from unit gain,
    and the tiny model leaves CTC's all-blank plateau later. Feature convolutions: Kaiming normal (as wav2vec
    2.0's); position convolution: N(0, 2 / sqrt(fan_in)), fan_in = kernel x input channels per group; biases
    zero. -> model"""
    import math

    tower = model.model.audio_tower
    for layer in tower.subsampling.conv_layers:
        torch.nn.init.kaiming_normal_(layer.conv.weight)
        if layer.conv.bias is not None:
            torch.nn.init.zeros_(layer.conv.bias)
    position = tower.encode_positions.conv
    fan_in = position.kernel_size[0] * position.in_channels // position.groups
    torch.nn.init.normal_(position.weight, mean=0.0, std=2 * math.sqrt(1 / fan_in))
    torch.nn.init.zeros_(position.bias)
    return model


def configure_trainable(model, model_cfg: DictConfig) -> None:
    """train_head_only: the CTC head alone; freeze_feature_encoder: the convolutions (as wav2vec2 fine-tuning
    does); freeze_encoder_layers=N: the convolutions, the position embedding and the first N layers."""
    tower = model.model.audio_tower
    frozen = []
    if model_cfg.train_head_only:
        frozen.append(model.model)
    if model_cfg.freeze_feature_encoder:
        frozen.append(tower.subsampling)
    if int(model_cfg.freeze_encoder_layers):
        frozen += [tower.subsampling, tower.encode_positions, *tower.layers[:int(model_cfg.freeze_encoder_layers)]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad = False


# --------------------------------------------------------------------------------------------- time masking
def attach_time_masking(model):
    """SpecAugment's time masks on the convolutions' output while training, when config.mask_time_prob > 0
    (spans of config.mask_time_length frames, at least config.mask_time_min_masks, within each clip's frames).
    Idempotent; not saved (load_ctc_model's models are for inference)."""
    tower = model.model.audio_tower
    if getattr(tower, "_w2vbert_time_masking", False):
        return model
    geometry = FrameGeometry.of(model.config)
    frames: dict[str, torch.Tensor | None] = {"valid": None}

    def tower_pre(module, args, kwargs):
        mask = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
        frames["valid"] = None if mask is None else geometry.output_frames(mask.sum(-1))

    def subsampling_post(module, args, output):
        prob = float(getattr(model.config, "mask_time_prob", 0.0) or 0.0)
        if not (module.training and prob > 0):
            return None
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

        batch, steps = output.shape[:2]
        valid = frames["valid"]
        attention = None if valid is None else (torch.arange(steps)[None, :] < valid.cpu()[:, None]).long()
        spans = _compute_mask_indices((batch, steps), prob, int(getattr(model.config, "mask_time_length", 10)),
                                      attention_mask=attention,
                                      min_masks=int(getattr(model.config, "mask_time_min_masks", 2)))
        keep = ~torch.from_numpy(spans).to(output.device)
        return output * keep[..., None].to(output.dtype)

    tower.register_forward_pre_hook(tower_pre, with_kwargs=True)
    tower.subsampling.register_forward_hook(subsampling_post)
    tower._w2vbert_time_masking = True
    return model


# --------------------------------------------------------------------------------------------- vocabulary
def coverage(tokenizer, texts: list[str]) -> dict:
    """How much of the (normalised) training text `tokenizer` writes back exactly: per character (occurrences
    outside its characters, by character) and per transcript (encode -> decode round trips that differ)."""
    from collections import Counter

    from .families import emittable_chars

    known = emittable_chars(tokenizer)
    counts = Counter(c for t in texts for c in t if c != " ")
    missing = {c: n for c, n in counts.most_common() if c not in known}
    total = sum(counts.values())
    # Not grouped: a CTC tokenizer's decode collapses repeats, which CTC writes with a blank between them.
    failed = [t for t in texts if tokenizer.decode(tokenizer(t, add_special_tokens=False).input_ids,
                                                   skip_special_tokens=True, group_tokens=False).strip() != t]
    return {"characters": len(counts), "covered_characters": len(counts) - len(missing), "missing": missing,
            "rate": 1.0 - sum(missing.values()) / total if total else 1.0, "transcripts": len(texts),
            "round_trip_failures": len(failed), "example_failure": failed[0] if failed else None,
            "complete": not missing and not failed}


def processor_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / PROCESSOR_DIR


def write_processor(cfg, char_processor_dir: Path, texts: list[str]) -> dict:
    """Choose the vocabulary (module doc), save the processor into processor_dir(output_dir) with prepare's
    normalizer.json, write vocabulary.json and print the choice. -> the report."""
    from transformers import OmniASRCTCProcessor, OmniASRFeatureExtractor, Wav2Vec2CTCTokenizer

    from .storage import atomic_dir, atomic_write_json

    mcfg, out = cfg.model, Path(cfg.output_dir)
    pretrained = OmniASRCTCProcessor.from_pretrained(mcfg.name_or_path) if mcfg.name_or_path else None
    report = {"vocab": str(mcfg.vocab), "base": mcfg.name_or_path}
    if pretrained is not None and not mcfg.architecture:
        report["coverage"] = coverage(pretrained.tokenizer, texts)
    keep = mcfg.vocab == "auto" and report.get("coverage", {}).get("complete", False)
    if keep:
        processor = pretrained
    else:
        extractor = pretrained.feature_extractor if pretrained is not None else OmniASRFeatureExtractor()
        processor = OmniASRCTCProcessor(feature_extractor=extractor,
                                        tokenizer=Wav2Vec2CTCTokenizer.from_pretrained(str(char_processor_dir)))
    report["source"] = "pretrained" if keep else "new"
    report["size"] = len(processor.tokenizer)
    with atomic_dir(processor_dir(out)) as tmp:
        processor.save_pretrained(tmp)
        (tmp / "normalizer.json").write_bytes((char_processor_dir / "normalizer.json").read_bytes())
    atomic_write_json(out / VOCAB_REPORT, report)
    print(describe_vocabulary(report))
    return report


def describe_vocabulary(report: dict) -> str:
    cov = report.get("coverage")
    seen = ""
    if cov is not None:
        missing = f", missing {''.join(cov['missing'])!r}" if cov["missing"] else ""
        seen = (f"; the pretrained tokenizer covers {cov['covered_characters']} of {cov['characters']} training "
                f"characters ({100 * cov['rate']:.2f} % of occurrences{missing}) and writes back "
                f"{cov['transcripts'] - cov['round_trip_failures']} of {cov['transcripts']} transcripts")
    why = ("model.vocab=new" if report["vocab"] == "new" else "no pretrained tokenizer" if cov is None
           else "coverage complete" if report["source"] == "pretrained" else "coverage incomplete")
    kind = "the pretrained tokenizer and CTC head" if report["source"] == "pretrained" else "a new character CTC head"
    return f"vocabulary: {kind}, {report['size']} tokens ({why}){seen}"


# --------------------------------------------------------------------------------------------- ONNX
class OnnxGraph(torch.nn.Module):
    """(input_values (B, 1, N), padding_mask (B, N)) -> (logits (B, T, V), output_lengths (B,)), output_lengths
    being FrameGeometry.output_frames of each clip's samples (with non-negative operands, so that ONNX's
    truncating integer division equals floor division)."""

    input_names = ("input_values", "padding_mask")
    dynamic_axes = {"input_values": {0: "batch", 2: "samples"}, "padding_mask": {0: "batch", 1: "samples"},
                    "logits": {0: "batch", 1: "frames"}, "output_lengths": {0: "batch"}}

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.geometry = FrameGeometry.of(model.config)

    def forward(self, input_values: torch.Tensor, padding_mask: torch.Tensor):
        logits = self.model(input_values=input_values, padding_mask=padding_mask).logits
        hop = self.geometry.hop
        samples = padding_mask.sum(-1)
        frames = torch.div((samples - self.geometry.window + hop).clamp(min=0), hop, rounding_mode="floor")
        return logits, frames

    @staticmethod
    def dummy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        """A padded batch of two clips to trace with."""
        values = torch.randn(2, 1, 16_000)
        mask = torch.ones(2, 16_000, dtype=torch.long)
        values[1, :, 9_000:] = 0.0
        mask[1, 9_000:] = 0
        return values, mask
