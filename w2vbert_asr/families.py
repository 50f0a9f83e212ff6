"""The CTC model families the toolkit trains or scores, and the little that differs between them.

    w2v_bert      W2v-BERT 2.0 (`Wav2Vec2BertForCTC`): 80-bin fbank frames, stacked, an adapter; what `train` has
                  always fine-tuned (facebook/w2v-bert-2.0, MIT)
    omniasr_ctc   Omnilingual ASR's CTC models (`OmniASRForCTC`, hf-audio/omniasr-ctc-300m-v2 and -1b-v2,
                  Apache-2.0): the raw waveform through strided convolutions, 20 ms frames
    mms           MMS (`Wav2Vec2ForCTC` with per-language adapters, facebook/mms-1b-all, CC-BY-NC-4.0): scored as
                  a baseline only

Everything else (the training loop, batching, CTC loss, greedy and n-gram decoding, chunked transcription,
scoring) is shared: a family names its transformers classes, its batched featurizer comes from its processor's
feature extractor (waveform.featurizer_for) and its frame geometry from its config (geometry.FrameGeometry.of).
A saved model folder says its family by `config.json`'s model_type.

Usage:
    from w2vbert_asr.families import family_of, load_processor
    family = family_of(AutoConfig.from_pretrained(model_dir))   # Family(name="omniasr_ctc", ...)
    processor = load_processor(model_dir)                       # its processor class, from a folder or Hub id
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import UsageError


@dataclass(frozen=True)
class Family:
    name: str               # model.family in conf/model/*.yaml
    model_type: str         # config.json's model_type
    model_class: str        # transformers class names, imported when used
    config_class: str
    processor_class: str
    system: str             # the `system` metrics.json and compare show
    license: str            # of the pretrained checkpoints (the model card repeats it)
    tag: str                # the model card's tag

    def classes(self) -> tuple[type, type, type]:
        """-> (model class, config class, processor class) from transformers."""
        import transformers

        return (getattr(transformers, self.model_class), getattr(transformers, self.config_class),
                getattr(transformers, self.processor_class))


FAMILIES = {
    "w2v_bert": Family("w2v_bert", "wav2vec2-bert", "Wav2Vec2BertForCTC", "Wav2Vec2BertConfig",
                       "Wav2Vec2BertProcessor", "w2v-bert-2.0-ctc", "mit", "w2v-bert-2.0"),
    "omniasr_ctc": Family("omniasr_ctc", "omniasr_ctc", "OmniASRForCTC", "OmniASRCTCConfig", "OmniASRCTCProcessor",
                          "omniasr-ctc", "apache-2.0", "omniasr"),
    "mms": Family("mms", "wav2vec2", "Wav2Vec2ForCTC", "Wav2Vec2Config", "Wav2Vec2Processor", "mms",
                  "cc-by-nc-4.0", "mms"),
}
TRAINABLE = ("w2v_bert", "omniasr_ctc")  # what model.family may name; mms is scored, not trained
MARKUP = re.compile(r"^(<.+>|\[.+\])$")  # tokens that stand for something, not for their characters


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise UsageError(f"model family {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config) -> Family:
    """The family of a model config (by model_type)."""
    for family in FAMILIES.values():
        if family.model_type == config.model_type:
            return family
    raise UsageError(f"a {config.model_type!r} model is not a CTC family this toolkit reads "
                     f"({', '.join(f.model_type for f in FAMILIES.values())})")


def family_of_model(ref: str | Path) -> Family:
    """The family of a saved model folder or Hub id (reads its config.json)."""
    from transformers import AutoConfig

    return family_of(AutoConfig.from_pretrained(str(ref)))


def load_processor(ref: str | Path, family: Family | None = None):
    """The processor (tokenizer + feature extractor) of a model folder or Hub id, as its family's class."""
    family = family or family_of_model(ref)
    return family.classes()[2].from_pretrained(str(ref))


def blank_id(config) -> int:
    """The CTC blank's id: `blank_token_id` where the config has one (omniASR), else the pad token (W2v-BERT, MMS:
    their tokenizers' [PAD]/<pad> is the blank)."""
    blank = getattr(config, "blank_token_id", None)
    return int(config.pad_token_id if blank is None else blank)


def emittable_chars(tokenizer) -> set[str]:
    """The characters a tokenizer can write: those of its tokens, a word delimiter or SentencePiece boundary
    (`|`, `▁`) standing for the space; special tokens and markup tokens (`<...>`, `[...]`: language tags,
    placeholders) write none."""
    specials = set(tokenizer.all_special_tokens)
    delimiter = getattr(tokenizer, "word_delimiter_token", None)
    chars = set()
    for token in tokenizer.get_vocab():
        if token not in specials and not MARKUP.match(token):
            chars |= set(" " if token == delimiter else token.replace("▁", " "))
    return chars - {" "}
