"""The CPU fbank's per-clip log-mel cache (features.LogMelCache) changes nothing: with it every batch's features
are bit for bit what the extractor computes without it, whatever the batch a clip was first seen in, the
float64 redo of weak frames included (that step depends on the batch, so it is redone per batch on the cached
frames). Also: the cache is only used where that holds (the numba CPU path), stays within its memory budget,
and the training loop's Collator gives the keys it needs."""

from __future__ import annotations

import numpy as np
import pytest
import soxr
import torch
from transformers import SeamlessM4TFeatureExtractor

from w2vbert_asr import synth
from w2vbert_asr.audio import to_float, to_int16
from w2vbert_asr.features import BatchFeatureExtractor, LogMelCache, clip_key, pad_waves
from w2vbert_asr.fbank import cpu_kernels
from w2vbert_asr.loss import Collator

SAMPLE_RATE = 16_000
# Samples per clip (0.5-4 s, odd and even frame counts) and gains: quiet clips have weak frames (float64 redo).
CLIP_SAMPLES = (8_000, 17_120, 24_560, 40_000, 63_840, 30_400)
GAINS = (1.0, 0.3, 0.1, 0.6, 0.05, 0.8)
# Batches that put clips together in different company, again and again (repeats are cache hits).
BATCHES = ([0, 1, 2], [2, 3, 0], [4, 1], [1, 0, 3, 4, 5], [5, 2], [3, 4, 0, 1, 2, 5], [2], [0, 5, 4])
needs_numba = pytest.mark.skipif(cpu_kernels() is None, reason="the cache is used on the numba CPU path only")


@pytest.fixture(scope="module")
def audio() -> list[np.ndarray]:
    """int16 PCM clips of espeak speech, as prepared splits store them."""
    audio, rate = synth.speak("The quick brown fox jumps over the lazy dog near the river bank, twice.", "en")
    speech = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    rng = np.random.default_rng(0)
    out = []
    for n, gain in zip(CLIP_SAMPLES, GAINS):
        start = int(rng.integers(0, speech.size - n))
        out.append(to_int16(speech[start: start + n] * np.float32(gain)))
    return out


def _extractor(**kwargs) -> BatchFeatureExtractor:
    return BatchFeatureExtractor.from_hf(SeamlessM4TFeatureExtractor(), **kwargs)


def _run(extractor, audio, batch, keyed: bool):
    waves, lengths = pad_waves([to_float(audio[i]) for i in batch])
    return extractor(waves, lengths, [clip_key(audio[i]) for i in batch] if keyed else None)


@needs_numba
@pytest.mark.parametrize("frames_per_chunk", [37, 1024], ids=["several-chunks-per-clip", "one-chunk"])
def test_cached_features_equal_recomputed_ones(audio, frames_per_chunk):
    cached, plain = _extractor(frames_per_chunk=frames_per_chunk), _extractor(frames_per_chunk=frames_per_chunk)
    assert cached.enable_cache(1 << 30)
    redone = []  # weak frames of clips whose log-mel came from the cache, per call
    original = BatchFeatureExtractor._redo_in_float64_

    def spy(self, waves, feats, clip, index, kernels):
        if self is cached:
            redone.append(clip.numel())
        return original(self, waves, feats, clip, index, kernels)

    BatchFeatureExtractor._redo_in_float64_ = spy
    try:
        for batch in BATCHES:
            hits = cached.cache.hits
            feats, mask = _run(cached, audio, batch, keyed=True)
            ref_feats, ref_mask = _run(plain, audio, batch, keyed=False)
            assert torch.equal(feats, ref_feats) and torch.equal(mask, ref_mask), batch
            assert feats.dtype == torch.float32 and mask.dtype == torch.long
    finally:
        BatchFeatureExtractor._redo_in_float64_ = original
    assert len(cached.cache) == len(audio)
    assert cached.cache.hits == sum(map(len, BATCHES)) - len(audio) and hits > 0
    assert cached.cache.misses == len(audio)
    # The quiet clips have weak frames, so the batch-level float64 redo ran on cached frames too.
    assert sum(redone[3:]) > 0


@needs_numba
def test_budget_bounds_the_cache_and_the_rest_is_computed(audio):
    cached, plain = _extractor(), _extractor()
    one_clip = CLIP_SAMPLES[0] // 160 * 80 * 4  # bytes of the shortest clip's log-mel frames, about
    budget = 3 * one_clip + 2 * LogMelCache.ENTRY_OVERHEAD
    assert cached.enable_cache(budget)
    for batch in BATCHES:
        assert all(torch.equal(a, b) for a, b in zip(_run(cached, audio, batch, True), _run(plain, audio, batch, False)))
    assert 0 < len(cached.cache) < len(audio) and cached.cache.bytes <= budget


def test_cache_only_where_it_is_exact(audio):
    """The torch-ops path (GPUs, or no numba) groups clips into shared FFT chunks, so a clip's frames there depend
    on its batch: no cache; a zero budget turns it off; a call without keys never uses it."""
    assert not _extractor(cpu_kernels=False).enable_cache(1 << 30)
    assert not _extractor().enable_cache(0)
    extractor = _extractor()
    if extractor.enable_cache(1 << 30):
        _run(extractor, audio, [0, 1], keyed=False)
        assert len(extractor.cache) == 0 and extractor.cache.hits == extractor.cache.misses == 0
    with pytest.raises(ValueError, match="2 keys for 3 clips"):
        extractor(*pad_waves([to_float(a) for a in audio[:3]]), [b"a", b"b"])


def test_clip_key_is_the_content():
    a = np.arange(1000, dtype=np.int16)
    assert clip_key(a) == clip_key(a.copy()) == clip_key(list(a.astype(np.int16)))
    assert clip_key(a) != clip_key(a[:-1]) and clip_key(a) != clip_key(a.astype(np.float32))
    b = a.copy()
    b[500] += 1
    assert clip_key(a) != clip_key(b)


def test_collator_gives_keys_only_when_asked(audio):
    from transformers import Wav2Vec2CTCTokenizer

    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.json"
        vocab.write_text(json.dumps({"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4}))
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab))
    examples = [{"audio": audio[i], "text": "ab a", "duration": len(audio[i]) / SAMPLE_RATE} for i in (2, 0)]
    assert "keys" not in Collator(tokenizer)(examples)
    keyed = Collator(tokenizer, keys=True)(examples)
    assert keyed["keys"] == [clip_key(audio[2]), clip_key(audio[0])]
    plain = Collator(tokenizer)(examples)
    assert all(torch.equal(keyed[k], plain[k]) for k in ("waves", "lengths", "labels"))
