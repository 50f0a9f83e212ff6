"""Training speed and accuracy: our accelerate loop vs transformers' Trainer set up as the reference script.

Usage:
    python benchmarks/train_vs_reference.py                             # tiny model, 600 steps, 2 alternated pairs
    python benchmarks/train_vs_reference.py --arch mid --steps 60       # hidden 512, 8 layers: speed only
    python benchmarks/train_vs_reference.py --steps 40 --repeats 1      # quick look
    python benchmarks/train_vs_reference.py --ours train.mixed_precision=bf16   # our side with other settings
    python benchmarks/train_vs_reference.py --json out.json             # also save every figure
    python benchmarks/train_vs_reference.py --repeats 3 --train-seeds 42 1 2   # one training seed per pair

The reference is ``examples/pytorch/speech-recognition/run_speech_recognition_ctc.py`` as a blog reader runs
it, rebuilt here from its documented behaviour (the script is not copied): input features computed once
before training by the processor's ``SeamlessM4TFeatureExtractor`` (``datasets.map``, untimed, the dataset
left in its default python format as the script leaves it), a padding CTC collator (ours: features padded
with the extractor's padding value, an attention mask, labels padded with -100), and ``Trainer`` with
``train_sampling_strategy="group_by_length"``, ``optim="adamw_torch"``, eager attention and the
script's/``TrainingArguments``' defaults for everything below that is not matched on purpose.

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

Each run is its own subprocess with ``--threads`` threads; the order alternates over ``--repeats`` pairs
(ours first in even pairs) and the medians are reported. Runs on a shared machine are noisy: read the
ratio.

Training seeds: by default every run trains with ``--seed`` (the reference is then deterministic: the
same CER every time). ``--train-seeds`` gives each pair its own training seed, used by both sides of the
pair (``TrainingArguments.seed``: the reference's shuffling, SpecAugment masks and dropout; ours: the
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
    from w2vbert_asr.data import PROCESSOR, load_prepared, prepare
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
    from w2vbert_asr.data import to_float

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
    for the clock (a dictionary lookup; the model never sees it)."""

    def __init__(self, padding_value: float, seconds_of: dict):
        self.padding_value = padding_value
        self.seconds_of = seconds_of
        self.batch_seconds: list[float] = []

    def __call__(self, examples: list[dict]) -> dict:
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
        self.batch_seconds.append(sum(self.seconds_of[(f.shape[0], tuple(ids))] for f, ids in zip(feats, labels)))
        return {"input_features": x, "attention_mask": mask, "labels": y}


def run_reference(args, setup: dict, run_dir: Path) -> dict:
    import datasets
    import torch
    from transformers import Trainer, TrainingArguments, Wav2Vec2BertForCTC, Wav2Vec2BertProcessor

    from w2vbert_asr.cli import compose

    cfg = compose(base_overrides(args, Path(args.work_dir)))
    tcfg = cfg.train
    processor = Wav2Vec2BertProcessor.from_pretrained(Path(setup["data_dir"]) / "processor")
    model = Wav2Vec2BertForCTC.from_pretrained(setup["init_dir"], attn_implementation="eager", use_safetensors=True)
    sha = weights_sha256(model)
    train = datasets.load_from_disk(setup["features_dir"])
    seconds_of = {(len(f), tuple(ids)): s for f, ids, s in zip(train["input_features"], train["labels"], train["seconds"])}
    collator = PaddingCTCCollator(processor.feature_extractor.padding_value, seconds_of)
    targs = TrainingArguments(
        output_dir=str(run_dir / "trainer"),
        per_device_train_batch_size=args.hf_batch_size,
        train_sampling_strategy="group_by_length",
        length_column_name="input_length",
        optim="adamw_torch",
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
        save_strategy="no",        # matched: no checkpoint inside the clock on either side
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                      processing_class=processor.feature_extractor)
    stamps = _stamp_steps()
    trainer.train()
    model_dir = run_dir / "model"
    trainer.model.save_pretrained(model_dir, safe_serialization=True)
    processor.save_pretrained(model_dir)
    return {"stamps": stamps, "step_seconds": collator.batch_seconds[: len(stamps)], "init_sha256": sha,
            "model_dir": str(model_dir), "torch_threads": torch.get_num_threads()}


def _train_seed(args) -> int:
    return args.seed if args.train_seed is None else args.train_seed


def run_ours(args, setup: dict, run_dir: Path) -> dict:
    import numpy as np
    import torch

    from w2vbert_asr.batching import DurationBatchSampler
    from w2vbert_asr.cli import compose
    from w2vbert_asr.data import load_prepared
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
        "train.save_total_limit=1", f"seed={_train_seed(args)}", *args.ours])
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
            "model_dir": str(run_dir / "model"), "torch_threads": torch.get_num_threads()}


def score_dev(model_dir: str, setup: dict) -> dict:
    """Greedy decoding of every dev clip alone; WER/CER by the project's scorer."""
    import torch
    from transformers import Wav2Vec2BertProcessor

    from w2vbert_asr.data import load_prepared
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


def run_child(side: str, args, argv_extra: list[str], repeat: int, train_seed: int) -> dict:
    work = Path(args.work_dir)
    run_dir = work / "runs" / f"{args.arch}-{side}-{repeat}"
    result_file = work / "runs" / f"{args.arch}-{side}-{repeat}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--run-dir", str(run_dir),
           "--result", str(result_file), "--train-seed", str(train_seed), *argv_extra]
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both sides on the CPU even where a GPU is present
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
    log_file = work / "runs" / f"{args.arch}-{side}-{repeat}.log"
    t0 = time.perf_counter()
    with open(log_file, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"{side} run {repeat} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    result = json.loads(result_file.read_text())
    result.update(speed(result, args.skip_steps))
    result["total_wall_s"] = time.perf_counter() - t0
    result["train_seed"] = train_seed
    return result


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (the demo recipe's 600)")
    p.add_argument("--repeats", type=int, default=2, help="alternated pairs of runs; medians are reported")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of every run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both sides train (ours: accelerate's choice with the YAML's mixed_precision; "
                        "the reference: fp32, as the script's defaults)")
    p.add_argument("--hf-batch-size", type=int, default=19, help="the reference's clips per step")
    p.add_argument("--max-batch-size", type=int, default=32, help="our cap on clips per batch")
    p.add_argument("--skip-steps", type=int, default=20, help="first steps left out of the clock on both sides")
    p.add_argument("--seed", type=int, default=42, help="the shared init, and the training seed unless --train-seeds")
    p.add_argument("--train-seeds", type=int, nargs="+",
                   help="training seed of each pair (both sides), cycled over --repeats; the init stays --seed's")
    p.add_argument("--train-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default=str(REPO / "outputs" / "bench" / "train_vs_reference"),
                   help="corpus, prepared data, init weights and runs (cached between invocations)")
    p.add_argument("--ours", nargs="*", default=[], help="extra config overrides for our side, e.g. train.mixed_precision=bf16")
    p.add_argument("--only", choices=["ours", "reference"], help="run one side only (no ratio)")
    p.add_argument("--json", help="also write every figure here")
    p.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

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
    if args.ours:
        passthrough += ["--ours", *args.ours]
    sides = [args.only] if args.only else ["ours", "reference"]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    seeds = args.train_seeds or [args.seed]
    for r in range(args.repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        train_seed = seeds[r % len(seeds)]
        for side in order:
            res = run_child(side, args, passthrough, r, train_seed)
            runs[side].append(res)
            print(f"  pair {r + 1} (seed {train_seed}) {side:<9}: {res['audio_s_per_s']:7.1f} audio-s/s over steps {args.skip_steps + 1}-"
                  f"{res['steps']} ({res['wall_s']:.1f} s, {res['audio_per_step']:.1f} s audio/step); dev WER "
                  f"{100 * res['dev']['wer']:.2f} % CER {100 * res['dev']['cer']:.2f} %; init {res['init_sha256'][:12]}")
    hashes = {r["init_sha256"] for rs in runs.values() for r in rs}
    summary = {"arch": args.arch, "steps": args.steps, "threads": args.threads, "setup": setup,
               "init_identical": len(hashes) == 1, "runs": runs}
    print(f"\ninit weights identical on both sides: {len(hashes) == 1} (sha256 {sorted(hashes)[0][:16]}...)")
    print(f"| side | audio-s/s (median of {args.repeats}) | audio/step | dev WER | dev CER |")
    print("|---|---|---|---|---|")
    med = {}
    for side, rs in runs.items():
        med[side] = {k: statistics.median(r[k] for r in rs) for k in ("audio_s_per_s", "audio_per_step")}
        med[side].update({k: statistics.median(r["dev"][k] for r in rs) for k in ("wer", "cer")})
        print(f"| {side} | {med[side]['audio_s_per_s']:.1f} | {med[side]['audio_per_step']:.1f} s | "
              f"{100 * med[side]['wer']:.2f} % | {100 * med[side]['cer']:.2f} % |")
    summary["median"] = med
    if len(sides) == 2:
        ratio = med["ours"]["audio_s_per_s"] / med["reference"]["audio_s_per_s"]
        pair_ratios = [o["audio_s_per_s"] / h["audio_s_per_s"] for o, h in zip(runs["ours"], runs["reference"])]
        summary.update(ratio=ratio, pair_ratios=pair_ratios,
                       cer_gap_points=100 * (med["ours"]["cer"] - med["reference"]["cer"]))
        print(f"\nours / reference audio-s/s: {ratio:.2f}x (per pair: {', '.join(f'{x:.2f}x' for x in pair_ratios)}); "
              f"dev CER ours - reference (medians): {summary['cer_gap_points']:+.2f} points")
        if len(set(seeds[: args.repeats])) > 1:
            gaps = [100 * (o["dev"]["cer"] - h["dev"]["cer"]) for o, h in zip(runs["ours"], runs["reference"])]
            means = {side: 100 * statistics.fmean(r["dev"]["cer"] for r in runs[side]) for side in sides}
            spread = statistics.stdev(gaps) / len(gaps) ** 0.5
            summary.update(seed_cer_gaps_points=gaps, mean_cer_points=means,
                           mean_cer_gap_points=statistics.fmean(gaps), mean_cer_gap_sem=spread)
            print(f"over {len(gaps)} training seeds: mean dev CER ours {means['ours']:.2f} %, reference "
                  f"{means['reference']:.2f} %; paired gap per seed {', '.join(f'{g:+.2f}' for g in gaps)}: "
                  f"mean {statistics.fmean(gaps):+.2f} points (standard error {spread:.2f})")
    command = "python benchmarks/train_vs_reference.py " + shlex.join(argv)
    print(f"command: {command.strip()}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
