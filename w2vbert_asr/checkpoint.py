"""Checkpoints (written atomically, loaded without running code) and the exported model folder.

    checkpoints/step-<N>/    model.safetensors (weights), optimizer.bin (AdamW moments),
                             random_states_<rank>.pkl (each process's Python/numpy/torch RNG and accelerate's
                             micro-batch counter), scaler.pt (fp16 only) and trainer_state.json (step, data
                             position, LR scheduler state, best WER, the running-loss window, history)
    model/                   save_pretrained model (safetensors) + processor + normalizer.json

A checkpoint is written into step-<N>.tmp and renamed only when complete: resume ignores .tmp folders.
optimizer.bin, random_states_*.pkl and scaler.pt are torch.save files; they are loaded only with
torch.load(weights_only=True), which accepts tensors, numbers and plain containers and runs no code. Any
other pickle in a checkpoint (custom_checkpoint_*.pkl, where accelerate keeps registered objects) makes
resume refuse.

Usage:
    from w2vbert_asr.checkpoint import latest_checkpoint, load_checkpoint
    load_checkpoint(accelerator, latest_checkpoint(Path("outputs/mn/checkpoints")))
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from . import UsageError
from .storage import (atomic_dir, atomic_write_json, disk_full_guard, free_bytes, fresh_dir, human_bytes, remove_paths,
                      replace_dir)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL = "model"


def _nothing() -> None:
    pass


# --------------------------------------------------------------------------------------------- writing
def save_checkpoint(accelerator, root: Path, step: int, trainer_state: dict, keep: int, best_step: int | Iterable[int],
                    during_write: Callable[[], None] = _nothing) -> Path:
    """Write accelerate's state + trainer_state.json into step-N.tmp, then rename: a kill mid-save leaves only
    a .tmp folder, which resume ignores, never a checkpoint that looks complete but is not. Then prune to the
    newest `keep` (plus the best). Every process takes part; the main one writes the shared files.

    A full disk (checked before the write against the size of the last checkpoint, and caught during it)
    removes the .tmp and raises one UsageError naming the free space, the folder and the last good
    checkpoint to resume from. `during_write` runs after the state is written, before the rename (tests)."""
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    last = latest_checkpoint(root)
    advice = (f"then continue from {last} with resume=true" if last is not None
              else "then run again (no checkpoint was written yet)")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if last is not None and last != final:
            need, free = _tree_bytes(last), free_bytes(root)
            if free < need:
                raise UsageError(f"not enough disk space for a checkpoint in {root}: {human_bytes(free)} free, the "
                                 f"last one ({last.name}) took {human_bytes(need)}. Free some space, {advice}")
        fresh_dir(tmp)
    accelerator.wait_for_everyone()
    with disk_full_guard(root, cleanup=[tmp] if accelerator.is_main_process else [], advice=advice):
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        during_write()
        if accelerator.is_main_process:
            atomic_write_json(tmp / STATE_FILE, trainer_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, final)
        prune(root, keep, best_step)
    accelerator.wait_for_everyone()
    return final


def save_model(accelerator, model, processor, normalizer, model_dir: Path, best: Path | None = None,
               during_write: Callable[[], None] = _nothing) -> None:
    """save_pretrained model (safetensors) + processor + normalizer.json into model_dir, atomically; with
    `best`, that checkpoint's weights.

    Every process takes part: the best checkpoint is loaded back on all of them, and
    `accelerator.get_state_dict` gathers full weights under FSDP / DeepSpeed ZeRO-3 (where the main process
    alone holds only its shard); the main process writes."""
    if best is not None and best.is_dir():
        load_checkpoint(accelerator, best)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        last = latest_checkpoint(model_dir.parent / CHECKPOINTS)
        advice = f"then run again with resume=true (it saves from {last})" if last else "then run again"
        with disk_full_guard(model_dir.parent, cleanup=[model_dir.with_name(model_dir.name + ".tmp")], advice=advice), \
                atomic_dir(model_dir) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
            normalizer.save(tmp)
            during_write()
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------- reading
def load_checkpoint(accelerator, path: Path) -> None:
    """accelerate.load_state(path), refusing anything that could run code (see `check_checkpoint_files`)."""
    check_checkpoint_files(path, accelerator.num_processes, accelerator.process_index)
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path}: a file holds more than tensors and plain data, and torch.load(weights_only=True)"
                         f" refused it ({str(e).splitlines()[0]}); delete that checkpoint folder") from e


# torch.distributed.checkpoint (FSDP's sharded state) reads its .metadata with plain pickle.load; these are
# the globals a real one names (its dataclasses, dtypes, torch.Size, a layout lookup, a path).
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Loads a DCP .metadata file only if it names nothing but the globals above."""

    def find_class(self, module, name):
        allowed = (module in _DCP_MODULES or (module, name) in _DCP_GLOBALS
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if allowed:
            found = super().find_class(module, name)
            if module not in _DCP_MODULES or isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def check_checkpoint_files(path: Path, num_processes: int, process_index: int) -> None:
    """Refuse (UsageError) a checkpoint that could run code on resume:
    - a pickle this toolkit does not write (custom_checkpoint_*.pkl: accelerate unpickles registered
      objects with weights_only=False);
    - this process's random_states_<rank>.pkl if torch.load(weights_only=True) rejects it (accelerate
      would swallow that failure and resume with fresh RNG streams, inexactly);
    - a torch.distributed.checkpoint .metadata file (FSDP, read with plain pickle) naming other globals.
    optimizer.bin and scaler.pt are loaded by accelerate with weights_only=True (see load_checkpoint)."""
    from accelerate.utils.other import load as weights_only_load

    ours = {f"random_states_{i}.pkl" for i in range(num_processes)}
    foreign = sorted(p.name for p in path.rglob("*.pkl") if p.name not in ours)
    if foreign:
        raise UsageError(f"{path} holds {', '.join(foreign)}: this toolkit never writes such pickles and will not "
                         "load one (it could run code); delete that checkpoint folder to resume from an older one")
    rng = path / f"random_states_{process_index}.pkl"
    for meta in [p for p in path.rglob("*") if p.name.endswith(".metadata") and p.is_file()]:
        try:
            with open(meta, "rb") as f:
                _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
            raise UsageError(f"{meta} is not plain checkpoint metadata ({e}); refusing to load it: delete that "
                             "checkpoint folder") from e
    try:
        if rng.exists():
            weights_only_load(rng)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path}: {rng.name} holds more than tensors and plain data, and "
                         f"torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}); delete that "
                         "checkpoint folder") from e


# --------------------------------------------------------------------------------------------- the folder
def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """step-* folders with a trainer_state.json (renamed into place complete), oldest first."""
    return sorted(p for p in ckpt_root.glob("step-*") if p.suffix not in (".tmp", ".old") and (p / STATE_FILE).is_file())


def prune(ckpt_root: Path, keep: int, best_step: int | Iterable[int]) -> None:
    """Keep the newest `keep` complete checkpoints (at least the newest one) plus the best, which may be
    older: keep=1 can leave two folders. Stale .tmp folders (a killed save) are removed."""
    done = complete_checkpoints(ckpt_root)
    steps = [best_step] if isinstance(best_step, int) else best_step  # several: the best, and those averaging needs
    kept = set(done[-max(keep, 1):]) | {ckpt_root / f"step-{int(k):08d}" for k in steps}
    remove_paths(p for p in done if p not in kept)
    remove_paths(list(ckpt_root.glob("step-*.tmp")))


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
