"""The studies behind the audit, averaging and pseudo-label defaults: audit scores against planted faults,
checkpoint averaging after the fact, pooled training seeds for `compare`, and the pseudo-label filters.
Results: recipes/README.md.

Usage:
    # how well each normalisation of the alignment score ranks a synthetic release's planted faults
    python benchmarks/levers.py audit RUN/audit/audit.tsv RELEASE/planted_faults.tsv
    # every checkpoint of training runs averaged after the fact (last N, best N), scored on dev and test
    python benchmarks/levers.py average RUN_SEED42 RUN_SEED1 RUN_SEED2 --out averaging/
    # the test predictions of several seeds in one results folder (ids prefixed by seed), for `compare`
    python benchmarks/levers.py pool RUN_SEED42 RUN_SEED1 RUN_SEED2 --out pooled/arm
    # CER of the kept pseudo-labels against the share kept, by confidence, alignment score or both (a pool
    # labelled at pseudolabel.threshold=0), and the pseudo.tsv a filter keeps
    python benchmarks/levers.py pseudo LABELS/pool.jsonl --write alignment:0:-0.3:LABELS_ALIGN
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from w2vbert_asr.alignment import NORMALISATIONS, normalise  # noqa: E402


def _tsv(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores lower than a negative): low score = faulty (ties count half)."""
    if not len(positive) or not len(negative):
        return math.nan
    less = (positive[:, None] < negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(less + 0.5 * ties)


# --------------------------------------------------------------------------------------------- audit
def audit_study(audit_tsv: str, faults_tsv: str, thresholds: list[float]) -> dict:
    rows = _tsv(audit_tsv)
    faults = {r["path"]: r["kind"] for r in _tsv(faults_tsv)}
    scored = [r for r in rows if r["score"]]
    skipped = [r for r in rows if not r["score"]]
    name = [Path(r["path"]).name for r in scored]
    faulty = np.array([n in faults for n in name])
    kinds = np.array([faults.get(n, "") for n in name])
    caught_by_rules = sum(Path(r["path"]).name in faults for r in skipped)
    cols = {k: np.array([float(r[k]) for r in scored]) for k in ("log_likelihood", "best_path", "frames", "chars")}
    out = {"clips": len(rows), "scored": len(scored), "planted": len(faults), "skipped_by_rules": len(skipped),
           "planted_skipped_by_rules": caught_by_rules, "normalisations": {}}
    for how in (*NORMALISATIONS, "cer"):
        score = -np.array([float(r["cer"]) for r in scored]) if how == "cer" else \
            normalise(cols["log_likelihood"], cols["best_path"], cols["frames"], cols["chars"], how)
        entry = {"auc": auc(score[faulty], score[~faulty]),
                 "auc_by_kind": {k: auc(score[kinds == k], score[~faulty]) for k in sorted(set(kinds) - {""})}}
        order = np.sort(score)
        entry["at"] = []
        for t in (thresholds if how == SCORE_NAME else []):
            flagged = score < t
            tp = int((flagged & faulty).sum()) + caught_by_rules
            fp = int((flagged & ~faulty).sum())
            entry["at"].append({"threshold": t, "flagged": int(flagged.sum()), "precision": tp / max(1, tp + fp),
                                "recall": tp / max(1, len(faults)),
                                "recall_by_kind": {k: float((flagged & (kinds == k)).sum() / max(1, (kinds == k).sum()))
                                                   for k in sorted(set(kinds) - {""})}})
        entry["quantiles"] = {q: float(np.quantile(order, q)) for q in (0.05, 0.1, 0.5)}
        out["normalisations"][how] = entry
    return out


SCORE_NAME = "gap_per_frame"


def print_audit(out: dict) -> None:
    print(f"{out['clips']} clips, {out['planted']} planted faults ({out['planted_skipped_by_rules']} of them skipped "
          f"by prepare's rules), {out['skipped_by_rules']} clips skipped by the rules in all")
    print(f"{'score':<15}{'AUC':>7}  AUC per kind")
    for how, e in out["normalisations"].items():
        kinds = "  ".join(f"{k} {v:.3f}" for k, v in e["auc_by_kind"].items())
        print(f"{how:<15}{e['auc']:>7.3f}  {kinds}")
    for row in out["normalisations"][SCORE_NAME]["at"]:
        kinds = "  ".join(f"{k} {100 * v:.0f}" for k, v in row["recall_by_kind"].items())
        print(f"threshold {row['threshold']:>6.2f}: flagged {row['flagged']:>3}, precision {100 * row['precision']:5.1f} %,"
              f" recall {100 * row['recall']:5.1f} %  (recall by kind, %: {kinds})")


# --------------------------------------------------------------------------------------------- averaging
def _decode(model, ds, featurizer, tokenizer, normalizer) -> tuple[dict, list[dict]]:
    import torch

    from w2vbert_asr.evaluate import decode_dataset, greedy_decoder, score

    hyps, _ = decode_dataset(model, ds, featurizer, greedy_decoder(tokenizer), torch.device("cpu"), 200.0, 32)
    return score(ds, hyps, normalizer)


def average_study(runs: list[str], out_dir: str, sizes: list[int]) -> dict:
    """Every single checkpoint, the last-N and best-N averages of each run on dev and test; the exported model
    under NeMo's rule (the average only when its dev WER, then CER, is not worse than the best single's)."""
    from w2vbert_asr.average import average_weights, evaluations
    from w2vbert_asr.checkpoint import STATE_FILE, complete_checkpoints
    from w2vbert_asr.families import load_processor
    from w2vbert_asr.model import load_ctc_model
    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.text import Normalizer
    from w2vbert_asr.waveform import featurizer_for

    table = {}
    for run in map(Path, runs):
        ckpts = {int(p.name.split("-")[1]): p for p in complete_checkpoints(run / "checkpoints")}
        history = json.loads((ckpts[max(ckpts)] / STATE_FILE).read_text())["history"]
        dev_scores = evaluations(history)
        model, processor = load_ctc_model(run / "model", "cpu"), load_processor(run / "model")
        normalizer, featurizer = Normalizer.load(run / "model"), featurizer_for(processor.feature_extractor)
        splits = {s: load_prepared(run, s) for s in ("dev", "test")}
        ranked = sorted(ckpts, key=lambda k: (*dev_scores[k], k))
        candidates = {f"single {k}": [k] for k in sorted(ckpts)}
        candidates |= {f"last {n}": sorted(ckpts)[-n:] for n in sizes if n <= len(ckpts)}
        candidates |= {f"best {n}": sorted(ranked[:n]) for n in sizes if n <= len(ckpts)}
        results = {}
        for name, steps in candidates.items():
            model.load_state_dict(average_weights([ckpts[k] for k in steps]))
            results[name] = {"steps": steps}
            for split, ds in splits.items():
                metrics, rows = _decode(model, ds, featurizer, processor.tokenizer, normalizer)
                results[name][split] = {"wer": metrics["wer"], "cer": metrics["cer"], "rows": rows}
            print(f"{run.name:<12}{name:<10} dev WER {100 * results[name]['dev']['wer']:6.2f} CER "
                  f"{100 * results[name]['dev']['cer']:5.2f}  test WER {100 * results[name]['test']['wer']:6.2f} CER "
                  f"{100 * results[name]['test']['cer']:5.2f}", flush=True)
        best = f"single {ranked[0]}"
        policies = {"single (best dev)": best}
        for n in sizes:
            for how in ("last", "best"):
                name = f"{how} {n}"
                if name in results:
                    avg, one = results[name]["dev"], results[best]["dev"]
                    kept = (avg["wer"], avg["cer"]) <= (one["wer"], one["cer"])
                    policies[f"{name} (NeMo rule)"] = name if kept else best
        table[run.name] = {"results": results, "policies": policies}
    _write_policies(table, Path(out_dir))
    return table


def _write_policies(table: dict, out: Path) -> None:
    """Per policy: a results folder of every run's test (and dev) predictions pooled, for `compare`."""
    from w2vbert_asr.evaluate import error_rates

    policies = next(iter(table.values()))["policies"]
    summary = {}
    for policy in policies:
        folder = out / policy.split(" (")[0].replace(" ", "_")
        splits = {}
        for split in ("dev", "test"):
            rows = [{**r, "id": f"{run}:{r['id']}"} for run, t in table.items()
                    for r in t["results"][t["policies"][policy]][split]["rows"]]
            (folder / "predictions").mkdir(parents=True, exist_ok=True)
            (folder / "predictions" / f"{split}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            rates = error_rates([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
            splits[split] = {**rates, "utterances": len(rows), "audio_hours": sum(r["duration"] for r in rows) / 3600}
        (folder / "metrics.json").write_text(json.dumps({"system": "w2v-bert-2.0-ctc", "model": policy,
                                                         "splits": splits}, indent=2))
        chosen = {run: t["policies"][policy] for run, t in table.items()}
        summary[policy] = {"folder": str(folder), "chosen": chosen, **{s: splits[s] for s in splits}}
        print(f"{policy:<22} pooled dev CER {100 * splits['dev']['cer']:5.2f}  test WER {100 * splits['test']['wer']:6.2f}"
              f" CER {100 * splits['test']['cer']:5.2f}  exported: {chosen}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


# --------------------------------------------------------------------------------------------- pooling
def pool_runs(runs: list[str], out: str, splits=("dev", "test"), name: str | None = None) -> None:
    """The predictions of several runs (training seeds) in one results folder, ids prefixed by the run's training
    seed (its config.yaml's `seed`): `compare` then pairs two such folders (two arms of the same seeds) utterance
    by utterance and seed by seed."""
    from omegaconf import OmegaConf

    from w2vbert_asr.evaluate import error_rates

    folder = Path(out)
    (folder / "predictions").mkdir(parents=True, exist_ok=True)
    metrics = {"system": "w2v-bert-2.0-ctc", "model": name or folder.name, "runs": runs, "splits": {}}
    for split in splits:
        rows = []
        for run in map(Path, runs):
            file = run / "predictions" / f"{split}.jsonl"
            seed = f"seed{OmegaConf.load(run / 'config.yaml').seed}"
            rows += [{**json.loads(line), "id": f"{seed}:{json.loads(line)['id']}"}
                     for line in file.read_text().splitlines() if line.strip()]
        (folder / "predictions" / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                      for r in rows))
        metrics["splits"][split] = {**error_rates([r["reference"] for r in rows], [r["hypothesis"] for r in rows]),
                                    "utterances": len(rows), "audio_hours": sum(r["duration"] for r in rows) / 3600}
        print(f"{folder}: {split} {len(rows)} utterances, WER {100 * metrics['splits'][split]['wer']:.2f} %, "
              f"CER {100 * metrics['splits'][split]['cer']:.2f} %")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))


# --------------------------------------------------------------------------------------------- pseudo-labels
def _passes(r: dict, filter_: str, threshold: float, min_alignment: float) -> bool:
    """pseudolabel's rule (_judge) for a label that passed prepare's checks."""
    return (filter_ == "alignment" or r["confidence"] >= threshold) and \
        (filter_ == "confidence" or r["alignment"] >= min_alignment)


def pseudo_study(pool_jsonl: str, shares=(1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.25), thresholds=(0.6, 0.7, 0.8, 0.9),
                 alignments=(-0.1, -0.2, -0.3, -0.5, -1.2), write: list[str] = ()) -> dict:
    """One labelling pass at pseudolabel.threshold=0 (pool.jsonl: every label with its confidence, alignment
    score and the pool's hidden text) -> what each filter keeps: (1) the most trusted share of the labels by
    confidence, by alignment, and by both (in the top share by each: the lower of its two ranks); (2) the share
    kept and the CER of the kept labels at given thresholds, as `pseudolabel.filter` would keep them. `write`:
    "FILTER:THRESHOLD:MIN_ALIGNMENT:OUT_DIR" entries, each writing the pseudo.tsv that filter would keep."""
    import jiwer

    records = [json.loads(line) for line in Path(pool_jsonl).read_text().splitlines() if line.strip()]
    scored = [r for r in records if r.get("reference") and "hypothesis" in r and "alignment" in r]
    # Labels the filter decides on: kept at threshold 0, or dropped by it; the others failed prepare's checks.
    eligible = [r for r in scored if r["kept"] or r["reason"] in ("low_confidence", "low_alignment")]
    if not eligible:
        raise SystemExit(f"{pool_jsonl}: no label with the pool's own text to score it against")

    def cer(rows):
        return jiwer.cer([r["reference"] for r in rows], [r["hypothesis"] for r in rows]) if rows else float("nan")

    rank = {key: {id(r): i for i, r in enumerate(sorted(eligible, key=lambda r: -r[key]))}
            for key in ("confidence", "alignment")}
    order = {"confidence": lambda r: rank["confidence"][id(r)], "alignment": lambda r: rank["alignment"][id(r)],
             "both": lambda r: max(rank["confidence"][id(r)], rank["alignment"][id(r)])}
    by_share = []
    print(f"{len(scored)} labelled pool clips with hidden text, {len(eligible)} past prepare's checks")
    for share in shares:
        row = {"share": share}
        for name, key in order.items():
            row[name] = cer(sorted(eligible, key=key)[: max(1, round(share * len(eligible)))])
        by_share.append(row)
        print(f"most trusted {100 * share:5.1f} %: CER by confidence {100 * row['confidence']:6.2f} %, by alignment "
              f"{100 * row['alignment']:6.2f} %, by both {100 * row['both']:6.2f} %")
    at = []
    settings = [("confidence", t, float("-inf")) for t in thresholds] + \
        [("alignment", 0.0, m) for m in alignments] + [("both", t, m) for t in thresholds for m in alignments]
    for filter_, t, m in settings:
        kept = [r for r in eligible if _passes(r, filter_, t, m)]
        at.append({"filter": filter_, "threshold": t, "min_alignment": m, "kept_share": len(kept) / len(scored),
                   "cer": cer(kept)})
        print(f"filter={filter_:<10} threshold={t:<4} min_alignment={m:<5}: kept {100 * len(kept) / len(scored):5.1f} "
              f"% of the pool, CER of the kept labels {100 * at[-1]['cer']:6.2f} %")
    for spec in write:
        filter_, t, m, out = spec.split(":", 3)
        kept = [r for r in eligible if _passes(r, filter_, float(t), float(m))]
        Path(out).mkdir(parents=True, exist_ok=True)
        lines = ["path\ttext\tconfidence\tsource"] + [f"{r['path']}\t{r['hypothesis']}\t{r['confidence']:.4f}\t"
                                                      f"{r['source']}" for r in kept]
        (Path(out) / "pseudo.tsv").write_text("\n".join(lines) + "\n")
        print(f"{out}/pseudo.tsv: {len(kept)} labels (filter={filter_}, threshold={t}, min_alignment={m})")
    return {"by_share": by_share, "at_thresholds": at}


# --------------------------------------------------------------------------------------------- entry
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("audit")
    a.add_argument("audit_tsv")
    a.add_argument("faults_tsv")
    a.add_argument("--thresholds", type=float, nargs="+",
                   default=[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.8, -1.0, -1.2, -1.5, -2.0])
    a.add_argument("--json")
    v = sub.add_parser("average")
    v.add_argument("runs", nargs="+")
    v.add_argument("--out", required=True)
    v.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 5])
    p = sub.add_parser("pool")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    q = sub.add_parser("pseudo")
    q.add_argument("pool_jsonl")
    q.add_argument("--write", nargs="*", default=[], metavar="FILTER:THRESHOLD:MIN_ALIGNMENT:OUT_DIR")
    q.add_argument("--json")
    args = ap.parse_args(argv)
    if args.what == "average":
        average_study(args.runs, args.out, args.sizes)
    elif args.what == "pool":
        pool_runs(args.runs, args.out)
    elif args.what == "pseudo":
        out = pseudo_study(args.pool_jsonl, write=args.write)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    if args.what == "audit":
        out = audit_study(args.audit_tsv, args.faults_tsv, args.thresholds)
        print_audit(out)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
