"""The bakeoff's GPU rows: omniASR-CTC-300M's training step at the `train=v100_16gb` preset, and each zero-shot
baseline's inference RTFx, with random weights in the released shapes (nothing is downloaded).

Usage:
    python benchmarks/bakeoff_gpu.py                                   # GPU: the training step and the RTFx rows
    python benchmarks/bakeoff_gpu.py --parts infer --llm-config <omniasr-llm-7b-v2 config.json>   # with the LLM
    python benchmarks/bakeoff_gpu.py --small --device cpu --steps 1    # seconds-long CPU smoke run (tests)
    python benchmarks/bakeoff_gpu.py --json bakeoff_gpu.json           # also save the numbers

train: `OmniASRForCTC` in the 300M shape (OmniASRCTCConfig()'s defaults: 24 layers of 1024), built by the toolkit's
    build_model with conf/model/omniasr_ctc_300m.yaml's settings (frozen convolutions, gradient checkpointing, time
    masks), a 40-token character head; micro-batches of noise at conf/train/v100_16gb.yaml's caps
    (benchmarks/train_step.py's plan: Common Voice-like durations, the longest clip first), each step the training
    loop's own `train_step` under an Accelerator in fp16 with a 16 GiB cap. Reports audio seconds trained per
    second and peak memory (goal: <= 15 GiB, as for W2v-BERT).
infer: RTFx = audio seconds / wall seconds on the same clips (longest first, batches of --batch-size), the
    featurizer included, fp16: omniASR-CTC 300M and 1B (48 layers of 1280), MMS-1b-all's shape (Wav2Vec2 with
    adapters); the omniASR LLM only with --llm-config (its config.json, e.g. from `w2vbert-asr download`), in
    bfloat16 (8-bit with --llm-quantize 8bit), forced to write --tokens-per-second tokens per audio second
    (min_new_tokens = max_new_tokens), since random weights would stop at once or never.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install; also makes benchmarks.* importable

from benchmarks.batching import corpus_durations  # noqa: E402
from benchmarks.train_step import CHARS, GIB, make_micro_batch, plan_batches  # noqa: E402
from w2vbert_asr.cli import compose  # noqa: E402
from w2vbert_asr.features import pad_waves  # noqa: E402
from w2vbert_asr.text import Vocabulary, build_processor  # noqa: E402

SAMPLING_RATE = 16_000
ONE_B = {"hidden_size": 1280, "num_hidden_layers": 48, "num_attention_heads": 16, "intermediate_size": 5120}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
         "conv_dim": [32] * 7}
CAP_GIB = 16.0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_part(args, device: torch.device) -> dict:
    """Audio-s/s and peak memory of omniASR-CTC-300M's training step at the v100_16gb preset."""
    from accelerate import Accelerator

    from w2vbert_asr.model import build_model
    from w2vbert_asr.optim import make_optimizer
    from w2vbert_asr.train import train_step
    from w2vbert_asr.waveform import featurizer_for

    cfg = compose(["lang=xx", "train=v100_16gb", "model=omniasr_ctc_300m", "model.name_or_path=null"])
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    model_cfg.architecture = {"audio_config": SMALL} if args.small else {"audio_config": {}}
    caps = dict(cfg.train)
    if args.small:
        caps.update(max_batch_seconds=8.0, max_batch_size=4, gradient_accumulation_steps=1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_processor(Vocabulary(list(CHARS), {c: 1 for c in CHARS}, {}), tmp).tokenizer
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    if total / GIB > CAP_GIB:  # a bigger card stands in for a 16 GB one
        torch.cuda.set_per_process_memory_fraction(CAP_GIB * GIB / total, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="fp16" if device.type == "cuda" else "no",
                              gradient_accumulation_steps=int(caps["gradient_accumulation_steps"]))
    torch.manual_seed(0)
    model = build_model(model_cfg, tokenizer)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    featurizer = featurizer_for(__import__("transformers").OmniASRFeatureExtractor()).to(accelerator.device)
    accum = int(caps["gradient_accumulation_steps"])
    plan, _ = plan_batches(float(caps["max_batch_seconds"]), int(caps["max_batch_size"]), (1 + args.steps) * accum, 0)
    micro = [make_micro_batch(d, len(tokenizer), model.config, i) for i, d in enumerate(plan)]
    batches = [{"waves": m.waves, "lengths": m.lengths, "labels": m.labels} for m in micro]
    model.train()
    train_step(accelerator, model, optimizer, scheduler, batches[:accum], featurizer, 1.0)  # warm-up: longest clip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for s in range(1, 1 + args.steps):
        train_step(accelerator, model, optimizer, scheduler, batches[s * accum:(s + 1) * accum], featurizer, 1.0)
    _sync(device)
    seconds = time.perf_counter() - start
    audio = sum(m.seconds for m in micro[accum:])
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"model": "omniASR-CTC 300M shape" if not args.small else "tiny", "steps": args.steps,
            "audio_seconds_per_second": audio / seconds, "peak_gib": peak,
            "parameters": sum(p.numel() for p in model.parameters())}


def _clips(args) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    durations = np.sort(np.clip(corpus_durations(args.clips, 0), 2.0, 10.0))[::-1]
    return [(0.05 * rng.standard_normal(int(d * SAMPLING_RATE))).astype(np.float32) for d in durations]


@torch.no_grad()
def _rtfx_ctc(model, extractor, clips, args, device, dtype) -> float:
    from w2vbert_asr.waveform import featurizer_for

    featurizer = featurizer_for(extractor).to(device)
    model = model.to(device, dtype).eval()
    run = lambda batch: model(**{k: v.to(dtype) if v.is_floating_point() else v  # noqa: E731
                                 for k, v in featurizer.model_inputs(*(t.to(device) for t in pad_waves(batch))).items()}
                              ).logits.argmax(-1).cpu()
    run(clips[-1:])  # warm-up
    _sync(device)
    start = time.perf_counter()
    for b in range(0, len(clips), args.batch_size):
        run(clips[b:b + args.batch_size])
    _sync(device)
    return sum(map(len, clips)) / SAMPLING_RATE / (time.perf_counter() - start)


def infer_part(args, device: torch.device) -> dict:
    from transformers import (OmniASRCTCConfig, OmniASRFeatureExtractor, OmniASRForCTC, Wav2Vec2Config,
                              Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC)

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    clips = _clips(args)
    shapes = {"omniasr-ctc-300m": {}, "omniasr-ctc-1b": ONE_B}
    rows = {}
    for name, shape in shapes.items():
        model = OmniASRForCTC(OmniASRCTCConfig(audio_config=SMALL if args.small else shape, vocab_size=10288))
        rows[name] = _rtfx_ctc(model, OmniASRFeatureExtractor(), clips, args, device, dtype)
        del model
    mms = Wav2Vec2Config(**(SMALL if args.small else ONE_B), feat_extract_norm="layer", do_stable_layer_norm=True,
                         adapter_attn_dim=16, vocab_size=154)
    rows["mms-1b-all"] = _rtfx_ctc(Wav2Vec2ForCTC(mms), Wav2Vec2FeatureExtractor(return_attention_mask=True), clips,
                                   args, device, dtype)
    if args.llm_config:
        rows["omniasr-llm"] = _rtfx_llm(args, clips, device)
    return {"dtype": str(dtype).removeprefix("torch."), "clips": len(clips), "batch_size": args.batch_size,
            "audio_seconds": sum(map(len, clips)) / SAMPLING_RATE, "rtfx": rows}


@torch.no_grad()
def _rtfx_llm(args, clips, device) -> float:
    """The omniASR LLM from its config.json with random weights: every batch writes exactly
    ceil(tokens_per_second x its longest clip) tokens."""
    from transformers import AutoConfig, BitsAndBytesConfig, OmniASRFeatureExtractor, OmniASRForConditionalGeneration

    config = AutoConfig.from_pretrained(args.llm_config)
    model = OmniASRForConditionalGeneration(config).to(torch.bfloat16)
    if args.llm_quantize:  # bitsandbytes swaps the Linear layers when the weights are loaded: save, then load
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = OmniASRForConditionalGeneration.from_pretrained(
                tmp, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device.index or 0})
    model = model.to(device).eval() if not args.llm_quantize else model.eval()
    extractor = OmniASRFeatureExtractor()
    conv = list(zip(config.audio_config.conv_kernel, config.audio_config.conv_stride))
    _sync(device)
    start = time.perf_counter()
    for b in range(0, len(clips), args.batch_size):
        batch = clips[b:b + args.batch_size]
        audio = extractor(batch, sampling_rate=SAMPLING_RATE)
        frames = audio["padding_mask"].sum(-1)
        for k, s in conv:
            frames = torch.div(frames - k, s, rounding_mode="floor") + 1
        width = int(frames.max())
        ids = torch.full((len(batch), width + 2), config.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(frames.tolist()):  # left-padded: audio placeholders, a language token, <s>
            ids[i, width - n:width] = config.audio_token_id
            ids[i, width:] = torch.tensor([config.bos_token_id, config.bos_token_id])
            mask[i, width - n:] = 1
        tokens = math.ceil(args.tokens_per_second * max(map(len, batch)) / SAMPLING_RATE)
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                       input_values=audio["input_values"].to(device, torch.bfloat16),
                       padding_mask=audio["padding_mask"].to(device), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False)
    _sync(device)
    return sum(map(len, clips)) / SAMPLING_RATE / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps after one warm-up step")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke run on the CPU")
    parser.add_argument("--llm-config", help="config.json (or its folder) of the omniASR LLM to time")
    parser.add_argument("--llm-quantize", choices=("8bit",), help="load the LLM's weights through bitsandbytes")
    parser.add_argument("--tokens-per-second", type=float, default=3.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    out = {"device": name, "command": "python benchmarks/bakeoff_gpu.py " + shlex.join(argv)}
    if "train" in args.parts:
        out["train"] = train_part(args, device)
        t = out["train"]
        print(f"train {t['model']} ({t['parameters'] / 1e6:.0f}M): {t['audio_seconds_per_second']:.1f} audio-s/s, "
              f"peak {t['peak_gib'] if t['peak_gib'] is None else round(t['peak_gib'], 2)} GiB, {name}")
    if "infer" in args.parts:
        out["infer"] = infer_part(args, device)
        for model, rtfx in out["infer"]["rtfx"].items():
            print(f"infer {model}: RTFx {rtfx:.1f} ({out['infer']['dtype']}, batch {args.batch_size}, {name})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
