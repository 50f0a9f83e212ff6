import unicodedata

import pytest

from w2vbert_asr.text import PAD, UNK, WORD_DELIMITER, Normalizer, Vocabulary, build_processor


def test_punctuation_by_unicode_category_and_nfc():
    n = Normalizer()
    raw = "«Habari» “za” — leo… ¿Sawa? ‹ok› WA\u0301TU,watoto"
    out = n(raw)
    assert out == "habari za leo sawa ok wátu watoto"
    assert unicodedata.is_normalized("NFC", out)
    assert not any(unicodedata.category(c).startswith("P") for c in out)


def test_keep_remove_replace_and_digits():
    assert Normalizer(keep=["'"])("Ng'ombe!") == "ng'ombe"
    assert Normalizer()("Ng'ombe!") == "ng ombe"
    assert Normalizer(remove=["x"])("axb") == "a b"
    assert Normalizer(replace={"ё": "е"})("Ёлка") == "елка"
    assert Normalizer(digits="remove")("Mwaka 2024 sasa") == "mwaka sasa"
    assert Normalizer(digits="keep")("Mwaka 2024") == "mwaka 2024"
    assert Normalizer(digits="drop_row").has_digits("a 1")
    with pytest.raises(ValueError, match="text.digits"):
        Normalizer(digits="spell")


def test_drop_latin_words_for_non_latin_languages():
    n = Normalizer(drop_latin_words=True)
    assert n("Сайн байна уу John, iPhone-оо!") == "сайн байна уу оо"


def test_zero_width_and_control_characters_removed():
    assert Normalizer()("a\u200bb\u200dc\ufeff d") == "abc d"


def test_normalizer_save_load(tmp_path):
    n = Normalizer(keep=["'"], drop_latin_words=True, digits="remove")
    n.save(tmp_path)
    assert Normalizer.load(tmp_path) == n


def test_vocabulary_from_train_only_with_rare_to_unk():
    vocab = Vocabulary.build(["aab ba", "abc"], min_char_count=2)
    assert vocab.chars == ["a", "b"]
    assert vocab.rare == {"c": 1}
    ids = vocab.token_to_id()
    assert ids[PAD] == 0 and UNK in ids and WORD_DELIMITER in ids
    oov = vocab.out_of_vocabulary(["abz", "zz"])
    assert oov["chars"] == {"z": 3} and oov["rate"] == pytest.approx(3 / 5)


def test_processor_round_trip(tmp_path):
    from transformers import Wav2Vec2BertProcessor

    build_processor(Vocabulary.build(["habari ya leo"]), tmp_path)
    proc = Wav2Vec2BertProcessor.from_pretrained(tmp_path)
    ids = proc.tokenizer("habari leo").input_ids
    assert proc.tokenizer.pad_token_id == 0
    assert proc.tokenizer.decode(ids, group_tokens=False) == "habari leo"
    assert proc.tokenizer.convert_ids_to_tokens(ids)[6] == WORD_DELIMITER
    assert proc.tokenizer.decode(proc.tokenizer("hax").input_ids, group_tokens=False) == f"ha{UNK}"
