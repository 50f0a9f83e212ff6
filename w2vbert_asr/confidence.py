"""Word and utterance confidence from CTC posteriors, and how well it catches wrong words.

Usage:
    from w2vbert_asr.confidence import Confidence
    conf = Confidence()                                    # the default measure (see below)
    words, utterance = conf.score(logits, [(0, 12), (14, 30)], blank_id=0)   # logits (T, V), spans in frames

Every output frame gets a confidence in [0, 1] from its posterior distribution p over the V tokens:
    max_prob   the normalised top probability (V * p_max - 1) / (V - 1): 0 for a uniform p, 1 for one-hot
    gibbs      Shannon entropy H = -sum p ln p
    tsallis    Tsallis entropy S_a = (1 - sum p^a) / (a - 1)
    renyi      Renyi entropy H_a = ln(sum p^a) / (1 - a)
An entropy E is mapped to [0, 1] against its maximum E_max (the uniform distribution's) either linearly,
1 - E / E_max (`lin`), or exponentially, (exp(-E) - exp(-E_max)) / (1 - exp(-E_max)) (`exp`). These are
the frame measures of Laptev & Ginsburg, "Fast entropy-based methods of word-level confidence estimation
for end-to-end ASR" (arXiv 2212.08703), which NeMo implements; a small order a (1/4 .. 1/2) makes the
entropies sensitive to the tail of p, which is where a wrong frame shows.

A word's frames are those of its span whose top token is not the blank (frames where the model emits
something; blank frames say little about the word); its confidence aggregates their frame confidences by
`word_aggregation` (min, mean or prod). An utterance's confidence aggregates its words' confidences by
`utterance_aggregation`; an utterance without words gets the mean frame confidence.

The defaults were chosen by `python -m w2vbert_asr.confidence_study`: the area under the ROC curve for
"this word is wrong" on the demo corpus, recorded in recipes/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

MEASURES = ("max_prob", "gibbs", "tsallis", "renyi")
NORMALIZATIONS = ("lin", "exp")
AGGREGATIONS = ("min", "mean", "prod")
_TINY = 1e-12  # floor for products in log space (a frame confidence of exactly 0)


@dataclass(frozen=True)
class Confidence:
    """One confidence measure (conf/config.yaml `confidence:`)."""

    # Chosen by word-error AUC on the demo model (confidence_study.py; the table is in recipes/README.md).
    measure: str = "tsallis"
    alpha: float = 0.5
    normalization: str = "lin"
    word_aggregation: str = "min"
    utterance_aggregation: str = "mean"

    def __post_init__(self) -> None:
        from . import UsageError

        for key, value, allowed in (("measure", self.measure, MEASURES),
                                    ("normalization", self.normalization, NORMALIZATIONS),
                                    ("word_aggregation", self.word_aggregation, AGGREGATIONS),
                                    ("utterance_aggregation", self.utterance_aggregation, AGGREGATIONS)):
            if value not in allowed:
                raise UsageError(f"confidence.{key}={value!r}: choose one of {', '.join(allowed)}")
        if self.measure in ("tsallis", "renyi") and (self.alpha <= 0 or self.alpha == 1):
            raise UsageError(f"confidence.alpha={self.alpha}: the entropy order must be > 0 and != 1 "
                             "(alpha -> 1 is measure=gibbs)")

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> Confidence:
        if not cfg:
            return cls()
        names = cls.__dataclass_fields__
        return cls(**{k: (float(v) if k == "alpha" else str(v)) for k, v in dict(cfg).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        """Short label, e.g. `tsallis(0.33,exp)/min/mean`."""
        frame = self.measure if self.measure == "max_prob" else f"{self.measure}({self.alpha:g},{self.normalization})"
        return f"{frame}/{self.word_aggregation}/{self.utterance_aggregation}"

    # ------------------------------------------------------------------------------------------- frames
    def frames(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) -> frame confidences (...,) in [0, 1], float32."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        v = logp.shape[-1]
        if self.measure == "max_prob":
            return ((v * logp.max(dim=-1).values.exp() - 1) / (v - 1)).clamp(0.0, 1.0)
        if self.measure == "gibbs":
            entropy = -(logp.exp() * logp).sum(-1)
            maximum = math.log(v)
        else:
            a = self.alpha
            power_sum = torch.logsumexp(a * logp, dim=-1)  # ln sum p^a, stable for tiny p
            if self.measure == "tsallis":
                entropy = (1 - power_sum.exp()) / (a - 1)
                maximum = (1 - v ** (1 - a)) / (a - 1)
            else:
                entropy = power_sum / (1 - a)
                maximum = math.log(v)
        if self.normalization == "lin":
            conf = 1 - entropy / maximum
        else:
            floor = math.exp(-maximum)
            conf = ((-entropy).exp() - floor) / (1 - floor)
        return conf.clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------------------- words
    def score(self, logits: torch.Tensor, spans: Sequence[tuple[int, int]], blank_id: int,
              frame_conf: torch.Tensor | None = None) -> tuple[list[float], float]:
        """Logits (T, V) of one utterance and its words' frame spans [start, end) -> (word confidences,
        utterance confidence). `frame_conf` (T,) skips recomputing the frame confidences."""
        conf = self.frames(logits) if frame_conf is None else frame_conf
        emitting = logits.argmax(-1) != blank_id
        words = [self._word(conf, emitting, int(s), int(e)) for s, e in spans]
        if not words:
            return [], float(conf.mean()) if conf.numel() else 0.0
        return words, aggregate(words, self.utterance_aggregation)

    def _word(self, conf: torch.Tensor, emitting: torch.Tensor, start: int, end: int) -> float:
        total = conf.shape[0]
        if total == 0:
            return 0.0
        start = min(max(start, 0), total - 1)
        end = min(max(end, start + 1), total)
        frames = conf[start:end][emitting[start:end]]
        if frames.numel() == 0:  # a word the beam search placed on blank frames: judge the whole span
            frames = conf[start:end]
        return aggregate(frames.tolist(), self.word_aggregation)


def aggregate(values: Sequence[float], how: str) -> float:
    """min | mean | prod of confidences in [0, 1] (prod in log space)."""
    if not values:
        return 0.0
    if how == "min":
        return float(min(values))
    if how == "mean":
        return float(sum(values) / len(values))
    return float(math.exp(sum(math.log(max(v, _TINY)) for v in values)))


@dataclass
class Hypothesis:
    """A decoded utterance with confidences: words are (word, start frame, end frame, confidence)."""

    text: str
    confidence: float
    words: list[tuple[str, int, int, float]]


def ctc_word_spans(ids: Sequence[int] | np.ndarray, tokenizer) -> list[tuple[str, int, int]]:
    """Greedy CTC ids per frame (T,) -> [(word, start frame, end frame)], exactly what
    `tokenizer.decode(ids, output_word_offsets=True).word_offsets` gives (the equivalence is tested), without
    a Python dict per frame and character: repeats are collapsed and blanks dropped with numpy, so an hour
    of frames decodes in milliseconds and holds a few arrays instead of ~30 MB of offset dicts."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # first frame of each run of one id
    ends = np.r_[starts[1:], ids.size]
    run_ids = ids[starts]
    unique = np.unique(run_ids)
    tokens = dict(zip(unique.tolist(), tokenizer.convert_ids_to_tokens(unique.tolist())))
    if not hasattr(tokenizer, "word_delimiter_token"):  # SentencePiece pieces (omniASR's own tokenizer)
        return _piece_word_spans(run_ids, starts, ends, tokens, tokenizer.pad_token)
    space = tokenizer.replace_word_delimiter_char
    chars = {i: space if t == tokenizer.word_delimiter_token else t for i, t in tokens.items()
             if t != tokenizer.pad_token}  # the blank is the pad token, dropped like decode drops it
    keep = np.isin(run_ids, np.fromiter(chars, dtype=np.int64, count=len(chars)))
    run_ids, starts, ends = run_ids[keep], starts[keep], ends[keep]
    is_word = np.array([chars[i] != space for i in run_ids.tolist()], dtype=bool)
    if not is_word.any():
        return []
    # A word is a maximal stretch of non-delimiter characters: its first run starts it, its last ends it.
    edges = np.diff(np.r_[0, is_word.astype(np.int8), 0])
    first, last = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    letters = [chars[i] for i in run_ids.tolist()]
    return [("".join(letters[a:b + 1]), int(starts[a]), int(ends[b])) for a, b in zip(first.tolist(), last.tolist())]


def _piece_word_spans(run_ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, tokens: dict,
                      blank: str) -> list[tuple[str, int, int]]:
    """ctc_word_spans for SentencePiece-style pieces: a piece that starts with `▁` starts a word (as the Metaspace
    decoder puts a space there); runs of the blank are dropped. A loop over runs of emitted pieces, not frames."""
    words: list[list] = []  # [text, start, end]
    for i, start, end in zip(run_ids.tolist(), starts.tolist(), ends.tolist()):
        piece = tokens[i]
        if piece == blank:
            continue
        if piece.startswith("▁") or not words:
            words.append(["", start, end])
        words[-1][0] += piece.lstrip("▁")
        words[-1][2] = end
    return [(text, start, end) for text, start, end in words if text]


def greedy_hypothesis(logits: torch.Tensor, tokenizer, confidence: Confidence) -> Hypothesis:
    """Greedy CTC decoding of one utterance's logits (T, V) with word spans and confidences."""
    words = ctc_word_spans(logits.argmax(dim=-1).cpu().numpy(), tokenizer)
    word_conf, utt = confidence.score(logits, [(s, e) for _, s, e in words], tokenizer.pad_token_id)
    words = [(w, s, e, c) for (w, s, e), c in zip(words, word_conf)]
    return Hypothesis(" ".join(w[0] for w in words), utt, words)


def beam_hypothesis(logits: torch.Tensor, beam: tuple, blank_id: int, confidence: Confidence) -> Hypothesis:
    """pyctcdecode's best beam `(text, lm_state, [(word, (start, end))], ...)` of logits (T, V) -> Hypothesis."""
    text, _, word_frames = beam[:3]
    spans = [(int(s), int(e)) for _, (s, e) in word_frames]
    word_conf, utt = confidence.score(logits, spans, blank_id)
    words = [(w, s, e, c) for (w, _), (s, e), c in zip(word_frames, spans, word_conf)]
    return Hypothesis(" ".join(w[0] for w in words) if words else text.strip(), utt, words)
