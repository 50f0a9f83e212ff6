"""Where a training step's time goes: torch.profiler over our loop's stages, forward broken down by block.

Usage:
    python benchmarks/profile_step.py                         # tiny demo model, demo batches, 2 threads
    python benchmarks/profile_step.py --arch mid              # hidden 512, 8 layers
    python benchmarks/profile_step.py --steps 8 --threads 1 --top 15

Uses the corpus, vocabulary and shared init that ``benchmarks/train_vs_reference.py`` prepares (run it, or
this script prepares them) and the audio per step that benchmark matches (its ``max_batch_seconds``).
One step is our loop's step, stage by stage, each inside a ``torch.profiler.record_function``:

* data: the next batch from the DataLoader (duration-bucketed sampler + our collator: pad waves, tokenize);
* features: ``BatchFeatureExtractor`` on the padded waves;
* forward, per block (forward hooks): feature projection, every Conformer layer's ffn1 / self_attn /
  conv_module / ffn2 / final norm summed over layers, adapter, CTC head;
* ctc: log-softmax + ``torch.nn.functional.ctc_loss`` (mean, zero_infinity), as transformers computes it;
* backward; optimizer: gradient clipping + AdamW step + zero_grad.

"python overhead" is the step's wall time minus the time the profiler saw inside aten operators on the
main thread: interpreter, module calls, hooks and dispatch. The table prints ms per step and share.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_vs_reference import ARCHITECTURES, prepare_work  # noqa: E402

BLOCKS = ("ffn1", "self_attn", "conv_module", "ffn2", "final_layer_norm")


def _block_hooks(model) -> list:
    """record_function ranges around the forward of every block we report; -> hook handles."""
    import torch

    w2v = model.wav2vec2_bert
    named = [("fwd/feature_projection", w2v.feature_projection), ("fwd/lm_head", model.lm_head)]
    if w2v.adapter is not None:
        named.append(("fwd/adapter", w2v.adapter))
    for layer in w2v.encoder.layers:
        for block in BLOCKS:
            named.append((f"fwd/encoder.{block}", getattr(layer, block)))
    handles = []
    for label, module in named:
        def pre(mod, args, label=label):
            mod._prof_range = torch.autograd.profiler.record_function(label)
            mod._prof_range.__enter__()

        def post(mod, args, output):
            mod._prof_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny")
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="eager", help="model.attn_implementation")
    p.add_argument("--bf16", action="store_true", help="forward under bf16 autocast (train.mixed_precision=bf16)")
    p.add_argument("--adamw", choices=["fused", "foreach", "for_loop"], default="fused",
                   help="AdamW implementation (train.adamw_impl)")
    p.add_argument("--top", type=int, default=12, help="aten operators listed by self time")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--hf-batch-size", type=int, default=19)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--work-dir", default=str(REPO / "outputs" / "bench" / "train_vs_reference"))
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import Wav2Vec2BertForCTC, Wav2Vec2BertProcessor

    from w2vbert_asr.batching import DurationBatchSampler
    from w2vbert_asr.data import load_prepared
    from w2vbert_asr.features import BatchFeatureExtractor
    from w2vbert_asr.model import attach_padding_hooks, output_lengths
    from w2vbert_asr.train import ADAMW_IMPLS, Collator

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    setup = prepare_work(args, work)
    processor = Wav2Vec2BertProcessor.from_pretrained(Path(setup["data_dir"]) / "processor")
    model = Wav2Vec2BertForCTC.from_pretrained(setup["init_dir"], attn_implementation=args.attn, use_safetensors=True)
    attach_padding_hooks(model).train()
    featurizer = BatchFeatureExtractor.from_hf(processor.feature_extractor)
    train = load_prepared(setup["data_dir"], "train")
    sampler = DurationBatchSampler(train["duration"], setup["max_batch_seconds"], args.max_batch_size, seed=args.seed)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=Collator(processor.tokenizer))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=2e-3, betas=(0.9, 0.98), eps=1e-8, **ADAMW_IMPLS[args.adamw])
    cfg = model.config

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()

    def step():
        with record_function("data"):
            batch = next(it)
        with record_function("features"):
            feats, mask = featurizer(batch["waves"], batch["lengths"])
        with record_function("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_features=feats, attention_mask=mask).logits.float()
        with record_function("ctc"):
            labels = batch["labels"]
            valid = labels >= 0
            log_probs = torch.nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
            loss = torch.nn.functional.ctc_loss(log_probs, labels[valid], output_lengths(batch["lengths"], cfg),
                                                valid.sum(-1), blank=cfg.pad_token_id, reduction="mean",
                                                zero_infinity=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return batch["seconds"]

    for _ in range(args.warmup):
        step()
    handles = _block_hooks(model)
    audio = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            with record_function("step"):
                audio += step()
        wall = time.perf_counter() - start
    for h in handles:
        h.remove()

    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    ms = lambda key: by_name[key].cpu_time_total / 1e3 / args.steps if key in by_name else 0.0  # noqa: E731
    step_ms = 1e3 * wall / args.steps
    # Operator time seen on the main thread (self time of aten ops): the rest is Python and dispatch.
    op_ms = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e3 / args.steps
    rows = [("data loading (sampler + collator)", ms("data")), ("features (fbank on the fly)", ms("features")),
            ("forward, total", ms("forward"))]
    fwd_blocks = [("feature projection", "fwd/feature_projection")] + [
        (f"Conformer {b} (all layers)", f"fwd/encoder.{b}") for b in BLOCKS] + [
        ("adapter", "fwd/adapter"), ("CTC head (lm_head)", "fwd/lm_head")]
    block_rows = [(f"  {name}", ms(key)) for name, key in fwd_blocks]
    rest = ms("forward") - sum(v for _, v in block_rows)
    block_rows.append(("  rest of forward (masks, SpecAugment, position ids)", rest))
    rows += block_rows + [("CTC loss", ms("ctc")), ("backward", ms("backward")),
                          ("optimizer (clip + AdamW + zero_grad)", ms("optimizer")),
                          ("python overhead (wall - aten op time)", max(0.0, step_ms - op_ms))]
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{args.arch}: {params / 1e6:.2f}M parameters, {args.threads} threads, attn {args.attn}; {args.steps} "
          f"profiled steps, {audio / args.steps:.1f} s audio/step, {step_ms:.0f} ms/step wall "
          f"({audio / wall:.1f} audio-s/s under the profiler)")
    print("| stage | ms/step | share of step |")
    print("|---|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.1f} | {100 * v / step_ms:.1f} % |")
    print(f"\ntop {args.top} aten operators by self time (ms/step):")
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    for e in ops[: args.top]:
        print(f"  {e.key:<40} {e.self_cpu_time_total / 1e3 / args.steps:8.1f}  ({e.count // args.steps} calls)")
    print(f"command: python benchmarks/profile_step.py {shlex.join(argv)}".rstrip())
    result = {"arch": args.arch, "threads": args.threads, "bf16": args.bf16, "step_ms": step_ms, "audio_per_step": audio / args.steps,
              "rows": rows, "aten_ms": op_ms}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
