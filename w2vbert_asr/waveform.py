"""Batched inputs of the models that read the waveform itself (omniASR-CTC, MMS), on CPU or GPU.

omniASR-CTC (`OmniASRFeatureExtractor`) and MMS (`Wav2Vec2FeatureExtractor` with `do_normalize`) take the raw
16 kHz samples, each clip scaled to zero mean and unit variance over its own samples (the biased variance, eps
inside the square root: 1e-5 for omniASR, 1e-7 for MMS) and padded with `padding_value`; omniASR wants a channel
axis, `(B, 1, N)`, and names its sample mask `padding_mask`, MMS `attention_mask`. `WaveNormalizer` does that
on the batch the toolkit already holds (zero-padded waves and their lengths) in a few tensor ops on the device,
instead of the extractor's list in, padded batch out; tests/test_omniasr.py checks it against the extractors.

`featurizer_for(feature_extractor)` gives the right batched featurizer for a processor's extractor: this
module's for the waveform models, `features.BatchFeatureExtractor` (the fbank) for W2v-BERT 2.0. Each has
`model_inputs(waves, lengths)`: the keyword arguments of the model's forward.

Usage:
    from w2vbert_asr.waveform import featurizer_for
    featurizer = featurizer_for(processor.feature_extractor).to(device)
    logits = model(**featurizer.model_inputs(waves, lengths)).logits     # waves (B, N), lengths (B,)
"""

from __future__ import annotations

import torch

from .geometry import SAMPLING_RATE

# The extractors' epsilons (added to the variance inside the square root); neither is saved in their config.
OMNIASR_EPS = 1e-5  # transformers' feature_extraction_omniasr.EPSILON, as the original layer_norm
WAV2VEC2_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


class WaveNormalizer(torch.nn.Module):
    """(waves (B, N) zero-padded, lengths (B,)) -> (values (B, N) or (B, 1, N), sample mask (B, N) long).

    eps: added to each clip's variance; normalize: False passes the samples through (an extractor with
    do_normalize off); channel: add the channel axis omniASR's convolutions read; mask_name: the model's name
    for the sample mask."""

    def __init__(self, eps: float, padding_value: float = 0.0, normalize: bool = True, channel: bool = False,
                 mask_name: str = "attention_mask", sampling_rate: int = SAMPLING_RATE):
        super().__init__()
        self.eps, self.padding_value = float(eps), float(padding_value)
        self.normalize, self.channel, self.mask_name = bool(normalize), bool(channel), str(mask_name)
        self.sampling_rate = int(sampling_rate)

    @classmethod
    def from_hf(cls, feature_extractor) -> WaveNormalizer:
        """From an `OmniASRFeatureExtractor` or a `Wav2Vec2FeatureExtractor` (e.g. `processor.feature_extractor`)."""
        omniasr = type(feature_extractor).__name__ == "OmniASRFeatureExtractor"
        return cls(eps=OMNIASR_EPS if omniasr else WAV2VEC2_EPS, padding_value=feature_extractor.padding_value,
                   normalize=feature_extractor.do_normalize, channel=omniasr,
                   mask_name="padding_mask" if omniasr else "attention_mask",
                   sampling_rate=feature_extractor.sampling_rate)

    @torch.no_grad()
    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if waves.dim() != 2:
            raise ValueError(f"waves must be (B, N), got shape {tuple(waves.shape)}; use pad_waves() for a list")
        lengths = torch.as_tensor(lengths, device=waves.device)
        mask = torch.arange(waves.shape[1], device=waves.device)[None, :] < lengths[:, None]
        values = waves.detach().to(torch.float32)
        if self.normalize:  # the extractor's order of operations, so the float32 rounding is the same
            count = mask.sum(-1, keepdim=True)
            masked = values * mask
            mean = masked.sum(-1, keepdim=True) / count
            variance = ((masked - mean) ** 2 * mask).sum(-1, keepdim=True) / count
            values = (values - mean) / torch.sqrt(variance + self.eps)
        values = values.masked_fill(~mask, self.padding_value)
        return (values[:, None, :] if self.channel else values), mask.long()

    def model_inputs(self, waves: torch.Tensor, lengths: torch.Tensor,
                     keys: list | None = None) -> dict[str, torch.Tensor]:
        """keys: BatchFeatureExtractor's cache keys; normalising the samples costs too little to cache."""
        values, mask = self(waves, lengths)
        return {"input_values": values, self.mask_name: mask}


def featurizer_for(feature_extractor, **kwargs):
    """The batched featurizer of a processor's feature extractor: `WaveNormalizer` for the waveform models,
    `BatchFeatureExtractor` (kwargs: its frames_per_chunk, cpu_kernels) for W2v-BERT 2.0's fbank."""
    if type(feature_extractor).__name__ in ("OmniASRFeatureExtractor", "Wav2Vec2FeatureExtractor"):
        return WaveNormalizer.from_hf(feature_extractor)
    from .features import BatchFeatureExtractor

    return BatchFeatureExtractor.from_hf(feature_extractor, **kwargs)
