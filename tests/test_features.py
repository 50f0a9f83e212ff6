"""BatchFeatureExtractor reproduces transformers' SeamlessM4TFeatureExtractor on real speech.

Speech comes from espeak-ng (w2vbert_asr.synth), resampled to 16 kHz and cut to mixed lengths.
"""

from __future__ import annotations

import numpy as np
import pytest
import soxr
import torch
from transformers import SeamlessM4TFeatureExtractor

from w2vbert_asr import features, synth
from w2vbert_asr.features import BatchFeatureExtractor, pad_waves

SAMPLE_RATE = 16_000
TOLERANCE = 1e-3  # max |ours - HF| on the normalised features
VOICE = "en"
SENTENCES = (
    "Hello there, this is a short test of the feature extractor.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Speech recognition for many languages needs careful feature extraction.",
    "One two three four five six seven eight nine ten eleven twelve thirteen.",
)
# Samples per clip: 0.7 s to 6 s. Frame counts (n - 400) // 160 + 1 mix odd and even, and the
# longest is odd so the batch is padded by one frame to a multiple of 2.
CLIP_SAMPLES = (11_200, 24_560, 40_000, 63_840, 95_840)
GAINS = (1.0, 0.3, 0.6, 0.1, 0.8)  # quiet clips have the weakest bins relative to float32 noise


def _speech(text: str) -> np.ndarray:
    audio, rate = synth.speak(text, VOICE)
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """About 12 s of espeak speech at 16 kHz, float32."""
    return np.concatenate([_speech(s) for s in SENTENCES])


@pytest.fixture(scope="module")
def clips(speech) -> list[np.ndarray]:
    """Mixed-length clips cut from different places of the speech, at different gains."""
    rng = np.random.default_rng(0)
    out = []
    for n, gain in zip(CLIP_SAMPLES, GAINS):
        start = int(rng.integers(0, speech.size - n))
        out.append(speech[start : start + n] * np.float32(gain))
    return out


@pytest.fixture(scope="module")
def hf() -> SeamlessM4TFeatureExtractor:
    return SeamlessM4TFeatureExtractor()


def hf_features(extractor, waves):
    out = extractor(waves, sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=True, return_tensors="pt")
    return out["input_features"], out["attention_mask"]


def assert_matches_hf(extractor, hf_extractor, waves, tolerance=TOLERANCE):
    ref, ref_mask = hf_features(hf_extractor, waves)
    ours, mask = extractor(*pad_waves(waves))
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert mask.dtype == torch.long and torch.equal(mask, ref_mask.long())
    diff = (ours - ref).abs().max().item()
    assert diff <= tolerance, f"max |ours - HF| = {diff:.2e}"
    return diff


BACKENDS = pytest.mark.parametrize("cpu_kernels", [True, False], ids=["numba", "torch-ops"])


@BACKENDS
def test_matches_hf_on_mixed_length_speech(clips, hf, cpu_kernels):
    extractor = BatchFeatureExtractor.from_hf(hf, cpu_kernels=cpu_kernels)
    assert_matches_hf(extractor, hf, clips)
    frames = [(n - 400) // 160 + 1 for n in CLIP_SAMPLES]
    assert {f % 2 for f in frames} == {0, 1} and frames[-1] % 2 == 1  # the fixture covers both parities


@BACKENDS
def test_single_clip_with_odd_frame_count(clips, hf, cpu_kernels):
    clip = clips[-1]  # 597 frames -> padded to 598 -> 299 stacked frames, the last one masked
    extractor = BatchFeatureExtractor.from_hf(hf, cpu_kernels=cpu_kernels)
    assert_matches_hf(extractor, hf, [clip])
    feats, mask = extractor(*pad_waves([clip]))
    assert feats.shape == (1, 299, 160) and mask.sum().item() == 298 and mask[0, -1] == 0


@BACKENDS
@pytest.mark.parametrize("frames_per_chunk", [37, 10**6], ids=["small-chunks", "one-chunk"])
def test_shortest_clip_and_chunk_boundaries(clips, hf, cpu_kernels, frames_per_chunk):
    """Chunks smaller than a clip, the whole batch as one chunk (the GPU layout) and the 2-frame
    minimum all give the same result as HF."""
    waves = [clips[0][: features.MIN_SAMPLES], clips[1], clips[2][:1000]]
    extractor = BatchFeatureExtractor.from_hf(hf, frames_per_chunk=frames_per_chunk, cpu_kernels=cpu_kernels)
    assert_matches_hf(extractor, hf, waves)


@BACKENDS
def test_follows_processor_settings(clips, hf, cpu_kernels):
    """Mel bins, stride (with its truncation) and padding value come from the HF extractor."""
    for settings in ({"num_mel_bins": 64, "padding_value": 1.5}, {"stride": 3}, {"stride": 4, "padding_value": -1.0}):
        custom = SeamlessM4TFeatureExtractor(**settings)
        extractor = BatchFeatureExtractor.from_hf(custom, cpu_kernels=cpu_kernels)
        assert_matches_hf(extractor, custom, clips[:3])
        waves, lengths = pad_waves(clips[:3])
        assert torch.equal(extractor.output_lengths(lengths), extractor(waves, lengths)[1].sum(dim=1))


def test_float64_redo_is_what_makes_quiet_speech_match(clips, hf):
    """Without redoing weak frames in float64 the quiet clip drifts from HF (so the tests above
    can fail); with it the error is far below the tolerance."""
    quiet = [clips[3]]  # gain 0.1
    extractor = BatchFeatureExtractor.from_hf(hf)
    with_redo = assert_matches_hf(extractor, hf, quiet)
    extractor._recheck_scale.fill_(float("inf"))  # no frame counts as weak any more
    ref, _ = hf_features(hf, quiet)
    without_redo = (extractor(*pad_waves(quiet))[0] - ref).abs().max().item()
    assert without_redo > 4 * with_redo


def test_backends_agree(clips, hf):
    numba_path = BatchFeatureExtractor.from_hf(hf, cpu_kernels=True)(*pad_waves(clips))[0]
    torch_path = BatchFeatureExtractor.from_hf(hf, cpu_kernels=False)(*pad_waves(clips))[0]
    assert (numba_path - torch_path).abs().max().item() < 2e-4


def test_pad_waves():
    waves, lengths = pad_waves([np.ones(5, np.float64), torch.full((3,), 2.0), [0.5, 0.5]])
    assert waves.dtype == torch.float32 and waves.shape == (3, 5)
    assert lengths.tolist() == [5, 3, 2] and lengths.dtype == torch.long
    assert waves[1].tolist() == [2.0, 2.0, 2.0, 0.0, 0.0] and waves[2, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="wave 1 has shape"):
        pad_waves([np.zeros(10), np.zeros((2, 10))])
    with pytest.raises(ValueError, match="empty"):
        pad_waves([])


def test_rejects_bad_input(hf):
    extractor = BatchFeatureExtractor.from_hf(hf)
    with pytest.raises(ValueError, match=r"row 1: 559 samples is shorter"):
        extractor(torch.zeros(2, 1000), torch.tensor([1000, 559]))
    with pytest.raises(ValueError, match=r"row 0: length 1001 > waves.shape\[1\]"):
        extractor(torch.zeros(1, 1000), torch.tensor([1001]))
    with pytest.raises(ValueError, match="use pad_waves"):
        extractor(torch.zeros(1000), torch.tensor([1000]))
    with pytest.raises(ValueError, match="padding_side"):
        BatchFeatureExtractor.from_hf(SeamlessM4TFeatureExtractor(padding_side="left"))


def test_constants_are_buffers_not_checkpoint_state(hf):
    extractor = BatchFeatureExtractor.from_hf(hf)
    assert extractor.state_dict() == {}  # nothing leaks into a model checkpoint
    names = {name for name, _ in extractor.named_buffers()}
    assert {"window", "mel_filters", "_recheck_scale"} <= names and any(n.startswith("_mel_group_") for n in names)
    assert extractor.mel_filters.shape == (257, 80)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_hf_on_gpu(clips, hf):
    extractor = BatchFeatureExtractor.from_hf(hf).to("cuda")
    waves, lengths = pad_waves(clips)
    feats, mask = extractor(waves.cuda(), lengths.cuda())
    assert feats.is_cuda and mask.is_cuda
    ref, ref_mask = hf_features(hf, clips)
    assert torch.equal(mask.cpu(), ref_mask.long())
    assert (feats.cpu() - ref).abs().max().item() <= TOLERANCE
