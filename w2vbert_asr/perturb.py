"""Speed perturbation and added noise for the training clips, made on the fly.

`train.speed_perturb=[0.9, 1.0, 1.1]` is Kaldi's 3-way speed perturbation: the training set is seen at every
factor, each copy a clip resampled with soxr so that it plays `factor` times as fast (length / factor, pitch
shifted with it, as `sox speed` does). Nothing is stored: the copy is made when the DataLoader reads the clip.
The duration batch sampler sees the new lengths (`durations`), so its caps hold for the perturbed clips, and an
epoch holds every clip at every factor. A clip whose transcript CTC could not align in the fewer frames of a
faster copy keeps its own speed in that copy.

`train.noise_dir=<folder>` adds, with probability `train.noise_prob`, a random stretch of a random audio file of
that folder (resampled to 16 kHz, looped when short) at a signal-to-noise ratio drawn from `train.noise_snr`.

Both are deterministic: what a clip gets depends only on the seed, the epoch and its position in the epoch, so
a run resumed from a checkpoint reads exactly the audio the uninterrupted run read.

Usage:
    from w2vbert_asr.perturb import perturbed
    train_ds = perturbed(load_prepared(out, "train"), cfg, model.config)   # the dataset itself when off
    sampler = DurationBatchSampler(durations(train_ds), ...)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soxr
import torch

from . import UsageError
from .audio import to_float
from .geometry import SAMPLING_RATE, FrameGeometry
from .rows import ctc_min_frames

NOISE_STREAM = 6_067  # rng stream of the noise draws (seed, stream, epoch, index)
# Memory for the CPU fbank's per-clip log-mel cache (features.LogMelCache, 32 KB per second of audio: 1 GiB holds
# ~9 h; the demo corpus needs 22 MB), and at most this share of the machine's memory over all processes.
FEATURE_CACHE_MAX_BYTES = 1 << 30
FEATURE_CACHE_MEMORY_SHARE = 1 / 8


def speed_change(wave: np.ndarray, factor: float) -> np.ndarray:
    """`(N,)` float32 audio played `factor` times as fast: about N / factor samples (soxr, pitch follows)."""
    if factor == 1.0:
        return wave
    return soxr.resample(wave, SAMPLING_RATE * factor, SAMPLING_RATE).astype(np.float32, copy=False)


class NoiseBank:
    """The audio files of a folder, read a random stretch at a time (never all in memory)."""

    def __init__(self, folder: str | Path):
        from .audio import audio_extensions

        folder = Path(folder)
        exts = audio_extensions()
        self.files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in exts) \
            if folder.is_dir() else []
        if not self.files:
            raise UsageError(f"train.noise_dir={folder}: no audio files there ({', '.join(sorted(exts))})")

    def stretch(self, rng: np.random.Generator, samples: int) -> np.ndarray:
        """`samples` of 16 kHz mono noise from a random file at a random offset (looped when the file is short)."""
        import soundfile as sf

        path = self.files[int(rng.integers(len(self.files)))]
        info = sf.info(str(path))
        need = int(math.ceil(samples * info.samplerate / SAMPLING_RATE)) + 1
        start = int(rng.integers(max(1, info.frames - need + 1)))
        data, rate = sf.read(str(path), start=start, frames=min(need, info.frames), dtype="float32", always_2d=True)
        noise = data.mean(axis=1)
        if rate != SAMPLING_RATE:  # "quick" quality: a third of HQ's time, and noise needs no clean band edge
            noise = soxr.resample(noise, rate, SAMPLING_RATE, quality="QQ")
        if noise.size == 0:
            return np.zeros(samples, np.float32)
        return np.resize(noise.astype(np.float32), samples)  # np.resize repeats a short file


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`wave` + `noise` scaled to `snr_db` dB below the wave's power, clipped to [-1, 1]."""
    power = float(np.mean(wave.astype(np.float64) ** 2))
    noise_power = float(np.mean(noise.astype(np.float64) ** 2))
    if power == 0 or noise_power == 0:
        return wave
    scale = math.sqrt(power / (noise_power * 10 ** (snr_db / 10)))
    return np.clip(wave + scale * noise, -1.0, 1.0).astype(np.float32)


class PerturbedDataset(torch.utils.data.Dataset):
    """A prepared split seen at every speed factor: index k is clip k % N in copy k // N. Items are the split's
    examples with `audio` (float32 when changed) and `duration` of the perturbed clip."""

    def __init__(self, dataset, factors, seed: int, geometry: FrameGeometry, noise: NoiseBank | None = None,
                 noise_prob: float = 0.0, snr: tuple[float, float] = (10.0, 30.0)):
        self.dataset, self.n, self.seed, self.epoch = dataset, len(dataset), int(seed), 0
        self.noise, self.noise_prob, self.snr = noise, float(noise_prob), (float(snr[0]), float(snr[-1]))
        seconds = np.asarray(dataset["duration"], dtype=np.float64)
        needed = np.array([ctc_min_frames(str(t)) for t in dataset["text"]])
        rows = []
        for f in factors:
            samples = np.floor(np.rint(seconds * SAMPLING_RATE) / float(f)).astype(np.int64)
            fits = np.asarray(geometry.output_frames(torch.as_tensor(samples))) >= needed
            rows.append(np.where(fits, float(f), 1.0))
        self.factors = np.stack(rows)                          # (copies, N): the factor each copy applies
        self.durations = (seconds[None, :] / self.factors).reshape(-1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.factors.size

    def __getitem__(self, key: int) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[int]) -> list[dict]:
        examples = self.dataset.__getitems__([int(k) % self.n for k in keys])
        return [self._perturb(int(k), e) for k, e in zip(keys, examples)]

    def _perturb(self, key: int, example: dict) -> dict:
        factor = float(self.factors.flat[key])
        noisy = False
        if self.noise is not None:
            rng = np.random.default_rng([self.seed, NOISE_STREAM, self.epoch, key])
            noisy = rng.random() < self.noise_prob
        if factor == 1.0 and not noisy:
            return example
        wave = speed_change(to_float(example["audio"]), factor)
        if noisy:
            wave = add_noise(wave, self.noise.stretch(rng, wave.size), float(rng.uniform(*self.snr)))
        return {**example, "audio": wave, "duration": wave.size / SAMPLING_RATE}


def perturbed(dataset, cfg, model_config):
    """The train split as training reads it: `dataset` itself unless train.speed_perturb or train.noise_dir."""
    tcfg = cfg.train
    factors = [float(f) for f in (tcfg.speed_perturb or [])] or [1.0]
    if factors == [1.0] and not tcfg.noise_dir:
        return dataset
    noise = NoiseBank(tcfg.noise_dir) if tcfg.noise_dir else None
    return PerturbedDataset(dataset, factors, cfg.seed, FrameGeometry.of(model_config), noise,
                            float(tcfg.noise_prob), tuple(tcfg.noise_snr))


def train_inputs(dataset, cfg, model_config, featurizer, processes: int = 1):
    """The prepared train split as the loader reads it -> (dataset, cache): `perturbed(dataset, ...)`, and whether
    the fbank's log-mel cache is on (features.LogMelCache: every clip's frames kept after its first epoch,
    bit-identical, so on wherever it applies: the CPU's numba path, and only unperturbed audio, since a perturbed
    clip never comes twice)."""
    train_ds = perturbed(dataset, cfg, model_config)
    cache = (train_ds is dataset and hasattr(featurizer, "enable_cache")
             and featurizer.enable_cache(feature_cache_bytes(processes)))
    return train_ds, bool(cache)


def feature_cache_bytes(processes: int = 1) -> int:
    """Each process's budget for the log-mel cache (0 where the memory size is unknown)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0
    return int(min(FEATURE_CACHE_MAX_BYTES, memory * FEATURE_CACHE_MEMORY_SHARE / max(1, processes)))


def durations(dataset) -> np.ndarray:
    """Seconds per item of a training dataset (a PerturbedDataset's perturbed lengths)."""
    return dataset.durations if isinstance(dataset, PerturbedDataset) else dataset["duration"]


def set_epoch(dataset, epoch: int) -> None:
    """Tell a PerturbedDataset the epoch (its noise draws depend on it); anything else is left alone."""
    if isinstance(dataset, PerturbedDataset):
        dataset.set_epoch(epoch)
