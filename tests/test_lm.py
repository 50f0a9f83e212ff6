"""n-gram LM: a normalised Kneser-Ney ARPA, the Wav2Vec2ProcessorWithLM folder, beam search with the LM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import kenlm
import numpy as np
import pytest
import torch

from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose
from w2vbert_asr.lm import UNK, beam_decoder, build_lm, load_decoder, write_arpa
from w2vbert_asr.text import Normalizer, Vocabulary, build_processor

CORPUS = ["habari ya asubuhi", "habari za jioni", "jambo rafiki yangu", "habari yangu ni nzuri",
          "rafiki ya asubuhi", "asante sana rafiki", "habari ya leo", "jambo sana"]


def next_word_mass(model: kenlm.Model, context: list[str], vocab: list[str]) -> float:
    """Sum over every word (plus </s> and <unk>) of P(word | <s> context): 1 for a normalised LM."""
    state = kenlm.State()
    model.BeginSentenceWrite(state)
    for w in context:
        out = kenlm.State()
        model.BaseScore(state, w, out)
        state = out
    return sum(10 ** model.BaseScore(state, w, kenlm.State()) for w in [*vocab, "</s>", UNK])


def unigram_log10(arpa_text: str) -> dict[str, float]:
    section = arpa_text.split("\\1-grams:\n")[1].split("\n\n")[0]
    return {line.split("\t")[1]: float(line.split("\t")[0]) for line in section.splitlines()}


@pytest.mark.parametrize("order", [2, 3, 4])
def test_arpa_distributions_sum_to_one(tmp_path, order):
    stats = write_arpa(CORPUS, order, tmp_path / "lm.arpa")
    model = kenlm.Model(str(tmp_path / "lm.arpa"))
    assert model.order == order and stats["sentences"] == len(CORPUS)
    vocab = sorted({w for t in CORPUS for w in t.split()})
    for context in ([], ["habari"], ["habari", "ya"], ["jambo", "sana"], ["nzuri"], ["asante", "sana", "rafiki"]):
        assert next_word_mass(model, context, vocab) == pytest.approx(1.0, abs=1e-4), context


def test_kneser_ney_uses_continuation_counts(tmp_path):
    """'francisco' is frequent but follows one word only; 'the' is rarer but follows three: KN ranks 'the' first."""
    corpus = ["san francisco"] * 5 + ["a the", "b the", "c the"]
    write_arpa(corpus, 2, tmp_path / "lm.arpa")
    uni = unigram_log10((tmp_path / "lm.arpa").read_text())
    assert uni["francisco"] < uni["the"]  # maximum likelihood would give francisco 5/16 vs the 3/16


def test_unknown_words_get_the_unseen_mass(tmp_path):
    stats = write_arpa(CORPUS, 3, tmp_path / "lm.arpa")
    words = [w for t in CORPUS for w in t.split()]
    singletons = sum(words.count(w) == 1 for w in set(words))
    assert stats["unk_log10"] == pytest.approx(math.log10(singletons / len(words)))
    model = kenlm.Model(str(tmp_path / "lm.arpa"))
    assert -10 < model.score("habari mpya", bos=True, eos=True) < 0  # an OOV word is unlikely, not impossible


def test_write_arpa_rejects_bad_input(tmp_path):
    with pytest.raises(UsageError, match="lm.order"):
        write_arpa(CORPUS, 1, tmp_path / "x.arpa")
    with pytest.raises(UsageError, match="empty"):
        write_arpa(["", "  "], 3, tmp_path / "x.arpa")
    with pytest.raises(UsageError, match="reserved"):
        write_arpa(["a <unk> b"], 3, tmp_path / "x.arpa")


# --------------------------------------------------------------------------------------------- build + decode
def write_prepared_train(output_dir, texts):
    """The part of `prepare`'s output that build_lm reads: prepared/train.arrow (text) and processor/."""
    from datasets.arrow_writer import ArrowWriter

    (output_dir / "prepared").mkdir(parents=True)
    with ArrowWriter(path=str(output_dir / "prepared" / "train.arrow")) as writer:
        writer.write_batch({"text": list(texts)})
        writer.finalize()
    processor = build_processor(Vocabulary.build(texts), output_dir / "processor")
    Normalizer().save(output_dir / "processor")
    return processor


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_run")
    processor = write_prepared_train(out, CORPUS)
    cfg = compose(["recipe=demo", f"output_dir={out}", "lm.alpha=0.7", "lm.beta=1.5", "lm.beam_width=32"])
    info = build_lm(cfg)
    return cfg, processor, info


def test_build_lm_writes_processor_with_lm_layout(lm_run):
    from transformers import Wav2Vec2ProcessorWithLM

    cfg, processor, info = lm_run
    lm_dir = cfg.lm.output_dir
    assert info["order"] == 3 and info["sentences"] == len(CORPUS) and info["text_source"].endswith("prepared/train")
    info_dir = Path(lm_dir) / "language_model"
    files = sorted(p.name for p in info_dir.iterdir())
    assert files == ["3gram.arpa", "attrs.json", "unigrams.txt"]
    assert json.loads((info_dir / "attrs.json").read_text())["alpha"] == 0.7
    with_lm = Wav2Vec2ProcessorWithLM.from_pretrained(lm_dir)
    assert with_lm.language_model.alpha == 0.7 and with_lm.language_model.beta == 1.5
    assert with_lm.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    logits = spelled_logits(processor.tokenizer, "habari ya asubuhi")
    assert with_lm.decode(logits.numpy()).text == "habari ya asubuhi"


def spelled_logits(tokenizer, text: str, confusions: dict[int, dict[str, float]] | None = None) -> torch.Tensor:
    """(T, V) log-probs spelling `text` one character per frame with blanks between; at character index i,
    `confusions[i]` gives the probabilities of competing characters."""
    vocab = tokenizer.get_vocab()
    frames = []
    for i, ch in enumerate(text):
        probs = (confusions or {}).get(i, {"|" if ch == " " else ch: 0.95})
        row = np.full(len(vocab), 1e-4)
        for c, p in probs.items():
            row[vocab[c]] = p
        frames += [row, np.eye(len(vocab))[vocab["[PAD]"]] * 0.95 + 1e-4]
    return torch.log(torch.tensor(np.array(frames), dtype=torch.float32))


def test_beam_search_with_lm_fixes_what_greedy_gets_wrong(lm_run):
    """Greedy reads 'habarj' (j slightly above i); the LM knows 'habari'."""
    from w2vbert_asr.evaluate import greedy_decoder

    cfg, processor, _ = lm_run
    tok = processor.tokenizer
    wrong = spelled_logits(tok, "habari ya asubuhi", {5: {"j": 0.5, "i": 0.45}})
    right = spelled_logits(tok, "jambo sana")
    batch = torch.full((2, wrong.shape[0], wrong.shape[1]), -20.0)
    batch[0], batch[1, : right.shape[0]] = wrong, right
    lengths = torch.tensor([wrong.shape[0], right.shape[0]])
    assert greedy_decoder(tok)(batch, lengths) == ["habarj ya asubuhi", "jambo sana"]
    assert beam_decoder(tok, cfg.lm.output_dir)(batch, lengths) == ["habari ya asubuhi", "jambo sana"]
    # Same beam search without the LM's weight keeps the acoustic choice: the fix comes from the LM.
    assert beam_decoder(tok, cfg.lm.output_dir, alpha=0.0, beta=0.0)(batch, lengths)[0] == "habarj ya asubuhi"


def test_lm_text_file_and_cli(tmp_path, lm_run):
    from w2vbert_asr.cli import main

    cfg, _, _ = lm_run
    text = tmp_path / "extra.txt"
    text.write_text("Habari, YA asubuhi!\n\njambo sana rafiki\n", encoding="utf-8")
    out = tmp_path / "lm2"
    assert main(["lm", "recipe=demo", f"output_dir={cfg.output_dir}", f"lm.text={text}", f"lm.output_dir={out}",
                 "lm.order=2"]) == 0
    info = json.loads((out / "lm_info.json").read_text())
    assert info["sentences"] == 2 and info["order"] == 2 and info["text_source"] == str(text)
    assert "habari ya asubuhi" not in (out / "language_model" / "unigrams.txt").read_text()
    assert (out / "language_model" / "unigrams.txt").read_text().split() == ["asubuhi", "habari", "jambo", "rafiki",
                                                                              "sana", "ya"]


def test_build_lm_errors(tmp_path):
    with pytest.raises(UsageError, match="no tokenizer"):
        build_lm(compose(["recipe=demo", f"output_dir={tmp_path}"]))
    with pytest.raises(UsageError, match="not an LM folder"):
        load_decoder(build_processor(Vocabulary.build(["ab"]), tmp_path / "p").tokenizer, tmp_path)


def test_evaluate_reports_wer_with_and_without_lm(tmp_path, lm_run):
    """evaluate_model(..., lm_dir) scores the split twice: '<split>' greedy and '<split>+lm' with beam search."""
    import datasets

    from w2vbert_asr.evaluate import evaluate_model
    from w2vbert_asr.model import build_model

    cfg, processor, _ = lm_run
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    build_model(cfg.model, processor.tokenizer).save_pretrained(model_dir, safe_serialization=True)
    processor.save_pretrained(model_dir)
    Normalizer().save(model_dir)
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict({
        "id": ["a", "b"], "text": CORPUS[:2], "duration": [1.0, 1.5],
        "audio": [rng.standard_normal(16000).astype(np.float32) * 0.1,
                  rng.standard_normal(24000).astype(np.float32) * 0.1]}).with_format("numpy")
    summary = evaluate_model(model_dir, cfg, {"test": ds}, tmp_path / "results", lm_dir=cfg.lm.output_dir)
    assert set(summary) == {"test", "test+lm"} and summary["test+lm"]["decoding"] == "beam+lm"
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"test", "test+lm"}


def test_beam_search_path_gives_word_confidences(lm_run):
    """With a confidence measure the LM path returns hypotheses whose word confidences come from the beam's
    word frames: the word whose letter was a coin toss (fixed by the LM) is the least confident one."""
    from w2vbert_asr.confidence import Confidence

    cfg, processor, _ = lm_run
    tok = processor.tokenizer
    wrong = spelled_logits(tok, "habari ya asubuhi", {5: {"j": 0.5, "i": 0.45}})
    [hyp] = beam_decoder(tok, cfg.lm.output_dir, confidence=Confidence())(wrong[None], torch.tensor([wrong.shape[0]]))
    assert hyp.text == "habari ya asubuhi"
    assert [w[0] for w in hyp.words] == ["habari", "ya", "asubuhi"]
    confs = [w[3] for w in hyp.words]
    assert confs[0] < min(confs[1:]), confs
    assert hyp.confidence == pytest.approx(sum(confs) / 3)
