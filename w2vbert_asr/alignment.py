"""How well a transcript fits its audio under a CTC model: the alignment score of `audit` and `pseudolabel`.

For a clip of T output frames and a transcript y of L characters the model gives
    log_likelihood   log p(y | audio), the CTC forward score over every alignment of y (loss.ctc_loss with
                     reduction="none"; -inf when y cannot be aligned in T frames)
    best_path        sum over frames of the largest log-probability: the score of the model's own best path,
                     whatever text it spells
and the score is their gap per frame,

    score = (log_likelihood - best_path) / T        (<= ~0; 0: the transcript is what the model hears)

Subtracting the best path removes what the clip alone costs (noise, an unusual voice, a model that is unsure
everywhere), so a low score says the transcript, not the clip, is the problem. On the bench of planted faults
(recipes/README.md) the four normalisations (per frame or per character, with or without the best path) rank
alike (AUC 0.9995-0.9997 with cross-fitted models); the synthetic clips are all equally clean, so the bench
cannot show the gap's advantage on noisy real recordings, which is why it is the one used. torchaudio's
forced_align (Viterbi, one alignment) was not an option: its newest build (2.11.1) fails to load its library
against torch 2.13 ("Could not load this library: .../_torchaudio.so").

Usage:
    from w2vbert_asr.alignment import Alignment, alignment
    a = alignment(logits, sample_lengths, labels, model.config)      # batched: (B, T, V), (B,), (B, L)
    a.score                                                          # (B,) float64 numpy
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import FrameGeometry
from .loss import IGNORE_INDEX, ctc_loss

# The normalisations `audit.tsv` can be re-ranked by (its columns hold every input); SCORE is the default one.
NORMALISATIONS = ("gap_per_frame", "gap_per_char", "per_frame", "per_char")
SCORE = "gap_per_frame"


@dataclass
class Alignment:
    """Per clip: log p(transcript | audio), the best path's log-probability, frames and characters."""

    log_likelihood: np.ndarray
    best_path: np.ndarray
    frames: np.ndarray
    chars: np.ndarray

    def normalised(self, how: str = SCORE) -> np.ndarray:
        return normalise(self.log_likelihood, self.best_path, self.frames, self.chars, how)

    @property
    def score(self) -> np.ndarray:
        return self.normalised(SCORE)


def normalise(log_likelihood, best_path, frames, chars, how: str = SCORE) -> np.ndarray:
    """The alignment score under one of NORMALISATIONS (arrays or numbers; -inf stays -inf)."""
    ll, best = np.asarray(log_likelihood, np.float64), np.asarray(best_path, np.float64)
    frames, chars = np.maximum(np.asarray(frames, np.float64), 1), np.maximum(np.asarray(chars, np.float64), 1)
    if how == "gap_per_frame":
        return (ll - best) / frames
    if how == "gap_per_char":
        return (ll - best) / chars
    if how == "per_frame":
        return ll / frames
    if how == "per_char":
        return ll / chars
    raise ValueError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALISATIONS)}")


@torch.no_grad()
def alignment(logits: torch.Tensor, sample_lengths: torch.Tensor, labels: torch.Tensor, config) -> Alignment:
    """logits (B, T, V) of a batch, sample_lengths (B,) its clips' samples, labels (B, L) padded with
    IGNORE_INDEX (the tokenizer's ids of each transcript) -> Alignment of every clip."""
    sample_lengths = torch.as_tensor(sample_lengths)
    nll = ctc_loss(logits, sample_lengths, labels, config, reduction="none", zero_infinity=False)
    frames = FrameGeometry.of(config).output_frames(sample_lengths).clamp(max=logits.shape[1]).to(logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = torch.arange(logits.shape[1], device=logits.device)[None, :] < frames[:, None]
    best = (logp.max(dim=-1).values * valid).sum(-1)
    return Alignment(log_likelihood=(-nll).double().cpu().numpy(), best_path=best.double().cpu().numpy(),
                     frames=frames.cpu().numpy(), chars=(labels != IGNORE_INDEX).sum(-1).cpu().numpy())


def label_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """Transcripts -> (B, L) ids padded with IGNORE_INDEX, as training's Collator makes them (characters the
    vocabulary lacks become its unknown token, which the model has never learnt to emit)."""
    ids = tokenizer(list(texts)).input_ids
    labels = torch.full((len(ids), max(1, max(map(len, ids), default=1))), IGNORE_INDEX, dtype=torch.long)
    for row, seq in zip(labels, ids):
        row[: len(seq)] = torch.tensor(seq, dtype=torch.long)
    return labels


def scored_stream(transcriber, items, normalizer):
    """(key, Transcript, alignment score of the transcript's normalised text) per input, as Transcriber.stream
    yields (key, Transcript): the pseudo-label's fit to its own audio, for `pseudolabel.filter`."""
    for key, logits, num_samples in transcriber.stream_logits(items):
        transcript = transcriber.decode(logits, num_samples)
        labels = label_ids(transcriber.tokenizer, [normalizer(transcript.text)])
        if logits.shape[0] == 0:
            yield key, transcript, float("-inf")
            continue
        a = alignment(logits[None].float(), torch.tensor([num_samples]), labels, transcriber.model.config)
        yield key, transcript, float(a.score[0])
