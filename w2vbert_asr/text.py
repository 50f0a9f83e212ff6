"""Text normalisation and the character CTC vocabulary.

One `Normalizer` serves training text, WER references and every system's hypotheses (ours and
Whisper's), so scores are always computed on the same footing. It is configured per recipe
(`conf/text/default.yaml`) and saved next to the model (`normalizer.json`) so that `evaluate`,
`baseline` and `transcribe` apply exactly what training applied.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from .geometry import SAMPLING_RATE

if TYPE_CHECKING:
    from transformers import Wav2Vec2BertProcessor

PAD = "[PAD]"  # CTC blank; id 0 so that padding labels and blanks coincide
UNK = "[UNK]"
WORD_DELIMITER = "|"
NORMALIZER_FILE = "normalizer.json"
DIGIT_POLICIES = ("keep", "remove", "drop_row")
_SPACES = re.compile(r"\s+")


@dataclass
class Normalizer:
    """Maps raw transcripts to the text the model learns and is scored on."""

    unicode_form: str = "NFC"
    lowercase: bool = True
    remove_punctuation: bool = True
    remove_symbols: bool = True
    keep: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    replace: dict[str, str] = field(default_factory=dict)
    digits: str = "keep"
    drop_latin_words: bool = False

    def __post_init__(self) -> None:
        if self.digits not in DIGIT_POLICIES:
            raise ValueError(f"text.digits={self.digits!r}: choose one of {', '.join(DIGIT_POLICIES)}")
        self.keep = [unicodedata.normalize(self.unicode_form, c) for c in self.keep]
        self._remove = set(self.remove)

    @classmethod
    def from_config(cls, cfg: Mapping) -> Normalizer:
        names = cls.__dataclass_fields__
        return cls(**{k: (dict(v) if k == "replace" else list(v) if k in ("keep", "remove") else v)
                      for k, v in cfg.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        Path(directory, NORMALIZER_FILE).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Normalizer:
        return cls(**json.loads(Path(directory, NORMALIZER_FILE).read_text()))

    def has_digits(self, text: str) -> bool:
        return any(unicodedata.category(c) == "Nd" for c in text)

    def _is_removed(self, ch: str) -> bool:
        if ch in self.keep:
            return False
        if ch in self._remove:
            return True
        cat = unicodedata.category(ch)
        return (self.remove_punctuation and cat[0] == "P") or (self.remove_symbols and cat[0] == "S") or (
            self.digits == "remove" and cat == "Nd"
        )

    def __call__(self, text: str) -> str:
        # NFC first, so "e" + U+0301 and "é" become the same vocabulary character.
        text = unicodedata.normalize(self.unicode_form, text)
        if self.lowercase:
            text = text.lower()
        for old, new in self.replace.items():
            text = text.replace(old, new)
        # Removed characters become spaces so "word,word" stays two words; then spaces collapse.
        text = "".join(" " if self._is_removed(c) else c for c in text)
        # Control and format characters (zero-width joiners, BOMs) are never speech.
        text = "".join(c for c in text if unicodedata.category(c)[0] != "C" or c.isspace())
        words = text.split()
        if self.drop_latin_words:
            words = [w for w in words if not any(_is_latin_letter(c) for c in w)]
        return _SPACES.sub(" ", " ".join(words)).strip()


def _is_latin_letter(ch: str) -> bool:
    return ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN")


@dataclass
class Vocabulary:
    """Character vocabulary: `[PAD]`=0 (CTC blank), `[UNK]`, `|` for spaces, then characters."""

    chars: list[str]
    counts: dict[str, int]
    rare: dict[str, int]  # characters mapped to [UNK] because they are rarer than min_char_count

    @classmethod
    def build(cls, texts: Iterable[str], min_char_count: int = 1) -> Vocabulary:
        """Characters of the (normalised) train texts only; eval text never leaks in."""
        counts = Counter(c for t in texts for c in t if c != " ")
        kept = sorted(c for c, n in counts.items() if n >= min_char_count)
        rare = {c: n for c, n in counts.items() if n < min_char_count}
        return cls(chars=kept, counts=dict(counts), rare=rare)

    def token_to_id(self) -> dict[str, int]:
        tokens = [PAD, UNK, WORD_DELIMITER, *self.chars]
        return {t: i for i, t in enumerate(tokens)}

    def out_of_vocabulary(self, texts: Iterable[str]) -> dict:
        """Characters of other splits that the model cannot emit, with their rate per character."""
        known = set(self.chars)
        oov: Counter[str] = Counter()
        total = 0
        for t in texts:
            for c in t:
                if c == " ":
                    continue
                total += 1
                if c not in known:
                    oov[c] += 1
        return {
            "chars": dict(oov.most_common()),
            "rate": (sum(oov.values()) / total) if total else 0.0,
            "total_chars": total,
        }


def build_processor(vocab: Vocabulary, output_dir: str | Path) -> Wav2Vec2BertProcessor:
    """Write vocab.json and save a standard `Wav2Vec2BertProcessor` loadable with `from_pretrained(dir)`."""
    # Imported here: the processor classes pull in transformers' modeling stack (seconds), which
    # reading text and checking whether prepared data is up to date do not need.
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertProcessor, Wav2Vec2CTCTokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = output_dir / "vocab.json"
    vocab_file.write_text(json.dumps(vocab.token_to_id(), ensure_ascii=False, indent=1))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file), unk_token=UNK, pad_token=PAD, word_delimiter_token=WORD_DELIMITER,
        bos_token=None, eos_token=None,
    )
    feature_extractor = SeamlessM4TFeatureExtractor(sampling_rate=SAMPLING_RATE)
    processor = Wav2Vec2BertProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    processor.save_pretrained(output_dir)
    return processor
