"""The Whisper baseline (w2vbert_asr.baseline) through its real code path, with a tiny offline Whisper.

`build_tiny_whisper` writes a Whisper checkpoint folder (model, generation config, tokenizer, feature
extractor) built from config, nothing downloaded. Its decoder is scripted: every layer is a no-op,
token embeddings are zero and the position embeddings are one-hot, so the logits depend on the decoder
position alone. It therefore always writes `transcript` after a four-token prompt (start, language,
task, no-timestamps), and, if asked to detect the language instead, picks <|en|>: a run that did not
force the recipe's language shows a different prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch

from w2vbert_asr import UsageError
from w2vbert_asr.baseline import _PromptRecorder, baseline, load_whisper, transcribe_dataset, whisper_language
from w2vbert_asr.cli import compose
from w2vbert_asr.synth import synthesize_corpus

TRANSCRIPT = "Habari, DUNIA!"       # what the scripted decoder writes ...
NORMALISED = "habari dunia"         # ... and what the default text normaliser makes of it
DETECTED_LANGUAGE = "en"            # what the scripted decoder would pick if the language were detected
PROMPT = ["<|startoftranscript|>", "<|sw|>", "<|transcribe|>", "<|notimestamps|>"]
NUM_TIMESTAMPS = 1501               # <|0.00|> .. <|30.00|> in 20 ms steps, as in every Whisper vocabulary
TINY_D_MODEL = 64                   # also the number of decoder positions: one one-hot vector each
SCRIPT_LOGIT = 10.0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tiny_whisper(directory: str | Path, transcript: str = TRANSCRIPT,
                       detected_language: str = DETECTED_LANGUAGE) -> Path:
    """Write a tiny Whisper checkpoint folder usable as `baseline.name_or_path` (offline, ~1 MB).

    Vocabulary: the 256 single-byte tokens of byte-level BPE (no merges) followed by Whisper's special
    tokens in Whisper's order (<|endoftext|>, <|startoftranscript|>, one per language in
    transformers' LANGUAGES order, <|translate|>, <|transcribe|>, <|startoflm|>, <|startofprev|>,
    <|nospeech|>, <|notimestamps|>, timestamps). The decoder writes `transcript` whatever the audio.
    """
    from tokenizers import AddedToken
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizer)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    specials = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in LANGUAGES), "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    timestamps = [f"<|{0.02 * i:.2f}|>" for i in range(NUM_TIMESTAMPS)]
    for token in specials + timestamps:
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    # Registered as special so decode(skip_special_tokens=True) drops them, as in real checkpoints.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamps])
    tid = tokenizer.convert_tokens_to_ids
    eot = tid("<|endoftext|>")

    config = WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=80, d_model=TINY_D_MODEL, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=TINY_D_MODEL,
        decoder_start_token_id=tid("<|startoftranscript|>"),
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, suppress_tokens=None, begin_suppress_tokens=None,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    text_ids = tokenizer.encode(transcript, add_special_tokens=False)
    if len(PROMPT) + len(text_ids) + 1 > TINY_D_MODEL:
        raise ValueError(f"transcript {transcript!r} is too long for the tiny decoder ({TINY_D_MODEL} positions)")
    with torch.no_grad():
        decoder = model.model.decoder
        for layer in decoder.layers:  # zero output projections: each layer adds nothing to the residual
            for linear in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
        decoder.embed_tokens.weight.zero_()
        decoder.embed_positions.weight.copy_(torch.eye(TINY_D_MODEL))
        script = torch.zeros(len(vocab), TINY_D_MODEL)  # logits at position p: script[:, p] (after layer norm)
        script[tid(f"<|{detected_language}|>"), 0] = SCRIPT_LOGIT
        for i, token in enumerate([*text_ids, eot]):
            script[token, len(PROMPT) - 1 + i] = SCRIPT_LOGIT
        model.proj_out.weight.copy_(script)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        lang_to_id={f"<|{c}|>": tid(f"<|{c}|>") for c in LANGUAGES},
        task_to_id={"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
        no_timestamps_token_id=tid("<|notimestamps|>"), is_multilingual=True, max_length=TINY_D_MODEL,
        begin_suppress_tokens=[eot])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny_whisper"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_whisper_dir):
    """One baseline run on a 20-clip synthetic corpus (10 test clips) -> (cfg, returned summary)."""
    tmp = tmp_path_factory.mktemp("baseline")
    corpus = tmp / "corpus"
    synthesize_corpus(corpus, "sw", num_clips=20, seed=0, split_fractions=(0.4, 0.1, 0.5))
    cfg = compose(["recipe=demo", f"output_dir={tmp}", f"data.root={corpus}",
                   f"baseline.name_or_path={tiny_whisper_dir}", "baseline.batch_size=4", "baseline.max_new_tokens=40"])
    return cfg, baseline(cfg)


def _results(cfg) -> tuple[dict, list[dict]]:
    results = Path(cfg.baseline.results_dir)
    metrics = json.loads((results / "metrics.json").read_text())
    rows = [json.loads(line) for line in (results / "predictions" / "test.jsonl").read_text().splitlines()]
    return metrics, rows


def test_language_token_is_forced(run):
    cfg, _ = run
    metrics, _ = _results(cfg)
    assert metrics["decoder_prompt"] == PROMPT
    assert metrics["language"] == "<|sw|>" and metrics["task"] == "transcribe"


def test_tiny_whisper_detects_another_language_when_not_forced(tiny_whisper_dir):
    """Guards the test above: the same checkpoint, left to detect the language, picks <|en|>."""
    model, processor = load_whisper(str(tiny_whisper_dir), torch.device("cpu"), torch.float32)
    recorder = _PromptRecorder(model.get_decoder())
    feats = processor.feature_extractor([np.zeros(16_000, np.float32)], sampling_rate=16_000, return_tensors="pt")
    model.generate(feats.input_features, max_new_tokens=5)
    prompt = processor.tokenizer.convert_ids_to_tokens(recorder.ids)
    assert prompt[:2] == ["<|startoftranscript|>", f"<|{DETECTED_LANGUAGE}|>"]


def test_hypotheses_go_through_the_normaliser(run):
    cfg, _ = run
    _, rows = _results(cfg)
    assert len(rows) == 10
    assert {r["hypothesis"] for r in rows} == {NORMALISED}


def test_results_have_evaluate_format(run):
    cfg, summary = run
    metrics, rows = _results(cfg)
    split = metrics["splits"]["test"]
    assert set(split) >= {"wer", "cer", "utterances", "audio_hours", "decode_seconds", "rtf", "rtfx", "decoding"}
    assert summary["test"]["wer"] == split["wer"]
    assert split["utterances"] == len(rows) and split["decoding"] == "greedy"
    assert split["rtfx"] == pytest.approx(split["audio_hours"] * 3600 / split["decode_seconds"])
    assert split["rtf"] == pytest.approx(1 / split["rtfx"])
    assert metrics["system"] == "whisper" and metrics["model"] == str(cfg.baseline.name_or_path)
    assert metrics["batch_size"] == 4 and metrics["device"].startswith("cpu")
    assert metrics["parameters"] > 0
    for r in rows:
        assert set(r) == {"id", "reference", "hypothesis", "wer", "cer", "duration"}
        assert r["wer"] == pytest.approx(jiwer.wer(r["reference"], r["hypothesis"]))
    refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
    assert split["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert split["audio_hours"] == pytest.approx(sum(r["duration"] for r in rows) / 3600, rel=1e-3)


def test_long_clips_use_long_form_decoding(tiny_whisper_dir):
    """A clip over Whisper's 30 s window is decoded sequentially, not cut at 30 s; order is kept."""
    import datasets

    model, processor = load_whisper(str(tiny_whisper_dir), torch.device("cpu"), torch.float32)
    waves = [np.zeros(16_000 * 2, np.float32), np.zeros(16_000 * 35, np.float32)]
    ds = datasets.Dataset.from_dict({"duration": [2.0, 35.0], "audio": waves}).with_format("numpy")
    texts, seconds = transcribe_dataset(model, processor, ds, 2, {"language": "sw", "task": "transcribe",
                                                                  "max_new_tokens": 20}, torch.device("cpu"),
                                        torch.float32)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts) and seconds > 0


@pytest.mark.parametrize("code, expected", [("sw", "sw"), ("sv-SE", "sv"), ("zh-CN", "zh"), ("pa_IN", "pa"),
                                            ("yue", "yue"), ("Swahili", "sw"), ("haitian-creole", "ht")])
def test_language_codes_map_to_whisper(code, expected):
    assert whisper_language(code) == expected


def test_language_whisper_lacks_is_a_usage_error():
    with pytest.raises(UsageError, match=r"baseline\.language=") as e:
        whisper_language("ky")
    assert "'ky'" in str(e.value)
    with pytest.raises(UsageError, match=r"no <\|yue\|> token"):
        whisper_language("yue", available=["en", "zh"])


def test_baseline_refuses_unknown_language_before_reading_data(tmp_path, tiny_whisper_dir):
    cfg = compose(["recipe=demo", f"output_dir={tmp_path}", f"data.root={tmp_path / 'missing'}",
                   f"baseline.name_or_path={tiny_whisper_dir}", "baseline.language=ky"])
    with pytest.raises(UsageError, match="Whisper has no language 'ky'"):
        baseline(cfg)


def test_missing_checkpoint_is_a_usage_error(tmp_path):
    cfg = compose(["recipe=demo", f"output_dir={tmp_path}", f"baseline.name_or_path={tmp_path / 'nothing'}"])
    with pytest.raises(UsageError, match="baseline.name_or_path"):
        baseline(cfg)


def test_outdated_generation_config_still_forces_language(run, tmp_path, tiny_whisper_dir):
    """Older fine-tuned checkpoints ship a generation config without the language/task tables, often with
    `forced_decoder_ids` pinning another language: the tables are rebuilt from the tokenizer and the
    recipe's language still wins."""
    import copy
    import shutil

    cfg, _ = run
    old = shutil.copytree(tiny_whisper_dir, tmp_path / "old_whisper")
    gen_file = old / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    en, transcribe, no_ts = gen["lang_to_id"]["<|en|>"], gen["task_to_id"]["transcribe"], gen["no_timestamps_token_id"]
    for key in ("lang_to_id", "task_to_id", "no_timestamps_token_id", "is_multilingual"):
        gen.pop(key)
    gen["forced_decoder_ids"] = [[1, en], [2, transcribe], [3, no_ts]]
    gen_file.write_text(json.dumps(gen))
    out = tmp_path / "results"
    cfg = copy.deepcopy(cfg)  # the module's run fixture stays untouched
    cfg.baseline.name_or_path, cfg.baseline.results_dir = str(old), str(out)
    baseline(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decoder_prompt"] == PROMPT
