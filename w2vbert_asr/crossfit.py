"""Cross-fitted models for `audit`: every train clip scored by a model that never trained on it.

A model remembers its own training clips, transcripts and all: the demo's model, trained on a release with
planted faults, reproduces the wrong transcripts of its train clips exactly (CER 0, alignment score of a clean
clip) while it still catches every kind of fault in dev and test (recipes/README.md). So with
`audit.folds=K` (K >= 2) the train clips are split into K folds, speakers kept whole (as Common Voice keeps
them disjoint between splits); fold f's clips are scored by a model trained, with the training config given
(the model's own: its run folder's config.yaml, when `model=` has one; else the recipe and overrides given), on
the other folds only. The folds' models live in <audit.output_dir>/fold<f>/ and are reused while the fold's
clips stay the same.

Usage:
    from w2vbert_asr.crossfit import fold_models
    model_dirs, fold_of = fold_models(cfg, 2)       # fold_of[clip_key(row)] -> the fold that scores it
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path

from omegaconf import open_dict

from .exclusion import AUDIT_COLUMNS
from .sources import RawRow, read_split, resolve

log = logging.getLogger(__name__)
HELD_OUT = "held_out.tsv"  # a fold's clips, in audit.tsv's format: its model's training leaves them out


def clip_key(row: RawRow) -> str:
    """What identifies a clip across reads: its real path, or its id when it carries its audio as bytes."""
    path = resolve(row) if row.audio_bytes is None and row.path else None
    return os.path.realpath(path) if path is not None else f"id:{row.id}"


def assign_folds(rows: list[RawRow], k: int) -> dict[str, int]:
    """clip key -> fold: whole speakers (a row without one is its own group), biggest groups first, each to the
    fold with the fewest clips so far; ties broken by a hash, so the folds do not depend on row order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        groups[row.speaker or f"clip:{row.id}"].append(clip_key(row))
    order = sorted(groups, key=lambda g: (-len(groups[g]), hashlib.sha1(g.encode()).hexdigest()))
    sizes, folds = [0] * k, {}
    for g in order:
        f = min(range(k), key=lambda i: (sizes[i], i))
        sizes[f] += len(groups[g])
        folds.update(dict.fromkeys(groups[g], f))
    return folds


def _held_out_tsv(rows: list[RawRow], folds: dict[str, int], fold: int) -> str:
    lines = ["\t".join(AUDIT_COLUMNS)]
    for row in rows:
        key = clip_key(row)
        if folds[key] == fold:
            cells = {"split": "train", "id": row.id, "path": "" if key.startswith("id:") else key, "score": "-inf",
                     "flagged": 1, "reason": f"held out: fold {fold}"}
            lines.append("\t".join(str(cells.get(c, "")) for c in AUDIT_COLUMNS))
    return "\n".join(lines) + "\n"


def trained_with(cfg):
    """cfg with the model, text and train sections the given model was trained with (its run folder's
    config.yaml, beside model/), so that `audit model=<dir>` needs no recipe; cfg itself when there is none or
    it does not fit this version's schema."""
    from omegaconf import OmegaConf

    run_config = Path(cfg.model_dir).parent / "config.yaml"
    if not run_config.is_file():
        return cfg
    trained, merged = OmegaConf.load(run_config), copy.deepcopy(cfg)
    try:
        for section in ("model", "text", "train"):
            if section in trained:
                merged[section] = OmegaConf.merge(cfg[section], trained[section])
        if "seed" in trained:
            merged.seed = trained.seed
    except Exception as e:  # an older or newer schema: train the folds with the config given instead
        log.warning("audit: %s does not fit this version's config (%s); the fold models use the config given",
                    run_config, str(e).splitlines()[0])
        return cfg
    return merged


def fold_config(cfg, out: Path, held_out: Path):
    """The training config of one fold: its own folder, its clips excluded from train (data.exclude)."""
    fold = copy.deepcopy(cfg)
    with open_dict(fold):
        fold.output_dir = str(out)
        fold.model_dir = str(out / "model")
        fold.eval.results_dir = str(out)
        fold.data.exclude = [*(cfg.data.get("exclude") or []), str(held_out)]
        fold.audit.threshold = 0.0  # the held-out clips are listed with score -inf
        fold.push.after_train = False
        fold.train.stop_at_step = None  # a fold trains to the end
        fold.resume = True  # an interrupted fold continues from its last checkpoint
    return fold


def fold_models(cfg, k: int) -> tuple[list[Path], dict[str, int]]:
    """Train (or reuse) the K fold models -> (their model dirs, clip key -> fold) for the train clips."""
    from .train import train

    rows = [row for split in cfg.data.train_splits for row in read_split(cfg.data, split)]
    base = trained_with(cfg)
    folds = assign_folds(rows, k)
    dirs = []
    for f in range(k):
        out = Path(cfg.audit.output_dir) / f"fold{f}"
        listing = _held_out_tsv(rows, folds, f)
        held_out = out / HELD_OUT
        done = (out / "model" / "config.json").is_file() and (out / "metrics.json").is_file()
        if held_out.is_file() and held_out.read_text(encoding="utf-8") != listing:
            shutil.rmtree(out)  # other clips in this fold now: its model is stale
            done = False
        if not done:
            out.mkdir(parents=True, exist_ok=True)
            held_out.write_text(listing, encoding="utf-8")
            print(f"audit: training fold {f + 1} of {k} into {out} (train without its "
                  f"{sum(v == f for v in folds.values())} clips)")
            train(fold_config(base, out, held_out))
        dirs.append(out / "model")
    return dirs, folds
