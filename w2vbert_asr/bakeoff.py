"""`w2vbert-asr bakeoff`: which model is best for this language, on this test set, in one command.

Usage:
    w2vbert-asr bakeoff recipe=mn data.root=/data/cv-corpus-21.0/mn train=v100_16gb
    w2vbert-asr bakeoff recipe=mn data.root=... "bakeoff.baselines=[omniasr_ctc,mms]" \
        "bakeoff.backbones=[omniasr_ctc_300m]"
    w2vbert-asr synth recipe=bakeoff_demo && w2vbert-asr bakeoff recipe=bakeoff_demo    # offline, tiny stand-ins

Stages, all on the recipe's data and text normaliser, composed from this command's own arguments:
    1. every model the stages need is cached or reachable (weights.py), before any data is prepared;
    2. each zero-shot baseline of `bakeoff.baselines` (conf/baseline/<name>.yaml) on eval.split, into
       <bakeoff.output_dir>/baselines/<name>/;
    3. each backbone of `bakeoff.backbones` (conf/model/<name>.yaml) fine-tuned with the same train config (steps,
       batch seconds, learning-rate schedule: the same budget) into <bakeoff.output_dir>/<name>/, then scored;
    4. `compare` over all of them into <bakeoff.output_dir>/compare/: WER/CER with intervals, every pair's paired
       verdict, RTFx, parameters and licence.
Each stage records a digest of its settings (bakeoff_stage.json in its folder); a rerun skips a finished stage
whose settings are unchanged, resumes a training stage from its newest checkpoint, and redoes a stage whose
settings changed (saying which). A baseline that cannot run here (a language the model does not cover, weights
that do not fit the device) is skipped with its one-line reason; bakeoff.json lists every stage's outcome.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from . import UsageError
from .storage import atomic_write_json, remove_paths

STAGE_FILE = "bakeoff_stage.json"
SUMMARY = "bakeoff.json"
# What a stage's results depend on; run-only settings (processes, workers, logging) are left out.
BASELINE_KEYS = ("lang", "data", "text", "eval.split", "baseline")
TRAIN_KEYS = ("lang", "data", "text", "model", "train", "seed", "eval.split")
RUN_ONLY = ("data.num_proc", "data.force_prepare", "train.num_workers", "train.logging_steps", "train.log_with",
            "train.stop_at_step", "baseline.device", "eval.device")


# --------------------------------------------------------------------------------------------- stage configs
def command_overrides(cfg) -> list[str]:
    """The overrides this command was run with (Hydra's record of them; `bakeoff.overrides` when called from
    Python), which every stage is composed from."""
    if cfg.bakeoff.overrides:
        return [str(o) for o in cfg.bakeoff.overrides]
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def compose_stage(overrides: list[str]):
    """conf/ composed with `overrides`, checked; inside a running command (Hydra already initialised) too."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        from .cli import compose

        return compose(overrides)
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .checks import ConfigError, explain, validate

    try:
        return validate(hydra_compose(config_name="config", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(explain(e, overrides)) from e


def stage_configs(cfg) -> tuple[dict, dict]:
    """-> ({baseline name: config}, {backbone name: config}) of a bakeoff config."""
    base = [o for o in command_overrides(cfg) if not o.startswith(("bakeoff.overrides", "hydra."))]
    out = Path(cfg.bakeoff.output_dir)
    # A backbone gets its own output_dir: the data root must not move with it (the demo's is ${output_dir}/corpus).
    root = OmegaConf.select(cfg, "data.root")
    pinned = [f"data.root={_quote(str(root))}"] if root else []
    baselines = {name: compose_stage([*_without(base, "baseline=", "baseline.results_dir="), f"baseline={name}",
                                      f"baseline.results_dir={_quote(str(out / 'baselines' / name))}"])
                 for name in cfg.bakeoff.baselines}
    backbones = {name: compose_stage([*_without(base, "model=", "output_dir=", "data.root="), *pinned,
                                      f"model={name}", f"output_dir={_quote(str(out / name))}"])
                 for name in cfg.bakeoff.backbones}
    return baselines, backbones


def _without(overrides: list[str], *prefixes: str) -> list[str]:
    """The overrides a stage sets itself are left out of the command's (Hydra refuses a group given twice)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(prefixes)]


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def settings_digest(cfg, keys: tuple[str, ...]) -> str:
    tree = {k: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            for k in keys for node in [OmegaConf.select(cfg, k)]}
    for dotted in RUN_ONLY:
        section, _, leaf = dotted.partition(".")
        if isinstance(tree.get(section), dict):
            tree[section].pop(leaf, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- stages
def _stamp(folder: Path) -> dict:
    path = folder / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _finished(folder: Path, split: str) -> bool:
    metrics = folder / "metrics.json"
    return metrics.is_file() and split in (json.loads(metrics.read_text()).get("splits") or {})


def run_baseline(name: str, cfg) -> dict:
    from .baseline import baseline

    folder, split = Path(cfg.baseline.results_dir), str(cfg.eval.split)
    digest = settings_digest(cfg, BASELINE_KEYS)
    stamp = _stamp(folder)
    if stamp.get("digest") == digest and stamp.get("done") and _finished(folder, split):
        print(f"bakeoff: baseline {name}: done before, same settings ({folder})")
        return {"stage": f"baseline {name}", "dir": str(folder), "status": "cached"}
    try:
        baseline(cfg)
    except UsageError as e:  # this baseline cannot run here: the others still can
        print(f"error: bakeoff: baseline {name} skipped: {e}")
        return {"stage": f"baseline {name}", "dir": str(folder), "status": "skipped", "reason": str(e)}
    atomic_write_json(folder / STAGE_FILE, {"stage": name, "digest": digest, "done": True})
    return {"stage": f"baseline {name}", "dir": str(folder), "status": "done"}


def run_backbone(name: str, cfg) -> dict:
    """Fine-tune and score one backbone; resumes its newest checkpoint when its settings are unchanged."""
    from .checkpoint import CHECKPOINTS, MODEL, latest_checkpoint
    from .train import train

    folder, split = Path(cfg.output_dir), str(cfg.data.test_split or cfg.data.eval_split)
    digest = settings_digest(cfg, TRAIN_KEYS)
    stamp = _stamp(folder)
    if stamp.get("digest") == digest and stamp.get("done") and _finished(folder, split):
        print(f"bakeoff: backbone {name}: trained before, same settings ({folder})")
        return {"stage": f"backbone {name}", "dir": str(folder), "status": "cached"}
    if stamp and stamp.get("digest") != digest:
        print(f"bakeoff: backbone {name}: settings changed since {folder} was trained: training again")
        remove_paths([folder / CHECKPOINTS, folder / MODEL])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / STAGE_FILE, {"stage": name, "digest": digest, "done": False})
    latest = latest_checkpoint(folder / CHECKPOINTS)
    cfg.resume = latest is not None
    stage = {"stage": f"backbone {name}", "dir": str(folder), "resumed_from": str(latest) if latest else None}
    if latest:
        print(f"bakeoff: backbone {name}: resuming from {latest}")
    if train(cfg).get("stopped"):  # train.stop_at_step: a time-boxed job; the next run resumes
        return {**stage, "status": "stopped"}
    atomic_write_json(folder / STAGE_FILE, {"stage": name, "digest": digest, "done": True})
    return {**stage, "status": "done"}


def bakeoff(cfg) -> dict:
    """`w2vbert-asr bakeoff`: the zero-shot baselines, each backbone fine-tuned, and the comparison of all."""
    from .compare import compare
    from .model import require_pretrained
    from .weights import hub_ids, require

    baselines, backbones = stage_configs(cfg)
    if not baselines and not backbones:
        raise UsageError("bakeoff.baselines and bakeoff.backbones are both empty: name at least two systems")
    require(hub_ids([c.baseline.name_or_path for c in baselines.values() if not c.baseline.random_standin]),
            "bakeoff")
    for c in backbones.values():
        require_pretrained(c.model, "bakeoff")
    out = Path(cfg.bakeoff.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = [run_baseline(name, c) for name, c in baselines.items()]
    stages += [run_backbone(name, c) for name, c in backbones.items()]
    runs = [s["dir"] for s in stages if s["status"] in ("done", "cached")]
    summary = {"stages": stages, "compare": None}
    if any(s["status"] == "stopped" for s in stages):
        atomic_write_json(out / SUMMARY, summary)
        print("bakeoff: stopped at train.stop_at_step; run the same command again to resume")
        return summary
    if len(runs) >= 2:
        compare_cfg = OmegaConf.merge(cfg, {"compare": {"runs": runs, "output_dir": str(out / "compare"),
                                                        "split": str(cfg.eval.split)}})
        compare(compare_cfg)
        summary["compare"] = str(out / "compare")
    atomic_write_json(out / SUMMARY, summary)
    skipped = [s for s in stages if s["status"] == "skipped"]
    print(f"bakeoff: {len(stages) - len(skipped)} of {len(stages)} systems scored"
          + (f"; skipped: {', '.join(s['stage'] for s in skipped)} (reasons in {out / SUMMARY})" if skipped else "")
          + (f"; comparison in {out / 'compare'}" if summary["compare"] else ""))
    if summary["compare"] is None:
        raise UsageError(f"fewer than two systems could be scored, nothing to compare (see {out / SUMMARY})")
    return summary
