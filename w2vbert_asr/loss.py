"""A training micro-batch and its CTC loss.

Usage:
    from w2vbert_asr.loss import Collator, ctc_loss
    batch = Collator(processor.tokenizer)(examples)      # waves (B, N), lengths (B,), labels (B, L), seconds
    loss = ctc_loss(logits, batch["lengths"], batch["labels"], model.config)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .audio import waves_of
from .families import blank_id
from .features import clip_key, pad_waves
from .geometry import FrameGeometry

IGNORE_INDEX = -100  # label padding that CTC loss ignores


class Collator:
    """Examples -> padded waves (B, N), lengths (B,), labels (B, L) with IGNORE_INDEX padding.

    Features are computed later on the training device by `BatchFeatureExtractor` (batched, GPU).
    keys: also give every clip's `clip_key` (batch["keys"]), for the extractor's log-mel cache."""

    def __init__(self, tokenizer, keys: bool = False):
        self.tokenizer = tokenizer
        self.keys = keys

    def __call__(self, examples: list[dict]) -> dict:
        waves, lengths = pad_waves(waves_of(e["audio"] for e in examples))  # int16 PCM -> float32
        # No special tokens: a CTC target is the transcript alone (a SentencePiece tokenizer may add </s>).
        ids = self.tokenizer([str(e["text"]) for e in examples], add_special_tokens=False).input_ids
        labels = torch.full((len(ids), max(map(len, ids))), IGNORE_INDEX, dtype=torch.long)
        for row, seq in zip(labels, ids):
            row[: len(seq)] = torch.tensor(seq)
        seconds = float(sum(float(e["duration"]) for e in examples))
        batch = {"waves": waves, "lengths": lengths, "labels": labels, "seconds": seconds}
        if self.keys:
            batch["keys"] = [clip_key(e["audio"]) for e in examples]
        return batch


# ------------------------------------------------------------------------------------------- the loss
def ctc_loss(logits: torch.Tensor, sample_lengths: torch.Tensor, labels: torch.Tensor, config,
             reduction: str | None = None, zero_infinity: bool | None = None) -> torch.Tensor:
    """logits (B, T, V), sample_lengths (B,) samples per clip, labels (B, L) padded with IGNORE_INDEX
    -> scalar CTC loss, as transformers' Wav2Vec2BertForCTC computes it (log-softmax in float32, blank =
    pad_token_id, or omniASR's blank_token_id: families.blank_id, `ctc_loss_reduction` ('mean' divides each
    clip's loss by its target length, then averages), `ctc_zero_infinity`), except for the input lengths:
    `FrameGeometry.output_frames`, every frame the clip alone yields (geometry.py). transformers counts the
    attention mask, which is one frame short for a clip with an odd number of fbank frames, so training would
    never see the frame that evaluation decodes.
    reduction / zero_infinity override the config's: `audit` takes each clip's -log p(labels | audio) with
    reduction="none", zero_infinity=False (an impossible alignment is +inf, not 0)."""
    if labels.max() >= config.vocab_size:
        raise ValueError(f"label id {int(labels.max())} >= vocab_size {config.vocab_size}")
    input_lengths = FrameGeometry.of(config).output_frames(torch.as_tensor(sample_lengths))
    input_lengths = input_lengths.to(logits.device).clamp(max=logits.shape[1])
    valid = labels >= 0
    targets = labels.masked_select(valid)
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)  # (T, B, V)
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's CTC needs all lengths equal to T
        return F.ctc_loss(log_probs, targets, input_lengths, valid.sum(-1), blank=blank_id(config),
                          reduction=reduction or config.ctc_loss_reduction,
                          zero_infinity=config.ctc_zero_infinity if zero_infinity is None else zero_infinity)
