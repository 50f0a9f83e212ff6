"""How a model turns audio samples into CTC output frames: one value from which every frame count derives.

W2v-BERT 2.0 reads 80-bin log-mel fbank frames (25 ms windows every 10 ms at 16 kHz), stacks pairs of
them into 160-dim encoder frames (20 ms), and its adapter's strided convolutions shorten that again
(one layer of stride 2: 40 ms per CTC frame). `FrameGeometry` holds those numbers as a value, so that
prepare's feasibility check, the training loss, evaluation, transcription and the ONNX export count
frames with one rule, and a model family with another geometry is another value, not other constants:
omniASR-CTC reads the waveform itself, 400 samples every 320 (20 ms) through its convolutions
(`FrameGeometry.of_convolutions`).

Usage:
    from w2vbert_asr.geometry import FrameGeometry
    geometry = FrameGeometry.of(model.config)     # from a saved or built model's config
    geometry.output_frames(16_000)                # CTC frames of a 1 s clip on its own (int or (B,) tensor)
    geometry.samples_per_frame                    # 640 for W2v-BERT 2.0 with its adapter
"""

from __future__ import annotations

from dataclasses import dataclass

# The W2v-BERT 2.0 feature extractor (transformers' SeamlessM4TFeatureExtractor) hard-codes these; they
# are not saved in the processor config, so they live here, and features.py imports them.
SAMPLING_RATE = 16_000  # Hz
FRAME_LENGTH = 400  # samples per fbank window: 25 ms
HOP_LENGTH = 160  # samples between fbank frames: 10 ms
FEATURE_STRIDE = 2  # fbank frames stacked into one 160-dim encoder frame (the extractor's `stride`)


@dataclass(frozen=True)
class FrameGeometry:
    """Samples -> frames: a window of `window` samples every `hop`, `stack` frames stacked into one (the
    last stack padded), then `adapter_layers` convolutions of `adapter_kernel` and `adapter_stride`
    (padding stride // 2, as transformers' adapter)."""

    sample_rate: int = SAMPLING_RATE
    window: int = FRAME_LENGTH
    hop: int = HOP_LENGTH
    stack: int = FEATURE_STRIDE
    adapter_layers: int = 0
    adapter_kernel: int = 3
    adapter_stride: int = 2

    @classmethod
    def of(cls, model_config) -> FrameGeometry:
        """The geometry of a model config: a `Wav2Vec2BertConfig` (fbank frames, stacked), or a model that reads
        the waveform through a stack of strided convolutions (`OmniASRCTCConfig`'s `audio_config`, MMS's
        `Wav2Vec2Config`)."""
        audio = getattr(model_config, "audio_config", None) or model_config
        if hasattr(audio, "conv_kernel") and hasattr(audio, "conv_stride"):
            return cls.of_convolutions(audio.conv_kernel, audio.conv_stride)
        if not getattr(model_config, "add_adapter", False):
            return cls()
        return cls(adapter_layers=int(model_config.num_adapter_layers),
                   adapter_kernel=int(model_config.adapter_kernel_size),
                   adapter_stride=int(model_config.adapter_stride))

    @classmethod
    def of_convolutions(cls, kernels, strides) -> FrameGeometry:
        """Unpadded strided convolutions over the samples as one window and hop: composing
        n -> (n - k) // s + 1 layer by layer equals (n - window) // hop + 1 with hop the product of the strides and
        window the receptive field k1 + s1 (k2 - 1) + s1 s2 (k3 - 1) + ... (floor((floor(a / b) - m) / c) =
        floor((a - m b) / (b c)) for integers). omniASR's encoder: 400 samples every 320 (20 ms)."""
        window, hop = 1, 1
        for kernel, stride in zip(kernels, strides):
            window += (int(kernel) - 1) * hop
            hop *= int(stride)
        return cls(window=window, hop=hop, stack=1)

    @property
    def samples_per_frame(self) -> int:
        """Input samples per CTC output frame (transformers' `inputs_to_logits_ratio`)."""
        return self.hop * self.stack * self.adapter_stride ** self.adapter_layers

    @property
    def frame_seconds(self) -> float:
        return self.samples_per_frame / self.sample_rate

    def output_frames(self, num_samples):
        """CTC frames the model emits for a clip of `num_samples` samples on its own: an int, or `(B,)` int64
        for a tensor of sample counts.

        This is the toolkit's one rule for a clip's output length (training's CTC loss, evaluation,
        transcription, export): every frame the clip alone produces, as `pipeline()` decodes it. A clip with
        an odd number of fbank frames ends in a stacked frame that is half padding; the extractor marks it
        invalid, so transformers' `_get_feat_extract_output_lengths(mask.sum(-1))` is one frame short there,
        and that frame can hold the last letter.
        """
        import torch

        tensor = torch.is_tensor(num_samples)
        n = num_samples.long() if tensor else int(num_samples)
        frames = (n - self.window) // self.hop + 1
        frames = frames.clamp(min=0) if tensor else max(0, frames)
        frames = -(-frames // self.stack)  # the extractor pads to a multiple of the stack
        pad = self.adapter_stride // 2
        for _ in range(self.adapter_layers):
            frames = (frames + 2 * pad - self.adapter_kernel) // self.adapter_stride + 1
        return frames.clamp(min=0) if tensor else max(0, frames)
