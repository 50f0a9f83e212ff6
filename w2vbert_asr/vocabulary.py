"""Which processor (tokenizer + feature extractor) a training run uses and saves with its model.

`prepare` always writes processor/: the character vocabulary of the train text with W2v-BERT 2.0's fbank
extractor. A W2v-BERT run uses it as it is. An omniASR-CTC run (model.family=omniasr_ctc) writes its own after
prepare, processor_omniasr_ctc/: its waveform extractor, and the checkpoint's tokenizer or that character
vocabulary (omniasr.write_processor says which, and why).

Usage:
    from w2vbert_asr.vocabulary import training_processor, write_processor
    write_processor(cfg)                       # main process, after prepare(cfg)
    processor = training_processor(cfg)        # every process
"""

from __future__ import annotations

from pathlib import Path

from .prepare import PROCESSOR


def processor_dir(cfg) -> Path:
    """The processor `train` uses and saves with the model."""
    if cfg.model.family == "omniasr_ctc":
        from .omniasr import processor_dir as omniasr_dir

        return omniasr_dir(cfg.output_dir)
    return Path(cfg.output_dir) / PROCESSOR


def training_processor(cfg):
    """The processor of processor_dir(cfg), as model.family's processor class."""
    from .families import family_named, load_processor

    return load_processor(processor_dir(cfg), family_named(cfg.model.family))


def write_processor(cfg) -> None:
    """After prepare, on the main process: the model family's processor (none to write for W2v-BERT)."""
    if cfg.model.family != "omniasr_ctc":
        return
    from .omniasr import write_processor as write_omniasr
    from .prepared import load_prepared

    texts = [str(t) for t in load_prepared(cfg.output_dir, "train")["text"]]
    write_omniasr(cfg, Path(cfg.output_dir) / PROCESSOR, texts)
