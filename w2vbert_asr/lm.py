"""Word n-gram language model for CTC beam search: an ARPA file built from the training transcripts,
decoded with pyctcdecode (beam search) + kenlm (n-gram scoring).

Usage:
    w2vbert-asr lm recipe=demo                                   # 3-gram from demo_out's train split -> demo_out/lm
    w2vbert-asr lm recipe=mn lm.order=4 lm.text=extra_sentences.txt   # more text than the transcripts
    w2vbert-asr evaluate recipe=demo eval.lm=demo_out/lm         # WER greedy and with the LM ("test+lm")
    w2vbert-asr transcribe model=demo_out/model transcribe.lm=demo_out/lm clip.mp3

    from w2vbert_asr.lm import beam_decoder
    decode = beam_decoder(processor.tokenizer, "demo_out/lm")    # (logits (B, T, V), lengths (B,)) -> texts

Text: the prepared train split's `text` column (already normalised exactly like the references), or
`lm.text` (plain text, one sentence per line, normalised here with the model's normaliser). Eval and
test transcripts are never used, so WER with the LM stays an honest held-out number.

Why kaldingram builds the ARPA (PyPI `kaldingram`, Next-gen Kaldi team, Apache-2.0, released 2026-07):
it is Kaldi's `make_kn_lm.py` packaged as a library -- back-off Kneser-Ney that reproduces SRILM's
`ngram-count -ukndiscount` (continuation counts at every lower order, discounts from counts-of-counts,
back-off weights that renormalise every context), pure Python (only tqdm), no system binaries (KenLM's
`lmplz` is a C++ tool that pip cannot install). The other candidate, `arpabo` 0.3.0, was rejected:
its "Kneser-Ney" uses continuation counts only for unigrams and writes back-off weights of 1.0, so its
conditional distributions do not sum to one (tests/test_lm.py checks ours do, through kenlm).
kaldingram (like SRILM without -unk) leaves no probability for unseen words, and kenlm would then
score every out-of-vocabulary word log10 p = -100, i.e. beam search could never output a word missing
from the LM text. We therefore add `<unk>` with the Good-Turing unseen mass (singleton word types /
word tokens) and scale the other unigrams by (1 - p_unk) before back-off weights are computed, so the
model stays normalised.

Output folder (`lm.output_dir`), loadable as-is by `Wav2Vec2ProcessorWithLM.from_pretrained(dir)`:
    preprocessor_config.json, tokenizer files, vocab.json    the model's processor (alphabet source)
    alphabet.json                                            pyctcdecode's alphabet (id order of vocab)
    language_model/<order>gram.arpa                          the n-gram (text ARPA; kenlm reads it)
    language_model/unigrams.txt                              words the LM knows (OOV penalty in beam)
    language_model/attrs.json                                alpha, beta, unk_score_offset, score_boundary
    lm_info.json                                             order, text source, sizes, beam_width, builder
For a large text, KenLM's `build_binary` (C++, not on PyPI) can turn the .arpa into a .bin that loads
much faster: replace the .arpa in language_model/ with it; pyctcdecode accepts either.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from . import UsageError
from .storage import atomic_dir
from .text import NORMALIZER_FILE, Normalizer

log = logging.getLogger(__name__)

LANGUAGE_MODEL_DIR = "language_model"  # pyctcdecode's BeamSearchDecoderCTC._LANGUAGE_MODEL_SERIALIZED_DIRECTORY
LM_INFO = "lm_info.json"
UNK = "<unk>"
MAX_UNK_MASS = 0.5  # a corpus of singletons would otherwise give unseen words most of the mass
UNK_SCORE_OFFSET = -10.0  # pyctcdecode's default extra ln-penalty for words outside unigrams.txt
MIN_ORDER = 2  # kaldingram's order-1 path counts <s> as a word; a unigram LM barely helps CTC anyway
MAX_ORDER = 6  # kaldingram's CLI stops at 5; beyond 6 a transcript-sized text has no statistics


# --------------------------------------------------------------------------------------------- text
def _model_source(cfg: DictConfig) -> Path:
    """Folder with the tokenizer (and normaliser) the LM is built for: the model dir, else prepare's processor/."""
    for candidate in (Path(cfg.model_dir), Path(cfg.output_dir) / "processor"):
        if (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise UsageError(f"no tokenizer in {cfg.model_dir} or {Path(cfg.output_dir) / 'processor'}: train or "
                     "`w2vbert-asr prepare` first, or pass model=<model dir>")


def train_texts(cfg: DictConfig, normalizer: Normalizer) -> tuple[list[str], str]:
    """-> (normalised sentences, description of their source)."""
    if cfg.lm.text:
        path = Path(cfg.lm.text)
        if not path.is_file():
            raise UsageError(f"lm.text={path} does not exist; give a UTF-8 text file, one sentence per line")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UsageError(f"lm.text={path} is not UTF-8 ({e}); convert it first") from e
        texts = [t for t in (normalizer(line) for line in lines) if t]
        return texts, str(path)
    from .prepare import prepare
    from .prepared import load_prepared

    # `w2vbert-asr lm model=<run>/model` without a recipe: the run folder is the model dir's parent.
    for run in (Path(cfg.output_dir), Path(cfg.model_dir).parent):
        if (run / "prepared" / "train.arrow").is_file():
            return [str(t) for t in load_prepared(run, "train")["text"] if str(t).strip()], str(run / "prepared/train")
    try:
        prepare(cfg)
    except MissingMandatoryValue as e:
        raise UsageError(f"no prepared train split in {cfg.output_dir} and the data config is incomplete ({e}): "
                         "pass recipe=<name> or data.root=..., or lm.text=<sentences.txt>") from e
    return [str(t) for t in load_prepared(cfg.output_dir, "train")["text"] if str(t).strip()], str(
        Path(cfg.output_dir) / "prepared/train")


# --------------------------------------------------------------------------------------------- ARPA
def write_arpa(texts: Iterable[str], order: int, path: str | Path) -> dict:
    """Back-off Kneser-Ney ARPA of word `order` from normalised sentences (+ `<unk>`, see module doc).

    -> {"ngrams": {1: n, 2: n, ...}, "sentences": n, "words": n, "vocabulary": n, "unk_log10": float}
    """
    import kaldingram.train
    from kaldingram.train import NgramCounts

    if not MIN_ORDER <= order <= MAX_ORDER:
        raise UsageError(f"lm.order={order}: choose {MIN_ORDER}..{MAX_ORDER}")
    counts = NgramCounts(order)
    word_counts: Counter[str] = Counter()
    sentences = 0
    for text in texts:
        words = text.split()
        if not words:
            continue
        if UNK in words or "<s>" in words or "</s>" in words:
            raise UsageError(f"sentence {sentences} contains a reserved token (<s>, </s>, <unk>): {text[:80]!r}")
        counts.add_raw_counts_from_line(" ".join(words))
        word_counts.update(words)
        sentences += 1
    if not sentences:
        raise UsageError("the LM text is empty after normalisation; check lm.text or the prepared train split")
    # kaldingram draws a nested progress bar per order and pass; one log line per build is enough here.
    log.info("estimating a %d-gram from %d sentences", order, sentences)
    bars = kaldingram.train.tqdm
    kaldingram.train.tqdm = functools.partial(bars, disable=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _estimate(counts, word_counts)
        with open(path, "w", encoding="utf-8") as f:
            counts.print_as_arpa(fout=f)
    finally:
        kaldingram.train.tqdm = bars
    ngrams = {n + 1: sum(len(h.word_to_f) for h in counts.counts[n].values()) for n in range(order)}
    p_unk = counts.counts[0][()].word_to_f[UNK]
    return {"ngrams": ngrams, "sentences": sentences, "words": sum(word_counts.values()),
            "vocabulary": len(word_counts), "unk_log10": math.log10(p_unk)}


def _estimate(counts, word_counts: Counter) -> None:
    """Kneser-Ney discounts and probabilities, `<unk>` with the unseen mass, then back-off weights."""
    counts.cal_discounting_constants()
    counts.cal_f()
    # Good-Turing unseen mass for <unk>; the seen unigrams give up exactly that share.
    singletons = sum(1 for n in word_counts.values() if n == 1)
    p_unk = min(MAX_UNK_MASS, max(singletons, 1) / sum(word_counts.values()))
    unigrams = counts.counts[0][()]
    for w in unigrams.word_to_f:
        unigrams.word_to_f[w] *= 1.0 - p_unk
    unigrams.word_to_count[UNK] = 0
    unigrams.word_to_f[UNK] = p_unk
    counts.cal_bow()  # after the rescale, so every back-off weight renormalises against the new unigrams


# --------------------------------------------------------------------------------------------- decoding
def decoder_labels(tokenizer) -> list[str]:
    """Tokens in id order (logit column order); pyctcdecode maps [PAD] -> blank, `|` -> space, [UNK] -> ⁇."""
    vocab = tokenizer.get_vocab()
    labels = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in labels] != list(range(len(labels))):
        raise ValueError("tokenizer ids are not contiguous from 0; cannot map logit columns to characters")
    return labels


def _load_kenlm(path: Path):
    import kenlm

    config = kenlm.Config()
    config.show_progress = False
    return kenlm.Model(str(path), config)


def load_decoder(tokenizer, lm_dir: str | Path, alpha: float | None = None, beta: float | None = None):
    """pyctcdecode `BeamSearchDecoderCTC` for `tokenizer`'s logit columns with the LM in `lm_dir`."""
    from pyctcdecode import BeamSearchDecoderCTC
    from pyctcdecode.alphabet import Alphabet
    from pyctcdecode.language_model import LanguageModel

    lm_path = Path(lm_dir) / LANGUAGE_MODEL_DIR
    if not lm_path.is_dir():
        raise UsageError(f"{lm_dir} is not an LM folder (no {LANGUAGE_MODEL_DIR}/); build one with `w2vbert-asr lm`")
    files = LanguageModel.parse_directory_contents(str(lm_path))
    attrs = json.loads(Path(files["json_attrs"]).read_text())
    if alpha is not None:
        attrs["alpha"] = float(alpha)
    if beta is not None:
        attrs["beta"] = float(beta)
    unigrams = Path(files["unigrams"]).read_text(encoding="utf-8").splitlines()
    language_model = LanguageModel(_load_kenlm(Path(files["kenlm"])), unigrams, **attrs)
    alphabet = Alphabet.build_alphabet(decoder_labels(tokenizer))
    return BeamSearchDecoderCTC(alphabet, language_model)


def lm_info(lm_dir: str | Path) -> dict:
    path = Path(lm_dir) / LM_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class BeamSearch:
    """pyctcdecode's beam search with an n-gram LM over one model's logit columns, at a fixed beam width."""

    decoder: object  # pyctcdecode BeamSearchDecoderCTC
    beam_width: int

    def best_beam(self, logits: torch.Tensor) -> tuple:
        """Logits (T, V) of one utterance -> the best beam `(text, lm_state, [(word, (start, end))], ...)`."""
        return self.decoder.decode_beams(logits.detach().float().cpu().numpy(), beam_width=self.beam_width)[0]

    def text(self, logits: torch.Tensor) -> str:
        return self.decoder.decode(logits.detach().float().cpu().numpy(), beam_width=self.beam_width)


def beam_search(tokenizer, lm_dir: str | Path, beam_width: int | None = None, alpha: float | None = None,
                beta: float | None = None) -> BeamSearch:
    """The LM folder `lm_dir` (`w2vbert-asr lm`) as a BeamSearch for `tokenizer`'s logit columns. beam_width,
    alpha and beta default to what `w2vbert-asr lm` stored there (its lm.beam_width, lm.alpha, lm.beta)."""
    decoder = load_decoder(tokenizer, lm_dir, alpha, beta)
    width = beam_width or lm_info(lm_dir).get("beam_width")
    if not width:
        raise UsageError(f"{Path(lm_dir) / LM_INFO} names no beam width: build the LM again with `w2vbert-asr lm`")
    return BeamSearch(decoder, int(width))


def beam_decoder(tokenizer, lm_dir: str | Path, beam_width: int | None = None, alpha: float | None = None,
                 beta: float | None = None, confidence=None) -> Callable[[torch.Tensor, torch.Tensor], list]:
    """Decoder for `evaluate.decode_dataset`: (logits (B, T, V) float, valid lengths (B,)) -> texts, or
    `confidence.Hypothesis` objects (word confidences over the best beam's word frames) given a measure."""
    search = beam_search(tokenizer, lm_dir, beam_width, alpha, beta)

    def decode(logits: torch.Tensor, lengths: torch.Tensor) -> list:
        rows = logits.detach().float().cpu()
        if confidence is None:
            return [search.text(row[:n]) for row, n in zip(rows, lengths.cpu().tolist())]
        from .confidence import beam_hypothesis

        return [beam_hypothesis(row[:n], search.best_beam(row[:n]), tokenizer.pad_token_id, confidence)
                for row, n in zip(rows, lengths.cpu().tolist())]

    return decode


# --------------------------------------------------------------------------------------------- command
def build_lm(cfg: DictConfig) -> dict:
    """`w2vbert-asr lm`: ARPA of order cfg.lm.order + processor + pyctcdecode files into cfg.lm.output_dir."""
    from pyctcdecode import BeamSearchDecoderCTC
    from pyctcdecode.alphabet import Alphabet
    from pyctcdecode.language_model import LanguageModel
    from transformers import AutoProcessor

    source = _model_source(cfg)
    processor = AutoProcessor.from_pretrained(source)  # the model's own processor class (families.py)
    normalizer = Normalizer.load(source) if (source / NORMALIZER_FILE).is_file() else Normalizer.from_config(cfg.text)
    texts, text_source = train_texts(cfg, normalizer)
    order = int(cfg.lm.order)

    out = Path(cfg.lm.output_dir)
    with atomic_dir(out) as tmp:
        arpa = tmp / "build" / f"{order}gram.arpa"
        stats = write_arpa(texts, order, arpa)
        unigrams = sorted({w for t in texts for w in t.split()})
        language_model = LanguageModel(_load_kenlm(arpa), unigrams, alpha=float(cfg.lm.alpha),
                                       beta=float(cfg.lm.beta), unk_score_offset=UNK_SCORE_OFFSET, score_boundary=True)
        decoder = BeamSearchDecoderCTC(Alphabet.build_alphabet(decoder_labels(processor.tokenizer)), language_model)
        processor.save_pretrained(tmp)
        decoder.save_to_dir(str(tmp))  # alphabet.json + language_model/{arpa, unigrams.txt, attrs.json}
        shutil.rmtree(tmp / "build")
        info = {"order": order, "text_source": text_source, "tokenizer_source": str(source), **stats,
                "alpha": float(cfg.lm.alpha), "beta": float(cfg.lm.beta), "beam_width": int(cfg.lm.beam_width),
                "builder": f"kaldingram {metadata.version('kaldingram')} (back-off Kneser-Ney, SRILM -ukndiscount)"}
        (tmp / LM_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=2))
    sizes = ", ".join(f"{n}-grams {c:,}" for n, c in stats["ngrams"].items())
    print(f"lm: {order}-gram from {stats['sentences']:,} sentences ({stats['words']:,} words, "
          f"{stats['vocabulary']:,} types; {sizes}) -> {out}")
    return {**info, "output_dir": str(out)}
