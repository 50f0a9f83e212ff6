"""`w2vbert-asr audit model=<dir> data.root=...`: score every clip's transcript against its audio, to find the
clips whose transcript is wrong (read for another prompt, words skipped, cut short, another language, no speech).

Usage:
    w2vbert-asr audit model=outputs/sw/model data.root=/data/cv-corpus-21.0/sw
    w2vbert-asr audit model=outputs/sw/model data.root=... "audit.splits=[train,dev,test,other]" audit.device=cuda
    w2vbert-asr train lang=sw data.root=... output_dir=outputs/sw_clean "data.exclude=[outputs/sw/audit/audit.tsv]"

Each clip of the audited splits (audit.splits; null: the configured train, eval and test sources) is read and
checked like prepare does it, with the model's normaliser and frame geometry (a clip prepare would skip is
listed with its reason, not scored), decoded by `data.num_proc` processes, and run through the model in
duration-sorted batches of at most `audit.max_batch_seconds` padded seconds: memory holds a window of decoded
clips, the worst `audit.worst` clips' audio and one line of text per clip. Per clip: the alignment score
(alignment.py; low = the transcript does not fit the audio), the greedy transcript, its CER against the
reference, the reference's characters per second, the duration and the utterance confidence.

Writes into audit.output_dir (default <run>/audit):
    audit.tsv            every clip, ranked worst first (exclusion.AUDIT_COLUMNS); `flagged` = score below
                         audit.threshold. `data.exclude=[audit.tsv]` leaves the flagged train clips out of train.
    audit_summary.json   clips, flagged and skipped per split, the score's distribution, the threshold; with a
                         synthetic release's planted_faults.tsv, precision and recall per fault kind
    audit.html           the worst clips, one page that works offline (audit_report.py)
"""

from __future__ import annotations

import heapq
import math
from itertools import count
from pathlib import Path

import numpy as np
import torch

from . import UsageError
from .alignment import alignment, label_ids
from .audio import waves_of
from .batching import greedy_batches
from .confidence import Confidence, greedy_hypothesis
from .evaluate import utterance_rates
from .exclusion import AUDIT_COLUMNS
from .features import pad_waves
from .storage import atomic_write_json, atomic_write_text
from .waveform import featurizer_for

AUDIT_TSV = "audit.tsv"
SUMMARY = "audit_summary.json"
REPORT = "audit.html"
# Decoded clips sorted by duration together before they are cut into batches: enough that a batch holds clips
# of similar length (little padding), few enough that their audio stays small (256 clips of 5 s: 40 MB).
WINDOW = 256
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


class Worst:
    """The `keep` lowest-scoring clips seen (their records and int16 audio), for the report."""

    def __init__(self, keep: int):
        self.keep, self.heap, self._n = int(keep), [], count()

    def offer(self, record: dict, audio) -> None:
        if self.keep <= 0:
            return
        item = (-_sortable(record["score"]), next(self._n), record, np.asarray(audio))
        if len(self.heap) < self.keep:
            heapq.heappush(self.heap, item)
        elif item[0] > self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def clips(self) -> list[tuple[dict, np.ndarray]]:
        """(record, audio) of the kept clips, worst first."""
        return [(r, a) for _, _, r, a in sorted(self.heap, key=lambda x: (-x[0], x[1]))]


class Scorer:
    """Runs decoded clips (prepare's examples) through one CTC model in batches -> one record per clip; offers
    each to `worst`."""

    def __init__(self, model, processor, normalizer, device, confidence: Confidence | None = None,
                 max_batch_seconds: float = 200.0, max_batch_size: int = 32, worst: Worst | None = None):
        self.model, self.tokenizer, self.normalizer, self.device = model.eval(), processor.tokenizer, normalizer, device
        self.featurizer = featurizer_for(processor.feature_extractor).to(device)
        self.confidence = confidence or Confidence()
        self.max_seconds, self.max_size = float(max_batch_seconds), int(max_batch_size)
        self.worst = worst or Worst(0)

    def score(self, split: str, examples: list[dict]) -> list[dict]:
        """Records of `examples` (dicts with id, path, text, sentence, duration, audio), in their order."""
        durations = [float(e["duration"]) for e in examples]
        order = np.argsort(durations, kind="stable")
        out: dict[int, dict] = {}
        for batch in greedy_batches(order, durations, self.max_seconds, self.max_size):
            for i, record in zip(batch, self._batch(split, [examples[i] for i in batch])):
                out[i] = record
                self.worst.offer(record, examples[i]["audio"])
        return [out[i] for i in range(len(examples))]

    @torch.no_grad()
    def _batch(self, split: str, batch: list[dict]) -> list[dict]:
        waves, lengths = pad_waves(waves_of(e["audio"] for e in batch))
        feats, mask = self.featurizer(waves.to(self.device), lengths.to(self.device))
        logits = self.model(input_features=feats, attention_mask=mask).logits.float()
        texts = [str(e["text"]) for e in batch]
        a = alignment(logits, lengths, label_ids(self.tokenizer, texts).to(self.device), self.model.config)
        rows = logits.cpu()
        records = []
        for i, (e, text) in enumerate(zip(batch, texts)):
            hyp = greedy_hypothesis(rows[i, : int(a.frames[i])], self.tokenizer, self.confidence)
            hypothesis = self.normalizer(hyp.text)
            duration = float(e["duration"])
            records.append({
                "split": split, "id": str(e["id"]), "path": str(e["path"]), "sentence": str(e["sentence"]),
                "score": float(a.score[i]), "cer": utterance_rates(text, hypothesis)["cer"],
                "chars_per_second": len(text.replace(" ", "")) / duration, "duration": duration,
                "frames": int(a.frames[i]), "chars": int(a.chars[i]), "log_likelihood": float(a.log_likelihood[i]),
                "best_path": float(a.best_path[i]), "confidence": hyp.confidence, "reference": text,
                "hypothesis": hypothesis, "words": [(w, c) for w, _, _, c in hyp.words], "reason": ""})
        return records

def _sortable(score: float) -> float:
    return -math.inf if math.isnan(score) else score


def audit_splits(cfg) -> list[str]:
    """The source splits to audit: audit.splits, or every configured train, eval and test source."""
    if cfg.audit.splits:
        return list(dict.fromkeys(str(s) for s in cfg.audit.splits))
    from .sources import splits_of

    return list(dict.fromkeys(s for sources in splits_of(cfg.data).values() for s in sources))


def score_clips(cfg, scorers: list[Scorer], rules, splits: list[str], route=None) -> tuple[list[dict], list[dict]]:
    """Read, check, decode and score every clip of `splits` -> (scored records, skipped records).
    route(split, row) -> index of the scorer for that clip (default: the first)."""
    from tqdm.auto import tqdm

    from .pool import DecodePool, num_processes
    from .sources import read_split

    scored, skipped = [], []
    with DecodePool(rules, num_processes(cfg.data.num_proc)) as pool:
        for split in splits:
            total = sum(1 for _ in read_split(cfg.data, split))
            windows: list[list[dict]] = [[] for _ in scorers]  # one per scorer: a batch goes through one model
            with tqdm(total=total, desc=f"audit {split}", unit="clip", mininterval=2) as bar:
                for row, (example, reason, detail) in pool.map(read_split(cfg.data, split)):
                    if example is None:
                        skipped.append({"split": split, "id": row.id, "path": row.path or "", "score": math.nan,
                                        "reason": reason, "detail": detail, "sentence": row.sentence})
                        bar.update()
                        continue
                    k = route(split, row) if route else 0
                    windows[k].append(example)
                    if len(windows[k]) == WINDOW:
                        scored += scorers[k].score(split, windows[k])
                        bar.update(len(windows[k]))
                        windows[k] = []
                for k, window in enumerate(windows):
                    if window:
                        scored += scorers[k].score(split, window)
                        bar.update(len(window))
    return scored, skipped


# --------------------------------------------------------------------------------------------- outputs
def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def audit_tsv(ranked: list[dict], skipped: list[dict], threshold: float) -> str:
    """audit.tsv: scored clips worst first (rank 1 = lowest score), then the clips prepare's rules skip."""
    lines = ["\t".join(AUDIT_COLUMNS)]
    for rank, r in enumerate(ranked, 1):
        r = {**r, "rank": rank, "flagged": int(r["score"] < threshold)}
        lines.append("\t".join(_cell(r.get(c, "")) for c in AUDIT_COLUMNS))
    for r in skipped:
        lines.append("\t".join(_cell(r.get(c, "")) for c in AUDIT_COLUMNS))
    return "\n".join(lines) + "\n"


def summarise(ranked: list[dict], skipped: list[dict], threshold: float, faults: dict) -> dict:
    """Counts per split, the score's distribution and, with planted faults, precision and recall."""
    splits: dict[str, dict] = {}
    for r in ranked:
        s = splits.setdefault(r["split"], {"rows": 0, "scored": 0, "flagged": 0, "skipped": {}})
        s["rows"] += 1
        s["scored"] += 1
        s["flagged"] += r["score"] < threshold
    for r in skipped:
        s = splits.setdefault(r["split"], {"rows": 0, "scored": 0, "flagged": 0, "skipped": {}})
        s["rows"] += 1
        s["skipped"][r["reason"]] = s["skipped"].get(r["reason"], 0) + 1
    scores = np.array([r["score"] for r in ranked], dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    distribution = {"clips": int(scores.size), "unalignable": int(np.sum(np.isneginf(scores))),
                    "mean": float(finite.mean()) if finite.size else math.nan,
                    "quantiles": {f"{q:g}": float(np.quantile(finite, q)) for q in QUANTILES} if finite.size else {},
                    "cer_median": float(np.median([r["cer"] for r in ranked])) if ranked else math.nan}
    flagged = int(np.sum(scores < threshold))
    out = {"threshold": threshold, "flagged": flagged, "flagged_share": flagged / max(1, scores.size),
           "splits": splits, "distribution": distribution}
    if faults:
        out["planted"] = planted_recall(ranked, skipped, threshold, faults)
    return out


def planted_recall(ranked: list[dict], skipped: list[dict], threshold: float, faults: dict) -> dict:
    """Against a synthetic release's planted faults (plant.py): precision and recall of the flagged clips,
    overall and per fault kind. A clip prepare's own rules skip (e.g. audio cut so short that CTC cannot align
    its transcript) is counted as caught: it never reaches training either."""
    def name(r):
        return Path(r["path"]).name

    flagged = {name(r) for r in ranked if r["score"] < threshold}
    dropped = {name(r) for r in skipped}
    audited = {name(r) for r in ranked} | dropped
    planted = {k: v for k, v in faults.items() if k in audited}
    caught = flagged | dropped
    true = caught & set(planted)
    kinds = {}
    for clip, row in planted.items():
        k = kinds.setdefault(row["kind"], {"planted": 0, "flagged": 0, "skipped_by_rules": 0})
        k["planted"] += 1
        k["flagged"] += clip in flagged
        k["skipped_by_rules"] += clip in dropped
    for k in kinds.values():
        k["recall"] = (k["flagged"] + k["skipped_by_rules"]) / k["planted"]
    return {"planted": len(planted), "caught": len(caught), "true_positives": len(true),
            "precision": len(true) / len(caught) if caught else math.nan,
            "recall": len(true) / len(planted) if planted else math.nan, "kinds": kinds,
            "false_positives": sorted(caught - set(planted)), "missed": sorted(set(planted) - caught)}


def print_summary(summary: dict) -> None:
    print(f"{'split':<8}{'clips':>7}{'scored':>8}{'flagged':>9}{'flagged %':>11}  skipped by prepare's rules")
    for name, s in summary["splits"].items():
        skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "-"
        print(f"{name:<8}{s['rows']:>7}{s['scored']:>8}{s['flagged']:>9}{100 * s['flagged'] / max(1, s['scored']):>11.1f}"
              f"  {skipped}")
    q = summary["distribution"]["quantiles"]
    if q:
        print("score quantiles: " + "  ".join(f"{float(k) * 100:g}%: {v:.3f}" for k, v in q.items())
              + f"  (threshold {summary['threshold']:g})")
    planted = summary.get("planted")
    if planted:
        print(f"planted faults: precision {100 * planted['precision']:.1f} %, recall {100 * planted['recall']:.1f} % "
              f"({planted['true_positives']} of {planted['planted']} caught, {planted['caught']} flagged or skipped)")
        for kind, k in planted["kinds"].items():
            print(f"  {kind:<16} {k['flagged'] + k['skipped_by_rules']:>3} of {k['planted']:<3} "
                  f"(flagged {k['flagged']}, skipped by prepare's rules {k['skipped_by_rules']})")


def _scorer(model_dir: Path, cfg, device, worst: Worst) -> Scorer:
    from .families import load_processor
    from .model import load_ctc_model
    from .text import Normalizer

    return Scorer(load_ctc_model(model_dir, device), load_processor(model_dir), Normalizer.load(model_dir), device,
                  Confidence.from_config(cfg.confidence), cfg.audit.max_batch_seconds, cfg.audit.max_batch_size, worst)


def audit(cfg) -> dict:
    """`w2vbert-asr audit`: score every clip (train clips by fold models with audit.folds >= 2), write audit.tsv,
    audit_summary.json and audit.html."""
    from .audit_report import write_report
    from .crossfit import clip_key, fold_models
    from .devices import device_name, pick_device
    from .geometry import FrameGeometry
    from .model import check_model_dir
    from .plant import read_faults
    from .rows import Rules

    acfg, threshold, folds = cfg.audit, float(cfg.audit.threshold), int(cfg.audit.folds)
    given = Path(cfg.model_dir) if (Path(cfg.model_dir) / "config.json").is_file() else None
    if folds < 2:
        given = check_model_dir(cfg.model_dir, "audit")
        _warn_if_trained_on(given, cfg)
    elif given is None:  # a mistyped model= must not pass unnoticed
        print(f"audit: model={cfg.model_dir} is not a model folder (no config.json): the splits other than train "
              "are scored by fold 0's model")
    fold_dirs, fold_of = fold_models(cfg, folds) if folds >= 2 else ([], {})
    device, worst = pick_device(acfg.device), Worst(acfg.worst)
    main_dir = given or fold_dirs[0]  # dev/test (and any other split): the given model, else fold 0's
    scorers = [_scorer(d, cfg, device, worst) for d in [main_dir, *fold_dirs]]
    rules = Rules.from_config(cfg, scorers[0].normalizer, FrameGeometry.of(scorers[0].model.config))
    train_sources = set(cfg.data.train_splits)

    def route(split, row) -> int:
        return 1 + fold_of[clip_key(row)] if fold_dirs and split in train_sources else 0

    splits = audit_splits(cfg)
    scored, skipped = score_clips(cfg, scorers, rules, splits, route)
    if not scored and not skipped:
        raise UsageError(f"no clips in the audited splits {splits}: check data.root / data.files")
    ranked = sorted(scored, key=lambda r: _sortable(r["score"]))
    root = cfg.data.get("root") if cfg.data.source == "commonvoice" else None
    faults = read_faults(root) if root else {}
    summary = {"model": str(main_dir), "folds": [str(d) for d in fold_dirs], "device": device_name(device),
               "splits_audited": splits, **summarise(ranked, skipped, threshold, faults)}
    out = Path(acfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / AUDIT_TSV, audit_tsv(ranked, skipped, threshold))
    atomic_write_json(out / SUMMARY, summary)
    write_report(out / REPORT, worst.clips(), summary, [r["score"] for r in ranked], skipped, faults)
    print_summary(summary)
    print(f"audit: {out / AUDIT_TSV} (ranked, worst first), {out / REPORT} (the {len(worst.heap)} worst); leave "
          f"the flagged train clips out with \"data.exclude=[{out / AUDIT_TSV}]\"")
    return summary


def _warn_if_trained_on(model_dir: Path, cfg) -> None:
    """A model scores its own train clips as it learnt them, wrong transcripts included: say so."""
    import logging

    from omegaconf import OmegaConf

    run_config = model_dir.parent / "config.yaml"
    if not run_config.is_file() or not set(cfg.data.train_splits) & set(audit_splits(cfg)):
        return
    trained = OmegaConf.load(run_config).get("data", {})
    if str(trained.get("root", "")) == str(cfg.data.get("root", "")) and cfg.data.get("root"):
        logging.getLogger(__name__).warning(
            "audit.folds=%s: %s was trained on the train clips it now scores; a model reproduces its own train "
            "transcripts, wrong ones included, so their scores look clean. audit.folds=2 scores them with models "
            "that never saw them", cfg.audit.folds, model_dir)
