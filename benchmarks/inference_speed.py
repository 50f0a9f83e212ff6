"""Inference speed: our W2v-BERT 2.0 CTC model vs Whisper large-v3 on the same clips, full path.

Usage:
    python benchmarks/inference_speed.py                                   # CPU: full-size, 4 clips (~10 min)
    python benchmarks/inference_speed.py --device cuda --clips 128         # GPU, fp16 (dtype auto)
    python benchmarks/inference_speed.py --device cuda --dtype bfloat16 --batch-sizes 1 8 32
    python benchmarks/inference_speed.py --small --clips 4 --batch-sizes 1 2   # seconds-long CPU smoke run
    python benchmarks/inference_speed.py --device cuda --json speed.json   # also save the numbers

Both models are built from their configs with random weights (nothing is downloaded):
* ours: ``Wav2Vec2BertForCTC`` in the w2v-bert-2.0 shape (``Wav2Vec2BertConfig()`` defaults, ~600M) with
  the adapter and a 40-character CTC head, as ``w2vbert-asr train`` exports it;
* Whisper: ``WhisperForConditionalGeneration`` in the large-v3 shape (d_model 1280, 32 + 32 layers,
  20 heads, FFN 5120, 128 mel bins, 51866 tokens, ~1.55B), with large-v3's special token ids.

Clips: Common Voice-like durations (log-normal, median 4.5 s, clipped to 2-10 s), random noise at 16 kHz,
sorted longest first and cut into batches of the given size: both models get identical batches (as
`evaluate` and `baseline` do, both sort by duration). The clock covers the whole path from 16 kHz
waveforms to token ids on the CPU:
* ours: pad, fbank features on the device (``BatchFeatureExtractor``), forward, argmax, CTC collapse;
* Whisper: ``WhisperFeatureExtractor`` (its torch STFT on the device; every clip padded to the 30 s
  window, as Whisper requires), ``generate`` greedy with the forced prompt <|sw|><|transcribe|>
  <|notimestamps|> and a KV cache. Random weights would stop at once or run to the token limit, so
  each batch emits exactly ceil(--tokens-per-second x its longest clip) tokens (min_new_tokens =
  max_new_tokens): ~3 tokens/s is English-like; Whisper's byte-level BPE splits low-resource scripts
  into more tokens, so real low-resource decoding is slower than this.
Detokenisation to text (microseconds for both) is left out of both. Untimed warm-up: the shortest clip
alone per model, plus --warmup batches per batch size (default 1; 0 for full size on CPU, where a batch
costs minutes). Ratio = Whisper wall time / ours on the same clips (higher: ours is faster).

Measured (2 shared CPU cores, full size, float32, default CPU command): ours 46.5 s / 38.4 s, Whisper
244.7 s / 189.4 s for 19.7 s of audio at batch 1 / 4: ratio 5.3x / 4.9x.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from w2vbert_asr.devices import device_name  # noqa: E402
from w2vbert_asr.features import BatchFeatureExtractor, pad_waves  # noqa: E402

SAMPLING_RATE = 16_000
MEDIAN_SECONDS, LOG_SIGMA = 4.5, 0.45            # as benchmarks/batching.py: Common Voice-like
MIN_SECONDS, MAX_SECONDS = 2.0, 10.0
CTC_VOCAB = 40                                    # [PAD], [UNK], |, ~37 characters
NOISE_LEVEL = 0.05
# whisper-large-v3's shape and special tokens (config.json / generation_config.json of the release).
WHISPER_LARGE_V3 = dict(vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
                        encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
                        decoder_ffn_dim=5120, max_source_positions=1500, max_target_positions=448)
WHISPER_SMALL = dict(WHISPER_LARGE_V3, d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024)
W2V_BERT_SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                      output_hidden_size=256, num_adapter_layers=1)
EOT, SOT, FIRST_LANGUAGE = 50257, 50258, 50259   # <|endoftext|>, <|startoftranscript|>, <|en|>
TRANSLATE, TRANSCRIBE, NO_TIMESTAMPS = 50359, 50360, 50364
NO_SPEECH_PAD, SPACE = 50256, 220
LANGUAGE = "sw"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# On 2 CPU cores one full-size Whisper clip costs about a minute (the encoder always runs 30 s windows).
DEFAULT_CLIPS = {"cpu": 4, "cuda": 128}


def clip_durations(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(MEDIAN_SECONDS), LOG_SIGMA, n), MIN_SECONDS, MAX_SECONDS)


def make_clips(n: int, seed: int) -> list[np.ndarray]:
    """n float32 noise waveforms (N,) at 16 kHz, longest first."""
    rng = np.random.default_rng(seed + 1)
    durations = sorted(clip_durations(n, seed), reverse=True)
    return [(NOISE_LEVEL * rng.standard_normal(int(d * SAMPLING_RATE))).astype(np.float32) for d in durations]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- ours
def build_ours(small: bool, device: torch.device, dtype: torch.dtype):
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertForCTC

    config = Wav2Vec2BertConfig(**(W2V_BERT_SMALL if small else {}), add_adapter=True, vocab_size=CTC_VOCAB,
                                pad_token_id=0)
    with torch.device(device):
        model = Wav2Vec2BertForCTC._from_config(config, dtype=dtype).eval()
    featurizer = BatchFeatureExtractor.from_hf(SeamlessM4TFeatureExtractor()).to(device)
    return model, featurizer


@torch.inference_mode()
def run_ours(model, featurizer, waves: list[np.ndarray], device, dtype) -> list[list[int]]:
    """One batch: waveforms -> CTC token ids per clip (blanks and repeats removed)."""
    padded, lengths = pad_waves(waves)
    feats, mask = featurizer(padded.to(device, non_blocking=True), lengths.to(device))
    logits = model(input_features=feats.to(dtype), attention_mask=mask).logits
    frames = model._get_feat_extract_output_lengths(mask.sum(-1)).cpu().tolist()
    ids = logits.argmax(-1).cpu()
    out = []
    for row, n in zip(ids, frames):
        collapsed = torch.unique_consecutive(row[:n])
        out.append(collapsed[collapsed != 0].tolist())
    return out


# --------------------------------------------------------------------------------------------- whisper
def build_whisper(small: bool, device: torch.device, dtype: torch.dtype):
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    shape = WHISPER_SMALL if small else WHISPER_LARGE_V3
    config = WhisperConfig(**shape, decoder_start_token_id=SOT, pad_token_id=NO_SPEECH_PAD, bos_token_id=EOT,
                           eos_token_id=EOT, begin_suppress_tokens=[SPACE, EOT])
    with torch.device(device):
        model = WhisperForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=NO_SPEECH_PAD,
        lang_to_id={f"<|{c}|>": FIRST_LANGUAGE + i for i, c in enumerate(LANGUAGES)},
        task_to_id={"translate": TRANSLATE, "transcribe": TRANSCRIBE}, no_timestamps_token_id=NO_TIMESTAMPS,
        is_multilingual=True, begin_suppress_tokens=[SPACE, EOT], max_length=config.max_target_positions)
    return model, WhisperFeatureExtractor(feature_size=config.num_mel_bins)


@torch.inference_mode()
def run_whisper(model, extractor, waves: list[np.ndarray], device, dtype, tokens_per_second: float) -> list[list[int]]:
    """One batch: waveforms -> exactly ceil(tokens_per_second x longest clip) generated ids per clip."""
    n_tokens = math.ceil(tokens_per_second * max(len(w) for w in waves) / SAMPLING_RATE)
    feats = extractor(waves, sampling_rate=SAMPLING_RATE, return_tensors="pt", device=device.type)
    out = model.generate(feats.input_features.to(device, dtype), language=LANGUAGE, task="transcribe",
                         min_new_tokens=n_tokens, max_new_tokens=n_tokens)
    ids = out.cpu()
    if ids.shape[-1] != n_tokens:
        raise RuntimeError(f"Whisper generated {ids.shape[-1]} tokens, expected {n_tokens}; the forcing failed")
    return ids.tolist()


# --------------------------------------------------------------------------------------------- timing
def time_model(name: str, run, clips: list[np.ndarray], batch_sizes: list[int], device, warmup: int) -> dict:
    """-> {batch_size: wall seconds for all clips}. Untimed first: the shortest clip alone (lazy
    initialisation), then `warmup` batches per batch size (GPU kernels and allocator for that shape)."""
    times = {}
    run(clips[-1:])
    for bs in batch_sizes:
        batches = [clips[i:i + bs] for i in range(0, len(clips), bs)]
        for b in batches[:warmup]:
            run(b)
        sync(device)
        start = time.perf_counter()
        for b in batches:
            run(b)
        sync(device)
        times[bs] = time.perf_counter() - start
        print(f"  {name:<18} batch {bs:>3}: {times[bs]:8.2f} s", flush=True)
    return times


def command(args: argparse.Namespace) -> str:
    """The exact command, with every option spelled out."""
    parts = ["python", "benchmarks/inference_speed.py", "--device", args.device, "--dtype", args.dtype,
             "--batch-sizes", *map(str, args.batch_sizes), "--clips", str(args.clips), "--seed", str(args.seed),
             "--tokens-per-second", f"{args.tokens_per_second:g}", "--warmup", str(args.warmup),
             "--threads", str(args.threads)]
    return shlex.join(parts + (["--small"] if args.small else []))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: float16 on cuda, else float32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--clips", type=int, default=None, help=f"default: {DEFAULT_CLIPS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens-per-second", type=float, default=3.0, help="Whisper tokens per second of audio")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches per model and batch size (default: 0 on cpu at full size, else 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for torch")
    parser.add_argument("--small", action="store_true", help="small configs of both architectures (smoke run)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    args.clips = args.clips or DEFAULT_CLIPS[args.device]
    capped = sorted({min(b, args.clips) for b in args.batch_sizes})  # a batch cannot hold more clips than exist
    if capped != sorted(set(args.batch_sizes)):
        print(f"batch sizes {args.batch_sizes} capped to the {args.clips} clips: {capped}")
    args.batch_sizes = capped
    # A full-size batch costs minutes on CPU; elsewhere one warm-up batch per shape is cheap.
    args.warmup = args.warmup if args.warmup is not None else int(args.device == "cuda" or args.small)
    args.dtype = args.dtype if args.dtype != "auto" else ("float16" if args.device == "cuda" else "float32")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    clips = make_clips(args.clips, args.seed)
    audio_s = sum(len(c) for c in clips) / SAMPLING_RATE
    print(f"{len(clips)} clips, {audio_s:.1f} s of audio ({len(clips[-1]) / SAMPLING_RATE:.1f}-"
          f"{len(clips[0]) / SAMPLING_RATE:.1f} s), device {device_name(device)}, {args.dtype}, "
          f"torch {torch.__version__}", flush=True)

    results = {}
    for name, build, make_run in (
        ("w2v-bert-2.0-ctc", build_ours,
         lambda m, f: lambda b: run_ours(m, f, b, device, dtype)),
        ("whisper-large-v3", build_whisper,
         lambda m, f: lambda b: run_whisper(m, f, b, device, dtype, args.tokens_per_second)),
    ):
        label = name + (" (small)" if args.small else "")
        start = time.perf_counter()
        model, extra = build(args.small, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        print(f"built {label}: {params / 1e6:.1f}M parameters, attention {model.config._attn_implementation}, "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        results[name] = {"parameters": params, "seconds": time_model(label, make_run(model, extra), clips,
                                                                     args.batch_sizes, device, args.warmup)}
        del model, extra  # one full-size model in memory at a time
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ours, whisper = results["w2v-bert-2.0-ctc"], results["whisper-large-v3"]
    print(f"\n{'model':<18}{'params':>9}{'batch':>7}{'clips':>7}{'audio s':>9}{'wall s':>9}{'RTFx':>9}{'ms/clip':>9}")
    for name, r in results.items():
        for bs, sec in r["seconds"].items():
            print(f"{name + ('*' if args.small else ''):<18}{r['parameters'] / 1e6:>8.0f}M{bs:>7}{len(clips):>7}"
                  f"{audio_s:>9.1f}{sec:>9.2f}"
                  f"{audio_s / sec:>9.2f}{1000 * sec / len(clips):>9.0f}")
    if args.small:
        print("* --small: reduced configs of both architectures, not the real model sizes")
    ratios = {bs: whisper["seconds"][bs] / ours["seconds"][bs] for bs in args.batch_sizes}
    print("\nspeed ratio (Whisper wall time / ours, same clips): "
          + ", ".join(f"batch {bs}: {r:.1f}x" for bs, r in ratios.items()))
    print(f"command: {command(args)}")
    summary = {"command": command(args), "device": device_name(device), "dtype": args.dtype, "clips": len(clips),
               "audio_seconds": audio_s, "tokens_per_second": args.tokens_per_second, "small": args.small,
               "models": results, "ratio_whisper_over_ours": ratios}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
