"""How well a confidence measure catches wrong words: the study that chose the defaults of confidence.py.

Usage:
    python -m w2vbert_asr.confidence_study --model demo_out/model --run demo_out --split dev    # AUC per measure
    python -m w2vbert_asr.confidence_study --model demo_out/model --run demo_out --split dev --json auc.json
    python -m w2vbert_asr.confidence_study --model demo_out/model --run demo_out --select 'tsallis(0.5,lin)/min/mean'

Every candidate measure (confidence.py's frame measures x word aggregations) scores the greedy words of a
prepared split; the table gives the area under the ROC curve for "this word is wrong" (and for "this
utterance has an error" under each utterance aggregation). `--select` adds what pseudo-labelling would keep:
the CER of the most confident share of the utterances.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .confidence import AGGREGATIONS, NORMALIZATIONS, Confidence, aggregate, greedy_hypothesis

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
    from .prepared import load_prepared
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
