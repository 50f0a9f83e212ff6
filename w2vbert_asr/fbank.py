"""Kaldi's fbank arithmetic as W2v-BERT 2.0's feature extractor does it: its constants, and the fused CPU
loops (numba) that `features.BatchFeatureExtractor` runs around its batched FFT and mel products.

Each loop is plain Python over numpy arrays (`_frames_py`, ...), compiled by numba when it is installed; the
torch path in features.py computes the same without them (GPUs, or no numba).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .geometry import FRAME_LENGTH, HOP_LENGTH

# The frame geometry (sampling rate, window, hop, stacking) lives in geometry.py.
FFT_LENGTH = 512  # next power of two >= FRAME_LENGTH
NUM_FREQ_BINS = FFT_LENGTH // 2 + 1  # 257 one-sided bins
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  # float32 machine epsilon, as in HF
NORM_EPS = 1e-7  # added to the variance before the square root, as in HF
PAD_TO_MULTIPLE_OF = 2  # HF __call__ default
# HF normalises with the unbiased variance (ddof=1), which is NaN for a single frame.
MIN_FRAMES = 2
MIN_SAMPLES = FRAME_LENGTH + (MIN_FRAMES - 1) * HOP_LENGTH  # 560 samples = 35 ms
# CPU work is done in chunks of frames so the FFT buffers stay in the L2 cache.
CPU_FRAMES_PER_CHUNK = 1024
# The mel matrix is banded: multiplying each group of filters only with the FFT bins it covers
# needs a fraction of the dense multiply-adds. 16 filters per group: one AVX-512 register of float32.
MEL_GROUP_SIZE = 16
# float32 FFT rounding is ~1e-7 of a frame's amplitude in every bin, so a mel bin far below the
# rest of its frame loses precision. Frames with a bin whose power per unit filter weight is below
# this fraction of the frame's total mel power are recomputed in float64 (a few voiced speech frames
# with near-empty bins below 300 Hz); the ratio trades accuracy against redone frames
# (benchmarks/README.md, features).
RECHECK_RATIO = 1e-9
# Kaldi per frame: y = f - mean(f); y[i] -= 0.97 y[i-1] (i >= 1); y[0] *= 0.03; y *= window.
# For i >= 1 that is 0.03 (u[i] - mean(f)) with u[i] = x[i-1] + (x[i] - x[i-1]) / 0.03: rounding
# then scales with |x[i] - x[i-1]| + 0.03 |x| instead of |x| (keeps weak low-frequency bins
# accurate). The 0.03 goes into the window; y[0] is zeroed by the window (checked in __init__).
INV_COMPLEMENT = 1.0 / (1.0 - PREEMPHASIS)



# --- fused CPU loops (numba) -------------------------------------------------------------------
def _frames_py(x, window, out):
    """The first R Kaldi frames of 1-D float32 ``x`` into ``out`` ``(R, 512)``: DC removed,
    pre-emphasised, windowed (``window`` includes the 0.03, see INV_COMPLEMENT), zero tail.
    (Callers slice ``x`` to the first frame: a start offset here stops LLVM vectorising, 4x slower.)"""
    inv = np.float32(INV_COMPLEMENT)
    for r in range(out.shape[0]):
        s = r * HOP_LENGTH
        acc = np.float32(0.0)
        for i in range(FRAME_LENGTH):
            acc += x[s + i]
        mean = acc / np.float32(FRAME_LENGTH)
        out[r, 0] = 0.0
        for i in range(1, FRAME_LENGTH):
            prev = x[s + i - 1]
            out[r, i] = window[i] * (prev + (x[s + i] - prev) * inv - mean)
        for i in range(FRAME_LENGTH, FFT_LENGTH):
            out[r, i] = 0.0


def _frames64_py(waves, clip, index, window, out):
    """HF's float64 framing of frames ``index[r]`` of ``waves[clip[r]]`` (``(B, N)`` float32) into
    ``out`` ``(R, 512)`` float64: DC removed, pre-emphasised, windowed, zero tail."""
    for r in range(out.shape[0]):
        c, s = clip[r], index[r] * HOP_LENGTH
        acc = 0.0
        for i in range(FRAME_LENGTH):
            acc += waves[c, s + i]
        mean = acc / FRAME_LENGTH
        out[r, 0] = window[0] * (1.0 - PREEMPHASIS) * (waves[c, s] - mean)
        for i in range(1, FRAME_LENGTH):
            out[r, i] = window[i] * ((waves[c, s + i] - mean) - PREEMPHASIS * (waves[c, s + i - 1] - mean))
        for i in range(FRAME_LENGTH, FFT_LENGTH):
            out[r, i] = 0.0


def _weak_rows_py(mel, scale, weak):
    """Per row of float32 mel power ``(R, mel)``: ``weak[r]`` = some bin * scale < the row's
    total (see RECHECK_RATIO); then floors the row at MEL_FLOOR, in place."""
    for r in range(mel.shape[0]):
        total = np.float32(0.0)
        for j in range(mel.shape[1]):
            total += mel[r, j]
        flag = False
        for j in range(mel.shape[1]):
            flag |= mel[r, j] * scale[j] < total
            mel[r, j] = max(mel[r, j], np.float32(MEL_FLOOR))
        weak[r] = flag


def _normalise_py(feats, count, padding_value):
    """In place on ``(T, mel)`` float32: rows < count to zero mean, unit unbiased variance per
    column (float64 sums); rows >= count to ``padding_value``."""
    bins = feats.shape[1]
    mean = np.zeros(bins, np.float64)
    for t in range(count):
        for j in range(bins):
            mean[j] += feats[t, j]
    mean /= count
    var = np.zeros(bins, np.float64)
    for t in range(count):
        for j in range(bins):
            d = feats[t, j] - mean[j]
            var[j] += d * d
    scale = (1.0 / np.sqrt(var / (count - 1) + NORM_EPS)).astype(np.float32)
    shift = mean.astype(np.float32)
    for t in range(count):
        for j in range(bins):
            feats[t, j] = (feats[t, j] - shift[j]) * scale[j]
    for t in range(count, feats.shape[0]):
        for j in range(bins):
            feats[t, j] = padding_value


_KERNELS: dict = {}
# Per-thread FFT input buffer for the CPU path, reused across calls: a fresh buffer per chunk costs as
# much in page faults as the framing itself. Module-level so that extractors
# stay picklable (DataLoader workers) and threads never share one.
_WORKSPACE = threading.local()


def cpu_buffer(rows: int) -> torch.Tensor:
    """A ``(rows, 512)`` float32 CPU tensor whose memory is reused by later calls in this thread."""
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.shape[0] < rows:
        buf = _WORKSPACE.buf = torch.empty(max(rows, CPU_FRAMES_PER_CHUNK), FFT_LENGTH)
    return buf[:rows]


def cpu_kernels() -> dict | None:
    """The numba-compiled loops (compiled once, cached on disk by numba), or None without numba."""
    if not _KERNELS:
        try:
            import numba
        except ImportError:
            _KERNELS["missing"] = True
        else:
            # reassoc: vectorised sums; contract: fused multiply-add. Both only change rounding.
            jit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
            # The weak-row test also assumes finite values, so that its loop vectorises.
            finite = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nnan", "ninf", "nsz"})
            _KERNELS.update(
                frames=jit(_frames_py), frames64=jit(_frames64_py), weak_rows=finite(_weak_rows_py),
                normalise=jit(_normalise_py),
            )
    return None if "missing" in _KERNELS else _KERNELS
