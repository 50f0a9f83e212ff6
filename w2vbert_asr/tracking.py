"""What a training run shows and keeps: the console, train.log, the experiment tracker and curves.png.

The console carries our own lines and every library's warnings; the libraries' INFO lines (accelerate's
"Saving current state to ...", four per checkpoint) and transformers' weight loading/saving bars stay out
of it. train.log keeps our lines and the libraries' INFO lines, with times. Metrics are named like
`train/loss` and `eval/wer` in train.log, in the tracker (`train.log_with`) and on curves.png.

Usage:
    from w2vbert_asr.tracking import open_train_log, quiet_console
    quiet_console()                              # once per command
    with open_train_log(output_dir / "train.log"): ...
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

OURS = "w2vbert_asr"
HPARAM_SECTIONS = ("train", "model", "text", "seed")  # of the config, shown beside the tracker's runs


def _ours_or_warning(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] == OURS or record.levelno >= logging.WARNING


def quiet_console() -> None:
    """Only our INFO lines and everyone's warnings on the console handlers (Hydra's job logging puts one on
    the root logger); transformers' progress bars for loading and writing weights off."""
    from transformers.utils import logging as hf_logging

    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and _ours_or_warning not in handler.filters:
            handler.addFilter(_ours_or_warning)
    hf_logging.disable_progress_bar()


@contextmanager
def open_train_log(path: Path | None):
    """Append INFO lines of ours and of the libraries to `path` while the block runs (None: nothing, as on
    the processes that do not write)."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    ours = logging.getLogger(OURS)
    ours.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def flat_hparams(cfg) -> dict:
    """The config's scalar settings as `section/key` -> value, for the tracker's hyperparameter table."""
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + "/", v)
            elif isinstance(v, (int, float, str, bool)):
                flat[key] = v
    walk("", OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items() if k.split("/")[0] in HPARAM_SECTIONS}


def progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, mininterval=2)


def plot_curves(history: list[dict], path: Path) -> None:
    """train/loss and eval/wer against the step, in one PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(7, 4))
    loss = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
    wer = [(h["step"], h["eval/wer"]) for h in history if "eval/wer" in h]
    if loss:
        ax1.plot(*zip(*loss), color="tab:blue", label="train/loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train/loss", color="tab:blue")
    ax2 = ax1.twinx()
    if wer:
        ax2.plot(*zip(*wer), "o-", color="tab:red", label="eval/wer")
    ax2.set_ylabel("eval/wer", color="tab:red")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
