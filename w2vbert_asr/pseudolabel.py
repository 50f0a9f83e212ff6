"""Pseudo-labelling of unlabelled clips, and self-training rounds on them.

Usage:
    w2vbert-asr pseudolabel model=outputs/sw/model data.root=/data/cv-corpus-21.0/sw     # other.tsv -> pseudo.tsv
    w2vbert-asr pseudolabel model=outputs/sw/model data.root=... pseudolabel.pool=/data/extra_audio/
    w2vbert-asr pseudolabel model=outputs/sw/model data.root=... eval.lm=outputs/sw/lm pseudolabel.threshold=0.95
    w2vbert-asr train lang=sw data.root=... output_dir=outputs/sw_st "data.extra_train=[outputs/sw/pseudo/pseudo.tsv]"
    w2vbert-asr pseudolabel recipe=selftrain_demo              # the whole loop: round 0, then a round per threshold

The pool (`pseudolabel.pool`) is Common Voice's `other.tsv` by default (recorded, not yet validated): any
TSV stem of the release, a manifest (.tsv/.csv/.jsonl with a `pseudolabel.audio_column` column) or a
folder of audio. Clips of the release's labelled splits (train, dev, test and the configured ones) are
never labelled. Each remaining clip is transcribed (greedy, or beam search with the n-gram when `eval.lm`
is set), normalised with the model's normaliser and kept when it passes prepare's checks (duration, CTC
feasibility, digits policy, non-empty text), contains no unknown token, and its utterance confidence
(confidence.py) is at least `pseudolabel.threshold`; `pseudolabel.max_clips` keeps only the most confident.

Writes into pseudolabel.output_dir:
    pseudo.tsv                  path, text, confidence, source (file:row) of every kept clip: a manifest for
                                `data.extra_train`, which adds it to train only (dev and test never see it)
    pool.jsonl                  every pool clip: hypothesis, confidence, kept or the reason it was dropped, and
                                the pool's own sentence when it has one (Common Voice's prompt, never used)
    pseudolabel_report.json     counts kept/dropped by reason with examples; with pool sentences, the CER of
                                the kept labels against them at a ladder of thresholds

Self-training (`self_training.thresholds` non-empty): round 0 trains on the labelled data alone into
output_dir/round0 (kept if it already holds a model); round i labels the pool with round i-1's model at
the i-th threshold (with `self_training.lm`: beam search with an n-gram of the labelled transcripts,
built into output_dir/round0/lm) and trains output_dir/round<i> on train + those labels, from the base initialisation
(`self_training.restart=true`) or from round i-1's weights; `self_training.max_ratio` caps the
pseudo-labelled clips per labelled one. Results of every round go to output_dir/self_training.json.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import jiwer
from omegaconf import DictConfig, OmegaConf, open_dict

from . import UsageError
from .confidence import Confidence
from .data import (REASONS, RawRow, SplitReport, _process, _read_delimited, _resolve, _Rules, load_audio,
                   read_split, splits_of)
from .storage import atomic_write_json, atomic_write_text
from .text import Normalizer

log = logging.getLogger(__name__)

PSEUDO = "pseudo.tsv"
POOL = "pool.jsonl"
REPORT = "pseudolabel_report.json"
SUMMARY = "self_training.json"
PSEUDO_COLUMNS = ("path", "text", "confidence", "source")
# Drop reasons beyond prepare's, in the order they are checked.
POOL_REASONS = ("in_labelled_split", *REASONS, "unknown_token", "low_confidence", "over_cap")
LADDER = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)  # thresholds the report scores the labels at


# --------------------------------------------------------------------------------------------- pool
def pool_rows(cfg: DictConfig) -> Iterator[RawRow]:
    """The clips to label: a TSV stem of data.root, a manifest file, or a folder of audio."""
    pool = str(cfg.pseudolabel.pool)
    root = Path(str(cfg.data.get("root") or "."))
    path = Path(pool)
    if path.is_dir():
        from .transcribe import find_audio

        files = find_audio([path])
        if not files:
            raise UsageError(f"pseudolabel.pool={pool}: no audio files in that folder")
        for i, (file, name) in enumerate(files, 1):
            yield RawRow(id=name, sentence="", file=str(path), line=i, path=str(file.absolute()), base=None)
        return
    if not path.suffix and (root / f"{pool}.tsv").is_file():  # a split of the release: Common Voice layout
        tsv, base, column, contained = root / f"{pool}.tsv", root / "clips", "path", True
    elif path.is_file() and path.suffix in (".tsv", ".csv", ".jsonl"):
        tsv, base, column, contained = path, path.parent, str(cfg.pseudolabel.audio_column), False
    else:
        raise UsageError(f"pseudolabel.pool={pool}: not a TSV of data.root={root} ({root / (pool + '.tsv')}), nor a "
                         ".tsv/.csv/.jsonl manifest, nor a folder of audio")
    if tsv.suffix == ".jsonl":
        records = ((i, json.loads(line)) for i, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), 1)
                   if line.strip())
    else:
        import csv

        records = _read_delimited(tsv, "\t" if tsv.suffix == ".tsv" else ",",
                                  csv.QUOTE_NONE if tsv.suffix == ".tsv" else csv.QUOTE_MINIMAL)
    for line, rec in records:
        if column not in rec:
            raise UsageError(f"{tsv}:{line}: no audio column {column!r} (set pseudolabel.audio_column); "
                             f"found {sorted(rec)}")
        audio = str(rec[column] or "")
        yield RawRow(id=Path(audio).stem or f"{tsv.stem}-{line}", sentence=str(rec.get("sentence") or ""),
                     file=str(tsv), line=line, path=audio, base=str(base),
                     contained=contained)


def labelled_paths(cfg: DictConfig) -> set[str]:
    """Resolved audio paths of every labelled split (the configured ones, and train/dev/test of a release)."""
    data = copy.deepcopy(cfg.data)
    with open_dict(data):
        data.limit = None  # a row held back by data.limit is still a labelled clip
    names = {s for sources in splits_of(data).values() for s in sources}
    if data.source == "commonvoice":
        names |= {s for s in ("train", "dev", "test") if (Path(data.root) / f"{s}.tsv").is_file()}
    paths = set()
    for name in sorted(names):
        for row in read_split(data, name):
            if row.path:
                resolved = _resolve(row)
                if resolved is not None:
                    paths.add(str(resolved))
    return paths


# --------------------------------------------------------------------------------------------- labelling
def label_pool(cfg: DictConfig, model_dir: str | Path, output_dir: str | Path, threshold: float,
               max_clips: int | None = None, lm_dir: str | Path | None = None) -> dict:
    """Transcribe the pool with `model_dir` (beam search with `lm_dir`, default eval.lm), keep confident clips
    that pass prepare's checks -> report dict."""
    from .model import pick_device
    from .transcribe import Transcriber, load_model

    model_dir, out = Path(model_dir), Path(output_dir)
    device = pick_device(cfg.pseudolabel.get("device", "auto"))
    model, processor = load_model(model_dir, device)
    normalizer = Normalizer.load(model_dir)
    lm_decoder, beam_width = None, 64
    lm_dir = lm_dir or cfg.eval.get("lm")
    if lm_dir:
        from .lm import lm_info, load_decoder

        lm_decoder = load_decoder(processor.tokenizer, lm_dir)
        beam_width = int(lm_info(lm_dir).get("beam_width", beam_width))
    confidence = Confidence.from_config(cfg.get("confidence"))
    # Whole clips: pool clips are utterances, and a clip longer than data.max_duration is dropped anyway.
    transcriber = Transcriber(model, processor, device, chunk_seconds=max(float(cfg.data.max_duration), 1.0) + 1.0,
                              overlap_seconds=0.0, batch_size=int(cfg.pseudolabel.batch_size), lm_decoder=lm_decoder,
                              beam_width=beam_width, confidence=confidence)
    # prepare's rules, with CTC feasibility from the frames this model really emits
    keys = ("add_adapter", "adapter_kernel_size", "adapter_stride", "num_adapter_layers")
    rules = _Rules(normalizer, int(cfg.data.sampling_rate), float(cfg.data.min_duration),
                   float(cfg.data.max_duration), {k: getattr(model.config, k) for k in keys})
    vocab = {t for t in processor.tokenizer.get_vocab() if len(t) == 1}
    unk = processor.tokenizer.unk_token
    excluded = labelled_paths(cfg)
    report, records = SplitReport(), []
    limit = int(cfg.data.report_examples)
    sr = int(cfg.data.sampling_rate)

    def drop(row: RawRow, reason: str, detail: str, **extra) -> None:
        report.skip(row, reason, detail, limit)
        records.append({"id": row.id, "path": row.path, "source": f"{row.file}:{row.line}", "kept": False,
                        "reason": reason, **extra, **_reference(row, normalizer)})

    def waves():
        for row in pool_rows(cfg):
            report.rows += 1
            path = _resolve(row)
            if path is None:
                drop(row, "path_escape", f"{row.path!r} points outside {row.base}")
            elif str(path) in excluded:
                drop(row, "in_labelled_split", f"{path} is in a labelled split")
            elif not path.is_file():
                drop(row, "missing_file", f"{path} does not exist")
            else:
                try:
                    wave = load_audio(path, sr)
                except Exception as e:  # any decoder error: count the clip, go on
                    drop(row, "undecodable_audio", f"{path}: {type(e).__name__}: {e}")
                    continue
                if not cfg.data.min_duration <= len(wave) / sr <= cfg.data.max_duration:
                    drop(row, "duration", f"{len(wave) / sr:.2f} s is outside data.min_duration..data.max_duration")
                    continue
                yield (row, path), wave

    start = time.perf_counter()
    candidates = []
    for (row, path), transcript in transcriber.stream(waves()):
        text = normalizer(transcript.text)
        conf = float(transcript.confidence if transcript.confidence is not None else 0.0)
        extra = {"hypothesis": text, "confidence": round(conf, 4)}
        checked = RawRow(id=row.id, sentence=transcript.text, file=row.file, line=row.line, path=str(path), base=None)
        example, reason, detail = _process(checked, rules)
        if example is None:
            drop(row, reason, detail, **extra)
        elif unk in transcript.text or (set(transcript.text) | set(text)) - vocab - {" "}:  # [UNK], or the beam's ⁇
            drop(row, "unknown_token", f"{transcript.text!r} has a token outside the vocabulary", **extra)
        elif conf < threshold:
            drop(row, "low_confidence", f"confidence {conf:.3f} < pseudolabel.threshold={threshold}", **extra)
        else:
            candidates.append((row, path, text, conf, example["duration"], extra))
    if max_clips is not None and len(candidates) > max_clips:
        ranked = sorted(range(len(candidates)), key=lambda i: -candidates[i][3])
        over = set(ranked[max(0, int(max_clips)):])
        for i in sorted(over):
            row, _, _, conf, _, extra = candidates[i]
            drop(row, "over_cap", f"confidence {conf:.3f} is not among the {max_clips} most confident", **extra)
        candidates = [c for i, c in enumerate(candidates) if i not in over]
    lines = ["\t".join(PSEUDO_COLUMNS)]
    for row, path, text, conf, duration, extra in candidates:
        report.kept += 1
        report.seconds += duration
        lines.append("\t".join([str(path), text, f"{conf:.4f}", f"{row.file}:{row.line}"]))
        records.append({"id": row.id, "path": str(path), "source": f"{row.file}:{row.line}", "kept": True,
                        "reason": "", **extra, **_reference(row, normalizer)})
    if report.rows == 0:
        raise UsageError(f"pseudolabel.pool={cfg.pseudolabel.pool} has no rows: nothing to label")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / PSEUDO, "\n".join(lines) + "\n")
    atomic_write_text(out / POOL, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = {"pool": str(cfg.pseudolabel.pool), "model": str(model_dir), "threshold": threshold,
               "max_clips": max_clips, "decoding": "beam+lm" if lm_decoder else "greedy",
               "confidence": confidence.to_dict(), **report.to_dict(),
               "kept_share": report.kept / report.rows, "seconds": round(time.perf_counter() - start, 1),
               "manifest": str(out / PSEUDO)}
    summary.update(label_quality(records))
    atomic_write_json(out / REPORT, summary)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items(), key=lambda kv: POOL_REASONS.index(kv[0])))
    print(f"pseudolabel: kept {report.kept} of {report.rows} pool clips ({100 * summary['kept_share']:.1f} %, "
          f"{report.seconds / 3600:.3f} h) at confidence >= {threshold}; dropped: {dropped or 'none'} -> {out / PSEUDO}")
    if "kept_cer" in summary:
        print(f"pseudolabel: CER of the kept labels against the pool's own sentences {100 * summary['kept_cer']:.2f} %")
    return summary


def _reference(row: RawRow, normalizer: Normalizer) -> dict:
    return {"reference": normalizer(row.sentence)} if row.sentence.strip() else {}


def label_quality(records: list[dict]) -> dict:
    """With pool sentences (Common Voice's prompts, or synth's true text): CER/WER of the labels that were
    kept, and of what each threshold of LADDER would keep (share of the transcribed clips, CER)."""
    scored = [r for r in records if r.get("reference") and "hypothesis" in r and r["reason"] != "over_cap"]
    if not scored:
        return {}
    out = {}
    kept = [r for r in scored if r["kept"]]
    if kept:
        out["kept_cer"] = jiwer.cer([r["reference"] for r in kept], [r["hypothesis"] for r in kept])
        out["kept_wer"] = jiwer.wer([r["reference"] for r in kept], [r["hypothesis"] for r in kept])
    ladder = []
    for t in LADDER:
        sel = [r for r in scored if r["confidence"] >= t and r["hypothesis"]]
        if sel:
            ladder.append({"threshold": t, "share": len(sel) / len(scored),
                           "cer": jiwer.cer([r["reference"] for r in sel], [r["hypothesis"] for r in sel]),
                           "wer": jiwer.wer([r["reference"] for r in sel], [r["hypothesis"] for r in sel])})
    out["ladder"] = ladder
    return out


# --------------------------------------------------------------------------------------------- rounds
def _round_config(cfg: DictConfig, output_dir: Path, extra: list[str], init_from: str | None) -> DictConfig:
    """cfg for one round: its own output_dir; the data config resolved first (a recipe may derive data.root
    from output_dir), pseudo-labels as extra train manifests, and the starting weights."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    new = copy.deepcopy(cfg)
    with open_dict(new):
        new.data = data
        new.data.extra_train = list(extra)
        new.output_dir = str(output_dir)
        new.model_dir = str(output_dir / "model")
        new.eval.results_dir = str(output_dir)
        new.train.init_from = init_from
        new.resume = False
    return new


def _results(run: Path, cfg: DictConfig) -> dict:
    metrics = json.loads((run / "metrics.json").read_text()).get("splits", {})
    return {s: {k: metrics[s][k] for k in ("wer", "cer", "utterances")} for s in
            (cfg.data.eval_split, cfg.data.test_split) if s in metrics}


def _compare_rounds(cfg: DictConfig, out: Path, rounds: int) -> str | None:
    """`compare` over the rounds' test predictions (95 % intervals, paired verdicts) into out/compare, so
    one command says whether a round really beat the supervised model. -> that folder, or None."""
    from .report import compare

    runs = [out / f"round{i}" for i in range(rounds)]
    split = cfg.data.test_split
    if rounds < 2 or not all((r / "predictions" / f"{split}.jsonl").is_file() for r in runs):
        return None
    ccfg = copy.deepcopy(cfg)
    with open_dict(ccfg):
        ccfg.compare.runs = [str(r) for r in runs]
        ccfg.compare.split = split
        ccfg.compare.output_dir = str(out / "compare")
    compare(ccfg)
    return str(out / "compare")


def self_train(cfg: DictConfig) -> dict:
    """Round 0 (labelled only), then one pseudo-label + train round per self_training.thresholds entry."""
    from .train import train

    st = cfg.self_training
    out = Path(cfg.output_dir)
    base = out / "round0"
    if (base / "model" / "config.json").is_file() and (base / "metrics.json").is_file():
        print(f"round 0: keeping the supervised model in {base / 'model'}")
    else:
        train(_round_config(cfg, base, [], None))
    labelled = json.loads((base / "prepare_report.json").read_text())["splits"]["train"]["kept"]
    lm_dir = None
    if st.get("lm"):  # an n-gram of the labelled transcripts only: the pool's text never leaks in
        from .lm import build_lm

        lm_dir = build_lm(_round_config(cfg, base, [], None))["output_dir"]
    rounds = [{"round": 0, "threshold": None, "pseudo_labels": 0, "labelled": labelled, **_results(base, cfg)}]
    previous = base / "model"
    for i, threshold in enumerate(st.thresholds, 1):
        run = out / f"round{i}"
        cap = int(st.max_ratio * labelled) if st.get("max_ratio") is not None else cfg.pseudolabel.get("max_clips")
        labels = label_pool(cfg, previous, run / "pseudo", float(threshold), cap, lm_dir)
        if labels["kept"] == 0:
            log.warning("round %d: no pool clip reached confidence %s; stopping", i, threshold)
            break
        train(_round_config(cfg, run, [labels["manifest"]], None if st.restart else str(previous)))
        rounds.append({"round": i, "threshold": float(threshold), "pseudo_labels": labels["kept"],
                       "kept_share": labels["kept_share"], "kept_cer": labels.get("kept_cer"), "labelled": labelled,
                       **_results(run, cfg)})
        previous = run / "model"
    summary = {"restart": bool(st.restart), "max_ratio": st.get("max_ratio"), "lm": lm_dir, "rounds": rounds,
               "comparison": _compare_rounds(cfg, out, len(rounds))}
    atomic_write_json(out / SUMMARY, summary)
    test = cfg.data.test_split
    print(f"{'round':>5}{'threshold':>10}{'pseudo':>8}{'kept %':>8}{'label CER %':>12}{'test WER %':>11}{'test CER %':>11}")
    for r in rounds:
        t = r.get(test, {})
        print(f"{r['round']:>5}{r['threshold'] if r['threshold'] is not None else '-':>10}{r['pseudo_labels']:>8}"
              f"{100 * r.get('kept_share', 0):>8.1f}"
              f"{(100 * r['kept_cer']) if r.get('kept_cer') is not None else float('nan'):>12.2f}"
              f"{100 * t.get('wer', float('nan')):>11.2f}{100 * t.get('cer', float('nan')):>11.2f}")
    return summary


def pseudolabel(cfg: DictConfig) -> dict:
    """`w2vbert-asr pseudolabel`: label the pool with model_dir; with self_training.thresholds, run the rounds."""
    if cfg.self_training.thresholds:
        return self_train(cfg)
    model_dir = Path(cfg.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} is not a model folder (no config.json); pass model=<trained model dir>")
    max_clips = cfg.pseudolabel.get("max_clips")
    return label_pool(cfg, model_dir, cfg.pseudolabel.output_dir, float(cfg.pseudolabel.threshold),
                      int(max_clips) if max_clips is not None else None)

