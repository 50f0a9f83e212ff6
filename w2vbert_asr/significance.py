"""Bootstrap intervals for corpus WER/CER, and paired differences between systems on the same utterances.

The test set is resampled with replacement `samples` times and the corpus error rate (errors summed over
the drawn utterances / reference words summed over them; not a mean of per-utterance rates) is recomputed on
each resample; the interval is the percentile range (Bisani & Ney 2004). Utterances of one speaker share
voice, microphone and room, so their errors are correlated: when every utterance names a speaker and there
are at least `min_speakers` of them, whole speakers are drawn instead (the blockwise bootstrap,
arXiv 1912.09508), which gives honestly wider intervals. A paired difference uses the same resamples for
both systems, so it only carries the variance of the difference, not of the test set's difficulty.

    rows = [{"reference": "a b", "hypothesis": "a c", "speaker": "s1"}, ...]   # predictions/<split>.jsonl rows
    result = bootstrap([rows_a, rows_b], Bootstrap(samples=1000, confidence=0.95, seed=0, min_speakers=10))
    interval(result.rates["wer"][:, 0], 0.95)     # system A's WER interval
    paired(result, 0, 1, 0.95)["wer"]["verdict"]  # "better", "worse" or "not distinguishable"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jiwer
import numpy as np

from . import UsageError

METRICS = ("wer", "cer")
BETTER, WORSE, SAME = "better", "worse", "not distinguishable"
MAX_WEIGHTS = 2**22  # resample-by-block weight cells held at once (32 MiB of float64); larger sets go in chunks


@dataclass(frozen=True)
class Bootstrap:
    samples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    min_speakers: int = 10

    @classmethod
    def from_config(cls, compare_cfg) -> "Bootstrap":
        """From the `compare:` config section (bootstrap_samples, confidence, seed, min_speakers)."""
        out = cls(int(compare_cfg.bootstrap_samples), float(compare_cfg.confidence), int(compare_cfg.seed),
                  int(compare_cfg.min_speakers))
        if out.samples < 1 or not 0 < out.confidence < 1:
            raise UsageError(f"compare.bootstrap_samples={out.samples} must be >= 1 and compare.confidence="
                             f"{out.confidence} between 0 and 1 (e.g. 1000 and 0.95)")
        return out


@dataclass
class Resampled:
    point: dict[str, np.ndarray]   # metric -> (S,) corpus rate of each system on the scored utterances
    rates: dict[str, np.ndarray]   # metric -> (samples, S) the same on every resample
    unit: str                      # "speaker" or "utterance": what was drawn
    blocks: int                    # how many speakers or utterances there were to draw from
    utterances: int


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, np.ndarray]:
    """metric -> (N, 2) per utterance: [edit errors, reference length] in words (wer) or characters (cer),
    from jiwer's alignments, so sums over any subset give exactly jiwer's corpus rate on that subset."""
    out = {}
    for metric, process in (("wer", jiwer.process_words), ("cer", jiwer.process_characters)):
        result = process(list(references), list(hypotheses))
        errors = [sum(max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
                      for c in chunks if c.type != "equal") for chunks in result.alignments]
        out[metric] = np.array([errors, [len(r) for r in result.references]], dtype=np.float64).T
    return out


def blocks_of(speakers: Sequence[str | None], min_speakers: int) -> tuple[np.ndarray, str]:
    """-> (block index of each utterance (N,), unit). Speakers are blocks only when all are known and there
    are at least min_speakers (and 2: one block resampled is always the same set, a zero-width interval)."""
    if speakers and all(speakers) and len(set(speakers)) >= max(2, min_speakers):
        return np.unique(np.asarray(speakers, dtype=object).astype(str), return_inverse=True)[1], "speaker"
    return np.arange(len(speakers)), "utterance"


def resampled_sums(blocks: np.ndarray, values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Sums of `values` (N, M) over `samples` bootstrap draws of the blocks. -> (samples, M).

    Each resample draws as many blocks as there are, with replacement; block sums are weighted by how
    often a block was drawn, as a (samples, blocks) @ (blocks, M) product."""
    n_blocks = int(blocks.max()) + 1
    per_block = np.zeros((n_blocks, values.shape[1]))
    np.add.at(per_block, blocks, values)
    rng = np.random.default_rng(seed)
    out = np.empty((samples, values.shape[1]))
    step = max(1, MAX_WEIGHTS // n_blocks)
    for start in range(0, samples, step):
        k = min(step, samples - start)
        draws = rng.integers(0, n_blocks, size=(k, n_blocks)) + n_blocks * np.arange(k)[:, None]
        weights = np.bincount(draws.ravel(), minlength=k * n_blocks).reshape(k, n_blocks)
        out[start:start + k] = weights @ per_block
    return out


def bootstrap(systems: Sequence[Sequence[dict]], settings: Bootstrap) -> Resampled:
    """Resample prediction rows of S systems on the same utterances (row i of every system is the same
    utterance). Rows need reference and hypothesis; an optional `speaker` in any system's row names the
    speaker. Rows with an empty reference are left out, as in the corpus WER (`evaluate.error_rates`)."""
    keep = [i for i, row in enumerate(systems[0]) if str(row.get("reference", "")).strip()]
    if not keep:
        raise UsageError("no utterance with a non-empty reference to compute intervals on")
    speakers = [next((r[i].get("speaker") for r in systems if r[i].get("speaker")), None) for i in keep]
    blocks, unit = blocks_of(speakers, settings.min_speakers)
    counts = [error_counts([str(rows[i]["reference"]) for i in keep], [str(rows[i].get("hypothesis") or "")
                                                                         for i in keep]) for rows in systems]
    # columns: for each metric, for each system, [errors, reference length]
    values = np.concatenate([c[m] for m in METRICS for c in counts], axis=1)
    sums = resampled_sums(blocks, values, settings.samples, settings.seed)
    total = values.sum(axis=0)
    point, rates, S = {}, {}, len(systems)
    for k, metric in enumerate(METRICS):
        cols = slice(2 * S * k, 2 * S * (k + 1))
        point[metric] = total[cols][0::2] / total[cols][1::2]
        rates[metric] = sums[:, cols][:, 0::2] / sums[:, cols][:, 1::2]
    return Resampled(point, rates, unit, int(blocks.max()) + 1, len(keep))


def interval(values: np.ndarray, confidence: float) -> list[float]:
    """Percentile interval [low, high] of bootstrap values (samples,)."""
    alpha = 1 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def verdict(low: float, high: float) -> str:
    """A minus B error-rate interval -> A is better (entirely below 0), worse (above 0) or neither."""
    return BETTER if high < 0 else WORSE if low > 0 else SAME


def system_intervals(rows: dict[str, dict], settings: Bootstrap) -> dict:
    """One system's rows by utterance id -> {"wer": [low, high], "cer": [low, high], "unit", "blocks",
    "utterances"}. Rows are taken in id order, so the same predictions in any order give the same intervals."""
    res = bootstrap([[rows[k] for k in sorted(rows)]], settings)
    return {**{m: interval(res.rates[m][:, 0], settings.confidence) for m in METRICS},
            "unit": res.unit, "blocks": res.blocks, "utterances": res.utterances}


def paired(res: Resampled, a: int, b: int, confidence: float) -> dict:
    """System a minus system b on every metric: the difference of corpus rates, its interval, the
    verdict for a, and the share of resamples on which a made fewer errors (Bisani & Ney's
    "probability of improvement")."""
    out = {}
    for m in METRICS:
        diff = res.rates[m][:, a] - res.rates[m][:, b]
        low, high = interval(diff, confidence)
        out[m] = {"difference": float(res.point[m][a] - res.point[m][b]), "interval": [low, high],
                  "verdict": verdict(low, high), "probability_of_improvement": float(np.mean(diff < 0))}
    return out


def percent_interval(bounds: Sequence[float], digits: int = 2) -> str:
    """[0.041, 0.182] -> "[4.10, 18.20]" (percent, as the tables show rates)."""
    return f"[{100 * bounds[0]:.{digits}f}, {100 * bounds[1]:.{digits}f}]"


def describe(unit: str, blocks: int, settings: Bootstrap) -> str:
    """How the intervals were made, for the notes under a table."""
    what = f"{blocks} speakers" if unit == "speaker" else f"{blocks} utterances"
    return (f"{100 * settings.confidence:g} % percentile bootstrap intervals, {settings.samples} resamples of the "
            f"{what}, seed {settings.seed}")
