"""Helpers for tests, notebooks and demos: small synthetic corpora with known defects."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np

from w2vbert_asr import synth

# make_faulty_release: what each injected row looks like.
FAULT_STREAM = 7_919           # rng stream id, keeps faults independent of the corpus plan
FAULTY_SPEAKER_BASE = 100_000  # speaker ids far above any corpus speaker (one per split)
TOO_SHORT_S = 0.1
TOO_LONG_S = 40.0
# transcript_too_long: 1.2 s = ~60 W2v-BERT frames (20 ms/frame) for >= 150 characters, far more
# than CTC can align; 1.2 s stays above any sensible minimum-duration filter (Common Voice ~1 s).
TRANSCRIPT_CLIP_S = 1.2
TRANSCRIPT_MIN_CHARS = 150
EMPTY_SENTENCE = "?!…"         # punctuation only: nothing left after normalisation
ESCAPING_PATH = "../../etc/passwd"
UNDECODABLE_BYTES = b"this is not audio\n" * 64  # ASCII only: no 0xFF byte, so no MPEG frame sync
COMBINING_ACUTE = "\u0301"
# Long mostly-silent MP3 at the lowest MPEG-1 bitrate (32 kbit/s): ~160 KB for 40 s.
SMALL_MP3 = {"bitrate_mode": "CONSTANT", "compression_level": 0.99}


def _nfd_sentence(words: list[str], sentence: str) -> str:
    """`sentence` in NFD with at least one decomposed letter when the script allows it.

    Prefers a real word that decomposes (e.g. a letter with a diacritic); otherwise adds an
    acute to the first letter that has a precomposed acute form (e.g. 'e' -> 'e' + U+0301);
    caseless scripts without either just stay as they are (the row is still valid).
    """
    decomposable = [w for w in words if unicodedata.normalize("NFD", w) != w]
    if decomposable:
        return unicodedata.normalize("NFD", f"{decomposable[0]} {sentence}")
    composable = [(ord(unicodedata.normalize("NFC", ch + COMBINING_ACUTE)), i) for i, ch in enumerate(sentence)
                  if len(unicodedata.normalize("NFC", ch + COMBINING_ACUTE)) == 1]
    if not composable:
        return sentence
    _, i = min(composable)  # lowest code point: the most common accented letter ('é' before 'ḿ')
    return unicodedata.normalize("NFD", sentence[: i + 1] + COMBINING_ACUTE + sentence[i + 1 :])


def _fit(audio: np.ndarray, seconds: float) -> np.ndarray:
    """Cut or zero-pad 48 kHz `(T,)` audio to exactly `seconds`."""
    n = int(round(seconds * synth.CV_SAMPLE_RATE))
    return np.pad(audio[:n], (0, max(0, n - audio.size)))


def make_faulty_release(root: str | os.PathLike, lang: str = "sw", num_clips: int = 40, seed: int = 0) -> dict[str, int]:
    """Synthesise a small release under `root`, then append faulty and tricky rows to its TSVs.

    Faulty rows (prepare must skip each, under the returned reason):
      train: empty_text, path_escape, 2x duration (0.1 s and 40 s clips), transcript_too_long
      dev:   missing_file;  test: undecodable_audio
    Valid-but-tricky rows in train (prepare must KEEP them): a sentence opening with a bare '"'
    and never closing it, and a sentence in NFD (decomposed letters).
    Rows are also appended to validated.tsv (= union of the splits, as in Common Voice).

    Returns expected skip counts per reason.
    """
    root = Path(root)
    synth.synthesize_corpus(root, lang, num_clips=num_clips, seed=seed)
    words, voice = synth.load_words(lang)
    rng = np.random.default_rng([seed, FAULT_STREAM])
    clips = root / "clips"

    def speech(spoken: str) -> np.ndarray:
        audio, sr = synth.speak(spoken, voice)
        return synth.finish_audio(rng, audio, sr)

    def sentence() -> tuple[str, str]:
        return synth.make_sentence(rng, words, (3, 5))

    def clip(name: str, audio: np.ndarray, **mp3) -> str:
        synth.write_clip(clips / name, audio, **mp3)
        return name

    rows = _faulty_rows(f"common_voice_{lang}_faulty", words, rng, sentence, speech, clip, clips)
    for k, split in enumerate(synth.SPLITS):
        client = synth.client_id(lang, seed, FAULTY_SPEAKER_BASE + k)
        tsv_rows = [synth.make_row(client, path, text, lang) for path, text in rows[split]]
        synth.write_tsv(root / f"{split}.tsv", tsv_rows, append=True)
        synth.write_tsv(root / "validated.tsv", tsv_rows, append=True)

    return {"missing_file": 1, "undecodable_audio": 1, "empty_text": 1, "path_escape": 1,
            "duration": 2, "transcript_too_long": 1}


def _faulty_rows(prefix: str, words: list[str], rng: np.random.Generator, sentence, speech, clip,
                 clips: Path) -> dict[str, list[tuple[str, str]]]:
    """split -> (path, sentence) of the injected rows; writes their clips. sentence() -> (written, spoken);
    speech(spoken) -> 48 kHz audio; clip(name, audio, **mp3) writes one clip; all draw from `rng`."""
    rows: dict[str, list[tuple[str, str]]] = {s: [] for s in synth.SPLITS}

    written, spoken = sentence()
    rows["train"].append((clip(f"{prefix}_empty_text.mp3", speech(spoken)), EMPTY_SENTENCE))
    rows["train"].append((ESCAPING_PATH, written))

    written, spoken = sentence()
    rows["train"].append((clip(f"{prefix}_too_short.mp3", _fit(speech(spoken), TOO_SHORT_S)), written))

    written, spoken = sentence()
    long_audio = _fit(speech(spoken), TOO_LONG_S)  # speech, then digital silence up to 40 s
    rows["train"].append((clip(f"{prefix}_too_long.mp3", long_audio, **SMALL_MP3), written))

    long_words: list[str] = []
    while len(" ".join(long_words)) < TRANSCRIPT_MIN_CHARS:
        long_words.append(words[int(rng.integers(len(words)))])
    short_audio = _fit(speech(long_words[0]), TRANSCRIPT_CLIP_S)
    rows["train"].append((clip(f"{prefix}_transcript_too_long.mp3", short_audio), " ".join(long_words) + "."))

    _, spoken = sentence()  # unquoted form: the bare '"' must be the only quote
    rows["train"].append((clip(f"{prefix}_bare_quote.mp3", speech(spoken)), '"' + spoken))
    written, spoken = sentence()
    nfd = _nfd_sentence(words, written)
    rows["train"].append((clip(f"{prefix}_nfd.mp3", speech(unicodedata.normalize("NFC", nfd))), nfd))

    written, _ = sentence()
    rows["dev"].append((f"{prefix}_missing_file.mp3", written))

    written, _ = sentence()
    (clips / f"{prefix}_undecodable.mp3").write_bytes(UNDECODABLE_BYTES)
    rows["test"].append((f"{prefix}_undecodable.mp3", written))
    return rows


# --------------------------------------------------------------------------------------------- tiny Whisper
# build_tiny_whisper: a scripted offline stand-in for a Whisper checkpoint (tests, the walkthrough notebook).
TINY_WHISPER_TRANSCRIPT = "Habari, DUNIA!"      # what the scripted decoder writes by default
TINY_WHISPER_DETECTED_LANGUAGE = "en"           # what it would pick if the language were detected, not forced
TINY_WHISPER_PROMPT_LENGTH = 4                  # start, language, task, no-timestamps
WHISPER_NUM_TIMESTAMPS = 1501                   # <|0.00|> .. <|30.00|> in 20 ms steps, as in every Whisper vocabulary
TINY_WHISPER_D_MODEL = 64                       # also the number of decoder positions: one one-hot vector each
TINY_WHISPER_SCRIPT_LOGIT = 10.0


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


def build_tiny_whisper(directory: str | os.PathLike, transcript: str = TINY_WHISPER_TRANSCRIPT,
                       detected_language: str = TINY_WHISPER_DETECTED_LANGUAGE) -> Path:
    """Write a tiny Whisper checkpoint folder usable as `baseline.name_or_path` (offline, ~1 MB).

    Built from config, nothing downloaded. Its decoder is scripted: every layer is a no-op, token
    embeddings are zero and the position embeddings are one-hot, so the logits depend on the decoder
    position alone. It therefore always writes `transcript` after the four-token prompt (start,
    language, task, no-timestamps), whatever the audio, and, if asked to detect the language instead,
    picks `detected_language`: a run that did not force the language shows a different prompt.

    Vocabulary: the 256 single-byte tokens of byte-level BPE (no merges) followed by Whisper's special
    tokens in Whisper's order (<|endoftext|>, <|startoftranscript|>, one per language in
    transformers' LANGUAGES order, <|translate|>, <|transcribe|>, <|startoflm|>, <|startofprev|>,
    <|nospeech|>, <|notimestamps|>, timestamps).
    """
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_whisper_tokenizer()
    vocab = tokenizer.get_vocab()
    tid = tokenizer.convert_tokens_to_ids
    eot = tid("<|endoftext|>")

    config = WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=80, d_model=TINY_WHISPER_D_MODEL, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=TINY_WHISPER_D_MODEL,
        decoder_start_token_id=tid("<|startoftranscript|>"),
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, suppress_tokens=None, begin_suppress_tokens=None,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    text_ids = tokenizer.encode(transcript, add_special_tokens=False)
    if TINY_WHISPER_PROMPT_LENGTH + len(text_ids) + 1 > TINY_WHISPER_D_MODEL:
        raise ValueError(f"transcript {transcript!r} is too long for the tiny decoder "
                         f"({TINY_WHISPER_D_MODEL} positions); use a shorter one")
    _script_decoder(model, [tid(f"<|{detected_language}|>")], [*text_ids, eot])
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        lang_to_id={f"<|{c}|>": tid(f"<|{c}|>") for c in LANGUAGES},
        task_to_id={"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
        no_timestamps_token_id=tid("<|notimestamps|>"), is_multilingual=True, max_length=TINY_WHISPER_D_MODEL,
        begin_suppress_tokens=[eot])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(directory)
    return directory


def _tiny_whisper_tokenizer():
    """Byte-level BPE with no merges (256 single-byte tokens), then Whisper's special and timestamp tokens."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    specials = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in LANGUAGES), "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    timestamps = [f"<|{0.02 * i:.2f}|>" for i in range(WHISPER_NUM_TIMESTAMPS)]
    for token in specials + timestamps:
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    # Registered as special so decode(skip_special_tokens=True) drops them, as in real checkpoints.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamps])
    return tokenizer


def _script_decoder(model, first: list[int], then: list[int]) -> None:
    """Make the decoder's logits depend on its position alone: at position 0 `first[0]` wins (what language
    detection would pick), and from the end of the prompt on, `then` token by token."""
    import torch

    with torch.no_grad():
        decoder = model.model.decoder
        for layer in decoder.layers:  # zero output projections: each layer adds nothing to the residual
            for linear in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
        decoder.embed_tokens.weight.zero_()
        decoder.embed_positions.weight.copy_(torch.eye(TINY_WHISPER_D_MODEL))
        # logits at position p: script[:, p] (after layer norm)
        script = torch.zeros(model.config.vocab_size, TINY_WHISPER_D_MODEL)
        script[first[0], 0] = TINY_WHISPER_SCRIPT_LOGIT
        for i, token in enumerate(then):
            script[token, TINY_WHISPER_PROMPT_LENGTH - 1 + i] = TINY_WHISPER_SCRIPT_LOGIT
        model.proj_out.weight.copy_(script)
