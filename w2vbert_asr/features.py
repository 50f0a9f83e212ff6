"""Batched, device-agnostic W2v-BERT 2.0 input features in torch.

Reproduces ``transformers.SeamlessM4TFeatureExtractor`` (what ``Wav2Vec2BertForCTC`` consumes)
to within 1e-3: Kaldi-style 80-bin log-mel fbank (Povey window, pre-emphasis, per-frame DC
removal, waveform scaled to the int16 range, no dither), per-utterance mean/variance
normalisation of every mel bin over the valid frames, padding to a multiple of 2 frames and
stacking pairs of frames into 160-dim vectors, with the same attention mask.

The HF extractor loops over frames in numpy (20-60 ms per 10 s clip on one core); this module
runs each chunk of frames as a few large tensor ops in float32, on CPU or GPU, and redoes in
float64 only the frames where float32 rounding would show (see ``RECHECK_RATIO``).

Usage:
    from transformers import SeamlessM4TFeatureExtractor
    from w2vbert_asr.features import BatchFeatureExtractor, pad_waves

    extract = BatchFeatureExtractor.from_hf(SeamlessM4TFeatureExtractor())  # or processor.feature_extractor
    waves, lengths = pad_waves(list_of_16khz_float_arrays)
    input_features, attention_mask = extract(waves, lengths)   # (B, T, 160), (B, T)

    python benchmarks/features.py --threads 1      # speed and max difference vs HF
"""

from __future__ import annotations

import numpy as np
import torch

# Frame geometry is hard-coded in SeamlessM4TFeatureExtractor._extract_fbank_features (it is not
# saved in the processor config), so it is hard-coded here too.
FRAME_LENGTH = 400  # samples: 25 ms at 16 kHz
HOP_LENGTH = 160  # samples: 10 ms at 16 kHz
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
# float32 FFT rounding is ~1e-7 of a frame's amplitude in every bin. A mel bin whose power per
# unit filter weight is below this fraction of the frame's total mel power can then be off by
# more than ~3e-4 in log (measured on espeak speech); such frames (~4-10% of speech frames,
# mostly voiced frames with near-empty bins below 300 Hz) are recomputed in float64.
RECHECK_RATIO = 1e-8


def pad_waves(waves: list[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of B 1-D waves -> ``(B, N)`` zero-padded float32 and ``(B,)`` int64 lengths."""
    if len(waves) == 0:
        raise ValueError("pad_waves got an empty list; pass at least one waveform")
    tensors = []
    for i, wave in enumerate(waves):
        t = wave if torch.is_tensor(wave) else torch.from_numpy(np.asarray(wave, dtype=np.float32))
        if t.dim() != 1:
            raise ValueError(f"wave {i} has shape {tuple(t.shape)}; expected a 1-D mono waveform (mix down first)")
        tensors.append(t.to(torch.float32))
    lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.long)
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True), lengths


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
    """

    def __init__(
        self,
        mel_filters: np.ndarray | torch.Tensor,
        window: np.ndarray | torch.Tensor,
        stride: int = 2,
        padding_value: float = 0.0,
        sampling_rate: int = 16000,
        frames_per_chunk: int = CPU_FRAMES_PER_CHUNK,
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
        # Non-persistent: derived constants, not weights; keeps them out of model checkpoints.
        self.register_buffer("window", window.to(torch.float32), persistent=False)
        # The fast path computes z = x[i] - 0.97 x[i-1] as 0.03 * lerp(x[i-1], x[i], 1 / 0.03) and
        # folds that 0.03 into its window.
        self.register_buffer("_window_fast", (window * (1.0 - PREEMPHASIS)).to(torch.float32), persistent=False)
        self.register_buffer("_window64", window, persistent=False)  # float64 recheck
        self.register_buffer("mel_filters", mel.to(torch.float32), persistent=False)
        # Kaldi scales samples to the int16 range; scaling the power by (2**15)**2 instead is exact
        # (a power of two) and saves a pass over the waveform.
        scaled = mel * INT16_SCALE**2
        self.register_buffer("_mel_dense", scaled.repeat_interleave(2, dim=0).to(torch.float32), persistent=False)
        self._groups = []
        for g, (k0, k1, m0, m1, weights) in enumerate(self._mel_groups(scaled)):
            self.register_buffer(f"_mel_group_{g}", weights, persistent=False)
            self._groups.append((2 * k0, 2 * k1, m0, m1, f"_mel_group_{g}"))
        # Recheck test: mel power / filter weight < RECHECK_RATIO * total mel power of the frame.
        weight = mel.sum(dim=0)
        inv_weight = torch.where(weight > 0, 1.0 / (weight.clamp(min=1e-30) * RECHECK_RATIO), torch.zeros_like(weight))
        self.register_buffer("_recheck_scale", inv_weight.to(torch.float32), persistent=False)
        self._workspace: dict = {}  # reusable FFT input buffer per (device, dtype); see _fft_buffer

    @classmethod
    def from_hf(cls, feature_extractor) -> "BatchFeatureExtractor":
        """From a ``SeamlessM4TFeatureExtractor`` (e.g. ``processor.feature_extractor``)."""
        side = getattr(feature_extractor, "padding_side", "right")
        if side != "right":
            raise ValueError(f"only padding_side='right' is supported, the extractor has {side!r}")
        return cls(
            mel_filters=feature_extractor.mel_filters,
            window=feature_extractor.window,
            stride=feature_extractor.stride,
            padding_value=feature_extractor.padding_value,
            sampling_rate=feature_extractor.sampling_rate,
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
        """``(B,)`` sample counts -> ``(B,)`` valid stacked frames, i.e. ``attention_mask.sum(1)``."""
        frames = num_fbank_frames(lengths)
        if self.stride == 1:  # HF's mask keeps frames with index % stride == 1: none for stride 1
            return torch.zeros_like(frames)
        # Stacked frame j is valid iff fbank frame j * stride + 1 is.
        return torch.div(frames - 2, self.stride, rounding_mode="floor") + 1

    def _redo_in_float64_(self, waves: torch.Tensor, feats: torch.Tensor, clip: torch.Tensor, index: torch.Tensor) -> None:
        """Recompute log-mel frames ``feats[clip, index]`` in float64, in HF's order of operations.

        waves ``(B, N)``; feats ``(B, T, mel)`` log-mel, fixed in place; clip, index ``(R,)``.
        Done once per batch for all weak frames, so its fixed cost is paid once.
        """
        raw = waves.unfold(1, FRAME_LENGTH, HOP_LENGTH)[clip, index].double()  # (R, 400)
        raw -= raw.mean(dim=1, keepdim=True)
        emphasised = torch.empty_like(raw)
        torch.sub(raw[:, 1:], raw[:, :-1], alpha=PREEMPHASIS, out=emphasised[:, 1:])
        emphasised[:, 0] = raw[:, 0] * (1.0 - PREEMPHASIS)
        emphasised *= self._window64.to(torch.float64)  # .to: survives a module-wide .float()
        spec = torch.view_as_real(torch.fft.rfft(emphasised, n=FFT_LENGTH)).reshape(clip.numel(), -1)
        mel = spec.to(torch.float32).square_() @ self._mel_dense
        feats[clip, index] = mel.clamp_(min=MEL_FLOOR).log_()

    def _fft_buffer(self, rows: int, device: torch.device) -> torch.Tensor:
        """A ``(>= rows, 512)`` float32 buffer, zero outside columns 1..399, kept between calls
        (a fresh 2 MB buffer per call costs page faults and a fill)."""
        buf = self._workspace.get(device)
        if buf is None or buf.shape[0] < rows:
            buf = torch.zeros(rows, FFT_LENGTH, device=device)  # zero tail = FFT padding; col 0 x window 0
            self._workspace[device] = buf
        return buf

    def _log_mel_into(self, waves: torch.Tensor, dest: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Kaldi log-mel of ``(G, N)`` waves in [-1, 1] into ``dest`` ``(G, T, mel)``, float32.

        Rows past a wave's own frames get garbage; callers mask them. Returns the weak frames as
        (clip, frame) index tensors: float32 rounding may show there (see ``RECHECK_RATIO``).
        """
        clips, num_frames = dest.shape[0], dest.shape[1]
        weak = []
        step = max(1, self.frames_per_chunk // clips) if waves.device.type == "cpu" else num_frames
        buf = self._fft_buffer(clips * min(step, num_frames), waves.device)
        window = self._window_fast[1:]
        for start in range(0, num_frames, step):
            stop = min(start + step, num_frames)
            rows = clips * (stop - start)
            x = waves[:, start * HOP_LENGTH : (stop - 1) * HOP_LENGTH + FRAME_LENGTH]  # (G, L) view
            # Kaldi per frame: y = f - mean(f); y[i] -= 0.97 y[i-1] (i >= 1); y[0] *= 0.03; y *= window.
            # For i >= 1 that is 0.03 (u[i] - mean(f)) with u[i] = x[i-1] + (x[i] - x[i-1]) / 0.03,
            # computed once per sample instead of per frame (lerp); the 0.03 is in the window and
            # y[0] is zeroed by it (checked in __init__). Rounding scales with |x[i] - x[i-1]| +
            # 0.03 |x|, not |x|, which keeps weak low-frequency bins accurate.
            u = torch.lerp(x[:, :-1], x[:, 1:], 1.0 / (1.0 - PREEMPHASIS))  # u[:, k]: sample k + 1
            dc = x.unfold(1, FRAME_LENGTH, HOP_LENGTH).mean(dim=2, keepdim=True)
            frame = buf[:rows].view(clips, stop - start, FFT_LENGTH)[..., 1:FRAME_LENGTH]
            torch.sub(u.unfold(1, FRAME_LENGTH - 1, HOP_LENGTH), dc, out=frame).mul_(window)
            power = torch.view_as_real(torch.fft.rfft(buf[:rows])).reshape(rows, 2 * NUM_FREQ_BINS).square_()
            # One clip: write straight into its contiguous rows of dest; else via a (rows, mel) temp.
            mel = dest[0, start:stop] if clips == 1 else waves.new_empty(rows, self.num_mel_bins)
            for k0, k1, m0, m1, name in self._groups:
                torch.mm(power[:, k0:k1], getattr(self, name), out=mel[:, m0:m1])
            # Checked here while the rows are in cache; redone later, all at once.
            rows = ((mel * self._recheck_scale).amin(dim=1) < mel.sum(dim=1)).nonzero().flatten()
            if rows.numel():
                weak.append((torch.div(rows, stop - start, rounding_mode="floor"), rows % (stop - start) + start))
            mel.clamp_(min=MEL_FLOOR).log_()
            if clips > 1:
                dest[:, start:stop] = mel.view(clips, stop - start, self.num_mel_bins)
        return weak

    def _normalise_(self, feats: torch.Tensor, frames: torch.Tensor) -> None:
        """In place: per clip and mel bin, zero mean and unit (unbiased) variance over the valid
        frames as HF does; padding frames get ``padding_value``. feats ``(G, T, mel)``, frames ``(G,)``."""
        if feats.shape[0] == 1:  # CPU: clip by clip, cache-resident and no masking needed
            count = int(frames[0])
            valid = feats[0, :count]
            # (torch.var_mean over dim 0 is ~30x slower than these column sums on CPU)
            valid.sub_(valid.mean(dim=0))
            var = valid.square().sum(dim=0) / (count - 1)
            valid.mul_(var.add_(NORM_EPS).rsqrt_())
            feats[0, count:] = self.padding_value
            return
        pad = (torch.arange(feats.shape[1], device=feats.device) >= frames[:, None]).unsqueeze(-1)  # (G, T, 1)
        count = frames.to(feats.dtype)[:, None, None]
        feats.masked_fill_(pad, 0.0)
        feats.sub_(feats.sum(dim=1, keepdim=True) / count).masked_fill_(pad, 0.0)
        var = feats.square().sum(dim=1, keepdim=True) / (count - 1)
        feats.mul_(var.add_(NORM_EPS).rsqrt_()).masked_fill_(pad, self.padding_value)

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
        waves = waves.to(torch.float32)  # as HF, which casts its input to float32 first
        frames_list = [(n - FRAME_LENGTH) // HOP_LENGTH + 1 for n in lengths_list]
        frames = torch.tensor(frames_list, device=device)
        padded = -(-max(frames_list) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
        kept = padded - padded % self.stride  # HF drops a remainder that does not fill a stack

        batch = len(frames_list)
        feats = torch.empty(batch, kept, self.num_mel_bins, device=device)
        weak = []
        for b0, b1 in self._clip_groups(frames_list, device):
            width = min(max(frames_list[b0:b1]), kept)
            weak += [(clip + b0, index) for clip, index in self._log_mel_into(waves[b0:b1], feats[b0:b1, :width])]
        if weak:
            clip, index = (torch.cat(part) for part in zip(*weak))
            real = index < frames[clip]  # weak padding frames need no fix
            self._redo_in_float64_(waves, feats, clip[real], index[real])
        if device.type == "cpu":
            for b in range(batch):
                self._normalise_(feats[b : b + 1], frames[b : b + 1])
        else:
            self._normalise_(feats, frames)
        input_features = feats.view(batch, kept // self.stride, self.num_mel_bins * self.stride)
        # HF keeps the mask of frames whose index % stride == 1 (the second frame of each pair).
        index = torch.arange(kept, device=device)
        attention_mask = (index[index % self.stride == 1][None, :] < frames[:, None]).long()
        return input_features, attention_mask
