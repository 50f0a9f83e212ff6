"""torch.compile vs eager for our training step: same init, same batches, same order, in one run.

Usage:
    python benchmarks/compile_step.py                          # tiny demo model, regional compile, 3 epochs
    python benchmarks/compile_step.py --modes whole regional   # whole-model and per-layer compile
    python benchmarks/compile_step.py --bucket 1.0             # pad every batch up to a multiple of 1 s
    python benchmarks/compile_step.py --arch mid --epochs 2 --bf16

Every variant starts from the shared init of ``benchmarks/train_vs_reference.py`` (which this script
prepares when needed), with the same seed, and runs the same list of demo batches (the duration-bucketed
sampler at that benchmark's audio per step, ``--epochs`` epochs of 17 batches): our ``compute_loss``
(features on the fly, our CTC loss), backward, clipping and fused AdamW with the demo's schedule: the
training loop's own ``w2vbert_asr.train.train_step`` under an ``Accelerator``. The first epoch holds the
compilation; the speed is the audio of the later epochs over their wall time.

Variants (``--modes``):
* eager: what the training loop runs;
* whole: ``torch.compile(model, dynamic=True)``: one graph per region between graph breaks (SpecAugment's
  ``nonzero`` and transformers' mask code break the graph);
* regional: ``layer.compile(dynamic=True)`` on every Conformer layer: the layers are the step's compute
  and have no graph breaks, and all layers share one compiled code object.

``--bucket S`` pads every batch's waves up to a multiple of S seconds (the lengths a static-shape compile
would see) and reports the padding that costs; the batch size still varies with the duration bucket.
The losses of all variants are printed: compiled code must train the same model (up to rounding).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_vs_reference import ARCHITECTURES, prepare_work  # noqa: E402


def batches_of(setup: dict, processor, epochs: int, max_batch_size: int, seed: int, bucket: float | None):
    """The demo batches in training order: -> (list of Collator dicts, padded share of samples added)."""
    import torch
    import torch.nn.functional as F

    from w2vbert_asr.batching import DurationBatchSampler
    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.geometry import SAMPLING_RATE
    from w2vbert_asr.loss import Collator

    train = load_prepared(setup["data_dir"], "train")
    sampler = DurationBatchSampler(train["duration"], setup["max_batch_seconds"], max_batch_size, seed=seed)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=Collator(processor.tokenizer))
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += list(loader)
    added = 0.0
    if bucket:
        quantum = int(round(bucket * SAMPLING_RATE))
        before = sum(b["waves"].numel() for b in out)
        for b in out:
            n = b["waves"].shape[1]
            b["waves"] = F.pad(b["waves"], (0, -(-n // quantum) * quantum - n))
        added = sum(b["waves"].numel() for b in out) / before - 1
    return out, added


def run_variant(mode: str, setup: dict, processor, batches: list[dict], per_epoch: int, bf16: bool, seed: int) -> dict:
    """One variant from the shared init: every batch is one optimizer step of the loop's own `train_step`."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from transformers import Wav2Vec2BertForCTC, get_scheduler

    from w2vbert_asr.cli import compose
    from w2vbert_asr.features import BatchFeatureExtractor
    from w2vbert_asr.model import attach_padding_hooks, use_fast_relative_key_bias
    from w2vbert_asr.optim import make_optimizer
    from w2vbert_asr.train import train_step

    torch._dynamo.reset()
    AcceleratorState._reset_state()  # each variant its own precision setting
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if bf16 else "no")
    tcfg = compose(["recipe=demo"]).train  # the demo's AdamW, schedule and clipping
    set_seed(seed)
    model = Wav2Vec2BertForCTC.from_pretrained(setup["init_dir"], attn_implementation="eager", use_safetensors=True)
    use_fast_relative_key_bias(attach_padding_hooks(model)).train()
    optimizer = make_optimizer(model, tcfg)
    scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                              num_training_steps=tcfg.max_steps)
    if mode == "whole":
        model = torch.compile(model, dynamic=True)
    elif mode == "regional":
        for layer in model.wav2vec2_bert.encoder.layers:
            layer.compile(dynamic=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    featurizer = BatchFeatureExtractor.from_hf(processor.feature_extractor)
    losses, stamps = [], [time.perf_counter()]
    for i, batch in enumerate(batches):
        out = train_step(accelerator, model, optimizer, scheduler, [batch], featurizer, tcfg.max_grad_norm)
        losses.append(out.loss_sum / max(out.finite, 1))
        if (i + 1) % per_epoch == 0:
            stamps.append(time.perf_counter())
    later = stamps[-1] - stamps[1]
    audio = sum(b["seconds"] for b in batches[per_epoch:])
    return {"mode": mode, "first_epoch_s": stamps[1] - stamps[0], "later_s": later, "audio_s_per_s": audio / later,
            "losses": losses}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny")
    p.add_argument("--modes", nargs="+", choices=["whole", "regional"], default=["regional"])
    p.add_argument("--epochs", type=int, default=3, help="epochs of demo batches; the first is not timed")
    p.add_argument("--bucket", type=float, help="pad every batch to a multiple of this many seconds")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (train.mixed_precision=bf16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--hf-batch-size", type=int, default=19)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--work-dir", default=str(REPO / "outputs" / "bench" / "train_vs_reference"))
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first one compiles")

    import torch
    import torch._dynamo
    from transformers import Wav2Vec2BertProcessor

    torch.set_num_threads(args.threads)
    # Variable lengths: without a higher limit dynamo gives up after 8 recompiles and runs eager silently.
    torch._dynamo.config.recompile_limit = 64
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    setup = prepare_work(args, work)
    processor = Wav2Vec2BertProcessor.from_pretrained(Path(setup["data_dir"]) / "processor")
    batches, added = batches_of(setup, processor, args.epochs, args.max_batch_size, args.seed, args.bucket)
    per_epoch = len(batches) // args.epochs
    shapes = sorted({tuple(b["waves"].shape) for b in batches})
    print(f"{len(batches)} batches ({per_epoch} per epoch), {len(shapes)} distinct (batch, samples) shapes"
          + (f"; bucket padding adds {100 * added:.1f} % samples" if args.bucket else ""))
    results = [run_variant("eager", setup, processor, batches, per_epoch, args.bf16, args.seed)]
    for mode in args.modes:
        results.append(run_variant(mode, setup, processor, batches, per_epoch, args.bf16, args.seed))
    eager = results[0]
    print("| variant | first epoch s (incl. compile) | later epochs audio-s/s | vs eager | final loss |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['first_epoch_s']:.1f} | {r['audio_s_per_s']:.1f} | "
              f"{r['audio_s_per_s'] / eager['audio_s_per_s']:.2f}x | {r['losses'][-1]:.4f} |")
        r["vs_eager"] = r["audio_s_per_s"] / eager["audio_s_per_s"]
    print(f"command: python benchmarks/compile_step.py {shlex.join(argv)}".rstrip())
    return {"results": results, "bucket_padding": added}


if __name__ == "__main__":
    main()
