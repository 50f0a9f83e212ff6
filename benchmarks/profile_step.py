"""Where a training step's time goes: torch.profiler over our loop's own step, forward broken down by block.

Usage:
    python benchmarks/profile_step.py                         # tiny demo model, demo batches, 2 threads
    python benchmarks/profile_step.py --arch mid              # hidden 512, 8 layers
    python benchmarks/profile_step.py --steps 8 --threads 1 --top 15
    python benchmarks/profile_step.py --no-feature-cache      # features computed every step (first epoch)

Uses the corpus, vocabulary and shared init that ``benchmarks/train_vs_reference.py`` prepares (run it, or
this script prepares them) and the audio per step that benchmark matches (its ``max_batch_seconds``).
Every step is the training loop's own ``w2vbert_asr.train.train_step`` under an ``Accelerator``, fed by the
loop's DataLoader, ``Collator`` and featurizer (with its log-mel cache filled as after the first epoch,
unless ``--no-feature-cache``); nothing of the step is copied here. The stages are labelled from outside
with ``torch.profiler.record_function`` ranges, the real functions running inside them:

* data: the next batch from the DataLoader (duration-bucketed sampler + our collator: pad waves, tokenize);
* features: the featurizer (``BatchFeatureExtractor``, a forward hook pair);
* forward, per block (forward hooks): feature projection, every Conformer layer's ffn1 / self_attn /
  conv_module / ffn2 / final norm summed over layers, adapter, CTC head;
* ctc: ``w2vbert_asr.loss.ctc_loss`` as ``compute_loss`` calls it;
* backward: ``accelerator.backward``; optimizer: ``accelerator.clip_grad_norm_``, the optimizer's ``step``
  and ``zero_grad``; step bookkeeping: the rest of ``train_step`` (accumulate context, the finite-loss
  gather, ``.item()``, scheduler).

"python overhead" is the step's wall time minus the time the profiler saw inside aten operators on the
main thread: interpreter, module calls, hooks and dispatch. The table prints ms per step and share.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shlex
import sys
import time
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


def _labelled(label: str, fn):
    """`fn` run inside a record_function range named `label`."""
    from torch.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _module_range(module, label: str):
    """A record_function range around every call of `module` (forward pre/post hooks)."""
    import torch

    def pre(mod, args):
        mod._prof_range = torch.autograd.profiler.record_function(label)
        mod._prof_range.__enter__()

    def post(mod, args, output):
        mod._prof_range.__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny")
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="eager", help="model.attn_implementation")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (train.mixed_precision=bf16)")
    p.add_argument("--adamw", choices=["fused", "foreach", "for_loop"], default="fused",
                   help="AdamW implementation (train.adamw_impl)")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="compute every clip's features every step (the loop's first epoch; later ones use the cache)")
    p.add_argument("--top", type=int, default=12, help="aten operators listed by self time")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--hf-batch-size", type=int, default=19)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--work-dir", default=str(REPO / "outputs" / "bench" / "train_vs_reference"))
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args(argv)

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import Wav2Vec2BertForCTC, Wav2Vec2BertProcessor, get_scheduler

    import w2vbert_asr.train as loop
    from w2vbert_asr.perturb import feature_cache_bytes
    from w2vbert_asr.batching import DurationBatchSampler
    from w2vbert_asr.cli import compose
    from w2vbert_asr.features import BatchFeatureExtractor
    from w2vbert_asr.loss import Collator
    from w2vbert_asr.model import attach_padding_hooks, use_fast_relative_key_bias
    from w2vbert_asr.optim import make_optimizer
    from w2vbert_asr.prepared import load_prepared

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    setup = prepare_work(args, work)
    processor = Wav2Vec2BertProcessor.from_pretrained(Path(setup["data_dir"]) / "processor")
    tcfg = compose(["recipe=demo", f"train.adamw_impl={args.adamw}"]).train  # the demo's AdamW, schedule, clipping
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if args.bf16 else "no")
    set_seed(args.seed)
    model = Wav2Vec2BertForCTC.from_pretrained(setup["init_dir"], attn_implementation=args.attn, use_safetensors=True)
    use_fast_relative_key_bias(attach_padding_hooks(model)).train()  # as build_model
    optimizer = make_optimizer(model, tcfg)
    scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                              num_training_steps=tcfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    featurizer = BatchFeatureExtractor.from_hf(processor.feature_extractor)
    cache = not args.no_feature_cache and featurizer.enable_cache(feature_cache_bytes())
    train = load_prepared(setup["data_dir"], "train")
    sampler = DurationBatchSampler(train["duration"], setup["max_batch_seconds"], args.max_batch_size, seed=args.seed)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=Collator(processor.tokenizer, keys=cache))
    if cache:  # as after the loop's first epoch: every clip's log-mel frames are in the cache
        for batch in loader:
            featurizer(batch["waves"], batch["lengths"], batch["keys"])

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
        loop.train_step(accelerator, model, optimizer, scheduler, [batch], featurizer, tcfg.max_grad_norm)
        return batch["seconds"]

    for _ in range(args.warmup):
        step()
    # Stage labels around the loop's own functions (restored below).
    patched = [(loop, "ctc_loss"), (accelerator, "backward"), (accelerator, "clip_grad_norm_"), (optimizer, "step"),
               (optimizer, "zero_grad")]
    saved = [getattr(obj, name) for obj, name in patched]
    for (obj, name), fn in zip(patched, saved):
        setattr(obj, name, _labelled({"ctc_loss": "ctc", "backward": "backward"}.get(name, "optimizer"), fn))
    handles = _block_hooks(model)
    audio = 0.0
    with _module_range(featurizer, "features"), _module_range(model, "forward"), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            with record_function("step"):
                audio += step()
        wall = time.perf_counter() - start
    for h in handles:
        h.remove()
    for (obj, name), fn in zip(patched, saved):
        if obj is loop:
            setattr(obj, name, fn)
        else:
            delattr(obj, name)  # the instance attribute goes; the class method shows again

    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    ms = lambda key: by_name[key].cpu_time_total / 1e3 / args.steps if key in by_name else 0.0  # noqa: E731
    step_ms = 1e3 * wall / args.steps
    # Operator time seen on the main thread (self time of aten ops): the rest is Python and dispatch.
    op_ms = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e3 / args.steps
    rows = [("data loading (sampler + collator)", ms("data")),
            (f"features (fbank{', log-mel cache' if cache else ', computed'})", ms("features")),
            ("forward, total", ms("forward"))]
    fwd_blocks = [("feature projection", "fwd/feature_projection")] + [
        (f"Conformer {b} (all layers)", f"fwd/encoder.{b}") for b in BLOCKS] + [
        ("adapter", "fwd/adapter"), ("CTC head (lm_head)", "fwd/lm_head")]
    block_rows = [(f"  {name}", ms(key)) for name, key in fwd_blocks]
    rest = ms("forward") - sum(v for _, v in block_rows)
    block_rows.append(("  rest of forward (masks, SpecAugment, position ids)", rest))
    staged = ms("data") + ms("features") + ms("forward") + ms("ctc") + ms("backward") + ms("optimizer")
    rows += block_rows + [("CTC loss", ms("ctc")), ("backward", ms("backward")),
                          ("optimizer (clip + AdamW + zero_grad)", ms("optimizer")),
                          ("step bookkeeping (accumulate, finite check, scheduler)", max(0.0, ms("step") - staged)),
                          ("python overhead (wall - aten op time)", max(0.0, step_ms - op_ms))]
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{args.arch}: {params / 1e6:.2f}M parameters, {args.threads} threads, attn {args.attn}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, AdamW {args.adamw}; {args.steps} profiled steps of "
          f"w2vbert_asr.train.train_step, {audio / args.steps:.1f} s audio/step, {step_ms:.0f} ms/step wall "
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
    result = {"arch": args.arch, "threads": args.threads, "bf16": args.bf16, "feature_cache": bool(cache),
              "step_ms": step_ms, "audio_per_step": audio / args.steps, "rows": rows, "aten_ms": op_ms}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
