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

Training on the CPU computes every clip's features again every epoch; ``enable_cache`` keeps each clip's
log-mel frames (``LogMelCache``, keyed by ``clip_key`` of its audio), so later epochs redo only the cheap
batch-level steps. The features stay bit for bit what the batch computes without the cache (tests/
test_feature_cache.py), which is why the cache is only used on the numba CPU path: there a clip's log-mel
frames do not depend on its batch. The float64 redo of weak frames does (one matrix product over the weak
frames of the whole batch, whose rounding varies with their number): it and the normalisation still run
per batch, on the cached frames.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch

from .audio import INT16_SCALE
from .fbank import (CPU_FRAMES_PER_CHUNK, FFT_LENGTH, INV_COMPLEMENT, MEL_FLOOR, MEL_GROUP_SIZE, MIN_SAMPLES, NORM_EPS,
                    NUM_FREQ_BINS, PAD_TO_MULTIPLE_OF, PREEMPHASIS, RECHECK_RATIO, cpu_buffer, cpu_kernels)
from .geometry import FEATURE_STRIDE, FRAME_LENGTH, HOP_LENGTH, SAMPLING_RATE


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
                            "w2vbert_asr.audio.to_float / waves_of)")
        if t.dim() != 1:
            raise ValueError(f"wave {i} has shape {tuple(t.shape)}; expected a 1-D mono waveform (mix down first)")
        tensors.append(t)
    lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.long)
    out = torch.empty(len(tensors), int(lengths.max()), dtype=torch.float32, device=tensors[0].device)
    for row, t in zip(out, tensors):  # one pass per row: copy, then zero only the tail
        row[: t.numel()] = t
        row[t.numel() :] = 0.0
    return out, lengths


def clip_key(audio) -> bytes:
    """A clip's identity for ``LogMelCache``: a digest of its samples as stored (int16 PCM or float), its dtype
    and length. Equal keys mean equal waveforms, hence equal features."""
    a = np.ascontiguousarray(audio)
    digest = hashlib.sha1(f"{a.dtype.str}:{a.shape}".encode())
    digest.update(memoryview(a).cast("B"))
    return digest.digest()


class LogMelCache:
    """Per-clip log-mel frames of the CPU feature path, as ``BatchFeatureExtractor`` computes them before the
    batch-level steps (the float64 redo of weak frames, normalisation, stacking), and the indices of the clip's
    weak frames. Filled in the order clips are first seen until ``max_bytes`` is reached, then left as it is:
    training visits every clip once per epoch, so evicting would only trade one miss for another."""

    ENTRY_OVERHEAD = 256  # bytes of bookkeeping per clip, roughly (dict slot, key, two tensor headers)

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: dict = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key, frames: int):
        """-> (log-mel (frames, mel) float32, weak frame indices (R,) int64) or None."""
        item = self._items.get(key)
        if item is None or item[0].shape[0] != frames:
            self.misses += 1
            return None
        self.hits += 1
        return item

    def put(self, key, log_mel: torch.Tensor, weak: torch.Tensor) -> None:
        size = log_mel.numel() * log_mel.element_size() + weak.numel() * weak.element_size() + self.ENTRY_OVERHEAD
        if key in self._items or self.bytes + size > self.max_bytes:
            return
        self._items[key] = (log_mel.clone(), weak.clone())
        self.bytes += size


def num_fbank_frames(lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)`` sample counts -> ``(B,)`` fbank frames before stacking (Kaldi ``snip_edges``)."""
    return torch.div(lengths - FRAME_LENGTH, HOP_LENGTH, rounding_mode="floor") + 1


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
        self.cache: LogMelCache | None = None  # enable_cache
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
    def enable_cache(self, max_bytes: int) -> bool:
        """Keep each clip's log-mel frames (``LogMelCache`` of at most ``max_bytes``) for calls that pass
        ``keys``. Only where the result stays bit-identical: the numba CPU path (a clip's log-mel frames there
        do not depend on the rest of its batch). -> whether the cache is on."""
        on = max_bytes > 0 and self.cpu_kernels and self.window.device.type == "cpu" and cpu_kernels() is not None
        self.cache = LogMelCache(max_bytes) if on else None
        return on

    def _log_mel_cpu(self, waves: torch.Tensor, frames: list[int], feats: torch.Tensor, kernels: dict,
                     keys: list | None = None) -> list:
        """Clip by clip, chunk by chunk: fused framing loop, then FFT and mel (see _log_mel_); a clip found in
        the cache under its key is copied instead, with its weak frames (the same list, in the same order)."""
        window = self._window_fast.numpy()
        cache = self.cache if keys is not None else None
        weak = []
        for b, count in enumerate(frames):
            hit = cache.get(keys[b], count) if cache is not None else None
            if hit is not None:
                feats[b, :count] = hit[0]
                if hit[1].numel():
                    weak.append((torch.full_like(hit[1], b), hit[1]))
                continue
            first = len(weak)
            x = waves[b].numpy()
            for start in range(0, count, self.frames_per_chunk):
                stop = min(start + self.frames_per_chunk, count)
                buf = cpu_buffer(stop - start)
                kernels["frames"](x[start * HOP_LENGTH :], window, buf.numpy())
                rows = self._log_mel_(buf, feats[b, start:stop], kernels)
                if rows.numel():
                    weak.append((torch.full_like(rows, b), rows + start))
            if cache is not None:
                rows = [index for _, index in weak[first:]]
                cache.put(keys[b], feats[b, :count], torch.cat(rows) if rows else torch.empty(0, dtype=torch.long))
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

    def model_inputs(self, waves: torch.Tensor, lengths: torch.Tensor, keys: list | None = None
                     ) -> dict[str, torch.Tensor]:
        """``forward`` as the keyword arguments of ``Wav2Vec2BertForCTC`` (waveform.featurizer_for's interface)."""
        input_features, attention_mask = self(waves, lengths, keys)
        return {"input_features": input_features, "attention_mask": attention_mask}

    @torch.no_grad()
    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, keys: list | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """waves ``(B, N)`` float32 zero-padded 16 kHz, lengths ``(B,)`` samples ->
        input_features ``(B, T, 160)`` float32, attention_mask ``(B, T)`` long.
        keys: one ``clip_key`` per row, to use the cache (``enable_cache``); ignored without one."""
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
        kernels = cpu_kernels() if device.type == "cpu" and self.cpu_kernels else None
        if keys is not None and len(keys) != batch:
            raise ValueError(f"{len(keys)} keys for {batch} clips")
        if kernels:
            weak = self._log_mel_cpu(waves, frames_list, feats, kernels, keys)
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
