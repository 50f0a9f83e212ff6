"""Which weights training exports to model/: the best (or last) checkpoint, or an average of several.

`train.average_checkpoints=N` (N >= 2) averages the weights of N checkpoints, element by element (icefall,
NeMo and ESPnet do the same): the last N (`train.average_by=last`) or the N with the lowest dev WER
(`best`, CER breaking ties). The average is scored on the eval split and kept only when it is not worse than
the single checkpoint that would be exported otherwise (NeMo's rule; WER, then CER); else that checkpoint is.
Which one went to model/ is said on the terminal, in train.log and in metrics.json (`model_weights`).

The checkpoints the average needs are kept while training: the newest max(save_total_limit, N) for `last`,
the N best besides the newest save_total_limit for `best`. Averaging reads only their model.safetensors, so
it needs unsharded checkpoints (single process or DDP; not FSDP/DeepSpeed sharded states).

Usage:
    from w2vbert_asr.average import average_weights
    state_dict = average_weights([Path("run/checkpoints/step-00000500"), Path("run/checkpoints/step-00000600")])
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)
WEIGHTS_FILE = "model.safetensors"  # accelerate's save_state(safe_serialization=True) name for the model


def average_weights(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the checkpoints' model weights (accumulated in float64, returned in each
    tensor's own dtype); integer tensors (counters) are taken from the last checkpoint."""
    from safetensors.torch import load_file

    if not paths:
        raise ValueError("average_weights needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    for path in paths:
        last = load_file(str(Path(path) / WEIGHTS_FILE))
        for name, t in last.items():
            if t.is_floating_point():
                total[name] = total[name] + t.double() if name in total else t.double()
    return {name: (total[name] / len(paths)).to(t.dtype) if t.is_floating_point() else t for name, t in last.items()}


def evaluations(history: list[dict]) -> dict[int, tuple[float, float]]:
    """step -> (eval WER, eval CER) from a trainer state's history."""
    return {int(h["step"]): (float(h["eval/wer"]), float(h["eval/cer"])) for h in history if "eval/wer" in h}


def chosen_steps(tcfg, history: list[dict], done: Sequence[int]) -> list[int]:
    """The checkpoint steps to average (among `done`, the complete ones), oldest first."""
    n = int(tcfg.average_checkpoints or 0)
    if n < 2:
        return []
    if tcfg.average_by == "last":
        return sorted(done)[-n:]
    scores = evaluations(history)
    ranked = sorted((s for s in done if s in scores), key=lambda s: (*scores[s], s))
    return sorted(ranked[:n])


def kept_checkpoints(tcfg, state) -> tuple[int, set[int]]:
    """(how many of the newest checkpoints prune keeps, steps it keeps besides): the best one, and those
    averaging will need."""
    n = int(tcfg.average_checkpoints or 0)
    keep, protect = int(tcfg.save_total_limit), {int(state.best_step)}
    if n >= 2 and tcfg.average_by == "last":
        keep = max(keep, n)
    elif n >= 2:
        scores = evaluations(state.history)
        protect |= set(sorted(scores, key=lambda s: (*scores[s], s))[:n])
    return keep, protect


def final_weights(s, state) -> tuple[Path | None, dict]:
    """(checkpoint for save_model to load, or None to save the weights the model holds; what was chosen).
    s: the training Session. With averaging, the average is loaded into the model and scored on the eval
    split; when it is worse than the single checkpoint, that checkpoint is returned to be loaded instead."""
    from .checkpoint import complete_checkpoints

    tcfg = s.cfg.train
    single = state.best_step if tcfg.select_best and state.best_step > 0 else state.step
    single_path = s.ckpt_root / f"step-{single:08d}"
    chosen = {"kind": "single", "step": single}
    done = {int(p.name.split("-")[1]): p for p in complete_checkpoints(s.ckpt_root)}
    steps = chosen_steps(tcfg, state.history, list(done))
    scores = evaluations(state.history)
    if len(steps) < 2 or single not in scores or not all((done[k] / WEIGHTS_FILE).is_file() for k in steps):
        if int(tcfg.average_checkpoints or 0) >= 2:
            log.warning("train.average_checkpoints=%s: found %d unsharded checkpoint(s) to average; exporting step %d",
                        tcfg.average_checkpoints, len(steps), single)
        return (single_path if single != state.step else None), chosen
    from accelerate.utils import extract_model_from_parallel

    extract_model_from_parallel(s.model).load_state_dict(average_weights([done[k] for k in steps]))
    wer, cer = _score_on_eval(s)
    best_wer, best_cer = scores[single]
    average = {"kind": "average", "steps": steps, "by": tcfg.average_by, "eval_wer": wer, "eval_cer": cer}
    single_info = {"kind": "single", "step": single, "eval_wer": best_wer, "eval_cer": best_cer}
    kept = (wer, cer) <= (best_wer, best_cer)  # not worse: NeMo's rule
    result = {**(average if kept else single_info), "average": average, "single": single_info}
    message = (f"model/: the average of checkpoints {steps} (eval WER {100 * wer:.2f}%, CER {100 * cer:.2f}%; "
               f"the single step {single}: {100 * best_wer:.2f}% / {100 * best_cer:.2f}%)" if kept else
               f"model/: the single checkpoint of step {single} (eval WER {100 * best_wer:.2f}%, CER "
               f"{100 * best_cer:.2f}%); the average of {steps} was worse ({100 * wer:.2f}% / {100 * cer:.2f}%)")
    log.info("%s", message)
    if s.accelerator.is_main_process:
        print(message)
    return (None if kept else single_path), result


def _score_on_eval(s) -> tuple[float, float]:
    """Eval WER and CER of the weights the model holds (every process decodes its share; all get the result)."""
    from .evaluate import decode_dataset, greedy_decoder, score

    hyps, _ = decode_dataset(s.model, s.eval_ds, s.featurizer, greedy_decoder(s.processor.tokenizer),
                             s.accelerator.device, s.cfg.eval.max_batch_seconds, s.cfg.eval.max_batch_size,
                             s.accelerator)
    metrics, _ = score(s.eval_ds, hyps, s.normalizer)
    return float(metrics["wer"]), float(metrics["cer"])


def record_choice(metrics_file: Path, chosen: dict) -> dict:
    """Add `model_weights` (what model/ holds) to metrics.json."""
    from .storage import atomic_write_json

    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    metrics["model_weights"] = chosen
    atomic_write_json(metrics_file, metrics)
    return chosen
