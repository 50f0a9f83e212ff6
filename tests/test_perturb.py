"""Speed perturbation and added noise (perturb.py), and checkpoint averaging (average.py), in training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from w2vbert_asr import average
from w2vbert_asr.average import average_weights, chosen_steps, kept_checkpoints
from w2vbert_asr.batching import DurationBatchSampler
from w2vbert_asr.cli import compose
from w2vbert_asr.geometry import SAMPLING_RATE, FrameGeometry
from w2vbert_asr.perturb import NoiseBank, PerturbedDataset, durations
from w2vbert_asr.prepared import PREPARED, load_prepared
from w2vbert_asr.rows import ctc_min_frames
from w2vbert_asr.train import train

FACTORS = [0.9, 1.0, 1.1]


def _geometry():
    from w2vbert_asr.model import architecture_config

    return FrameGeometry.of(architecture_config(compose(["recipe=demo"]).model))


# ------------------------------------------------------------------------------------------ perturbation
def test_perturbed_clips_have_the_new_length_and_the_sampler_sees_it(prepared_run):
    ds = load_prepared(prepared_run.output_dir, "train")
    n = len(ds)
    p = PerturbedDataset(ds, FACTORS, seed=0, geometry=_geometry())
    assert len(p) == 3 * n
    for k in (0, n + 1, 2 * n + 2):  # one clip of each copy
        copy, i = divmod(k, n)
        item, original = p[k], ds[i]
        assert np.isclose(item["duration"], float(original["duration"]) / FACTORS[copy], rtol=1e-3)
        assert abs(len(item["audio"]) - len(original["audio"]) / FACTORS[copy]) <= 1
        assert np.isclose(p.durations[k], item["duration"], atol=2 / SAMPLING_RATE)
        assert item["text"] == original["text"]
    assert p[n + 1]["audio"].dtype == np.int16  # factor 1.0 and no noise: the stored clip itself
    sampler = DurationBatchSampler(durations(p), 20.0, 32, seed=0)
    for batch in sampler.rank_batches(0):  # the caps hold for the perturbed lengths
        items = p.__getitems__(batch)
        assert len(batch) * max(i["duration"] for i in items) <= 20.0 + 1e-3 or len(batch) == 1
    assert sorted(i for b in sampler.rank_batches(0) for i in b) == list(range(3 * n))


def test_a_copy_too_fast_for_its_transcript_keeps_its_speed():
    import datasets

    geometry = _geometry()
    text = "abcdefghij"
    samples = geometry.samples_per_frame * ctc_min_frames(text) + geometry.samples_per_frame // 2
    while int(geometry.output_frames(torch.tensor([samples]))[0]) > ctc_min_frames(text):
        samples -= 1  # just enough frames for the text at speed 1.0
    ds = datasets.Dataset.from_dict({"text": [text], "duration": [samples / SAMPLING_RATE],
                                     "audio": [np.zeros(samples, np.int16)]}).with_format("numpy", dtype=None)
    p = PerturbedDataset(ds, FACTORS, seed=0, geometry=geometry)
    assert p.factors[:, 0].tolist() == [0.9, 1.0, 1.0]  # 1.1 would leave CTC too few frames


def test_noise_is_added_at_the_drawn_snr_deterministically_per_epoch(prepared_run, tmp_path):
    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()
    sf.write(noise_dir / "hum.wav", np.random.default_rng(0).standard_normal(80_000).astype(np.float32) * 0.1, 8000)
    ds = load_prepared(prepared_run.output_dir, "train")
    p = PerturbedDataset(ds, [1.0], seed=3, geometry=_geometry(), noise=NoiseBank(noise_dir), noise_prob=1.0,
                         snr=(12.0, 12.0))
    clean = ds[0]["audio"].astype(np.float64) / 32768
    noisy = p[0]["audio"].astype(np.float64)
    snr = 10 * np.log10(np.mean(clean ** 2) / np.mean((noisy - clean) ** 2))
    assert len(noisy) == len(clean) and abs(snr - 12.0) < 0.5  # a stretch of the 8 kHz file, resampled
    assert np.array_equal(p[0]["audio"], noisy.astype(np.float32))  # same seed, epoch and index: same audio
    p.set_epoch(1)
    assert not np.array_equal(p[0]["audio"], noisy.astype(np.float32))  # another epoch: another draw


# ------------------------------------------------------------------------------------------ averaging
def test_average_weights_is_the_elementwise_mean(tmp_path):
    rng = torch.Generator().manual_seed(0)
    tensors = [{"w": torch.randn(3, 4, generator=rng), "h": torch.randn(5, generator=rng).to(torch.bfloat16),
                "count": torch.tensor([k])} for k in range(3)]
    paths = []
    for k, t in enumerate(tensors):
        paths.append(tmp_path / f"step-{k}")
        paths[-1].mkdir()
        save_file(t, str(paths[-1] / "model.safetensors"))
    avg = average_weights(paths)
    assert torch.allclose(avg["w"], sum(t["w"] for t in tensors) / 3, atol=1e-6)
    assert avg["h"].dtype == torch.bfloat16
    assert torch.equal(avg["h"], (sum(t["h"].double() for t in tensors) / 3).to(torch.bfloat16))
    assert torch.equal(avg["count"], torch.tensor([2]))  # integers: the last checkpoint's


def test_which_checkpoints_are_averaged_and_kept():
    class T:
        average_checkpoints, average_by, save_total_limit = 2, "best", 1

    class S:
        best_step = 2
        history = [{"step": 1, "eval/wer": 0.5, "eval/cer": 0.2}, {"step": 2, "eval/wer": 0.3, "eval/cer": 0.1},
                   {"step": 3, "eval/wer": 0.5, "eval/cer": 0.1}, {"step": 4, "eval/wer": 0.9, "eval/cer": 0.5}]

    assert chosen_steps(T, S.history, [1, 2, 3, 4]) == [2, 3]  # WER, then CER
    assert kept_checkpoints(T, S) == (1, {2, 3})
    T.average_by = "last"
    assert chosen_steps(T, S.history, [1, 2, 3, 4]) == [3, 4] and kept_checkpoints(T, S) == (2, {2})
    T.average_checkpoints = 0
    assert chosen_steps(T, S.history, [1, 2, 3, 4]) == [] and kept_checkpoints(T, S) == (1, {2})


def _clone(src_cfg, dst: Path) -> None:
    for name in (PREPARED, "processor"):
        shutil.copytree(Path(src_cfg.output_dir) / name, dst / name)
    shutil.copy(Path(src_cfg.output_dir) / "prepare_report.json", dst / "prepare_report.json")


def _losses(out: Path) -> list[float]:
    return [json.loads(line[line.index("{"):])["train/loss"] for line in (out / "train.log").read_text().splitlines()
            if '"train/loss"' in line]


COMMON = ["train.max_steps=6", "train.eval_steps=2", "train.warmup_steps=1", "train.max_batch_seconds=30",
          "train.logging_steps=1", "data.test_split=null", "train.speed_perturb=[0.9,1.0,1.1]",
          "train.average_checkpoints=2", "train.average_by=best", "train.save_total_limit=1"]


def test_speed_perturbed_averaged_run_resumes_exactly_and_exports_the_mean(tmp_path, monkeypatch, run_overrides,
                                                                         prepared_run, sw_corpus):
    monkeypatch.setattr(average, "_score_on_eval", lambda s: (0.0, 0.0))  # the average always wins here
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for d in (straight, resumed):
        _clone(prepared_run, d)
    result = train(compose(run_overrides(straight, sw_corpus, *COMMON)))
    assert train(compose(run_overrides(resumed, sw_corpus, *COMMON, "train.stop_at_step=3")))["stopped"]
    train(compose(run_overrides(resumed, sw_corpus, *COMMON, "resume=true")))
    assert _losses(resumed) == _losses(straight) and len(_losses(straight)) == 6
    chosen = result["model_weights"]
    assert chosen["kind"] == "average" and len(chosen["steps"]) == 2
    assert json.loads((straight / "metrics.json").read_text())["model_weights"] == chosen
    exported = load_file(str(straight / "model" / "model.safetensors"))
    mean = average_weights([straight / "checkpoints" / f"step-{k:08d}" for k in chosen["steps"]])
    assert all(torch.allclose(exported[k], mean[k]) for k in exported)
    again = load_file(str(resumed / "model" / "model.safetensors"))
    assert all(torch.equal(exported[k], again[k]) for k in exported)


def test_an_average_worse_on_eval_is_not_exported(tmp_path, monkeypatch, run_overrides, prepared_run, sw_corpus):
    monkeypatch.setattr(average, "_score_on_eval", lambda s: (9.0, 9.0))  # worse than any real WER
    _clone(prepared_run, tmp_path)
    result = train(compose(run_overrides(tmp_path, sw_corpus, "train.max_steps=2", "train.eval_steps=1",
                                         "train.warmup_steps=1", "train.average_checkpoints=2", "data.test_split=null",
                                         "train.select_best=false")))
    chosen = result["model_weights"]
    assert chosen["kind"] == "single" and chosen["step"] == 2 and chosen["average"]["steps"] == [1, 2]
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    last = load_file(str(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert all(torch.equal(exported[k], last[k]) for k in exported)
