"""Word and utterance confidence from CTC posteriors, and how well it catches wrong words.

Usage:
    python -m w2vbert_asr.confidence --model demo_out/model --run demo_out --split dev   # AUC per measure
    python -m w2vbert_asr.confidence --model demo_out/model --run demo_out --split dev --json auc.json

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

The defaults were chosen by `python -m w2vbert_asr.confidence` (this module's command): the area under
the ROC curve for "this word is wrong" on the demo corpus, recorded in recipes/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

MEASURES = ("max_prob", "gibbs", "tsallis", "renyi")
NORMALIZATIONS = ("lin", "exp")
AGGREGATIONS = ("min", "mean", "prod")
_TINY = 1e-12  # floor for products in log space (a frame confidence of exactly 0)


@dataclass(frozen=True)
class Confidence:
    """One confidence measure (conf/config.yaml `confidence:`)."""

    # Chosen by word-error AUC on the demo model (recipes/README.md): Tsallis 0.5 with min over a word's
    # frames 0.766 on the 400-clip pool and 0.792 on dev, against 0.731 / 0.729 for max-probability.
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


# ------------------------------------------------------------------------------------------- evaluation
def roc_auc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for the positive class (Mann-Whitney U, ties count half);
    NaN when one class is empty."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    if not pos or not neg:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positives) if p)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def word_errors(reference: str, hypothesis: str) -> list[bool]:
    """One flag per hypothesis word: True when the Levenshtein alignment to the reference makes it a
    substitution or an insertion (the word is wrong), False when it matches."""
    import jiwer

    words = hypothesis.split()
    if not words:
        return []
    if not reference.split():
        return [True] * len(words)
    out = jiwer.process_words(reference, hypothesis)
    wrong = [True] * len(words)
    for chunk in out.alignments[0]:
        if chunk.type == "equal":
            for k in range(chunk.hyp_start_idx, chunk.hyp_end_idx):
                wrong[k] = False
    return wrong


def candidate_measures() -> list[Confidence]:
    """The measures compared when choosing the default (frame measure x word aggregation)."""
    frames = [("max_prob", 1.0, "lin")]
    frames += [(m, 1.0, n) for m in ("gibbs",) for n in NORMALIZATIONS]
    frames += [(m, a, n) for m in ("tsallis", "renyi") for a in (0.25, 0.33, 0.5) for n in NORMALIZATIONS]
    return [Confidence(m, a, n, agg, "mean") for m, a, n in frames for agg in AGGREGATIONS]


def auc_table(logits: Sequence[torch.Tensor], references: Sequence[str], tokenizer, normalizer=None,
              measures: Sequence[Confidence] | None = None) -> list[dict]:
    """Greedy-decode each utterance's logits (T_i, V) and score every measure: AUC of (1 - word confidence)
    for "this word is wrong", and of (1 - utterance confidence) for "this utterance has an error"."""
    measures = list(measures or candidate_measures())
    rows = []
    base = [greedy_hypothesis(lg, tokenizer, Confidence("max_prob")) for lg in logits]
    spans = [[(s, e) for _, s, e, _ in h.words] for h in base]
    hyps = [normalizer(h.text) if normalizer else h.text for h in base]
    wrong = [word_errors(r, h) for r, h in zip(references, hyps)]
    usable = [len(w) == len(s) for w, s in zip(wrong, spans)]  # normalising never splits/merges words here
    utt_wrong = [r != h for r, h in zip(references, hyps)]
    for m in measures:
        word_scores, word_flags = [], []
        utt_scores: dict[str, list[float]] = {agg: [] for agg in AGGREGATIONS}
        for lg, sp, wr, ok in zip(logits, spans, wrong, usable):
            wc, uc = m.score(lg, sp, tokenizer.pad_token_id)
            for agg in AGGREGATIONS:  # every utterance aggregation from the same word confidences
                utt_scores[agg].append(1 - (aggregate(wc, agg) if wc else uc))
            if ok:
                word_scores += [1 - c for c in wc]
                word_flags += wr
        by_agg = {agg: roc_auc(s, utt_wrong) for agg, s in utt_scores.items()}
        rows.append({**m.to_dict(), "name": m.name, "word_auc": roc_auc(word_scores, word_flags),
                     "utterance_auc": by_agg[m.utterance_aggregation],
                     **{f"utterance_auc_{agg}": v for agg, v in by_agg.items()}, "words": len(word_flags),
                     "wrong_words": sum(word_flags), "utterances": len(utt_wrong), "wrong_utterances": sum(utt_wrong)})
    return rows


SHARES = (0.1, 0.25, 0.5, 0.75, 1.0)


def selection_table(logits: Sequence[torch.Tensor], references: Sequence[str], tokenizer, normalizer=None,
                    measures: Sequence[Confidence] | None = None, shares: Sequence[float] = SHARES) -> list[dict]:
    """What pseudo-labelling would keep: for each measure, the CER of the most confident `share` of the
    utterances (greedy hypotheses against references) and the utterance confidence at that cut."""
    import jiwer

    rows = []
    for m in measures or [Confidence()]:
        hyps = [greedy_hypothesis(lg, tokenizer, m) for lg in logits]
        texts = [normalizer(h.text) if normalizer else h.text for h in hyps]
        order = sorted(range(len(hyps)), key=lambda i: -hyps[i].confidence)
        for share in shares:
            top = order[:max(1, round(share * len(order)))]
            rows.append({"name": m.name, "share": share, "threshold": hyps[top[-1]].confidence,
                         "cer": jiwer.cer([references[i] for i in top], [texts[i] for i in top]),
                         "wer": jiwer.wer([references[i] for i in top], [texts[i] for i in top])})
    return rows


def split_logits(model_dir: str | Path, run_dir: str | Path, split: str) -> tuple[list[torch.Tensor], list[str]]:
    """Logits (T_i, V) of every clip of a prepared split (run_dir/prepared/<split>.arrow) and the references."""
    from .data import load_prepared
    from .transcribe import Transcriber, load_model

    model, processor = load_model(model_dir, "cpu")
    ds = load_prepared(run_dir, split)
    transcriber = Transcriber(model, processor, "cpu", chunk_seconds=120.0, overlap_seconds=0.0)
    items = ((i, ds[i]["audio"]) for i in range(len(ds)))
    logits = {key: lg for key, lg, _ in transcriber.stream_logits(items)}
    return [logits[i] for i in range(len(ds))], [str(t) for t in ds["text"]]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="AUC of every confidence measure for 'this word is wrong'.")
    parser.add_argument("--model", required=True, help="a trained model dir")
    parser.add_argument("--run", required=True, help="a run dir with prepared/<split>.arrow")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--select", nargs="*", metavar="MEASURE",
                        help="also print the CER of the most confident 10/25/50/75/100 %% of utterances for these "
                             "measures, written like the AUC table's names, e.g. 'tsallis(0.5,lin)/min/prod'")
    args = parser.parse_args(argv)
    from .text import Normalizer
    from .transcribe import load_model

    _, processor = load_model(args.model, "cpu")
    logits, refs = split_logits(args.model, args.run, args.split)
    rows = auc_table(logits, refs, processor.tokenizer, Normalizer.load(args.model))
    rows.sort(key=lambda r: -r["word_auc"] if not math.isnan(r["word_auc"]) else 0)
    r0 = rows[0]
    print(f"{args.split}: {r0['utterances']} utterances, {r0['words']} words, {r0['wrong_words']} wrong, "
          f"{r0['wrong_utterances']} utterances with an error")
    print(f"{'measure (frame/word)':<30}{'word AUC':>10}" + "".join(f"{'utt AUC ' + a:>14}" for a in AGGREGATIONS))
    for r in rows:
        print(f"{r['name'].rsplit('/', 1)[0]:<30}{r['word_auc']:>10.3f}"
              + "".join(f"{r['utterance_auc_' + a]:>14.3f}" for a in AGGREGATIONS))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.select is not None:
        by_name = {m.name: m for m in candidate_measures()}
        wanted = []
        for name in args.select:
            frame_word, _, utt = name.rpartition("/")
            base = by_name.get(f"{frame_word}/mean")
            if base is None:
                raise SystemExit(f"unknown measure {name!r}; names look like {next(iter(by_name))!r}")
            wanted.append(Confidence(base.measure, base.alpha, base.normalization, base.word_aggregation, utt))
        table = selection_table(logits, refs, processor.tokenizer, Normalizer.load(args.model), wanted or None)
        print(f"{'measure (frame/word/utterance)':<36}{'kept %':>8}{'threshold':>11}{'CER %':>8}{'WER %':>8}")
        for r in table:
            print(f"{r['name']:<36}{100 * r['share']:>8.0f}{r['threshold']:>11.4f}{100 * r['cer']:>8.2f}"
                  f"{100 * r['wer']:>8.2f}")
        rows = rows + table
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
