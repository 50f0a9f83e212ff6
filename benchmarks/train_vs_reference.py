"""Training speed and accuracy: our accelerate loop vs transformers' Trainer set up as the reference script.

Usage:
    python benchmarks/train_vs_reference.py                             # tiny model, 600 steps, 2 alternated rounds,
                                                                        # ours fp32 + bf16, the reference fp32 + bf16
    python benchmarks/train_vs_reference.py --ours-precisions no --reference-precisions fp32   # like with like, fp32
    python benchmarks/train_vs_reference.py --arch mid --steps 60       # hidden 512, 8 layers: speed only
    python benchmarks/train_vs_reference.py --steps 40 --repeats 1      # quick look
    python benchmarks/train_vs_reference.py --ours train.adamw_impl=for_loop   # our side with other settings
    python benchmarks/train_vs_reference.py --json out.json             # also save every figure
    python benchmarks/train_vs_reference.py --repeats 3 --train-seeds 42 1 2   # one training seed per round

The reference is ``examples/pytorch/speech-recognition/run_speech_recognition_ctc.py`` as a blog reader runs
it, rebuilt here from its documented behaviour (the script is not copied): input features computed once
before training by the processor's ``SeamlessM4TFeatureExtractor`` (``datasets.map``, untimed, the dataset
left in its default python format as the script leaves it), the script's padding through ``processor.pad``
(features padded with the extractor's padding value, an attention mask, labels padded with -100), and
``Trainer`` with ``train_sampling_strategy="group_by_length"`` (the script's ``--group_by_length``) and the
script's/``TrainingArguments``' defaults for everything else that is not matched on purpose, among them
the optimizer and the attention: ``TrainingArguments``' default ``optim``, ``adamw_torch_fused`` with
torch >= 2.8, and transformers' default ``attn_implementation``, ``sdpa`` (the script sets neither;
``--reference-optim adamw_torch --reference-attn eager`` gives the for-loop AdamW and eager attention that
earlier versions of this benchmark pinned, which made the reference a few per cent slower than the script).
The script itself was run side by side with this rebuild once (benchmarks/README.md, "How the script matches
the two sides").

Precisions: ``--ours-precisions`` (``train.mixed_precision``: ``no`` = fp32, ``bf16``, ...) and
``--reference-precisions`` (``fp32``, or ``bf16``/``fp16``: the Trainer's ``bf16=True``/``fp16=True``, with
``use_cpu=True`` on the CPU, as ``--bf16 True --use_cpu True`` on the script's command line). Every
(ours, reference) precision pair gets its ratio, with the command that reruns just that pair.

Matched on purpose, both sides:
* the model: one tiny (or mid-size) ``Wav2Vec2BertForCTC`` initialised once from ``--seed`` and saved as
  safetensors; both sides load that folder, and the SHA-256 of the loaded weights is printed per side;
* the data: the demo recipe's synthetic corpus (``w2vbert-asr synth`` + ``prepare``, cached in
  ``--work-dir``), its vocabulary and processor;
* the hyperparameters of ``recipe=demo`` (learning rate, warmup, cosine schedule, AdamW betas/eps,
  weight decay, gradient clipping), the step count, CPU threads;
* audio per step: the reference takes ``--hf-batch-size`` clips per step; our ``train.max_batch_seconds``
  is chosen so that our sampler makes exactly as many batches per epoch, hence the same mean audio per step;
* no evaluation and no checkpoint during the run (ours evaluates and checkpoints once after the last
  step, outside the clock); the reference's default ``save_steps=500`` is turned off.

Clock: a global ``torch.optim`` step hook stamps every optimizer step on both sides; the speed is the real
(unpadded) audio of steps ``--skip-steps``+1 .. N over the wall time between those stamps, so start-up
and the first steps' one-off costs are left out on both sides alike. Ours computes its features inside
that window (on the fly, in the loop or its DataLoader workers); the reference computed them beforehand.

Scoring: both final models are loaded the same way (``load_ctc_model``) and every dev clip is decoded
alone (batch 1: no padding), greedy, scored by ``w2vbert_asr.evaluate.score`` with the project's
normaliser. The reference script's own metric decodes padding frames and is never used.

Each run is its own subprocess with ``--threads`` threads. A round runs every variant once, ours and the
reference interleaved (ours-1, reference-1, ours-2, reference-2, ...), and every other round runs them in
the reverse order, so a pair's two runs are neighbours in time; the medians over ``--repeats`` rounds are
reported, each ratio with the spread of its per-round ratios, and the load average before every run
(``os.getloadavg``). Runs on a shared machine are noisy: compare only within one invocation.

Training seeds: by default every run trains with ``--seed`` (the reference is then deterministic: the
same CER every time). ``--train-seeds`` gives each round its own training seed, used by every run of the
round (``TrainingArguments.seed``: the reference's shuffling, SpecAugment masks and dropout; ours: the
``seed`` key), while the init stays the one ``--seed`` made. A dev set of 40 clips scores one character
as ~0.15 CER points, so a single pair cannot tell two loops' accuracy apart; over several seeds the
benchmark reports the mean dev CER of each side and the mean paired gap with its spread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install

SAMPLING_RATE = 16_000
IGNORE_INDEX = -100  # label padding that the CTC loss ignores
# Mid-size: between the tiny test model and the 600M one, large enough for matrix multiplies to dominate.
ARCHITECTURES = {
    "tiny": None,  # conf/model/tiny.yaml as it is
    "mid": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 2048,
            "output_hidden_size": 512},
}


# ---------------------------------------------------------------------------------------------- setup
def base_overrides(args, work: Path) -> list[str]:
    """The demo recipe with the corpus in the work dir (so the prepared-data fingerprint is shared)."""
    return ["recipe=demo", f"data.root={work / 'corpus'}", f"seed={args.seed}"]


def model_overrides(init_dir: Path) -> list[str]:
    return [f"model.name_or_path={init_dir}", "model.architecture=null", "model.attn_implementation=eager"]


def weights_sha256(model) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prepare_work(args, work: Path) -> dict:
    """Synthesise + prepare the demo corpus, save the shared init, pick our max_batch_seconds. Cached."""
    import numpy as np
    from omegaconf import OmegaConf

    from w2vbert_asr.batching import DurationBatchSampler
    from w2vbert_asr.cli import compose
    from w2vbert_asr.prepare import PROCESSOR, prepare
    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.model import build_model
    from w2vbert_asr.synth import synth
    from transformers import Wav2Vec2BertProcessor
    from accelerate.utils import set_seed

    data_dir = work / "data"
    init_dir = work / f"init-{args.arch}-seed{args.seed}"
    cfg = compose(base_overrides(args, work) + model_overrides(init_dir) + [f"output_dir={data_dir}"])
    if not (work / "corpus" / "train.tsv").is_file():
        synth(cfg)
    prepare(cfg)
    processor = Wav2Vec2BertProcessor.from_pretrained(data_dir / PROCESSOR)
    if not (init_dir / "model.safetensors").is_file():
        tiny = compose(base_overrides(args, work))  # recipe=demo -> model=tiny
        model_cfg = OmegaConf.create(OmegaConf.to_container(tiny.model, resolve=True))
        if ARCHITECTURES[args.arch]:
            model_cfg.architecture.update(ARCHITECTURES[args.arch])
        set_seed(args.seed)
        model = build_model(model_cfg, processor.tokenizer)
        tmp = init_dir.with_name(init_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, init_dir)
    train = load_prepared(data_dir, "train")
    durations = np.asarray(train["duration"], dtype=np.float64)
    hf_steps_per_epoch = -(-len(durations) // args.hf_batch_size)  # Trainer keeps the last partial batch
    # Our sampler's batch count falls as max_batch_seconds grows; take the middle of the range of caps
    # that gives exactly the reference's batch count per epoch (same mean audio per step).
    caps = [c / 10 for c in range(100, 2001)]
    fits = [c for c in caps if len(DurationBatchSampler(durations, c, args.max_batch_size, seed=args.seed))
            == hf_steps_per_epoch]
    if not fits:
        raise SystemExit(f"no max_batch_seconds in 10-200 s gives {hf_steps_per_epoch} batches per epoch")
    max_batch_seconds = fits[len(fits) // 2]
    feats_dir = work / "reference-features"
    if not (feats_dir / "dataset_info.json").is_file():
        _reference_features(train, processor, feats_dir)
    return {"data_dir": str(data_dir), "init_dir": str(init_dir), "max_batch_seconds": max_batch_seconds,
            "hf_steps_per_epoch": hf_steps_per_epoch, "train_clips": len(durations),
            "train_seconds": float(durations.sum()), "features_dir": str(feats_dir),
            "eval_split": cfg.data.eval_split}


def _reference_features(train, processor, out: Path) -> None:
    """The reference's preprocessing: features and label ids per clip, computed once before training."""
    from w2vbert_asr.audio import to_float

    fe, tok = processor.feature_extractor, processor.tokenizer

    def featurize(example):
        feats = fe(to_float(example["audio"]), sampling_rate=SAMPLING_RATE).input_features[0]  # int16 PCM -> float
        return {"input_features": feats, "input_length": len(example["audio"]),
                "labels": tok(str(example["text"])).input_ids, "seconds": float(example["duration"])}

    ds = train.with_format(None).map(featurize, remove_columns=train.column_names, desc="reference features")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------- one run
def _stamp_steps() -> list[float]:
    """Wall-clock time after every optimizer step of any torch optimizer in this process."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    cuda = torch.cuda.is_available()

    def stamp(*_):
        if cuda:  # the step's kernels finished, not just queued (both sides alike)
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(stamp)
    return stamps


class PaddingCTCCollator:
    """Reference side: examples -> input_features (B, T, 160) padded with the extractor's padding value,
    attention_mask (B, T), labels (B, L) padded with -100. Also records each batch's real audio seconds
    for the clock (a dictionary lookup; the model never sees it).

    processor: pad as the script's ``DataCollatorCTCWithPadding`` does, through ``processor.pad`` (the feature
    extractor's numpy padding of the python lists, the tokenizer's padding of the labels); without one, the
    same tensors are built with torch (tests)."""

    def __init__(self, padding_value: float, seconds_of: dict, processor=None):
        self.padding_value = padding_value
        self.seconds_of = seconds_of
        self.processor = processor
        self.batch_seconds: list[float] = []

    def __call__(self, examples: list[dict]) -> dict:
        self.batch_seconds.append(sum(self.seconds_of[(len(e["input_features"]), tuple(e["labels"]))] for e in examples))
        if self.processor is not None:
            return self._processor_pad(examples)
        import torch

        feats = [torch.as_tensor(e["input_features"], dtype=torch.float32) for e in examples]
        labels = [list(e["labels"]) for e in examples]
        b, t = len(feats), max(f.shape[0] for f in feats)
        x = torch.full((b, t, feats[0].shape[1]), self.padding_value)
        mask = torch.zeros(b, t, dtype=torch.long)
        y = torch.full((b, max(map(len, labels))), IGNORE_INDEX, dtype=torch.long)
        for i, (f, ids) in enumerate(zip(feats, labels)):
            x[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
            y[i, : len(ids)] = torch.tensor(ids)
        return {"input_features": x, "attention_mask": mask, "labels": y}

    def _processor_pad(self, examples: list[dict]) -> dict:
        import torch

        batch = self.processor.pad([{"input_features": e["input_features"]} for e in examples], padding="longest",
                                   return_tensors="pt")
        labels = self.processor.pad(labels=[{"input_ids": e["labels"]} for e in examples], padding="longest",
                                    return_tensors="pt")
        return {"input_features": batch["input_features"], "attention_mask": batch["attention_mask"].to(torch.long),
                "labels": labels["input_ids"].masked_fill(labels.attention_mask.ne(1), IGNORE_INDEX)}


REFERENCE_PRECISIONS = ("fp32", "bf16", "fp16")
OURS_PRECISIONS = ("no", "bf16", "fp16", "auto")  # train.mixed_precision


def reference_training_args(args, tcfg, run_dir: Path, precision: str):
    """The reference's ``TrainingArguments``: the demo recipe's hyperparameters, the script's defaults for the
    rest (the optimizer too, unless --reference-optim), and `precision` as ``--bf16/--fp16 True`` would set it."""
    from transformers import TrainingArguments

    if precision not in REFERENCE_PRECISIONS:
        raise SystemExit(f"reference precision {precision!r}: use one of {', '.join(REFERENCE_PRECISIONS)}")
    optim = {"optim": args.reference_optim} if args.reference_optim else {}
    return TrainingArguments(
        output_dir=str(run_dir / "trainer"),
        per_device_train_batch_size=args.hf_batch_size,
        train_sampling_strategy="group_by_length",
        length_column_name="input_length",
        max_steps=args.steps,
        learning_rate=tcfg.learning_rate,
        warmup_steps=tcfg.warmup_steps,
        lr_scheduler_type=tcfg.lr_scheduler,
        weight_decay=tcfg.weight_decay,
        adam_beta1=tcfg.adam_betas[0],
        adam_beta2=tcfg.adam_betas[1],
        adam_epsilon=tcfg.adam_eps,
        max_grad_norm=tcfg.max_grad_norm,
        seed=_train_seed(args),
        use_cpu=args.device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        save_strategy="no",        # matched: no checkpoint inside the clock on either side
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **optim,
    )


def run_reference(args, setup: dict, run_dir: Path) -> dict:
    import datasets
    import torch
    from transformers import Trainer, Wav2Vec2BertForCTC, Wav2Vec2BertProcessor

    from w2vbert_asr.cli import compose

    cfg = compose(base_overrides(args, Path(args.work_dir)))
    processor = Wav2Vec2BertProcessor.from_pretrained(Path(setup["data_dir"]) / "processor")
    attn = {"attn_implementation": args.reference_attn} if args.reference_attn else {}  # else transformers' default
    model = Wav2Vec2BertForCTC.from_pretrained(setup["init_dir"], use_safetensors=True, **attn)
    sha = weights_sha256(model)
    train = datasets.load_from_disk(setup["features_dir"])
    seconds_of = {(len(f), tuple(ids)): s for f, ids, s in zip(train["input_features"], train["labels"], train["seconds"])}
    collator = PaddingCTCCollator(processor.feature_extractor.padding_value, seconds_of, processor)
    targs = reference_training_args(args, cfg.train, run_dir, args.precision)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                      processing_class=processor.feature_extractor)
    stamps = _stamp_steps()
    trainer.train()
    model_dir = run_dir / "model"
    trainer.model.save_pretrained(model_dir, safe_serialization=True)
    processor.save_pretrained(model_dir)
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return {"stamps": stamps, "step_seconds": collator.batch_seconds[: len(stamps)], "init_sha256": sha,
            "model_dir": str(model_dir), "torch_threads": torch.get_num_threads(),
            "optimizer": f"{targs.optim.value} ({type(optimizer).__name__}, fused={optimizer.defaults.get('fused')})",
            "mixed_precision": args.precision, "attn_implementation": model.config._attn_implementation}


def _train_seed(args) -> int:
    return args.seed if args.train_seed is None else args.train_seed


def run_ours(args, setup: dict, run_dir: Path) -> dict:
    import numpy as np
    import torch

    from w2vbert_asr.batching import DurationBatchSampler
    from w2vbert_asr.cli import compose
    from w2vbert_asr.devices import resolve_mixed_precision
    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.model import build_model
    from w2vbert_asr.train import train
    from transformers import Wav2Vec2BertProcessor

    run_dir.mkdir(parents=True, exist_ok=True)
    # The prepared data is the shared one (same fingerprint): link it instead of preparing again.
    for name in ("prepared", "processor", "prepare_report.json"):
        src, dst = Path(setup["data_dir"]) / name, run_dir / name
        if not dst.exists():
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    cfg = compose(base_overrides(args, Path(args.work_dir)) + model_overrides(Path(setup["init_dir"])) + [
        f"output_dir={run_dir}", f"train.max_steps={args.steps}", f"train.eval_steps={args.steps}",
        f"train.max_batch_seconds={setup['max_batch_seconds']}", f"train.max_batch_size={args.max_batch_size}",
        "train.save_total_limit=1", f"seed={_train_seed(args)}", f"train.mixed_precision={args.precision}",
        *args.ours])
    processor = Wav2Vec2BertProcessor.from_pretrained(run_dir / "processor")
    sha = weights_sha256(build_model(cfg.model, processor.tokenizer))  # the path train() loads the init by
    # Real audio of every step, replayed from the (deterministic) sampler the loop uses.
    durations = np.asarray(load_prepared(run_dir, "train")["duration"], dtype=np.float64)
    sampler = DurationBatchSampler(durations, cfg.train.max_batch_seconds, cfg.train.max_batch_size, seed=cfg.seed)
    step_seconds, epoch = [], 0
    while len(step_seconds) < args.steps:
        step_seconds += [float(durations[b].sum()) for b in sampler.rank_batches(epoch)]
        epoch += 1
    stamps = _stamp_steps()
    train(cfg)
    return {"stamps": stamps[: args.steps], "step_seconds": step_seconds[: args.steps], "init_sha256": sha,
            "model_dir": str(run_dir / "model"), "torch_threads": torch.get_num_threads(),
            "optimizer": f"AdamW (train.adamw_impl={cfg.train.adamw_impl})",
            "attn_implementation": cfg.model.attn_implementation,
            "mixed_precision": resolve_mixed_precision(cfg.train.mixed_precision)}


def score_dev(model_dir: str, setup: dict) -> dict:
    """Greedy decoding of every dev clip alone; WER/CER by the project's scorer."""
    import torch
    from transformers import Wav2Vec2BertProcessor

    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.evaluate import decode_dataset, greedy_decoder, score
    from w2vbert_asr.features import BatchFeatureExtractor
    from w2vbert_asr.model import load_ctc_model
    from w2vbert_asr.text import Normalizer

    data_dir = Path(setup["data_dir"])
    processor = Wav2Vec2BertProcessor.from_pretrained(data_dir / "processor")
    normalizer = Normalizer.load(data_dir / "processor")
    dev = load_prepared(data_dir, setup["eval_split"])
    model = load_ctc_model(model_dir)
    featurizer = BatchFeatureExtractor.from_hf(processor.feature_extractor)
    hyps, _ = decode_dataset(model, dev, featurizer, greedy_decoder(processor.tokenizer), torch.device("cpu"),
                             max_batch_seconds=1e9, max_batch_size=1)
    metrics, _ = score(dev, hyps, normalizer)
    return {"wer": metrics["wer"], "cer": metrics["cer"], "utterances": metrics["utterances"]}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    setup = json.loads(Path(args.work_dir, f"setup-{args.arch}.json").read_text())
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    result = (run_ours if args.child == "ours" else run_reference)(args, setup, run_dir)
    result["dev"] = score_dev(result["model_dir"], setup)
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ parent
def speed(result: dict, skip: int) -> dict:
    stamps, secs = result["stamps"], result["step_seconds"]
    if len(stamps) <= skip + 1:
        raise SystemExit(f"only {len(stamps)} optimizer steps stamped; need more than --skip-steps {skip} + 1")
    wall = stamps[-1] - stamps[skip - 1] if skip else stamps[-1] - stamps[0]
    audio = sum(secs[skip: len(stamps)]) if skip else sum(secs[1: len(stamps)])
    return {"audio_s_per_s": audio / wall, "wall_s": wall, "audio_s": audio, "steps": len(stamps),
            "audio_per_step": sum(secs[: len(stamps)]) / len(stamps)}


def run_child(side: str, precision: str, args, argv_extra: list[str], repeat: int, train_seed: int) -> dict:
    work = Path(args.work_dir)
    name = f"{args.arch}-{side}-{precision}-{repeat}"
    run_dir = work / "runs" / name
    result_file = work / "runs" / f"{name}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--precision", precision,
           "--run-dir", str(run_dir), "--result", str(result_file), "--train-seed", str(train_seed), *argv_extra]
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both sides on the CPU even where a GPU is present
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
    log_file = work / "runs" / f"{name}.log"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_file, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"{side} {precision} run {repeat} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    result = json.loads(result_file.read_text())
    result.update(speed(result, args.skip_steps))
    result.update(total_wall_s=time.perf_counter() - t0, train_seed=train_seed, side=side, precision=precision,
                  load_before=load_before, load_after=os.getloadavg()[0])
    return result


def round_order(variants: list[tuple[str, str]], repeat: int) -> list[tuple[str, str]]:
    """One round's run order: ours and reference variants interleaved (o1, r1, o2, r2, ...; the longer list's
    rest at the end), reversed in odd rounds, so each (ours, reference) pair runs close together in time."""
    ours = [v for v in variants if v[0] == "ours"]
    ref = [v for v in variants if v[0] == "reference"]
    order = [v for k in range(max(len(ours), len(ref))) for v in (ours[k: k + 1] + ref[k: k + 1])]
    return order if repeat % 2 == 0 else order[::-1]


def _label(variant: tuple[str, str]) -> str:
    side, precision = variant
    return f"{side} {'fp32' if precision == 'no' else precision}"


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(values[0]) if len(values) == 1 else f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def pair_command(args, ours_precision: str, reference_precision: str) -> str:
    """The command that reruns one (ours, reference) precision pair with this invocation's other settings."""
    argv = ["--arch", args.arch, "--steps", str(args.steps), "--repeats", str(args.repeats),
            "--threads", str(args.threads), "--ours-precisions", ours_precision,
            "--reference-precisions", reference_precision]
    if args.skip_steps != 20:
        argv += ["--skip-steps", str(args.skip_steps)]
    if args.device != "cpu":
        argv += ["--device", args.device]
    if args.train_seeds:
        argv += ["--train-seeds", *map(str, args.train_seeds)]
    if args.reference_optim:
        argv += ["--reference-optim", args.reference_optim]
    if args.reference_attn:
        argv += ["--reference-attn", args.reference_attn]
    if args.ours:
        argv += ["--ours", *args.ours]
    return "python benchmarks/train_vs_reference.py " + shlex.join(argv)


def _split_precision_overrides(ours: list[str]) -> tuple[list[str], str | None]:
    """--ours overrides without train.mixed_precision, and the precision they set (None if none)."""
    rest, precision = [], None
    for item in ours:
        key, _, value = item.partition("=")
        if key.lstrip("+") == "train.mixed_precision":
            precision = value
        else:
            rest.append(item)
    return rest, precision


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (the demo recipe's 600)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds; each runs every variant once, alternated; medians are reported")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of every run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides train")
    p.add_argument("--ours-precisions", nargs="+", choices=OURS_PRECISIONS,
                   help="train.mixed_precision of our runs (no = fp32); default: no bf16, or the value of a "
                        "train.mixed_precision=... in --ours")
    p.add_argument("--reference-precisions", nargs="+", choices=REFERENCE_PRECISIONS, default=["fp32", "bf16"],
                   help="the reference's precision: fp32 (the script's default), bf16 / fp16 (TrainingArguments "
                        "bf16=True / fp16=True, plus use_cpu=True on the CPU)")
    p.add_argument("--reference-optim",
                   help="TrainingArguments.optim of the reference; default: TrainingArguments' own default, as the "
                        "script (adamw_torch_fused with torch >= 2.8); adamw_torch = the for-loop AdamW")
    p.add_argument("--reference-attn", choices=["eager", "sdpa"],
                   help="attn_implementation of the reference; default: transformers' default, as the script (sdpa)")
    p.add_argument("--hf-batch-size", type=int, default=19, help="the reference's clips per step")
    p.add_argument("--max-batch-size", type=int, default=32, help="our cap on clips per batch")
    p.add_argument("--skip-steps", type=int, default=20, help="first steps left out of the clock on both sides")
    p.add_argument("--seed", type=int, default=42, help="the shared init, and the training seed unless --train-seeds")
    p.add_argument("--train-seeds", type=int, nargs="+",
                   help="training seed of each round (every run of it), cycled over --repeats; the init stays --seed's")
    p.add_argument("--train-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default=str(REPO / "outputs" / "bench" / "train_vs_reference"),
                   help="corpus, prepared data, init weights and runs (cached between invocations)")
    p.add_argument("--ours", nargs="*", default=[], help="extra config overrides for our side, e.g. train.adamw_impl=for_loop")
    p.add_argument("--only", choices=["ours", "reference"], help="run one side only (no ratio)")
    p.add_argument("--json", help="also write every figure here")
    p.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    args.ours, ours_mp = _split_precision_overrides(args.ours)
    if args.ours_precisions and ours_mp:
        raise SystemExit(f"--ours train.mixed_precision={ours_mp} and --ours-precisions: give the precision once")
    ours_precisions = args.ours_precisions or ([ours_mp] if ours_mp else ["no", "bf16"])
    if ours_mp and ours_mp not in OURS_PRECISIONS:
        raise SystemExit(f"train.mixed_precision={ours_mp}: use one of {', '.join(OURS_PRECISIONS)}")
    args.ours_precisions = list(dict.fromkeys(ours_precisions))
    args.reference_precisions = list(dict.fromkeys(args.reference_precisions))

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"preparing {work} (synthetic demo corpus, shared {args.arch} init, reference features; cached)")
    setup = prepare_work(args, work)
    (work / f"setup-{args.arch}.json").write_text(json.dumps(setup))
    print(f"train split: {setup['train_clips']} clips, {setup['train_seconds']:.1f} s; reference batch "
          f"{args.hf_batch_size} -> {setup['hf_steps_per_epoch']} steps/epoch, "
          f"{setup['train_seconds'] / setup['hf_steps_per_epoch']:.1f} s of audio per step; ours "
          f"max_batch_seconds {setup['max_batch_seconds']:g} -> same steps/epoch")
    passthrough = ["--arch", args.arch, "--steps", str(args.steps), "--threads", str(args.threads),
                   "--hf-batch-size", str(args.hf_batch_size), "--max-batch-size", str(args.max_batch_size),
                   "--seed", str(args.seed), "--work-dir", str(work), "--device", args.device]
    if args.reference_optim:
        passthrough += ["--reference-optim", args.reference_optim]
    if args.reference_attn:
        passthrough += ["--reference-attn", args.reference_attn]
    if args.ours:
        passthrough += ["--ours", *args.ours]
    variants = [("ours", x) for x in args.ours_precisions] * (args.only != "reference") + \
        [("reference", x) for x in args.reference_precisions] * (args.only != "ours")
    runs: dict[str, list[dict]] = {_label(v): [] for v in variants}
    seeds = args.train_seeds or [args.seed]
    print(f"{os.cpu_count()} CPUs, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) "
          f"at the start; {args.repeats} rounds of {', '.join(map(_label, variants))}")
    for r in range(args.repeats):
        train_seed = seeds[r % len(seeds)]
        for variant in round_order(variants, r):
            res = run_child(*variant, args, passthrough, r, train_seed)
            runs[_label(variant)].append(res)
            print(f"  round {r + 1} (seed {train_seed}) {_label(variant):<15}: {res['audio_s_per_s']:7.1f} audio-s/s "
                  f"over steps {args.skip_steps + 1}-{res['steps']} ({res['wall_s']:.1f} s, {res['audio_per_step']:.1f} s "
                  f"audio/step; load {res['load_before']:.1f} -> {res['load_after']:.1f}); dev WER "
                  f"{100 * res['dev']['wer']:.2f} % CER {100 * res['dev']['cer']:.2f} %; init {res['init_sha256'][:12]}; "
                  f"{res.get('optimizer', '')}, attention {res.get('attn_implementation', '?')}")
    hashes = {r["init_sha256"] for rs in runs.values() for r in rs}
    loads = [x for rs in runs.values() for r in rs for x in (r["load_before"], r["load_after"])]
    summary = {"arch": args.arch, "steps": args.steps, "threads": args.threads, "setup": setup,
               "init_identical": len(hashes) == 1, "runs": runs, "cpus": os.cpu_count(),
               "load_average_range": [min(loads), max(loads)]}
    print(f"\ninit weights identical in every run: {len(hashes) == 1} (sha256 {sorted(hashes)[0][:16]}...); "
          f"1-min load average {min(loads):.1f}-{max(loads):.1f} over the runs ({os.cpu_count()} CPUs)")
    print(f"| run | audio-s/s (median of {args.repeats}; range) | audio/step | dev WER | dev CER | optimizer |")
    print("|---|---|---|---|---|---|")
    med = {}
    for label, rs in runs.items():
        speeds = [r["audio_s_per_s"] for r in rs]
        med[label] = {"audio_s_per_s": statistics.median(speeds), "range": [min(speeds), max(speeds)],
                      "audio_per_step": statistics.median(r["audio_per_step"] for r in rs)}
        med[label].update({k: statistics.median(r["dev"][k] for r in rs) for k in ("wer", "cer")})
        print(f"| {label} | {med[label]['audio_s_per_s']:.1f} ({_spread(speeds, '{:.1f}')}) | "
              f"{med[label]['audio_per_step']:.1f} s | {100 * med[label]['wer']:.2f} % | {100 * med[label]['cer']:.2f} % | "
              f"{rs[0].get('optimizer', '')} |")
    summary["median"] = med
    pairs = []
    if not args.only:
        print("\n| ours | reference | ours / reference (ratio of medians) | per round | dev CER ours - reference | command |")
        print("|---|---|---|---|---|---|")
        for op in args.ours_precisions:
            for rp in args.reference_precisions:
                o, h = runs[_label(("ours", op))], runs[_label(("reference", rp))]
                ratio = med[_label(("ours", op))]["audio_s_per_s"] / med[_label(("reference", rp))]["audio_s_per_s"]
                per_round = [a["audio_s_per_s"] / b["audio_s_per_s"] for a, b in zip(o, h)]
                gaps = [100 * (a["dev"]["cer"] - b["dev"]["cer"]) for a, b in zip(o, h)]
                pair = {"ours": op, "reference": rp, "ratio": ratio, "pair_ratios": per_round,
                        "cer_gap_points": 100 * (med[_label(("ours", op))]["cer"] - med[_label(("reference", rp))]["cer"]),
                        "seed_cer_gaps_points": gaps, "command": pair_command(args, op, rp)}
                if len(set(seeds[: args.repeats])) > 1:
                    pair.update(mean_cer_gap_points=statistics.fmean(gaps),
                                mean_cer_gap_sem=statistics.stdev(gaps) / len(gaps) ** 0.5)
                pairs.append(pair)
                gap = (f"{pair['mean_cer_gap_points']:+.2f} points (mean over seeds, standard error "
                       f"{pair['mean_cer_gap_sem']:.2f})" if "mean_cer_gap_points" in pair
                       else f"{pair['cer_gap_points']:+.2f} points")
                print(f"| {_label(('ours', op))} | {_label(('reference', rp))} | **{ratio:.2f}x** | "
                      f"{_spread(per_round)}x | {gap} | `{pair['command']}` |")
    summary["pairs"] = pairs
    command = "python benchmarks/train_vs_reference.py " + shlex.join(argv)
    print(f"command: {command.strip()}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
