"""Tiny randomly initialised stand-ins of each baseline family, built offline from config: for the tests and the
offline demo (`baseline.random_standin=true`), never for a real comparison.

    omniasr_ctc   OmniASRForCTC + a SentencePiece-style BPE tokenizer (`tokenizers`, ParakeetTokenizer) trained
                  on the given text + OmniASRFeatureExtractor: the shape of hf-audio/omniasr-ctc-300m-v2
    mms           Wav2Vec2ForCTC with attention adapters, one adapter.<code>.safetensors and vocabulary per
                  language (nested vocab.json, as facebook/mms-1b-all)
    omniasr_llm   OmniASRForConditionalGeneration (a 1-layer Llama decoder) + a BPE tokenizer with the
                  <|lang:code_script|> tokens, the audio placeholder and a chat template in the processor
    whisper       testing.build_tiny_whisper (a scripted decoder)

Their transcripts are noise (Whisper's a fixed sentence): what they exercise is the code path, the language
mapping, the scoring and the comparison. `build_standin` writes `STANDIN_FILE` into the folder, and `baseline`
labels such a run as random weights in metrics.json, which `compare` shows.

Usage:
    from w2vbert_asr.standins import build_standin
    build_standin("mms", "/tmp/mms", texts, languages=["swh", "eng"])
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STANDIN_FILE = "random_standin.json"  # marks a folder built here: its weights are random
SPECIALS = ("<pad>", "<unk>")  # <pad> (id 0) is the CTC blank
HIDDEN = 32
CONV = {"conv_dim": (32,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}
ENCODER = {"hidden_size": HIDDEN, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64}
LLM_AUDIO_TOKEN = "<extra_id_1>"
# The LLM prompt: the audio placeholders, the language marker, then <s>, after which the transcript is decoded.
LLM_CHAT_TEMPLATE = ("{%- for message in messages -%}{%- for item in message['content'] -%}"
                     "{%- if item['type'] == 'audio' -%}" + LLM_AUDIO_TOKEN
                     + "{%- elif item['type'] == 'language' -%}<|lang:{{ item['language'] }}|>{%- endif -%}"
                     "{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt -%}<s>{%- endif -%}")


def piece_tokenizer(texts: list[str], vocab_size: int = 120, specials: tuple[str, ...] = SPECIALS):
    """A SentencePiece-style (Metaspace) BPE tokenizer trained on `texts` with the `tokenizers` library, as a
    transformers ParakeetTokenizer (what omniasr_ctc checkpoints load as); specials first, <pad> = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.parakeet.tokenization_parakeet import ParakeetTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials)))
    named = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    return ParakeetTokenizer(tokenizer_object=tok, **{k: v for k, v in named.items() if v in specials})


def build_tiny_omniasr_ctc(directory: str | Path, texts: list[str], seed: int = 0) -> Path:
    from transformers import OmniASRCTCConfig, OmniASRCTCProcessor, OmniASRFeatureExtractor, OmniASRForCTC

    directory = Path(directory)
    tokenizer = piece_tokenizer(texts)
    config = OmniASRCTCConfig(audio_config={**ENCODER, **CONV}, vocab_size=len(tokenizer), blank_token_id=0,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    OmniASRForCTC(config).eval().save_pretrained(directory)
    OmniASRCTCProcessor(feature_extractor=OmniASRFeatureExtractor(), tokenizer=tokenizer).save_pretrained(directory)
    return directory


def build_tiny_mms(directory: str | Path, texts: list[str], languages: list[str], seed: int = 0) -> Path:
    """One character vocabulary per language (the characters of `texts`), each with its adapter weights."""
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor
    from transformers import Wav2Vec2CTCTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for t in texts for c in t if c != " "})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: i + 5 for i, c in enumerate(chars)}}
    (directory / "vocab.json").write_text(json.dumps({lang: vocab for lang in languages}, ensure_ascii=False))
    tokenizer = Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), target_lang=languages[0], pad_token="<pad>",
                                     unk_token="<unk>", bos_token="<s>", eos_token="</s>", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    config = Wav2Vec2Config(**ENCODER, **CONV, feat_extract_norm="layer", do_stable_layer_norm=True,
                            adapter_attn_dim=8, vocab_size=len(vocab), pad_token_id=0)
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(config).eval()
    for k, lang in enumerate(languages):
        torch.manual_seed(seed + 1 + k)
        model.init_adapter_layers()
        save_file({k2: v.detach().clone().contiguous() for k2, v in model._get_adapters().items()},
                  str(directory / f"adapter.{lang}.safetensors"))
    model.save_pretrained(directory)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def build_tiny_omniasr_llm(directory: str | Path, texts: list[str], languages: list[str], seed: int = 0) -> Path:
    """languages: omniASR codes (`swh_latn`); `auto` (the language-agnostic mode) is always there."""
    from transformers import OmniASRConfig, OmniASRFeatureExtractor, OmniASRForConditionalGeneration, OmniASRProcessor

    directory = Path(directory)
    specials = ("<s>", "<pad>", "</s>", "<unk>", LLM_AUDIO_TOKEN,
                *(f"<|lang:{code}|>" for code in dict.fromkeys([*languages, "auto"])))
    tokenizer = piece_tokenizer(texts, specials=specials)
    ids = tokenizer.convert_tokens_to_ids
    text = {"vocab_size": len(tokenizer), "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 4096}
    config = OmniASRConfig(audio_config={**ENCODER, **CONV}, text_config=text, audio_token_id=ids(LLM_AUDIO_TOKEN),
                           bos_token_id=ids("<s>"), pad_token_id=ids("<pad>"), eos_token_id=ids("</s>"))
    torch.manual_seed(seed)
    model = OmniASRForConditionalGeneration(config).eval()
    model.generation_config.update(bos_token_id=ids("<s>"), pad_token_id=ids("<pad>"), eos_token_id=ids("</s>"))
    model.save_pretrained(directory)
    OmniASRProcessor(feature_extractor=OmniASRFeatureExtractor(), tokenizer=tokenizer, chat_template=LLM_CHAT_TEMPLATE,
                     audio_token=LLM_AUDIO_TOKEN).save_pretrained(directory)
    return directory


def build_standin(family: str, directory: str | Path, texts: list[str], languages: list[str] = ()) -> Path:
    """A tiny random model of a baseline family in `directory`, marked with STANDIN_FILE. languages: the
    model's language codes (MMS: ISO 639-3; omniASR LLM: code_script), where the family has any."""
    directory = Path(directory)
    if family == "whisper":
        from .testing import build_tiny_whisper

        build_tiny_whisper(directory)
    elif family == "omniasr_ctc":
        build_tiny_omniasr_ctc(directory, texts)
    elif family == "mms":
        build_tiny_mms(directory, texts, list(languages))
    elif family == "omniasr_llm":
        build_tiny_omniasr_llm(directory, texts, list(languages))
    else:
        raise ValueError(f"no stand-in for baseline family {family!r}")
    (directory / STANDIN_FILE).write_text(json.dumps({"family": family, "weights": "random", "languages":
                                                      list(languages)}))
    return directory


def is_standin(directory: str | Path) -> bool:
    return (Path(directory) / STANDIN_FILE).is_file()
