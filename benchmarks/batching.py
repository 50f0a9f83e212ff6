"""Padding share of duration-bucketed batching vs random and globally sorted batching.

Usage:
    python benchmarks/batching.py
    python benchmarks/batching.py --num-utterances 50000 --seed 1

Durations imitate a crowd-sourced read-speech corpus: log-normal with a 4.5 s median,
clipped to 1-10 s. All three methods run under the same caps (padded seconds per batch
and utterances per batch):

* random: shuffle, then pack greedily (what a plain length-agnostic sampler does);
* sorted: sort by duration, then pack greedily (least padding, but the same batches
  every epoch — no shuffling at all);
* ours: ``DurationBatchSampler`` (buckets + within-bucket shuffle + shuffled batch order).

Padded share = padded seconds / padded-batch seconds (frames are proportional to seconds).
Also printed: batches per epoch and mean real seconds per batch (how full batches are).
Target: ours <= 3 % padding.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from w2vbert_asr.batching import DurationBatchSampler, greedy_batches, padding_share  # noqa: E402

MEDIAN_SECONDS = 4.5
LOG_SIGMA = 0.45  # puts ~5 % of utterances under 2.2 s and ~5 % over 9.4 s
MIN_SECONDS, MAX_SECONDS = 1.0, 10.0
SETTINGS = [(200.0, 32), (100.0, 16)]  # (max_seconds, max_batch_size)
TARGET_SHARE = 0.03


def corpus_durations(n: int, seed: int) -> np.ndarray:
    """Log-normal durations ``(n,)`` in seconds, clipped to [MIN_SECONDS, MAX_SECONDS]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(MEDIAN_SECONDS), LOG_SIGMA, n), MIN_SECONDS, MAX_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-utterances", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    d = corpus_durations(args.num_utterances, args.seed)
    print(f"{len(d)} utterances, {d.sum() / 3600:.1f} h, median {np.median(d):.2f} s, "
          f"range {d.min():.2f}-{d.max():.2f} s")
    ok = True
    for max_seconds, max_batch_size in SETTINGS:
        rng = np.random.default_rng(args.seed)
        methods = {
            "random": greedy_batches(rng.permutation(len(d)), d, max_seconds, max_batch_size),
            "sorted": greedy_batches(np.argsort(d, kind="stable"), d, max_seconds, max_batch_size),
            "ours": list(DurationBatchSampler(d, max_seconds, max_batch_size, seed=args.seed)),
        }
        print(f"\nmax_seconds={max_seconds:g}, max_batch_size={max_batch_size}")
        print(f"{'method':<8}{'padded share':>14}{'batches':>10}{'real s/batch':>14}")
        shares = {}
        for name, batches in methods.items():
            shares[name] = padding_share(batches, d)
            print(f"{name:<8}{shares[name]:>13.2%}{len(batches):>10}{d.sum() / len(batches):>14.1f}")
        print(f"ratio random/ours padded share: {shares['random'] / shares['ours']:.0f}x; "
              f"ours/sorted batches: {len(methods['ours']) / len(methods['sorted']):.3f}")
        ok &= shares["ours"] <= TARGET_SHARE
    print(f"\nours <= {TARGET_SHARE:.0%} padding at every setting: {'yes' if ok else 'NO'}")
    print("command: python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
