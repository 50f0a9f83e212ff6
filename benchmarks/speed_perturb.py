"""What speed perturbation (and added noise) costs per training step: the loop's own data loading and train_step,
plain against perturbed, on the same prepared demo data, alternating in one process.

Every variant runs `train.setup` on a copy of a prepared run (the demo recipe, train.num_workers=0, so loading
is on the step's critical path: the worst case) and times, per optimizer step, reading + collating the batch
(where the resampling and the noise happen) and `train_step` (features, forward, backward, optimizer).

Usage:
    w2vbert-asr synth recipe=demo output_dir=demo_out && w2vbert-asr prepare recipe=demo output_dir=demo_out
    python benchmarks/speed_perturb.py --run demo_out --steps 40 --repeats 3     # --corpus: another release folder
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"plain": [], "speed": ["train.speed_perturb=[0.9,1.0,1.1]"],
            "speed+noise": ["train.speed_perturb=[0.9,1.0,1.1]", "train.noise_prob=1.0"]}


def _noise_folder(root: Path) -> Path:
    import soundfile as sf

    folder = root / "noise"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # 30 s of coloured noise at 44.1 kHz per file: read a stretch at a time, resampled
        x = np.cumsum(rng.standard_normal(44_100 * 30)).astype(np.float32)
        sf.write(folder / f"noise{i}.wav", (x - x.mean()) / (np.abs(x).max() + 1e-9) * 0.3, 44_100)
    return folder


def measure(run: Path, corpus: Path, work: Path, variant: str, steps: int, noise: Path) -> dict:
    from w2vbert_asr.cli import compose
    from w2vbert_asr.devices import own_accelerator_state
    from w2vbert_asr.perturb import set_epoch
    from w2vbert_asr.train import TrainHooks, make_accelerator, setup, train_step

    out = work / variant
    if not out.exists():
        shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", "model", "tensorboard", "audit*"))
    overrides = ["recipe=demo", f"output_dir={out}", f"data.root={corpus}", "train.num_workers=0",
                 "train.log_with=none", *VARIANTS[variant]]
    if "noise" in variant:
        overrides.append(f"train.noise_dir={noise}")
    cfg = compose(overrides)
    with own_accelerator_state():
        accelerator = make_accelerator(cfg)
        s = setup(cfg, accelerator, TrainHooks())
        epoch, batches = 0, iter(s.loader)
        load, step = [], []
        while len(step) < steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:  # the plain epoch is a third of the perturbed one: go on into the next
                epoch += 1
                s.sampler.set_epoch(epoch)
                set_epoch(s.loader.dataset, epoch)
                batches = iter(s.loader)
                continue
            t1 = time.perf_counter()
            train_step(accelerator, s.model, s.optimizer, s.scheduler, [batch], s.featurizer, cfg.train.max_grad_norm)
            load.append(t1 - t0)
            step.append(time.perf_counter() - t1)
    return {"load": statistics.median(load), "step": statistics.median(step), "load_mean": statistics.fmean(load),
            "step_mean": statistics.fmean(step)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a prepared demo run folder")
    ap.add_argument("--corpus", type=Path, help="its release (default: <run>/corpus)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        noise = _noise_folder(work)
        results = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for variant in VARIANTS:
                results[variant].append(measure(args.run, args.corpus or args.run / "corpus", work, variant,
                                                args.steps, noise))
                m = results[variant][-1]
                print(f"repeat {r + 1} {variant:<12} load {1000 * m['load_mean']:7.1f} ms  step {1000 * m['step_mean']:7.1f}"
                      f" ms (means of {args.steps} steps)", flush=True)
    plain = results["plain"]
    base_load = statistics.fmean(m["load_mean"] for m in plain)
    base_step = statistics.fmean(m["load_mean"] + m["step_mean"] for m in plain)
    print(f"\n{'variant':<12}{'load ms':>9}{'train_step ms':>15}{'extra load / plain step':>26}")
    for variant, ms in results.items():
        load = statistics.fmean(m["load_mean"] for m in ms)
        step = statistics.fmean(m["step_mean"] for m in ms)
        print(f"{variant:<12}{1000 * load:>9.1f}{1000 * step:>15.1f}{100 * (load - base_load) / base_step:>25.1f}%")


if __name__ == "__main__":
    main()
