"""Long-audio transcription: our streaming chunker vs transformers' ASR pipeline, peak memory and speed.

Usage:
    python benchmarks/transcribe_long.py                          # 1, 10 and 60 min files, tiny random model
    python benchmarks/transcribe_long.py --minutes 1 10 --threads 2
    python benchmarks/transcribe_long.py --model demo_out/model   # a trained model instead of random weights
    python benchmarks/transcribe_long.py --work /tmp/tl           # keep (and reuse) the model and audio files

Model: without --model, the tiny architecture (conf/model/tiny.yaml, 2.5M parameters) with random weights
(seed 0) and the Swahili word-list characters as vocabulary, saved as `train` exports it. Random weights
emit letters everywhere, so the decoder has more words to place than a trained model would give it.

Audio: ~2 minutes of espeak-ng sentences (`w2vbert_asr.synth`, random sentences from the sw word list,
0.3-1.5 s pauses), tiled to 1, 10 and 60 minutes with room tone (Gaussian, sigma 3e-3) added over the
whole file, written as 16 kHz 16-bit WAV; plus a 2 s file, the memory baseline.

Each (system, file) runs in a fresh Python process, so its peak RSS (VmHWM) is its own. Inside it the
model is loaded and warmed up on 1 s of audio (numba compilation, first-call allocations) before the clock
starts; the clock then covers reading the file, features, forward, stitching and decoding to text.
* ours: `Transcriber(model, processor, chunk_seconds=20, overlap_seconds=4).transcribe_file` (transcribe's
  defaults: 2 chunks per forward pass on CPU), which reads the file in blocks (`audio.read_blocks`);
* pipeline: `pipeline("automatic-speech-recognition", model=<dir>, chunk_length_s=20, stride_length_s=2,
  batch_size=2)` on the same model folder (plain transformers: its own feature extractor and attention),
  given the whole file read with soundfile, the only way it takes a long file; stride 2 s per side is
  our 4 s overlap split in the middle.
RTFx = audio seconds / wall seconds; `cpu RTFx` uses the process's CPU seconds (all threads) instead, which
moves less when the machine is shared. Ratios: pipeline time / ours (speed-up), pipeline peak / ours (memory).
Agreement: whether the two transcripts are equal, else their word error rate against each other; the
pipeline cuts its last chunk differently and merges chunk texts its own way, so a few words may differ.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

SAMPLING_RATE = 16_000
CHUNK_SECONDS, OVERLAP_SECONDS = 20.0, 4.0  # transcribe's defaults (conf/config.yaml)
BASE_SECONDS = 120.0  # unique speech, tiled to each length
ROOM_TONE = 3e-3
BASELINE_SECONDS = 2.0


# --------------------------------------------------------------------------------------------- inputs
def build_random_model(directory: Path) -> Path:
    """The tiny architecture with random weights (seed 0), saved with its processor like train's export."""
    import torch

    from w2vbert_asr.cli import compose
    from w2vbert_asr.model import build_model
    from w2vbert_asr.synth import load_words
    from w2vbert_asr.text import Normalizer, Vocabulary, build_processor

    if (directory / "model.safetensors").is_file():
        return directory
    words, _ = load_words("sw")
    processor = build_processor(Vocabulary.build([" ".join(words)]), directory)
    torch.manual_seed(0)
    model = build_model(compose(["model=tiny"]).model, processor.tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    Normalizer().save(directory)
    return directory


def write_audio(work: Path, minutes: list[float]) -> dict[str, Path]:
    """-> {label: 16 kHz WAV}: the 2 s baseline and one file per length (existing files are reused)."""
    import numpy as np
    import soundfile as sf
    import soxr

    from w2vbert_asr.synth import load_words, make_sentence, speak

    paths = {"2s": work / "speech_2s.wav", **{f"{m:g}min": work / f"speech_{m:g}min.wav" for m in minutes}}
    if all(p.is_file() for p in paths.values()):
        return paths
    rng = np.random.default_rng(0)
    words, voice = load_words("sw")
    parts, total = [], 0
    while total < BASE_SECONDS * SAMPLING_RATE:
        _, spoken = make_sentence(rng, words, (3, 10))
        audio, rate = speak(spoken, voice)
        parts += [soxr.resample(audio, rate, SAMPLING_RATE),
                  np.zeros(int(rng.uniform(0.3, 1.5) * SAMPLING_RATE), np.float32)]
        total += len(parts[-2]) + len(parts[-1])
    base = np.concatenate(parts)
    for label, path in paths.items():
        n = int((BASELINE_SECONDS if label == "2s" else float(label[:-3]) * 60) * SAMPLING_RATE)
        wave = np.tile(base, -(-n // len(base)))[:n] + rng.normal(0, ROOM_TONE, n).astype(np.float32)
        sf.write(path, np.clip(wave, -1, 1), SAMPLING_RATE, subtype="PCM_16")
    return paths


# --------------------------------------------------------------------------------------------- one run
def run_child(system: str, model_dir: str, audio: str, threads: int, batch_size: str = "auto") -> dict:
    """In this (fresh) process: load, warm up, transcribe `audio` once -> figures and the text."""
    import numpy as np
    import soundfile as sf
    import torch

    torch.set_num_threads(threads)
    seconds = sf.info(audio).frames / sf.info(audio).samplerate
    warm = np.random.default_rng(0).normal(0, 0.1, SAMPLING_RATE).astype(np.float32)
    if system == "ours":
        from w2vbert_asr.transcribe import load_model, Transcriber

        model, processor = load_model(model_dir, "cpu")
        transcriber = Transcriber(model, processor, "cpu", CHUNK_SECONDS, OVERLAP_SECONDS, batch_size=batch_size)
        transcriber.transcribe([warm])
        run = lambda: transcriber.transcribe_file(audio).text  # noqa: E731
    else:
        from transformers import pipeline

        from w2vbert_asr.transcribe import AUTO_BATCH_SIZE

        asr = pipeline("automatic-speech-recognition", model=model_dir, device="cpu",
                       chunk_length_s=CHUNK_SECONDS, stride_length_s=OVERLAP_SECONDS / 2,
                       batch_size=AUTO_BATCH_SIZE[0])
        asr({"raw": warm, "sampling_rate": SAMPLING_RATE})

        def run():
            wave, rate = sf.read(audio, dtype="float32")
            return asr({"raw": wave, "sampling_rate": rate})["text"]
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        text = run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak_mb = peak_rss_mb()
    return {"system": system, "audio_seconds": seconds, "wall": wall, "cpu": cpu, "peak_mb": peak_mb, "text": text}


def peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM belongs to this program alone; ru_maxrss also
    counts the parent's memory at the fork (the parent holds the audio it wrote)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def measure(system: str, model_dir: Path, audio: Path, threads: int, batch_size: str = "auto") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", system, "--model", str(model_dir), "--audio", str(audio),
           "--threads", str(threads), "--batch-size", batch_size]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{system} on {audio.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(ours: str, theirs: str) -> str:
    import jiwer

    if ours.split() == theirs.split():
        return "identical"
    if not ours.split() or not theirs.split():
        return "one is empty"
    return f"differ: WER {100 * jiwer.wer(theirs, ours):.2f} % ({len(ours.split())} vs {len(theirs.split())} words)"


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    parser.add_argument("--model", help="a trained model folder (default: the tiny architecture, random weights)")
    parser.add_argument("--work", help="folder for the model and audio files (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", default="auto", help="ours: chunks per forward pass (transcribe.batch_size)")
    parser.add_argument("--systems", nargs="+", default=["ours", "pipeline"], choices=["ours", "pipeline"])
    parser.add_argument("--child", choices=["ours", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--audio", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.model, args.audio, args.threads, args.batch_size)))
        return []

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = Path(args.model) if args.model else build_random_model(work / "tiny_random_model")
        files = write_audio(work, args.minutes)
        rows = []
        for label, audio in files.items():
            for system in args.systems:
                r = measure(system, model_dir, audio, args.threads, args.batch_size)
                rows.append({**r, "file": label})
                print(f"  {label:>7} {system:<8} wall {r['wall']:8.2f} s  RTFx {r['audio_seconds'] / r['wall']:7.1f}  "
                      f"cpu RTFx {r['audio_seconds'] / r['cpu']:7.1f}  peak RSS {r['peak_mb']:7.0f} MB", flush=True)
    report(rows, args, argv)
    return rows


def report(rows: list[dict], args, argv) -> None:
    by = {(r["file"], r["system"]): r for r in rows}
    print(f"\n{'file':>7} | {'ours RTFx':>9} {'cpu':>6} {'peak MB':>8} | {'pipe RTFx':>9} {'cpu':>6} {'peak MB':>8} | "
          f"{'speed-up':>8} {'memory':>7} | transcripts")
    for label in dict.fromkeys(r["file"] for r in rows):
        o, p = by.get((label, "ours")), by.get((label, "pipeline"))
        cells = []
        for r in (o, p):
            cells.append(f"{r['audio_seconds'] / r['wall']:9.1f} {r['audio_seconds'] / r['cpu']:6.1f} "
                         f"{r['peak_mb']:8.0f}" if r else f"{'-':>9} {'-':>6} {'-':>8}")
        ratio = f"{p['wall'] / o['wall']:7.2f}x {p['peak_mb'] / o['peak_mb']:6.2f}x" if o and p else f"{'-':>8} {'-':>7}"
        agree = agreement(o["text"], p["text"]) if o and p else "-"
        print(f"{label:>7} | {cells[0]} | {cells[1]} | {ratio} | {agree}")
    for system in args.systems:
        base = by.get(("2s", system))
        longest = max((r for r in rows if r["system"] == system), key=lambda r: r["audio_seconds"])
        if base and longest is not base:
            target = " (target: <= +150 MB)" if system == "ours" else ""
            print(f"{system}: peak RSS on {longest['file']} is {longest['peak_mb'] - base['peak_mb']:+.0f} MB over the "
                  f"2 s file{target}")
    command = ["python", "benchmarks/transcribe_long.py", *(argv if argv is not None else sys.argv[1:])]
    print("command:", shlex.join(command))


if __name__ == "__main__":
    main()
