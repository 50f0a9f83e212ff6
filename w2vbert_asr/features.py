"""Batched W2v-BERT 2.0 input features, on CPU or GPU.

Reproduces ``transformers.SeamlessM4TFeatureExtractor`` (what ``Wav2Vec2BertForCTC`` consumes)
to within 1e-3: Kaldi-style 80-bin log-mel fbank (Povey window, pre-emphasis, per-frame DC
removal, waveform scaled to the int16 range, no dither), per-utterance mean/variance
normalisation of every mel bin over the valid frames, padding to a multiple of 2 frames and
stacking pairs of frames into 160-dim vectors, with the same attention mask.

The HF extractor loops over frames in numpy (~20 ms per 10 s clip on one core). Here each chunk
of frames is one batched float32 FFT and a few banded mel matrix products; on CPU the
element-wise steps around them are fused numba loops (torch ops when numba is missing, and on
GPU). The few frames where float32 rounding would show are redone in float64
(see ``RECHECK_RATIO``).

Usage:
    from transformers import SeamlessM4TFeatureExtractor
    from w2vbert_asr.features import BatchFeatureExtractor, pad_waves

    extract = BatchFeatureExtractor.from_hf(SeamlessM4TFeatureExtractor())  # or processor.feature_extractor
    waves, lengths = pad_waves(list_of_16khz_float_arrays)
    input_features, attention_mask = extract(waves, lengths)   # (B, T, 160), (B, T)

    python benchmarks/features.py --threads 1      # speed and max difference vs HF
"""

from __future__ import annotations

import warnings

import threading

import numpy as np
import torch

# --- frame geometry: the one home of every frame constant, the derived ones included ----------------
# Hard-coded in SeamlessM4TFeatureExtractor._extract_fbank_features (it is not saved in the processor
# config), so it is hard-coded here too; data, transcribe, export and the benchmarks import it from here.
SAMPLING_RATE = 16_000  # Hz: what W2v-BERT 2.0's feature extractor expects
FRAME_LENGTH = 400  # samples: 25 ms at 16 kHz
HOP_LENGTH = 160  # samples: 10 ms at 16 kHz
FEATURE_STRIDE = 2  # fbank frames stacked into one 160-dim encoder frame (the extractor's `stride`)
SAMPLES_PER_ENCODER_FRAME = HOP_LENGTH * FEATURE_STRIDE  # 320 samples = 20 ms
FFT_LENGTH = 512  # next power of two >= FRAME_LENGTH
NUM_FREQ_BINS = FFT_LENGTH // 2 + 1  # 257 one-sided bins
PREEMPHASIS = 0.97
INT16_SCALE = 2.0**15  # Kaldi works on 16-bit integer sample values
MEL_FLOOR = 1.192092955078125e-07  # float32 machine epsilon, as in HF
NORM_EPS = 1e-7  # added to the variance before the square root, as in HF
PAD_TO_MULTIPLE_OF = 2  # HF __call__ default
# HF normalises with the unbiased variance (ddof=1), which is NaN for a single frame.
MIN_FRAMES = 2
MIN_SAMPLES = FRAME_LENGTH + (MIN_FRAMES - 1) * HOP_LENGTH  # 560 samples = 35 ms
# CPU work is done in chunks of frames so the FFT buffers stay in the L2 cache.
CPU_FRAMES_PER_CHUNK = 1024
# The mel matrix is banded: multiplying each group of filters only with the FFT bins it covers
# needs ~1/5 of the dense multiply-adds. 16 filters per group (one AVX-512 register of float32)
# measured fastest.
MEL_GROUP_SIZE = 16
# float32 FFT rounding is ~1e-7 of a frame's amplitude in every bin, so a mel bin far below the
# rest of its frame loses precision. Frames with a bin whose power per unit filter weight is below
# this fraction of the frame's total mel power are recomputed in float64: ~1-2% of speech frames,
# mostly voiced ones with near-empty bins below 300 Hz. Measured on 48 clean espeak clips (the
# hardest case: no room noise), the rest then stays within 1.3e-4 of HF after normalisation
# (3.9e-3 without the redo); 1e-8 gives 6e-5 but redoes 4-10% of frames.
RECHECK_RATIO = 1e-9
# Kaldi per frame: y = f - mean(f); y[i] -= 0.97 y[i-1] (i >= 1); y[0] *= 0.03; y *= window.
# For i >= 1 that is 0.03 (u[i] - mean(f)) with u[i] = x[i-1] + (x[i] - x[i-1]) / 0.03: rounding
# then scales with |x[i] - x[i-1]| + 0.03 |x| instead of |x| (keeps weak low-frequency bins
# accurate). The 0.03 goes into the window; y[0] is zeroed by the window (checked in __init__).
INV_COMPLEMENT = 1.0 / (1.0 - PREEMPHASIS)


def pad_waves(waves: list[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of B 1-D waves -> ``(B, N)`` zero-padded float32 and ``(B,)`` int64 lengths."""
    if len(waves) == 0:
        raise ValueError("pad_waves got an empty list; pass at least one waveform")
    tensors = []
    for i, wave in enumerate(waves):
        if torch.is_tensor(wave):
            t = wave
        else:
            with warnings.catch_warnings():  # read-only arrays (memory-mapped datasets) are only read here
                warnings.simplefilter("ignore", UserWarning)
                a = np.asarray(wave)
                t = torch.from_numpy(a if a.dtype.kind in "iu" else a.astype(np.float32, copy=False))
        if not t.is_floating_point():  # int16 PCM read as float would be 32768 times too loud
            raise TypeError(f"wave {i} is {t.dtype}; pass float waves in [-1, 1] (prepared int16 audio: "
                            "w2vbert_asr.data.to_float / waves_of)")
        if t.dim() != 1:
            raise ValueError(f"wave {i} has shape {tuple(t.shape)}; expected a 1-D mono waveform (mix down first)")
        tensors.append(t)
    lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.long)
    out = torch.empty(len(tensors), int(lengths.max()), dtype=torch.float32, device=tensors[0].device)
    for row, t in zip(out, tensors):  # one pass per row: copy, then zero only the tail
        row[: t.numel()] = t
        row[t.numel() :] = 0.0
    return out, lengths


def num_fbank_frames(lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)`` sample counts -> ``(B,)`` fbank frames before stacking (Kaldi ``snip_edges``)."""
    return torch.div(lengths - FRAME_LENGTH, HOP_LENGTH, rounding_mode="floor") + 1


def samples_per_frame(model_config) -> int:
    """Input samples per CTC output frame (transformers' ``inputs_to_logits_ratio``): the fbank hop (160)
    times the stacked frames (2) times each adapter layer's stride: 640 samples = 40 ms for W2v-BERT 2.0."""
    ratio = SAMPLES_PER_ENCODER_FRAME
    if getattr(model_config, "add_adapter", False):
        ratio *= int(model_config.adapter_stride) ** int(model_config.num_adapter_layers)
    return ratio


def ctc_output_frames(num_samples, model_config):
    """CTC frames the model emits for a clip of ``num_samples`` samples on its own: an int, or ``(B,)``
    int64 for a tensor of sample counts.

    This is the toolkit's one rule for a clip's output length (training's CTC loss, evaluation,
    transcription, export): every frame the clip alone produces, as `pipeline()` decodes it. A clip with
    an odd number of fbank frames ends in a stacked frame that is half padding; the extractor marks it
    invalid, so transformers' ``_get_feat_extract_output_lengths(mask.sum(-1))`` is one frame short
    there, and that frame can hold the last letter.
    """
    tensor = torch.is_tensor(num_samples)
    n = num_samples.long() if tensor else int(num_samples)
    fbank = (n - FRAME_LENGTH) // HOP_LENGTH + 1
    fbank = fbank.clamp(min=0) if tensor else max(0, fbank)
    frames = -(-fbank // FEATURE_STRIDE)  # the extractor pads to a multiple of the stride
    if getattr(model_config, "add_adapter", False):
        k, s = int(model_config.adapter_kernel_size), int(model_config.adapter_stride)
        for _ in range(int(model_config.num_adapter_layers)):
            frames = (frames + 2 * (s // 2) - k) // s + 1  # the adapter convolutions (padding stride // 2)
        frames = frames.clamp(min=0) if tensor else max(0, frames)
    return frames


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
# Per-thread FFT input buffer for the CPU path, reused across calls: a fresh 2 MB buffer per chunk
# costs ~0.3 ms of page faults, as much as the framing itself. Module-level so that extractors
# stay picklable (DataLoader workers) and threads never share one.
_WORKSPACE = threading.local()


def _cpu_buffer(rows: int) -> torch.Tensor:
    """A ``(rows, 512)`` float32 CPU tensor whose memory is reused by later calls in this thread."""
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.shape[0] < rows:
        buf = _WORKSPACE.buf = torch.empty(max(rows, CPU_FRAMES_PER_CHUNK), FFT_LENGTH)
    return buf[:rows]


def _cpu_kernels() -> dict | None:
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


class BatchFeatureExtractor(torch.nn.Module):
    """Built from an HF extractor's attributes so it follows the saved processor.

    Args:
        mel_filters: ``(257, num_mel_bins)`` filter bank, as ``feature_extractor.mel_filters``.
        window: ``(400,)`` analysis window, as ``feature_extractor.window``.
        stride: frames stacked into one output vector.
        padding_value: value of padded feature positions.
        sampling_rate: expected input rate in Hz (callers check it via ``.sampling_rate``).
        frames_per_chunk: CPU chunk size in frames (a GPU runs all frames at once).
        cpu_kernels: on CPU use the fused numba loops when numba is installed (False: torch ops,
            the path GPUs take).
    """

    def __init__(
        self,
        mel_filters: np.ndarray | torch.Tensor,
        window: np.ndarray | torch.Tensor,
        stride: int = FEATURE_STRIDE,
        padding_value: float = 0.0,
        sampling_rate: int = SAMPLING_RATE,
        frames_per_chunk: int = CPU_FRAMES_PER_CHUNK,
        cpu_kernels: bool = True,
    ):
        super().__init__()
        mel = torch.as_tensor(np.asarray(mel_filters), dtype=torch.float64)
        window = torch.as_tensor(np.asarray(window), dtype=torch.float64)
        if mel.dim() != 2 or mel.shape[0] != NUM_FREQ_BINS:
            raise ValueError(f"mel_filters must be ({NUM_FREQ_BINS}, num_mel_bins), got {tuple(mel.shape)}")
        if window.shape != (FRAME_LENGTH,):
            raise ValueError(f"window must have shape ({FRAME_LENGTH},), got {tuple(window.shape)}")
        if window[0] != 0:
            # Pre-emphasis is applied to the whole waveform once instead of per frame; that differs
            # from Kaldi only in each frame's first sample, which a Povey/Hann window zeroes.
            raise ValueError("window[0] must be 0 (Povey or Hann window) for the batched pre-emphasis")
        if stride < 1 or frames_per_chunk < 1:
            raise ValueError(f"stride and frames_per_chunk must be >= 1, got {stride}, {frames_per_chunk}")
        self.num_mel_bins = mel.shape[1]
        self.stride = int(stride)
        self.padding_value = float(padding_value)
        self.sampling_rate = int(sampling_rate)
        self.frames_per_chunk = int(frames_per_chunk)
        self.cpu_kernels = bool(cpu_kernels)
        # Non-persistent: derived constants, not weights; keeps them out of model checkpoints.
        self.register_buffer("window", window.to(torch.float32), persistent=False)
        self.register_buffer("mel_filters", mel.to(torch.float32), persistent=False)
        self.register_buffer("_window_fast", (window * (1.0 - PREEMPHASIS)).to(torch.float32), persistent=False)
        self.register_buffer("_window64", window, persistent=False)  # float64 redo
        # Kaldi scales samples to the int16 range; scaling the power by (2**15)**2 instead is exact
        # (a power of two) and saves a pass over the waveform.
        scaled = mel * INT16_SCALE**2
        self._groups = []
        for g, (k0, k1, m0, m1, weights) in enumerate(self._mel_groups(scaled)):
            self.register_buffer(f"_mel_group_{g}", weights, persistent=False)
            self._groups.append((2 * k0, 2 * k1, m0, m1, f"_mel_group_{g}"))
        # Weak-frame test: mel power / filter weight < RECHECK_RATIO * the frame's total mel power.
        # (An all-zero filter, which HF warns about, makes every frame weak: still right, slower.)
        weight = mel.sum(dim=0)
        inv_weight = torch.where(weight > 0, 1.0 / (weight.clamp(min=1e-30) * RECHECK_RATIO), torch.zeros_like(weight))
        self.register_buffer("_recheck_scale", inv_weight.to(torch.float32), persistent=False)

    @classmethod
    def from_hf(cls, feature_extractor, **kwargs) -> "BatchFeatureExtractor":
        """From a ``SeamlessM4TFeatureExtractor`` (e.g. ``processor.feature_extractor``);
        ``kwargs`` go to the constructor (``frames_per_chunk``, ``cpu_kernels``)."""
        side = getattr(feature_extractor, "padding_side", "right")
        if side != "right":
            raise ValueError(f"only padding_side='right' is supported, the extractor has {side!r}")
        return cls(
            mel_filters=feature_extractor.mel_filters,
            window=feature_extractor.window,
            stride=feature_extractor.stride,
            padding_value=feature_extractor.padding_value,
            sampling_rate=feature_extractor.sampling_rate,
            **kwargs,
        )

    @staticmethod
    def _mel_groups(mel: torch.Tensor) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """Split filters into groups; each gets ``(bin0, bin1, mel0, mel1, weights)``.

        ``weights`` is ``(2 * (bin1 - bin0), mel1 - mel0)`` float32 with every row repeated, so it
        multiplies the interleaved squared (real, imag) FFT output and sums re^2 + im^2 for free.
        """
        nonzero = mel != 0
        groups = []
        for m0 in range(0, mel.shape[1], MEL_GROUP_SIZE):
            m1 = min(m0 + MEL_GROUP_SIZE, mel.shape[1])
            rows = nonzero[:, m0:m1].any(dim=1).nonzero().flatten()
            if rows.numel() == 0:  # all-zero filters: any bin range gives zeros
                rows = torch.tensor([0])
            k0, k1 = int(rows[0]), int(rows[-1]) + 1
            weights = mel[k0:k1, m0:m1].repeat_interleave(2, dim=0).to(torch.float32).contiguous()
            groups.append((k0, k1, m0, m1, weights))
        return groups

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """``(B,)`` sample counts of one batch -> ``(B,)`` valid stacked frames, i.e. what
        ``attention_mask.sum(1)`` of ``forward`` on that batch gives."""
        frames = num_fbank_frames(lengths)
        if self.stride == 1:  # HF's mask keeps frames with index % stride == 1: none for stride 1
            return torch.zeros_like(frames)
        padded = -(-int(frames.max()) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
        # Stacked frame j is valid iff fbank frame j * stride + 1 is, and j survives truncation.
        valid = torch.div(frames - 2, self.stride, rounding_mode="floor") + 1
        return valid.clamp(min=0, max=padded // self.stride)

    # --- shared steps -------------------------------------------------------------------------
    def _mel_power(self, frames: torch.Tensor, mel: torch.Tensor) -> None:
        """Windowed frames ``(R, 512)`` (float32 or float64) -> float32 mel power into ``mel``."""
        spec = torch.view_as_real(torch.fft.rfft(frames)).reshape(frames.shape[0], 2 * NUM_FREQ_BINS)
        power = spec.square_() if spec.dtype == torch.float32 else spec.to(torch.float32).square_()
        for k0, k1, m0, m1, name in self._groups:
            torch.mm(power[:, k0:k1], getattr(self, name), out=mel[:, m0:m1])

    def _log_mel_(self, frames: torch.Tensor, mel: torch.Tensor, kernels: dict | None = None) -> torch.Tensor:
        """Windowed frames ``(R, 512)`` -> log-mel into ``mel`` ``(R, mel)``; returns the weak rows
        (checked here while the rows are in cache; fixed later, all at once)."""
        self._mel_power(frames, mel)
        if kernels:
            weak = np.empty(mel.shape[0], np.bool_)
            kernels["weak_rows"](mel.numpy(), self._recheck_scale.numpy(), weak)
            rows = torch.from_numpy(np.flatnonzero(weak))
        else:
            rows = ((mel * self._recheck_scale).amin(dim=1) < mel.sum(dim=1)).nonzero().flatten()
            mel.clamp_(min=MEL_FLOOR)
        mel.log_()
        return rows

    def _redo_in_float64_(self, waves: torch.Tensor, feats: torch.Tensor, clip: torch.Tensor, index: torch.Tensor,
                          kernels: dict | None) -> None:
        """Recompute log-mel frames ``feats[clip, index]`` with float64 framing and FFT, in HF's
        order of operations. waves ``(B, N)``; feats ``(B, T, mel)`` fixed in place; clip, index ``(R,)``."""
        window = self._window64.to(torch.float64)  # .to: survives a module-wide .float()
        if kernels:
            frames = torch.empty(clip.numel(), FFT_LENGTH, dtype=torch.float64)
            kernels["frames64"](waves.numpy(), clip.numpy(), index.numpy(), window.numpy(), frames.numpy())
        else:
            raw = waves.unfold(1, FRAME_LENGTH, HOP_LENGTH)[clip, index].double()  # (R, 400)
            raw -= raw.mean(dim=1, keepdim=True)
            frames = raw.new_zeros(clip.numel(), FFT_LENGTH)
            torch.sub(raw[:, 1:], raw[:, :-1], alpha=PREEMPHASIS, out=frames[:, 1:FRAME_LENGTH])
            frames[:, 0] = raw[:, 0] * (1.0 - PREEMPHASIS)
            frames[:, :FRAME_LENGTH] *= window
        mel = feats.new_empty(clip.numel(), self.num_mel_bins)
        self._mel_power(frames, mel)
        feats[clip, index] = mel.clamp_(min=MEL_FLOOR).log_()

    # --- CPU with numba -----------------------------------------------------------------------
    def _log_mel_cpu(self, waves: torch.Tensor, frames: list[int], feats: torch.Tensor, kernels: dict) -> list:
        """Clip by clip, chunk by chunk: fused framing loop, then FFT and mel (see _log_mel_)."""
        window = self._window_fast.numpy()
        weak = []
        for b, count in enumerate(frames):
            x = waves[b].numpy()
            for start in range(0, count, self.frames_per_chunk):
                stop = min(start + self.frames_per_chunk, count)
                buf = _cpu_buffer(stop - start)
                kernels["frames"](x[start * HOP_LENGTH :], window, buf.numpy())
                rows = self._log_mel_(buf, feats[b, start:stop], kernels)
                if rows.numel():
                    weak.append((torch.full_like(rows, b), rows + start))
        return weak

    # --- torch ops (GPU, or CPU without numba) ------------------------------------------------
    def _clip_groups(self, frames: list[int], device: torch.device) -> list[tuple[int, int]]:
        """Consecutive clip ranges ``[b0, b1)`` processed together: on CPU as many clips as fit in
        one chunk of frames (padding frames count), on GPU the whole batch."""
        if device.type != "cpu":
            return [(0, len(frames))]
        groups, b0, longest = [], 0, 0
        for b, n in enumerate(frames):
            longest = max(longest, n)
            if b > b0 and (b - b0 + 1) * longest > self.frames_per_chunk:
                groups.append((b0, b))
                b0, longest = b, n
        groups.append((b0, len(frames)))
        return groups

    def _log_mel_torch(self, waves: torch.Tensor, frames: list[int], feats: torch.Tensor) -> list:
        """Groups of clips, chunk by chunk, as batched tensor ops (see _log_mel_)."""
        weak = []
        window = self._window_fast[1:]
        for b0, b1 in self._clip_groups(frames, waves.device):
            clips, width = b1 - b0, min(max(frames[b0:b1]), feats.shape[1])
            step = max(1, self.frames_per_chunk // clips) if waves.device.type == "cpu" else width
            for start in range(0, width, step):
                stop = min(start + step, width)
                x = waves[b0:b1, start * HOP_LENGTH : (stop - 1) * HOP_LENGTH + FRAME_LENGTH]  # (G, L)
                u = torch.lerp(x[:, :-1], x[:, 1:], INV_COMPLEMENT)  # u[:, k]: sample k + 1, see INV_COMPLEMENT
                dc = x.unfold(1, FRAME_LENGTH, HOP_LENGTH).mean(dim=2, keepdim=True)
                buf = waves.new_zeros(clips, stop - start, FFT_LENGTH)  # zero tail = FFT padding
                torch.sub(u.unfold(1, FRAME_LENGTH - 1, HOP_LENGTH), dc, out=buf[..., 1:FRAME_LENGTH])
                buf[..., 1:FRAME_LENGTH] *= window
                mel = waves.new_empty(clips * (stop - start), self.num_mel_bins)
                rows = self._log_mel_(buf.view(-1, FFT_LENGTH), mel)
                feats[b0:b1, start:stop] = mel.view(clips, stop - start, -1)
                if rows.numel():
                    span = stop - start
                    weak.append((torch.div(rows, span, rounding_mode="floor") + b0, rows % span + start))
        return weak

    def _normalise_torch_(self, feats: torch.Tensor, frames: torch.Tensor) -> None:
        """In place on ``(B, T, mel)``: per clip and mel bin, zero mean and unit (unbiased) variance
        over the valid frames as HF does; padding frames get ``padding_value``."""
        pad = (torch.arange(feats.shape[1], device=feats.device) >= frames[:, None]).unsqueeze(-1)  # (B, T, 1)
        count = frames.to(feats.dtype)[:, None, None]
        feats.masked_fill_(pad, 0.0)
        feats.sub_(feats.sum(dim=1, keepdim=True) / count).masked_fill_(pad, 0.0)
        var = feats.square().sum(dim=1, keepdim=True) / (count - 1)
        feats.mul_(var.add_(NORM_EPS).rsqrt_()).masked_fill_(pad, self.padding_value)

    @torch.no_grad()
    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waves ``(B, N)`` float32 zero-padded 16 kHz, lengths ``(B,)`` samples ->
        input_features ``(B, T, 160)`` float32, attention_mask ``(B, T)`` long."""
        if waves.dim() != 2:
            raise ValueError(f"waves must be (B, N), got shape {tuple(waves.shape)}; use pad_waves() for a list")
        lengths = torch.as_tensor(lengths)
        if lengths.shape != (waves.shape[0],):
            raise ValueError(f"lengths must have shape ({waves.shape[0]},), got {tuple(lengths.shape)}")
        lengths_list = lengths.tolist()
        for i, n in enumerate(lengths_list):
            if n > waves.shape[1]:
                raise ValueError(f"row {i}: length {n} > waves.shape[1] = {waves.shape[1]}")
            if n < MIN_SAMPLES:
                raise ValueError(
                    f"row {i}: {n} samples is shorter than {MIN_SAMPLES} ({MIN_SAMPLES * 1000 // self.sampling_rate}"
                    " ms, two fbank frames); drop such clips before feature extraction"
                )
        device = waves.device
        waves = waves.detach().to(torch.float32).contiguous()  # as HF, which casts its input to float32 first
        frames_list = [(n - FRAME_LENGTH) // HOP_LENGTH + 1 for n in lengths_list]
        frames = torch.tensor(frames_list, device=device)
        padded = -(-max(frames_list) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
        kept = padded - padded % self.stride  # HF drops a remainder that does not fill a stack
        batch = len(frames_list)

        # HF normalises before padding and truncating, so all frames are computed: padded >= frames.
        feats = torch.empty(batch, padded, self.num_mel_bins, device=device)
        kernels = _cpu_kernels() if device.type == "cpu" and self.cpu_kernels else None
        if kernels:
            weak = self._log_mel_cpu(waves, frames_list, feats, kernels)
        else:
            weak = self._log_mel_torch(waves, frames_list, feats)
        if weak:
            clip, index = (torch.cat(part) for part in zip(*weak))
            real = index < frames[clip]  # weak padding frames need no fix
            self._redo_in_float64_(waves, feats, clip[real], index[real], kernels)
        if kernels:
            for b, count in enumerate(frames_list):
                kernels["normalise"](feats[b].numpy(), count, self.padding_value)
        else:
            self._normalise_torch_(feats, frames)

        if kept < padded:
            feats = feats[:, :kept].contiguous()
        input_features = feats.view(batch, kept // self.stride, self.num_mel_bins * self.stride)
        # HF keeps the mask of frames whose index % stride == 1 (the second frame of each pair).
        index = torch.arange(kept, device=device)
        attention_mask = (index[index % self.stride == 1][None, :] < frames[:, None]).long()
        return input_features, attention_mask
