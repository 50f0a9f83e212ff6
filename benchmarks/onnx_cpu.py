"""CPU inference: torch fp32 (eager and SDPA attention) vs onnxruntime fp32 and int8, side by side.

Usage:
    python benchmarks/onnx_cpu.py --size tiny                       # tiny architecture (~1 min)
    python benchmarks/onnx_cpu.py --size 600m --repeats 1 --seconds 3 --batch-sizes 1 --profile   # export ~10 min
    python benchmarks/onnx_cpu.py --size 600m --repeats 1 --seconds 3 --batch-sizes 8 --warmup 0 \
        --work-dir <the same> --skip-export                        # batch 8 of the 600M shape: ~15 min
    python benchmarks/onnx_cpu.py --size 600m --threads 2 --batch-sizes 1 --profile   # where int8 time goes
    python benchmarks/onnx_cpu.py --variants --model-dir demo_out/model --run-dir demo_out   # int8 variants

Models are built from config with random weights (nothing is downloaded): `--size tiny` is conf/model/tiny.yaml,
`--size 600m` is `Wav2Vec2BertConfig()` (the w2v-bert-2.0 shape) with conf/model/w2v_bert_2.yaml's overrides
(adapter etc.) and a 40-character CTC head. Each is exported with `w2vbert_asr.export` exactly as
`w2vbert-asr export export.quantize=int8` does (TorchScript, offline basic optimisation, dynamic int8 of
the MatMuls from conf/config.yaml's `export.int8`), into --work-dir.

Timed: the model alone (features `(B, T, 160)` and mask precomputed by BatchFeatureExtractor from random
speech-level noise clips of --seconds; every backend gets the same arrays), after --warmup untimed runs,
best of --repeats, the backends interleaved so that load from other processes hits them alike. RTFx =
audio seconds / wall seconds. torch uses torch.set_num_threads(n), onnxruntime intra_op_num_threads=n.
Printed: RTFx per backend, threads and batch size, the ratio of each to torch fp32 eager, file sizes,
and the largest |ORT - torch| logit difference as a correctness check.

--variants: on a trained model folder and its run's prepared test split (--run-dir/prepared/test.arrow),
quantise with every combination of QInt8/QUInt8, per-tensor/per-channel and op types, and print size,
RTFx (batch 1, --threads) and test CER of each next to fp32's.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from w2vbert_asr.export import export_onnx, onnx_size, optimize_offline, quantize_int8  # noqa: E402
from w2vbert_asr.geometry import SAMPLING_RATE  # noqa: E402
from w2vbert_asr.features import BatchFeatureExtractor, pad_waves  # noqa: E402
from w2vbert_asr.onnx_model import OnnxCTCModel  # noqa: E402

CTC_VOCAB = 40  # [PAD], [UNK], |, ~37 characters
NOISE_LEVEL = 0.05
BACKENDS = ("torch fp32 eager", "torch fp32 sdpa", "ORT fp32", "ORT int8")
VARIANT_OPS = (["MatMul"], ["MatMul", "Conv"], ["MatMul", "Gemm", "Conv"])


def build_torch(size: str, attn: str):
    """A random Wav2Vec2BertForCTC in the tiny or 600M shape as the toolkit's torch path runs it (padding
    hooks, `relative_key_bias`), eval mode."""
    from transformers import Wav2Vec2BertForCTC

    from w2vbert_asr.cli import compose
    from w2vbert_asr.model import architecture_config, attach_padding_hooks, use_fast_relative_key_bias

    config = architecture_config(compose(["model=tiny" if size == "tiny" else "model=w2v_bert_2"]).model)
    config.vocab_size, config.pad_token_id = CTC_VOCAB, 0
    torch.manual_seed(0)
    model = Wav2Vec2BertForCTC._from_config(config, attn_implementation=attn)
    return use_fast_relative_key_bias(attach_padding_hooks(model)).eval()


def featurizer() -> BatchFeatureExtractor:
    from transformers import SeamlessM4TFeatureExtractor

    return BatchFeatureExtractor.from_hf(SeamlessM4TFeatureExtractor())


def make_batch(batch: int, seconds: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Lengths from 80 % to 100 % of --seconds, so the batch is padded like a real one.
    n = [int(seconds * SAMPLING_RATE * f) for f in np.linspace(1.0, 0.8, batch)]
    waves, lengths = pad_waves([(NOISE_LEVEL * rng.standard_normal(k)).astype(np.float32) for k in n])
    feats, mask = featurizer()(waves, lengths)
    return feats, mask, float(lengths.sum()) / SAMPLING_RATE


def export_all(size: str, work: Path, model) -> dict[str, Path]:
    """fp32 (offline-optimised) and int8 files as `w2vbert-asr export export.quantize=int8` writes them."""
    from w2vbert_asr.cli import compose

    ecfg = compose([]).export
    fp32, int8 = work / size / "model.onnx", work / size / "model.int8.onnx"
    start = time.perf_counter()
    export_onnx(model, fp32, 0.0, int(ecfg.opset))
    t_export = time.perf_counter() - start
    if ecfg.optimize != "none":
        optimize_offline(fp32, str(ecfg.optimize))
    t_opt = time.perf_counter() - start - t_export
    quantize_int8(fp32, int8, str(ecfg.int8.weight_type), bool(ecfg.int8.per_channel), list(ecfg.int8.op_types))
    t_quant = time.perf_counter() - start - t_export - t_opt
    print(f"[{size}] export {t_export:.0f} s, offline optimisation {t_opt:.0f} s, int8 {t_quant:.0f} s")
    return {"ORT fp32": fp32, "ORT int8": int8}


def run_speed(args) -> None:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="onnx_cpu_"))
    for size in args.size:
        eager = build_torch(size, "eager")
        sdpa = build_torch(size, "sdpa")
        sdpa.load_state_dict(eager.state_dict())
        params = sum(p.numel() for p in eager.parameters())
        files = export_all(size, work, eager) if not args.skip_export else \
            {"ORT fp32": work / size / "model.onnx", "ORT int8": work / size / "model.int8.onnx"}
        sizes = {k: onnx_size(v) for k, v in files.items()}
        torch_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
        print(f"[{size}] {params / 1e6:.1f}M parameters; safetensors fp32 {torch_bytes / 1e6:.0f} MB, ORT fp32 "
              f"{sizes['ORT fp32'] / 1e6:.0f} MB, ORT int8 {sizes['ORT int8'] / 1e6:.0f} MB "
              f"({sizes['ORT fp32'] / sizes['ORT int8']:.2f}x smaller)")
        gc.collect()
        print(f"| size | threads | batch | audio s | {' | '.join(f'{b} RTFx' for b in BACKENDS)} | "
              f"{' | '.join(f'{b} / eager' for b in BACKENDS[1:])} | max abs ORT fp32 - torch |")
        print("|" + "---|" * (5 + 2 * len(BACKENDS)))
        for threads in args.threads:
            torch.set_num_threads(threads)
            sessions = {k: OnnxCTCModel(v, eager.config, threads) for k, v in files.items()}
            runners = {"torch fp32 eager": eager, "torch fp32 sdpa": sdpa, **sessions}
            for batch in args.batch_sizes:
                feats, mask, audio = make_batch(batch, args.seconds)
                best = {k: float("inf") for k in runners}
                outputs = {}
                for rep in range(args.repeats + args.warmup):  # the first --warmup passes are untimed
                    for name, model in runners.items():
                        with torch.no_grad():
                            start = time.perf_counter()
                            out = model(input_features=feats, attention_mask=mask).logits
                            seconds = time.perf_counter() - start
                        if rep >= args.warmup:
                            best[name] = min(best[name], seconds)
                        outputs[name] = out
                diff = (outputs["ORT fp32"] - outputs["torch fp32 eager"]).abs().max().item()
                rtfx = {k: audio / v for k, v in best.items()}
                print(f"| {size} | {threads} | {batch} | {audio:.1f} | "
                      + " | ".join(f"{rtfx[b]:.2f}" for b in BACKENDS) + " | "
                      + " | ".join(f"{rtfx[b] / rtfx[BACKENDS[0]]:.2f}x" for b in BACKENDS[1:])
                      + f" | {diff:.1e} |", flush=True)
            if args.profile:
                profile(files, eager.config, threads, args.seconds)
            del sessions, runners
            gc.collect()
        del eager, sdpa
        gc.collect()


def profile(files: dict[str, Path], config, threads: int, seconds: float) -> None:
    """onnxruntime's per-node profile at batch 1, summed by operator type: where the time goes."""
    import json

    import onnxruntime as ort

    feats, mask, _ = make_batch(1, seconds)
    feeds = {"input_features": feats.numpy(), "attention_mask": mask.numpy()}
    for name, path in files.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "onnx_cpu_profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = [e for e in events if e.get("name") == "model_run"][1:]  # first run: warm-up
        by_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                by_op[e["args"]["op_name"]] = by_op.get(e["args"]["op_name"], 0.0) + e["dur"]
        total = sum(by_op.values())
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
        run_ms = np.mean([r["dur"] for r in runs]) / 1e3 if runs else float("nan")
        print(f"profile {name}, {threads} thread(s), batch 1, {seconds:.0f} s: {run_ms:.0f} ms per run; by op: "
              + ", ".join(f"{op} {100 * t / total:.0f}%" for op, t in top))


def run_variants(args) -> None:
    """Every int8 variant of a trained model: size, speed at batch 1 and test CER, next to fp32."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertProcessor

    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.evaluate import decode_dataset, greedy_decoder, score
    from w2vbert_asr.export import FP32_FILE, ONNX_DIR, export_model_dir
    from w2vbert_asr.text import Normalizer

    model_dir = Path(args.model_dir)
    fp32 = model_dir / ONNX_DIR / FP32_FILE
    if not fp32.is_file():
        from w2vbert_asr.cli import compose

        export_model_dir(model_dir, compose(["lang=model", "export.optimize=basic"]).export)
    config = Wav2Vec2BertConfig.from_pretrained(model_dir)
    processor = Wav2Vec2BertProcessor.from_pretrained(model_dir)
    normalizer = Normalizer.load(model_dir)
    test = load_prepared(args.run_dir, "test")
    feats = BatchFeatureExtractor.from_hf(processor.feature_extractor)
    batch = make_batch(1, args.seconds)
    threads = args.threads[-1]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="onnx_variants_"))

    def measure(path: Path) -> tuple[float, float, float]:
        model = OnnxCTCModel(path, config, threads)
        hyps, _ = decode_dataset(model, test, feats, greedy_decoder(processor.tokenizer), torch.device("cpu"),
                                 400.0, 32)
        cer = score(test, hyps, normalizer)[0]["cer"]
        model(input_features=batch[0], attention_mask=batch[1])
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            model(input_features=batch[0], attention_mask=batch[1])
            best = min(best, time.perf_counter() - start)
        return onnx_size(path) / 1e6, batch[2] / best, 100 * cer

    size, rtfx, cer = measure(fp32)
    print(f"{len(test)} test clips, batch 1 x {args.seconds:.0f} s, {threads} thread(s)")
    print("| weights | scales | op types | MB | RTFx | vs fp32 | test CER % | CER - fp32 (points) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| fp32 | - | - | {size:.1f} | {rtfx:.1f} | 1.00x | {cer:.2f} | - |")
    for weight, per_channel, ops in itertools.product(("QInt8", "QUInt8"), (False, True), VARIANT_OPS):
        path = work / f"{weight}_{int(per_channel)}_{'-'.join(ops)}.onnx"
        quantize_int8(fp32, path, weight, per_channel, ops)
        s, r, c = measure(path)
        print(f"| {weight} | {'per channel' if per_channel else 'per tensor'} | {', '.join(ops)} | {s:.1f} | {r:.1f} "
              f"| {r / rtfx:.2f}x | {c:.2f} | {c - cer:+.2f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs="+", choices=("tiny", "600m"), default=["tiny"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=5.0, help="longest clip of a batch (others down to 80%%)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend (best is kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes over the backends first")
    parser.add_argument("--work-dir", help="where the ONNX files go (default: a new temporary folder)")
    parser.add_argument("--skip-export", action="store_true", help="reuse the files in --work-dir")
    parser.add_argument("--profile", action="store_true", help="also print onnxruntime's per-op profile")
    parser.add_argument("--variants", action="store_true", help="int8 variants of --model-dir instead")
    parser.add_argument("--model-dir", help="--variants: a trained model folder")
    parser.add_argument("--run-dir", help="--variants: its run folder (prepared/test.arrow)")
    args = parser.parse_args(argv)
    print("command: python benchmarks/onnx_cpu.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    print(f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}")
    if args.variants:
        run_variants(args)
    else:
        run_speed(args)


if __name__ == "__main__":
    main()
