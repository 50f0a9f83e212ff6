"""Pseudo-labelling of unlabelled clips, and self-training rounds on them.

Usage:
    w2vbert-asr pseudolabel model=outputs/sw/model data.root=/data/cv-corpus-21.0/sw     # other.tsv -> pseudo.tsv
    w2vbert-asr pseudolabel model=outputs/sw/model data.root=... pseudolabel.pool=/data/extra_audio/
    w2vbert-asr pseudolabel model=outputs/sw/model data.root=... pseudolabel.lm=outputs/sw/lm pseudolabel.threshold=0.95
    w2vbert-asr train lang=sw data.root=... output_dir=outputs/sw_st "data.extra_train=[outputs/sw/pseudo/pseudo.tsv]"
    w2vbert-asr pseudolabel recipe=selftrain_demo              # the whole loop: round 0, then a round per threshold

The pool (`pseudolabel.pool`) is Common Voice's `other.tsv` by default (recorded, not yet validated): any TSV
stem of the release, a manifest (.tsv/.csv/.jsonl with a `pseudolabel.audio_column` column) or a folder of
audio. Clips of the release's labelled splits (train, dev, test and the configured ones) are never labelled,
whatever path leads to them (real paths are compared, symlinks resolved), nor are copies of dev or test clips
under another name (same decoded audio: prepare's rule, rows.HeldOut). Each remaining clip is transcribed
(greedy, or beam search with the n-gram when `pseudolabel.lm` is set), normalised with the model's normaliser
and kept when it passes prepare's checks (duration, CTC feasibility, digits policy, non-empty text), contains
no unknown token, and passes `pseudolabel.filter`: its utterance confidence (confidence.py) is at least
`pseudolabel.threshold`, and/or the alignment score of the label against its own audio (alignment.py, as
`audit` scores a transcript) at least `pseudolabel.min_alignment`; `pseudolabel.max_clips` keeps only the most
confident.

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
from omegaconf import OmegaConf, open_dict

from . import UsageError
from .confidence import Confidence
from .model import check_model_dir
from .audio import load_audio, to_int16
from .pool import DecodePool, num_processes
from .rows import REASONS, HeldOut, Rules, SplitReport, audio_digest, check_length, check_text
from .sources import RawRow, read_records, read_split, resolve, splits_of
from .storage import atomic_write_json, atomic_write_text, folder_lock
from .text import Normalizer

log = logging.getLogger(__name__)

PSEUDO = "pseudo.tsv"
POOL = "pool.jsonl"
REPORT = "pseudolabel_report.json"
SUMMARY = "self_training.json"
PSEUDO_COLUMNS = ("path", "text", "confidence", "source")
# Drop reasons beyond prepare's, in the order they are checked.
POOL_REASONS = ("in_labelled_split", *REASONS, "unknown_token", "low_confidence", "low_alignment", "over_cap")
SHARES = (1.0, 0.9, 0.75, 0.5, 0.25)  # the most trusted share of the labels the report scores, by each filter
LADDER = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)  # thresholds the report scores the labels at
ROUND_COMMAND = "w2vbert-asr pseudolabel, self-training round"  # who holds a round folder's lock


# --------------------------------------------------------------------------------------------- pool
def pool_rows(cfg) -> Iterator[RawRow]:
    """The clips to label: a TSV stem of data.root, a manifest file, or a folder of audio."""
    pool = str(cfg.pseudolabel.pool)
    root = Path(str(OmegaConf.select(cfg, "data.root") or "."))
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
    for line, rec in read_records(tsv):
        if column not in rec:
            raise UsageError(f"{tsv}:{line}: no audio column {column!r} (set pseudolabel.audio_column); "
                             f"found {sorted(rec)}")
        audio = str(rec[column] or "")
        yield RawRow(id=Path(audio).stem or f"{tsv.stem}-{line}", sentence=str(rec.get("sentence") or ""),
                     file=str(tsv), line=line, path=audio, base=str(base), contained=contained)


def labelled_clips(cfg, rules: Rules) -> HeldOut:
    """The clips of every labelled split (the configured ones, and train/dev/test of a release) by real path;
    those of the evaluation splits also by decoded audio (prepare's rule: a copy under another name is the
    same clip), decoded in data.num_proc processes."""
    data = copy.deepcopy(cfg.data)
    with open_dict(data):
        data.limit = None  # a row held back by data.limit is still a labelled clip
    splits = splits_of(data)
    names = {s for sources in splits.values() for s in sources}
    held_out = {s for name, sources in splits.items() if name != "train" for s in sources}
    if data.source == "commonvoice":
        names |= {s for s in ("train", "dev", "test") if (Path(data.root) / f"{s}.tsv").is_file()}
        held_out |= {"dev", "test"} & names - set(splits["train"])
    clips = HeldOut()
    with DecodePool(rules, num_processes(data.num_proc)) as decoder:
        for name in sorted(names):
            if name in held_out:
                for row, (example, _, _) in decoder.map(read_split(data, name)):
                    clips.add(name, row, example)
            else:  # train: labelling its clips again is pointless, not a leak; no need to decode them
                for row in read_split(data, name):
                    clips.add(name, row)
    return clips


# --------------------------------------------------------------------------------------------- labelling
class _Pool:
    """What labelling a pool found: the report (counts by reason), one record per clip, the kept candidates."""

    def __init__(self, normalizer: Normalizer, report_examples: int):
        self.normalizer, self.limit = normalizer, report_examples
        self.report, self.records, self.candidates = SplitReport(), [], []

    def drop(self, row: RawRow, reason: str, detail: str, **extra) -> None:
        self.report.skip(row, reason, detail, self.limit)
        self.records.append({"id": row.id, "path": row.path, "source": f"{row.file}:{row.line}", "kept": False,
                             "reason": reason, **extra, **_reference(row, self.normalizer)})

    def keep(self, row: RawRow, path: Path, text: str, conf: float, duration: float, extra: dict) -> None:
        self.candidates.append((row, path, text, conf, duration, extra))

    def cap(self, max_clips: int | None) -> None:
        """Keep only the `max_clips` most confident candidates; the others are dropped as over_cap."""
        if max_clips is None or len(self.candidates) <= max_clips:
            return
        ranked = sorted(range(len(self.candidates)), key=lambda i: -self.candidates[i][3])
        over = set(ranked[max(0, int(max_clips)):])
        for i in sorted(over):
            row, _, _, conf, _, extra = self.candidates[i]
            self.drop(row, "over_cap", f"confidence {conf:.3f} is not among the {max_clips} most confident", **extra)
        self.candidates = [c for i, c in enumerate(self.candidates) if i not in over]

    def manifest(self) -> str:
        """pseudo.tsv: the kept candidates (recorded as kept)."""
        lines = ["\t".join(PSEUDO_COLUMNS)]
        for row, path, text, conf, duration, extra in self.candidates:
            self.report.kept += 1
            self.report.seconds += duration
            lines.append("\t".join([str(path), text, f"{conf:.4f}", f"{row.file}:{row.line}"]))
            self.records.append({"id": row.id, "path": str(path), "source": f"{row.file}:{row.line}", "kept": True,
                                 "reason": "", **extra, **_reference(row, self.normalizer)})
        return "\n".join(lines) + "\n"


def _pool_waves(cfg, pool: _Pool, rules: Rules):
    """((row, path), wave) of every pool clip that is not labelled, exists, decodes and fits the duration
    bounds; the others are dropped with their reason. Each clip is decoded once."""
    labelled, sample_rate = labelled_clips(cfg, rules), rules.geometry.sample_rate
    for row in pool_rows(cfg):
        pool.report.rows += 1
        path = resolve(row)
        seen = labelled.match(row) if path is not None else ""
        if path is None:
            pool.drop(row, "path_escape", f"{row.path!r} points outside {row.base}")
        elif seen:
            pool.drop(row, "in_labelled_split", seen)
        elif not path.is_file():
            pool.drop(row, "missing_file", f"{path} does not exist")
        else:
            try:
                wave = load_audio(path, sample_rate)
            except Exception as e:  # any decoder error: count the clip, go on
                pool.drop(row, "undecodable_audio", f"{path}: {type(e).__name__}: {e}")
                continue
            seen = labelled.match(row, audio_digest(to_int16(wave)))  # a copy of a dev or test clip
            if seen:
                pool.drop(row, "in_labelled_split", seen)
                continue
            if not cfg.data.min_duration <= len(wave) / sample_rate <= cfg.data.max_duration:
                pool.drop(row, "duration", f"{len(wave) / sample_rate:.2f} s is outside data.min_duration..data.max_duration")
                continue
            yield (row, path, len(wave)), wave


def _judge(pool: _Pool, transcripts, rules: Rules, tokenizer, threshold: float, filter_: str = "confidence",
           min_alignment: float = float("-inf")) -> None:
    """Each transcribed clip: kept as a candidate, or dropped for prepare's reasons, an unknown token, a
    confidence below `threshold` or an alignment score below `min_alignment` (as pseudolabel.filter says)."""
    vocab = {t for t in tokenizer.get_vocab() if len(t) == 1}
    for (row, path, samples), transcript, fit in transcripts:
        text = pool.normalizer(transcript.text)
        conf = float(transcript.confidence if transcript.confidence is not None else 0.0)
        extra = {"hypothesis": text, "confidence": round(conf, 4), "alignment": round(fit, 4)}
        checked, reason, detail = check_text(transcript.text, rules.normalizer)
        if checked is not None:
            reason, detail = check_length(samples, checked, rules)
        if reason:
            pool.drop(row, reason, detail, **extra)
        elif tokenizer.unk_token in transcript.text or (set(transcript.text) | set(text)) - vocab - {" "}:
            pool.drop(row, "unknown_token", f"{transcript.text!r} has a token outside the vocabulary", **extra)  # [UNK], or the beam's ⁇
        elif filter_ in ("confidence", "both") and conf < threshold:
            pool.drop(row, "low_confidence", f"confidence {conf:.3f} < pseudolabel.threshold={threshold}", **extra)
        elif filter_ in ("alignment", "both") and not fit >= min_alignment:
            pool.drop(row, "low_alignment", f"alignment score {fit:.3f} < pseudolabel.min_alignment={min_alignment}",
                      **extra)
        else:
            pool.keep(row, path, text, conf, samples / rules.geometry.sample_rate, extra)


def label_pool(cfg, model_dir: str | Path, output_dir: str | Path, threshold: float,
               max_clips: int | None = None, lm_dir: str | Path | None = None) -> dict:
    """Transcribe the pool with `model_dir` (beam search with `lm_dir`, default pseudolabel.lm), keep confident
    clips that pass prepare's checks -> report dict."""
    from .alignment import scored_stream
    from .devices import pick_device
    from .transcribe import Transcriber, load_model

    model_dir, out = Path(model_dir), Path(output_dir)
    device = pick_device(cfg.pseudolabel.device)
    model, processor = load_model(model_dir, device)
    normalizer = Normalizer.load(model_dir)
    lm_dir = lm_dir or cfg.pseudolabel.lm
    search = None
    if lm_dir:
        from .lm import beam_search

        search = beam_search(processor.tokenizer, lm_dir)
    confidence = Confidence.from_config(cfg.confidence)
    # Whole clips: pool clips are utterances, and a clip longer than data.max_duration is dropped anyway.
    transcriber = Transcriber(model, processor, device, chunk_seconds=max(float(cfg.data.max_duration), 1.0) + 1.0,
                              overlap_seconds=0.0, batch_size=int(cfg.pseudolabel.batch_size), beam_search=search,
                              confidence=confidence)
    rules = Rules.from_config(cfg, normalizer, transcriber.geometry)  # CTC feasibility of this model's frames
    pool = _Pool(normalizer, int(cfg.data.report_examples))
    start = time.perf_counter()
    pcfg = cfg.pseudolabel
    _judge(pool, scored_stream(transcriber, _pool_waves(cfg, pool, rules), normalizer), rules, processor.tokenizer,
           threshold, pcfg.filter, float(pcfg.min_alignment))
    pool.cap(max_clips)
    if pool.report.rows == 0:
        raise UsageError(f"pseudolabel.pool={cfg.pseudolabel.pool} has no rows: nothing to label")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / PSEUDO, pool.manifest())
    atomic_write_text(out / POOL, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool.records))
    report = pool.report
    summary = {"pool": str(cfg.pseudolabel.pool), "model": str(model_dir), "threshold": threshold,
               "filter": str(pcfg.filter), "min_alignment": float(pcfg.min_alignment),
               "max_clips": max_clips, "decoding": "beam+lm" if search else "greedy",
               "confidence": confidence.to_dict(), **report.to_dict(),
               "kept_share": report.kept / report.rows, "seconds": round(time.perf_counter() - start, 1),
               "manifest": str(out / PSEUDO), **label_quality(pool.records)}
    atomic_write_json(out / REPORT, summary)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items(), key=lambda kv: POOL_REASONS.index(kv[0])))
    print(f"pseudolabel: kept {report.kept} of {report.rows} pool clips ({100 * summary['kept_share']:.1f} %, "
          f"{report.seconds / 3600:.3f} h) by {pcfg.filter}; dropped: {dropped or 'none'} -> {out / PSEUDO}")
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
    out["by_share"] = _by_share([r for r in scored if "alignment" in r])
    return out


def _by_share(scored: list[dict]) -> list[dict]:
    """CER of the most trusted SHARES of the labels, trusted by confidence and by alignment score: which filter
    keeps the cleaner labels at the same fraction kept."""
    rows = []
    for share in SHARES if scored else ():
        row = {"share": share}
        for key in ("confidence", "alignment"):
            top = sorted(scored, key=lambda r: -r[key])[: max(1, round(share * len(scored)))]
            row[f"cer_by_{key}"] = jiwer.cer([r["reference"] for r in top], [r["hypothesis"] for r in top])
            row[f"{key}_threshold"] = top[-1][key]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- rounds
def _round_config(cfg, output_dir: Path, extra: list[str], init_from: str | None):
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


def _results(run: Path, cfg) -> dict:
    metrics = json.loads((run / "metrics.json").read_text()).get("splits", {})
    return {s: {k: metrics[s][k] for k in ("wer", "cer", "utterances")} for s in
            (cfg.data.eval_split, cfg.data.test_split) if s in metrics}


def _compare_rounds(cfg, out: Path, rounds: int) -> str | None:
    """`compare` over the rounds' test predictions (95 % intervals, paired verdicts) into out/compare, so
    one command says whether a round really beat the supervised model. -> that folder, or None."""
    from .compare import compare

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


def self_train(cfg) -> dict:
    """Round 0 (labelled only), then one pseudo-label + train round per self_training.thresholds entry."""
    from .train import train

    st = cfg.self_training
    out = Path(cfg.output_dir)
    base = out / "round0"
    with folder_lock(base, "output_dir", f"{ROUND_COMMAND} 0"):  # each round's folder, like `train`'s
        if (base / "model" / "config.json").is_file() and (base / "metrics.json").is_file():
            print(f"round 0: keeping the supervised model in {base / 'model'}")
        else:
            train(_round_config(cfg, base, [], None))
        labelled = json.loads((base / "prepare_report.json").read_text())["splits"]["train"]["kept"]
        lm_dir = None
        if st.lm:  # an n-gram of the labelled transcripts only: the pool's text never leaks in
            from .lm import build_lm

            lm_dir = build_lm(_round_config(cfg, base, [], None))["output_dir"]
    rounds = [{"round": 0, "threshold": None, "pseudo_labels": 0, "labelled": labelled, **_results(base, cfg)}]
    previous = base / "model"
    for i, threshold in enumerate(st.thresholds, 1):
        run = out / f"round{i}"
        cap = int(st.max_ratio * labelled) if st.max_ratio is not None else cfg.pseudolabel.max_clips
        with folder_lock(run, "output_dir", f"{ROUND_COMMAND} {i}"):
            labels = label_pool(cfg, previous, run / "pseudo", float(threshold), cap, lm_dir)
            if labels["kept"] == 0:
                log.warning("round %d: no pool clip reached confidence %s; stopping", i, threshold)
                break
            train(_round_config(cfg, run, [labels["manifest"]], None if st.restart else str(previous)))
        rounds.append({"round": i, "threshold": float(threshold), "pseudo_labels": labels["kept"],
                       "kept_share": labels["kept_share"], "kept_cer": labels.get("kept_cer"), "labelled": labelled,
                       **_results(run, cfg)})
        previous = run / "model"
    summary = {"restart": bool(st.restart), "max_ratio": st.max_ratio, "lm": lm_dir, "rounds": rounds,
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


def pseudolabel(cfg) -> dict:
    """`w2vbert-asr pseudolabel`: label the pool with model_dir; with self_training.thresholds, run the rounds."""
    if cfg.self_training.thresholds:
        return self_train(cfg)
    model_dir = check_model_dir(cfg.model_dir, "pseudolabel")
    max_clips = cfg.pseudolabel.max_clips
    return label_pool(cfg, model_dir, cfg.pseudolabel.output_dir, float(cfg.pseudolabel.threshold),
                      int(max_clips) if max_clips is not None else None)

