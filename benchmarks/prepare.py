"""`prepare` on a synthetic Common Voice release: parallel decoding, prepared bytes per audio hour, start-up.

Usage:
    python benchmarks/prepare.py                                   # 2,000 clips, num_proc 1 vs 2
    python benchmarks/prepare.py --corpus /tmp/cv2000 --clips 2000 --procs 1 2 --repeats 2

Prints, side by side in one run:

* clips/s and audio-hours per hour of `prepare` at each `--procs` value, timed in this process (imports,
  Hydra and the corpus synthesis excluded; processes, decoding, filtering, Arrow writing, processor and
  report included; best of `--repeats`, runs interleaved), the speed-up of the last over the first
  (target >= 1.8x at num_proc 2 on 2 free cores), and whether the outputs are byte-identical;
* bytes of prepared data per audio hour: int16 PCM (now) against float32 (before), the same clips;
* reading the prepared audio back for training: float32 file vs int16 file + `waves_of`, ms per 1,000 clips;
* what the int16 rounding does to the W2v-BERT features (`BatchFeatureExtractor`, per-utterance
  normalised): max abs difference on speech frames and on near-silent frames;
* the fixed start-up cost of a `w2vbert-asr prepare` command: a no-op run (data up to date) in a fresh
  process, and how much of it is the up-to-date check itself.

The corpus is synthesised with `w2vbert_asr.synth.synthesize_corpus` (`w2vbert-asr synth`) when `--corpus`
has no train.tsv (about 3.5 min per 1,000 clips on one core).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from w2vbert_asr.cli import compose  # noqa: E402
from w2vbert_asr.prepared import PREPARED, load_prepared  # noqa: E402
from w2vbert_asr.audio import load_audio, to_float, waves_of  # noqa: E402
from w2vbert_asr.prepare import prepare  # noqa: E402
from w2vbert_asr.sources import splits_of  # noqa: E402

TARGET_SPEEDUP = 1.8
TARGET_MB_PER_HOUR = 120
SPEECH_DBFS, SILENCE_DBFS = -40.0, -60.0  # frame RMS: speech above, near-silence below


def _overrides(corpus: Path, out: Path, num_proc: int, lang: str) -> list[str]:
    return [f"lang={lang}", f"data.root={corpus}", f"output_dir={out}", f"data.num_proc={num_proc}"]


def _arrow_files(out: Path) -> list[Path]:
    return sorted((out / PREPARED).glob("*.arrow"))


def _cpu(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _time_prepare(corpus: Path, out: Path, num_proc: int, lang: str) -> tuple[dict, dict]:
    """-> ({wall, cpu_main, cpu_workers} seconds, report). Worker CPU is counted once the pool is joined."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = compose(_overrides(corpus, out, num_proc, lang))
    main, workers, start = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    report = prepare(cfg)
    return {"wall": time.perf_counter() - start, "cpu_main": _cpu(resource.RUSAGE_SELF) - main,
            "cpu_workers": _cpu(resource.RUSAGE_CHILDREN) - workers}, report


def _float32_copy(out: Path, target: Path) -> tuple[int, dict[str, list[np.ndarray]]]:
    """Write the prepared splits again under `target`/prepared with float32 audio decoded from the source
    clips (what prepare stored before), -> (bytes, {split: float waves})."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    target = target / PREPARED
    target.mkdir(parents=True, exist_ok=True)
    total, waves = 0, {}
    for file in _arrow_files(out):
        ds = datasets.Dataset.from_file(str(file))
        features = datasets.Features({**ds.features, "audio": datasets.List(datasets.Value("float32"))})
        waves[file.stem] = []
        with ArrowWriter(features=features, path=str(target / file.name)) as w:
            for start in range(0, len(ds), 64):
                rows = ds[start:start + 64]
                rows["audio"] = [load_audio(p) for p in rows["path"]]
                waves[file.stem] += rows["audio"]
                w.write_batch(rows)
            w.finalize()
        total += (target / file.name).stat().st_size
    return total, waves


def _read_ms_per_1000(out: Path, splits: list[str], convert) -> float:
    """Read every clip in batches of 16 (as the Collator gets them) and make float32 waves of them."""
    clips, start = 0, time.perf_counter()
    for split in splits:
        ds = load_prepared(out, split)
        for b in range(0, len(ds), 16):
            waves = convert(ds[b:b + 16]["audio"])
            clips += len(waves)
    return 1000 * (time.perf_counter() - start) / clips * 1000


def _feature_effect(originals: list[np.ndarray], quantised: list[np.ndarray]) -> dict:
    """|features(original) - features(int16-rounded)| by frame loudness: max on speech, in-between and
    near-silent frames, mean and 99.9th percentile over all values, and the mel bin of the maximum."""
    import torch
    from transformers import SeamlessM4TFeatureExtractor

    from w2vbert_asr.geometry import FEATURE_STRIDE, FRAME_LENGTH, HOP_LENGTH
    from w2vbert_asr.features import BatchFeatureExtractor, pad_waves

    extract = BatchFeatureExtractor.from_hf(SeamlessM4TFeatureExtractor())
    worst = {"speech": 0.0, "between": 0.0, "silence": 0.0}
    frames = {k: 0 for k in worst}
    values, worst_bin, span = [], (0.0, -1), HOP_LENGTH * FEATURE_STRIDE  # samples per stacked frame
    with torch.no_grad():
        for a, q in zip(originals, quantised):
            (fa, ma), (fq, _) = (extract(*pad_waves([w])) for w in (a, q))
            valid = int(ma[0].sum())
            diff = (fa[0, :valid] - fq[0, :valid]).abs().numpy()  # (T, 160): two stacked 80-bin frames
            values.append(diff.ravel())
            t, j = np.unravel_index(diff.argmax(), diff.shape)
            worst_bin = max(worst_bin, (float(diff[t, j]), int(j % (diff.shape[1] // FEATURE_STRIDE))))
            for t in range(valid):
                seg = a[t * span: t * span + span + FRAME_LENGTH - HOP_LENGTH]
                dbfs = 20 * np.log10(max(float(np.sqrt(np.mean(seg.astype(np.float64) ** 2))), 1e-12))
                kind = "speech" if dbfs >= SPEECH_DBFS else "silence" if dbfs < SILENCE_DBFS else "between"
                worst[kind] = max(worst[kind], float(diff[t].max()))
                frames[kind] += 1
    values = np.concatenate(values)
    return {"max_abs_diff": worst, "frames": frames, "mean": float(values.mean()),
            "p99_9": float(np.percentile(values, 99.9)), "worst_mel_bin": worst_bin[1]}


def _prepare_command(checkout: Path, corpus: Path, out: Path, lang: str) -> tuple[float, int]:
    """(wall seconds, modules imported) of `w2vbert-asr prepare` run from `checkout` in a fresh process.
    The module count does not depend on the machine's load."""
    cli = [sys.executable, "-X", "importtime", "-m", "w2vbert_asr.cli", "prepare", *_overrides(corpus, out, 1, lang)]
    start = time.perf_counter()
    # cwd too: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    done = subprocess.run(cli, check=True, env={**os.environ, "PYTHONPATH": str(checkout)}, cwd=checkout,
                          capture_output=True, text=True)
    return time.perf_counter() - start, done.stderr.count("import time:") - 1  # minus the header line


def _startup(corpus: Path, out: Path, lang: str, repeats: int, before: Path | None, work: Path) -> dict:
    """Best wall seconds of a no-op `w2vbert-asr prepare` (data up to date) in a fresh process, for this
    checkout and (interleaved) for `before`; and the seconds of our up-to-date check in-process."""
    ours = Path(__file__).resolve().parents[1]
    runs = {"ours": (ours, out)}
    if before:
        runs["before"] = (before, work / "before")
        _prepare_command(before, corpus, work / "before", lang)  # prepares once; the timed runs are no-ops
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for k, (checkout, folder) in runs.items():
            seconds, best[f"{k}_modules"] = _prepare_command(checkout, corpus, folder, lang)
            best[k] = min(best[k], seconds)
    cfg = compose(_overrides(corpus, out, 1, lang))
    start = time.perf_counter()
    prepare(cfg)
    best["check"] = time.perf_counter() - start
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, help="Common Voice-like folder; synthesised there if it has no train.tsv")
    p.add_argument("--clips", type=int, default=2000, help="clips to synthesise (when --corpus has none)")
    p.add_argument("--lang", default="sw")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--feature-clips", type=int, default=48, help="clips compared for the int16 rounding")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--before", type=Path, help="another checkout (e.g. the main branch before this change): "
                   "its no-op prepare command is timed side by side with ours")
    args = p.parse_args(argv)

    corpus = args.corpus or Path(tempfile.gettempdir()) / f"w2vbert_bench_{args.lang}{args.clips}"
    if not (corpus / "train.tsv").is_file():
        from w2vbert_asr.synth import synthesize_corpus

        print(f"synthesising {args.clips} clips into {corpus} ...", flush=True)
        synthesize_corpus(corpus, args.lang, num_clips=args.clips, seed=0)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    print(f"corpus {corpus}; {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    # --- speed: one untimed small run per setting (page cache, lazy imports, first fork), then interleaved
    # runs, best of --repeats
    for n in args.procs:
        shutil.rmtree(work / "warmup", ignore_errors=True)
        prepare(compose([*_overrides(corpus, work / "warmup", n, args.lang), "data.limit=40"]))
    runs: dict[int, dict] = {}
    reports: dict[int, dict] = {}
    for _ in range(args.repeats):
        for n in args.procs:
            times, reports[n] = _time_prepare(corpus, work / f"np{n}", n, args.lang)
            if n not in runs or times["wall"] < runs[n]["wall"]:
                runs[n] = times
    best = {n: t["wall"] for n, t in runs.items()}
    first = args.procs[0]
    rows = sum(s["rows"] for s in reports[first]["splits"].values())
    hours = sum(s["hours"] for s in reports[first]["splits"].values())
    print(f"\nprepare: {rows} clips, {hours:.3f} h of audio (splits {list(splits_of(compose(_overrides(corpus, work, 1, args.lang)).data))})")
    print(f"{'num_proc':>8} {'seconds':>8} {'clips/s':>8} {'audio h/h':>10} {'CPU s main':>11} {'CPU s workers':>14}")
    for n in args.procs:
        t = runs[n]
        print(f"{n:>8} {t['wall']:>8.2f} {rows / t['wall']:>8.1f} {hours * 3600 / t['wall']:>10.0f} "
              f"{t['cpu_main']:>11.2f} {t['cpu_workers']:>14.2f}")
    last = args.procs[-1]
    speedup = best[first] / best[last]
    # What the same work would take on `last` free cores: the main process (reading rows, writing Arrow) and
    # the workers run at once, so the time is bounded by the busier of main alone and all CPU / cores.
    t1, tn = runs[first], runs[last]
    free = (t1["cpu_main"] + t1["cpu_workers"]) / max(tn["cpu_main"], (tn["cpu_main"] + tn["cpu_workers"]) / last)
    identical = all(a.read_bytes() == b.read_bytes() for a, b in
                    zip(_arrow_files(work / f"np{first}"), _arrow_files(work / f"np{last}"))) and \
        (work / f"np{first}" / "prepare_report.json").read_text() == (work / f"np{last}" / "prepare_report.json").read_text()
    print(f"speed-up num_proc {last} vs {first}: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x on {last} free cores); "
          f"outputs byte-identical: {identical}")
    print(f"CPU-time bound on {last} free cores (independent of other load): {free:.2f}x")

    # --- storage: int16 now vs float32 before, same clips
    out = work / f"np{first}"
    int16_bytes = sum(f.stat().st_size for f in _arrow_files(out))
    float_bytes, originals = _float32_copy(out, work / "float32")
    print(f"\nprepared bytes per audio hour: float32 (before) {float_bytes / hours / 1e6:.1f} MB, "
          f"int16 (now) {int16_bytes / hours / 1e6:.1f} MB ({float_bytes / int16_bytes:.2f}x smaller; "
          f"target <= {TARGET_MB_PER_HOUR} MB)")

    # --- reading it back (what the Collator and evaluate do per batch)
    splits = [f.stem for f in _arrow_files(out)]
    i16 = _read_ms_per_1000(out, splits, waves_of)
    f32 = _read_ms_per_1000(work / "float32", splits, lambda col: [np.asarray(a, dtype=np.float32) for a in col])
    i16 = min(i16, _read_ms_per_1000(out, splits, waves_of))  # both after a first read (page cache)
    print(f"reading audio for training, ms per 1,000 clips: float32 {f32:.0f}, int16 + waves_of {i16:.0f} "
          f"(ratio {i16 / f32:.2f})")

    # --- what int16 rounding does to the features
    test = load_prepared(out, "train")
    k = min(args.feature_clips, len(test))
    quantised = [to_float(a) for a in test[:k]["audio"]]
    effect = _feature_effect(originals["train"][:k], quantised)
    d, n = effect["max_abs_diff"], effect["frames"]
    print(f"int16 rounding, |feature difference| over {k} clips (features are normalised per mel bin to unit "
          f"variance): mean {effect['mean']:.1e}, 99.9th percentile {effect['p99_9']:.1e}; max on speech frames "
          f"(>= {SPEECH_DBFS:.0f} dBFS, {n['speech']}) {d['speech']:.2f}, between ({n['between']}) {d['between']:.2f}, "
          f"near-silent (< {SILENCE_DBFS:.0f} dBFS, {n['silence']}) {d['silence']:.2f}; the largest in mel bin "
          f"{effect['worst_mel_bin']} of 80")

    # --- fixed start-up cost of the command
    start = _startup(corpus, out, args.lang, 3, args.before, work)
    print(f"\nstart-up: a no-op `w2vbert-asr prepare` (data up to date) takes {start['ours']:.2f} s in a fresh process "
          f"({start['ours_modules']} modules imported); the up-to-date check (hash the TSVs, stat {rows} clips) "
          f"is {start['check']:.2f} s of it")
    if args.before:
        print(f"          the same no-op command from {args.before}: {start['before']:.2f} s "
              f"({start['before_modules']} modules); ours / before = {start['ours'] / start['before']:.2f}")

    print("\ncommand: python benchmarks/prepare.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    json.dump({"clips": rows, "hours": hours, "runs": runs, "speedup": speedup, "identical": identical,
               "free_core_bound": free,
               "bytes_per_hour": {"float32": float_bytes / hours, "int16": int16_bytes / hours},
               "read_ms_per_1000": {"float32": f32, "int16": i16}, "feature_effect": effect,
               "startup_s": start}, open(work / "results.json", "w"), indent=1)
    print(f"results: {work / 'results.json'}")
    if args.work is None:
        shutil.rmtree(work / "float32", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
