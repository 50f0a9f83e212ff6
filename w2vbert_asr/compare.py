"""Side-by-side comparison of result folders written by `evaluate` and `baseline`.

Usage:
    w2vbert-asr compare compare.runs=[demo_out,demo_out/baseline]
    w2vbert-asr compare compare.runs=[outputs/mn,outputs/mn/baseline,outputs/mn/whisper-ft] compare.split=test \
        compare.output_dir=outputs/mn/compare compare.top_disagreements=20
    w2vbert-asr compare compare.runs=[a,b] compare.bootstrap_samples=10000 compare.confidence=0.99

Each run folder holds metrics.json and predictions/<split>.jsonl. Writes into `compare.output_dir`
(default: <first run>/compare when no `lang`/recipe is given):
    comparison.md      table (system, model, WER, CER with bootstrap intervals, utterances, audio hours,
                       parameters, RTFx with the device and batch setting it was measured with), warnings,
                       every pair's paired difference with its interval and verdict (better / worse / not
                       distinguishable), and the utterances where the systems disagree most (reference +
                       every hypothesis); also printed
    comparison.json    the same as data
    comparison.png     bar charts: WER/CER per system with interval error bars, RTFx per system
Intervals and verdicts: w2vbert_asr/significance.py (resampled by speaker when the predictions name them).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from . import UsageError
from .evaluate import METRICS, PREDICTIONS
from .significance import BETTER, METRICS as RATES, WORSE, Bootstrap, bootstrap, describe, paired, \
    percent_interval, system_intervals
from .storage import atomic_write_text

MARKDOWN = "comparison.md"
JSON = "comparison.json"
PNG = "comparison.png"
MIN_RUNS = 2
WARN = " (!)"  # marks table cells that a warning below the table qualifies


# --------------------------------------------------------------------------------------------- reading
def load_run(folder: str | Path, split: str) -> dict:
    """-> {"dir", header keys..., "metrics": split metrics, "rows": {id: prediction row}}."""
    folder = Path(folder)
    metrics_file = folder / METRICS
    if not metrics_file.is_file():
        raise UsageError(f"{metrics_file} not found: compare.runs must list folders written by "
                         "`w2vbert-asr evaluate` (eval.results_dir) or `w2vbert-asr baseline` (baseline.results_dir)")
    try:
        data = json.loads(metrics_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{metrics_file} is not valid JSON ({e}); re-run the command that wrote it") from e
    splits = data.get("splits") or {}
    if split not in splits:
        raise UsageError(f"{metrics_file} has no split {split!r} (it has {sorted(splits) or 'none'}); "
                         f"set compare.split=<one of them> or score that split first (eval.split={split})")
    pred_file = folder / PREDICTIONS / f"{split}.jsonl"
    if not pred_file.is_file():
        raise UsageError(f"{pred_file} not found next to {metrics_file}; re-run the command that wrote the folder")
    header = {k: v for k, v in data.items() if k != "splits"}
    rows = read_predictions(pred_file)
    if not rows:
        counted = splits[split].get("utterances", "?")
        raise UsageError(f"{pred_file} holds no predictions although {metrics_file} counts {counted} utterances; "
                         "re-run the command that wrote the folder")
    return {"dir": str(folder), **header, "metrics": splits[split], "rows": rows}


def _refuse_duplicates(runs: list[str]) -> None:
    """One UsageError when two entries of compare.runs are the same folder (however written): a run
    compared with itself only adds a row that agrees with it."""
    seen: dict[str, int] = {}
    for i, run in enumerate(runs, start=1):
        first = seen.setdefault(os.path.realpath(run), i)
        if first != i:
            again = f", the second time as {run}" if run != runs[first - 1] else ""
            raise UsageError(f"compare.runs lists {runs[first - 1]} twice (entries {first} and {i}{again}); "
                             "list each result folder once")


def read_predictions(pred_file: Path) -> dict[str, dict]:
    """predictions/<split>.jsonl -> {id: row}, in file order."""
    rows = {}
    for n, line in enumerate(pred_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[str(row["id"])] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UsageError(f"{pred_file}:{n}: not a prediction row ({type(e).__name__}: {e})") from e
    return rows


def _labels(runs: list[dict]) -> list[str]:
    """System names, made unique with the model name, then the folder, when two runs share one."""
    labels = [str(r.get("system") or Path(r["dir"]).name) for r in runs]
    names = list(labels)
    labels = [f"{lab} ({Path(str(r.get('model') or r['dir'])).name})" if names.count(lab) > 1 else lab
              for lab, r in zip(names, runs)]
    names = list(labels)
    return [f"{lab} [{r['dir']}]" if names.count(lab) > 1 else lab for lab, r in zip(names, runs)]


def batch_setting(run: dict) -> str:
    """How the run batched its decoding, from the metrics.json header."""
    if run.get("batch_size") is not None:
        return f"batch {run['batch_size']}"
    if run.get("max_batch_seconds") is not None:
        return f"batches <= {run['max_batch_seconds']:g} s, <= {run.get('max_batch_size', '?')} clips"
    return "batch ?"


# --------------------------------------------------------------------------------------------- analysis
def _warnings(runs: list[dict], labels: list[str], common: set[str]) -> list[str]:
    out = []
    devices = {str(r.get("device") or "?") for r in runs}
    if len(devices) > 1:
        per = "; ".join(f"{lab}: {r.get('device') or '?'}" for lab, r in zip(labels, runs))
        out.append(f"RTFx was measured on different devices ({per}): the speeds are not comparable.")
    for lab, r in zip(labels, runs):
        counted = r["metrics"].get("utterances")
        if isinstance(counted, int) and counted != len(r["rows"]):
            out.append(f"{lab}: metrics.json counts {counted} utterances, its predictions file holds "
                       f"{len(r['rows'])}: its WER/CER (from metrics.json) do not describe the utterances compared.")
    id_sets = [set(r["rows"]) for r in runs]
    if any(s != id_sets[0] for s in id_sets):
        per = ", ".join(f"{lab}: {len(s)}" for lab, s in zip(labels, id_sets))
        out.append(f"The runs scored different utterance sets ({per}; {len(common)} in common): WER/CER are "
                   "not directly comparable; the disagreement list uses the common utterances.")
    differing = sorted(i for i in common if len({r["rows"][i].get("reference") for r in runs}) > 1)
    if differing:
        out.append(f"{len(differing)} common utterances have different references (e.g. {differing[0]}): the "
                   "runs used different text normalisation, so their scores are not on the same footing.")
    return out


def disagreements(runs: list[dict], labels: list[str], common: set[str], top: int) -> list[dict]:
    """Common utterances ordered by how far the systems' per-utterance WER (then CER) lie apart."""
    items = []
    for uid in common:
        rows = [r["rows"][uid] for r in runs]
        wers, cers = [float(x.get("wer", 0.0)) for x in rows], [float(x.get("cer", 0.0)) for x in rows]
        spread_w, spread_c = max(wers) - min(wers), max(cers) - min(cers)
        if spread_w == 0 and spread_c == 0:
            continue  # the systems agree on this one
        items.append({"id": uid, "reference": rows[0].get("reference", ""), "duration": rows[0].get("duration"),
                      "wer_spread": spread_w, "cer_spread": spread_c,
                      "hypotheses": {lab: {"hypothesis": x.get("hypothesis", ""), "wer": w, "cer": c}
                                     for lab, x, w, c in zip(labels, rows, wers, cers)}})
    items.sort(key=lambda d: (-d["wer_spread"], -d["cer_spread"], d["id"]))
    return items[:top]


def significance(runs: list[dict], labels: list[str], common: set[str], settings: Bootstrap) -> tuple[list, dict]:
    """Every pair of runs on their common utterances: paired WER/CER difference, interval, verdict.
    -> (pairs, how the common set was resampled)."""
    ids = sorted(common)  # a fixed order: the same seed must give the same resamples in every process
    if not ids:
        return [], {}
    res = bootstrap([[r["rows"][i] for i in ids] for r in runs], settings)
    pairs = [{"a": labels[a], "b": labels[b], **paired(res, a, b, settings.confidence)}
             for a in range(len(runs)) for b in range(a + 1, len(runs))]
    return pairs, {"unit": res.unit, "blocks": res.blocks, "utterances": res.utterances}


def _params(n) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(x, scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * x:.{digits}f}" if isinstance(x, (int, float)) else "?"


def _rate(run: dict, metric: str) -> str:
    """"10.00 [4.00, 18.00]": the run's rate in percent with its interval."""
    ci = run.get(f"{metric}_interval")
    return _fmt(run[metric], 100) + (f" {percent_interval(ci)}" if ci else "")


def _verdict(v: str) -> str:
    return f"**{v}**" if v in (BETTER, WORSE) else v


def to_markdown(report: dict) -> str:
    boot = Bootstrap(**report["bootstrap"])
    conf = f"{100 * boot.confidence:g} %"
    lines = [f"# Comparison on split `{report['split']}`", "",
             f"| system | model | WER % [{conf} CI] | CER % [{conf} CI] | utterances | audio h | parameters | "
             "licence | RTFx | measured on |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    # Flag the cells a warning below the table is about, so nobody reads the numbers without it.
    mixed_devices = len({r["device"] for r in report["runs"]}) > 1
    mixed_sets = any(r["utterances"] != report["common_utterances"] for r in report["runs"])
    for r in report["runs"]:
        utts = f"{r['utterances']}{WARN if mixed_sets else ''}"
        rtfx = f"{_fmt(r['rtfx'], digits=1)}{WARN if mixed_devices else ''}"
        lines.append(f"| {_cell(r['label'])} | {_cell(r['model'])} | {_rate(r, 'wer')} | {_rate(r, 'cer')} | "
                     f"{utts} | {_fmt(r['audio_hours'], digits=3)} | {_params(r['parameters'])} | "
                     f"{_cell(r.get('license') or '?')} | {rtfx} | {_cell(r['device'])}, {_cell(r['batch'])} |")
    lines.append("")
    lines.append("WER/CER on normalised text (the same normaliser for references and every hypothesis); "
                 "RTFx = audio seconds / wall seconds of decoding, features included." + _interval_note(report))
    standins = [r["label"] for r in report["runs"] if str(r.get("weights") or "").startswith("random")]
    if standins:
        lines += ["", f"> **Random weights:** {', '.join(standins)} {'is a' if len(standins) == 1 else 'are'} tiny "
                  "untrained stand-in" + ("" if len(standins) == 1 else "s") + " of the real model (an offline run): "
                  "their scores say nothing about the real baselines."]
    if report["warnings"]:
        lines += ["", *(f"> **Warning{WARN}:** {w}" for w in report["warnings"])]
    if report["pairs"]:
        sig = report["paired_resampling"]
        lines += ["", f"## Paired differences (A minus B on the {sig['utterances']} common utterances)", "",
                  f"| A | B | WER points [{conf} CI] | WER: A is | CER points [{conf} CI] | CER: A is |",
                  "|---|---|---:|---|---:|---|"]
        for p in report["pairs"]:
            cells = [f"{100 * p[m]['difference']:+.2f} {percent_interval(p[m]['interval'])} | "
                     f"{_verdict(p[m]['verdict'])}" for m in RATES]
            lines.append(f"| {_cell(p['a'])} | {_cell(p['b'])} | {' | '.join(cells)} |")
        lines += ["", f"Both systems are scored on the same resamples ({describe(sig['unit'], sig['blocks'], boot)}); "
                  "A is better (worse) when the whole interval of A minus B lies below (above) 0."
                  + (f" Each verdict holds at {conf} on its own: among {len(report['pairs'])} pairs, one may be "
                     "called by chance." if len(report["pairs"]) > 2 else "")]
    lines += ["", f"## Where the systems disagree most (top {len(report['disagreements'])} of "
              f"{report['common_utterances']} common utterances, by per-utterance WER spread, then CER)", ""]
    if not report["common_utterances"]:
        lines.append("No utterance is common to all runs: nothing to compare utterance by utterance.")
    elif not report["disagreements"]:
        lines.append("The systems agree on every common utterance.")
    for k, d in enumerate(report["disagreements"], start=1):
        dur = f", {d['duration']:.1f} s" if isinstance(d.get("duration"), (int, float)) else ""
        lines += [f"{k}. `{d['id']}`{dur}: WER spread {100 * d['wer_spread']:.0f} %, "
                  f"CER spread {100 * d['cer_spread']:.0f} %",
                  f"   - reference: {d['reference']}"]
        lines += [f"   - {lab} (WER {100 * h['wer']:.0f} %, CER {100 * h['cer']:.0f} %): {h['hypothesis']}"
                  for lab, h in d["hypotheses"].items()]
    return "\n".join(lines) + "\n"


def _interval_note(report: dict) -> str:
    """How each run's intervals were made; which runs, when they were not all made alike."""
    groups: dict[tuple, list[str]] = {}
    for r in report["runs"]:
        if r.get("resampling"):
            groups.setdefault((r["resampling"]["unit"], r["resampling"]["blocks"]), []).append(r["label"])
    boot = Bootstrap(**report["bootstrap"])
    notes = [describe(unit, blocks, boot) + (f" ({', '.join(labels)})" if len(groups) > 1 else "")
             for (unit, blocks), labels in groups.items()]
    if any(unit == "utterance" for unit, _ in groups):
        notes.append(f"without speaker ids (or with fewer than {report['bootstrap']['min_speakers']} speakers) "
                     "utterances of one speaker are drawn independently, so intervals can be too narrow")
    return f" Brackets: {'; '.join(notes)}." if notes else ""


def plot(report: dict, path: Path) -> None:
    """Two bar charts side by side: WER and CER (%) per system with interval error bars; RTFx per system
    (log scale)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    runs = report["runs"]
    labels = [r["label"] for r in runs]
    x = np.arange(len(runs))
    width = 0.38
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(runs), 4.5))
    for offset, key, name in ((-width / 2, "wer", "WER"), (width / 2, "cer", "CER")):
        values = np.array([100 * (r[key] if isinstance(r[key], (int, float)) else np.nan) for r in runs])
        bounds = np.array([100 * np.array(r.get(f"{key}_interval") or [np.nan, np.nan]) for r in runs])
        errors = np.clip([values - bounds[:, 0], bounds[:, 1] - values], 0, None)  # (2, systems)
        bars = ax1.bar(x + offset, values, width, label=name, yerr=np.nan_to_num(errors), capsize=4)
        ax1.bar_label(bars, fmt="%.1f", fontsize=8)
    ax1.set_xticks(x, labels, rotation=15, ha="right")
    ax1.set_ylabel("error rate (%)")
    conf = f"{100 * report['bootstrap']['confidence']:g} %"
    ax1.set_title(f"WER / CER on {report['split']} (lower is better)\nbars: {conf} bootstrap interval", fontsize=10)
    ax1.legend()
    rtfx = [r["rtfx"] if isinstance(r["rtfx"], (int, float)) else np.nan for r in runs]
    bars = ax2.bar(x, rtfx, 0.6, color="tab:green")
    ax2.bar_label(bars, fmt="%.1f", fontsize=8)
    ax2.set_xticks(x, labels, rotation=15, ha="right")
    if all(v > 0 for v in rtfx if not np.isnan(v)) and not all(np.isnan(rtfx)):
        ax2.set_yscale("log")  # systems often differ by 10x or more
    devices = {r["device"] for r in runs}
    ax2.set_title("RTFx (higher is faster)" + ("" if len(devices) > 1 else f"\n{next(iter(devices))}"), fontsize=10)
    if len(devices) > 1:
        ax2.text(0.5, -0.3, "measured on different devices", transform=ax2.transAxes, ha="center", color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _output_dir(cfg: DictConfig, runs: list[str]) -> Path:
    """compare.output_dir, or <first run>/compare when it cannot resolve (no lang/recipe given)."""
    try:
        value = cfg.compare.output_dir
    except OmegaConfBaseException:
        value = None
    return Path(value) if value else Path(runs[0]) / "compare"


def compare(cfg: DictConfig) -> dict:
    """`w2vbert-asr compare`: read 2+ result folders, write comparison.md/.json/.png. -> the JSON content."""
    runs_cfg = [str(r) for r in (cfg.compare.runs or [])]
    if len(runs_cfg) < MIN_RUNS:
        raise UsageError(f"compare needs at least {MIN_RUNS} result folders, got {runs_cfg}: pass "
                         "compare.runs=[<evaluate results dir>,<baseline results dir>]")
    _refuse_duplicates(runs_cfg)
    split = str(cfg.compare.split)
    settings = Bootstrap.from_config(cfg.compare)
    runs = [load_run(r, split) for r in runs_cfg]
    labels = _labels(runs)
    common = set.intersection(*(set(r["rows"]) for r in runs))
    cis = [system_intervals(r["rows"], settings) if r["rows"] else {} for r in runs]
    pairs, paired_resampling = significance(runs, labels, common, settings)
    report = {
        "split": split,
        "bootstrap": asdict(settings),
        "runs": [{"label": lab, "dir": r["dir"], "system": r.get("system"), "model": r.get("model", "?"),
                  "wer": r["metrics"].get("wer"), "cer": r["metrics"].get("cer"),
                  "wer_interval": ci.get("wer"), "cer_interval": ci.get("cer"),
                  "resampling": {"unit": ci["unit"], "blocks": ci["blocks"]} if ci else None,
                  "utterances": len(r["rows"]),  # what was read, which every other figure but WER/CER uses
                  "audio_hours": r["metrics"].get("audio_hours"), "parameters": r.get("parameters"),
                  "license": r.get("license"), "weights": r.get("weights"),
                  "rtfx": r["metrics"].get("rtfx"), "device": r.get("device") or "?", "batch": batch_setting(r),
                  "decoding": r["metrics"].get("decoding")}
                 for lab, r, ci in zip(labels, runs, cis)],
        "warnings": _warnings(runs, labels, common),
        "common_utterances": len(common),
        "pairs": pairs,
        "paired_resampling": paired_resampling,
        "disagreements": disagreements(runs, labels, common, int(cfg.compare.top_disagreements)),
    }
    out = _output_dir(cfg, runs_cfg)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    atomic_write_text(out / MARKDOWN, markdown)
    atomic_write_text(out / JSON, json.dumps(report, ensure_ascii=False, indent=2))
    plot(report, out / PNG)
    print(markdown)
    print(f"wrote {out / MARKDOWN}, {out / JSON} and {out / PNG}")
    return report
