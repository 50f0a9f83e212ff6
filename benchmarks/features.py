"""Batched torch features vs transformers' SeamlessM4TFeatureExtractor, side by side.

Synthesises espeak-ng speech (with room tone, as the synthetic corpora have), cuts it into
10 s clips, then times both extractors on the same clips in the same run, interleaved, best of
--repeats. Prints per-clip milliseconds, the speed ratio, the max |difference| of the features
and whether the attention masks agree, plus the exact command.

Usage:
    python benchmarks/features.py --threads 1
    python benchmarks/features.py --threads 1 --clips 32 --seconds 10 --batch 16 --repeats 3
    python benchmarks/features.py --threads 1 --torch-ops   # our CPU path without numba
    python benchmarks/features.py --device cuda             # ours on GPU, HF on CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SAMPLE_RATE = 16_000


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch and numpy's BLAS")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where our extractor runs")
    ap.add_argument("--torch-ops", action="store_true", help="on CPU, use torch ops instead of the numba loops")
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of every clip")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over all clips; best one counts")
    ap.add_argument("--lang", default=None, help="word list for the synthetic speech (default: first shipped)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    # Before numpy loads: keep HF's numpy (BLAS) on the same thread budget as torch.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import numpy as np
    import soxr
    import torch
    from transformers import SeamlessM4TFeatureExtractor

    from w2vbert_asr import synth
    from w2vbert_asr.features import BatchFeatureExtractor, pad_waves
    from w2vbert_asr.fbank import cpu_kernels

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    lang = args.lang or synth.available_languages()[0]
    clips = make_clips(args, lang, np, soxr, synth)

    hf = SeamlessM4TFeatureExtractor()
    ours = BatchFeatureExtractor.from_hf(hf, cpu_kernels=not args.torch_ops).to(args.device)
    if args.device == "cpu":
        path = "torch ops" if args.torch_ops or cpu_kernels() is None else "numba loops"
    else:
        path = "torch ops"
    batches = [clips[i : i + args.batch] for i in range(0, len(clips), args.batch)]

    def run_hf():
        return [hf(b, sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=True, return_tensors="pt")
                for b in batches]

    def run_ours():
        out = []
        for b in batches:
            waves, lengths = pad_waves(b)
            out.append(ours(waves.to(args.device), lengths.to(args.device)))
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out

    run_ours()  # warm-up: first-call allocations, CUDA context / cuFFT plans
    # Wall time, and CPU time of this thread: on a shared machine the latter is what the work
    # costs (both extractors are single-threaded with --threads 1). Best of the repeats.
    wall = {"hf": float("inf"), "ours": float("inf")}
    cpu = dict(wall)
    results = {}
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        for name, fn in (("hf", run_hf), ("ours", run_ours)):
            w0, c0 = time.perf_counter(), time.thread_time()
            results[name] = fn()
            wall[name] = min(wall[name], time.perf_counter() - w0)
            cpu[name] = min(cpu[name], time.thread_time() - c0)

    max_diff, masks_equal = 0.0, True
    for r, (feats, mask) in zip(results["hf"], results["ours"]):
        max_diff = max(max_diff, (feats.cpu() - r["input_features"]).abs().max().item())
        masks_equal &= torch.equal(mask.cpu(), r["attention_mask"].long())

    n = len(clips)
    ms = {key: {name: 1000 * t / n for name, t in d.items()} for key, d in (("wall", wall), ("cpu", cpu))}
    cmd = (f"python benchmarks/features.py --threads {args.threads} --device {args.device}"
           f"{' --torch-ops' if args.torch_ops else ''} --clips {args.clips} --seconds {args.seconds:g}"
           f" --batch {args.batch} --repeats {args.repeats} --lang {lang} --seed {args.seed}")
    print(f"clips: {n} x {args.seconds:g} s espeak speech ({lang}), batch {args.batch}, "
          f"torch threads {args.threads}, ours on {args.device} ({path})")
    print("per clip (ms)                     wall      cpu")
    print(f"HF SeamlessM4TFeatureExtractor : {ms['wall']['hf']:8.2f} {ms['cpu']['hf']:8.2f}")
    print(f"BatchFeatureExtractor          : {ms['wall']['ours']:8.2f} {ms['cpu']['ours']:8.2f}"
          "   (incl. pad_waves)")
    speedup = {key: v["hf"] / v["ours"] for key, v in ms.items()}
    cpu_note = "" if args.device == "cpu" else "   (cpu column: host time only, GPU work not counted)"
    print(f"speed-up                       : {speedup['wall']:7.1f}x {speedup['cpu']:7.1f}x{cpu_note}")
    print(f"max |difference|               : {max_diff:.2e}   attention masks equal: {masks_equal}")
    print(f"command: {cmd}")


def make_clips(args, lang, np, soxr, synth) -> list:
    """``args.clips`` float32 16 kHz clips of exactly ``args.seconds`` of synthetic speech."""
    words, voice = synth.load_words(lang)
    rng = np.random.default_rng(args.seed)
    target = int(round(args.seconds * SAMPLE_RATE))
    clips = []
    for _ in range(args.clips):
        parts, total = [], 0
        while total < target:
            _, spoken = synth.make_sentence(rng, words, (4, 12))
            audio, rate = synth.speak(spoken, voice)
            part = soxr.resample(synth.finish_audio(rng, audio, rate), synth.CV_SAMPLE_RATE, SAMPLE_RATE)
            parts.append(part.astype(np.float32))
            total += part.size
        clips.append(np.concatenate(parts)[:target])
    return clips


if __name__ == "__main__":
    main()
