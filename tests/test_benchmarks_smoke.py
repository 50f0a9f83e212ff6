"""Smoke tests for benchmarks/train_step.py: the tiny CPU configuration runs end to end, eager and SDPA give
the same loss on the same batches, a refused attention implementation is reported instead of crashing,
and the analytic FLOP count agrees with torch's FlopCounterMode."""

import tempfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

# Two micro-batches of at most 2 x 3 s per implementation. One thread: on 2 cores shared with other
# processes, two OpenMP threads spin against each other and run ~10x slower.
TINY_ARGS = ["--device", "cpu", "--small", "--steps", "1", "--warmup", "1", "--max-batch-seconds", "6",
             "--max-batch-size", "2", "--grad-accum", "1", "--max-duration", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def ts(load_benchmark):
    module = load_benchmark("train_step")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)  # main(--threads 1) and this fixture change process-wide state


def test_peak_lookup_takes_the_most_specific_whole_word(ts):
    """Every GPU of the table is found from a device name that holds it, whatever the case and suffix, and is
    not shadowed by a shorter name listed before it (an "H100 PCIe" is no SXM "H100"); a model number that only
    starts like a listed one is another GPU, whose peak is unknown rather than wrong."""
    for key, tflops in ts.PEAK_TFLOPS:
        for name in (f"NVIDIA {key}", f"NVIDIA {key}-SXM4-80GB", f"nvidia {key.lower()} 80GB HBM3"):
            assert ts.peak_tflops(name) == tflops, name
    for other in ("NVIDIA L40S", "NVIDIA A10", "NVIDIA H1000", "Some Future GPU", ""):  # L40S/A10: not L4/A10G
        assert ts.peak_tflops(other) is None, other


def test_printed_mfu_is_model_flops_over_the_devices_peak(ts, capsys):
    """The table's MFU/HFU divide the achieved model/hardware TFLOP/s by the peak of the device's name."""
    peak = ts.peak_tflops("NVIDIA H100 80GB HBM3")
    run = ts.RunResult(attn="sdpa", steps=2, seconds=4.0, audio_seconds=40.0, padded_seconds=44.0,
                       feature_seconds=0.4, model_flops=0.25 * peak * 1e12 * 4.0,
                       hardware_flops=0.3 * peak * 1e12 * 4.0)
    for device_peak, mfu, hfu in ((peak, "25.0%", "30.0%"), (None, "unknown", "unknown")):
        ts.print_results([run], {"device": torch.device("cpu"), "peak_tflops": device_peak, "dtype": torch.bfloat16},
                         [])
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sdpa "))
        assert row.split()[7:9] == [mfu, hfu], row


def test_cpu_small_run_eager_vs_sdpa(ts, capsys):
    eager, sdpa = ts.main([*TINY_ARGS, "--attn", "both"])
    out = capsys.readouterr().out
    assert (eager.attn, sdpa.attn) == ("eager", "sdpa")
    assert eager.status == sdpa.status == "ok", (eager.note, sdpa.note)
    for r in (eager, sdpa):
        assert r.steps == 1 and len(r.losses) == 2
        assert r.audio_seconds > 0 and r.seconds > 0 and r.model_flops > 0
        assert r.hardware_flops > r.model_flops  # gradient checkpointing recomputes the Conformer layers
        assert all(np.isfinite(r.losses))
    # Same init, batches, SpecAugment masks and dropout: fp32 eager and SDPA differ only by rounding.
    np.testing.assert_allclose(eager.losses, sdpa.losses, rtol=1e-4)
    assert "sdpa / eager speed" in out
    assert "command: python " in out and "--attn both" in out


def test_refused_sdpa_is_reported(ts, monkeypatch, capsys):
    real_build = ts.build_model

    def refuse_sdpa(model_cfg, tokenizer):
        if model_cfg.attn_implementation == "sdpa":
            raise ValueError("Wav2Vec2BertForCTC does not support an attention implementation through sdpa")
        return real_build(model_cfg, tokenizer)

    monkeypatch.setattr(ts, "build_model", refuse_sdpa)
    (sdpa,) = ts.main([*TINY_ARGS, "--attn", "sdpa"])
    out = capsys.readouterr().out
    assert sdpa.status == "unsupported" and "does not support" in sdpa.note and sdpa.steps == 0
    assert "[sdpa] attention implementation unsupported" in out
    assert "command: python " in out  # the table is still printed


def _tiny_model_and_batch(ts, checkpointing: bool):
    from w2vbert_asr.cli import compose

    cfg = compose(["train=v100_16gb", "lang=xx", "model=tiny"])
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    model_cfg.gradient_checkpointing = checkpointing
    vocab = ts.Vocabulary(chars=list(ts.CHARS), counts={}, rare={})
    with tempfile.TemporaryDirectory() as tmp:
        processor = ts.build_processor(vocab, tmp)
    model = ts._build(model_cfg, processor.tokenizer, "eager", torch.device("cpu"), 0, None)
    batch = ts.make_micro_batch(np.array([2.5, 1.5]), len(processor.tokenizer), model.config, 0)
    feats, mask = ts.BatchFeatureExtractor.from_hf(processor.feature_extractor)(batch.waves, batch.lengths)
    return model, feats, mask, batch.labels


def _counted(model, feats, mask, labels) -> tuple[int, int]:
    """-> (forward, backward) FLOPs as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as fwd:
        loss = model(input_features=feats, attention_mask=mask, labels=labels).loss
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def test_flop_formula_matches_flop_counter(ts):
    plain, feats, mask, labels = _tiny_model_and_batch(ts, checkpointing=False)
    ckpt, *_ = _tiny_model_and_batch(ts, checkpointing=True)
    fwd_plain, bwd_plain = _counted(plain, feats, mask, labels)
    _, bwd_ckpt = _counted(ckpt, feats, mask, labels)
    est_fwd, est_recomputed = ts.forward_flops(plain, *feats.shape[:2])
    # Biases and norms are counted as weights by the estimate, not by the counter: within 2 %.
    assert est_fwd == pytest.approx(fwd_plain, rel=0.02)
    # What checkpointing adds to the backward is one more forward of the Conformer layers.
    assert est_recomputed == pytest.approx(bwd_ckpt - bwd_plain, rel=0.02)
    model_f, hw_f = ts.step_flops(plain, [tuple(feats.shape[:2])], checkpointing=True)
    assert model_f == pytest.approx(3 * est_fwd) and hw_f == pytest.approx(3 * est_fwd + est_recomputed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_model_fits_16gb(ts):
    """The 600M model at conf/train/v100_16gb.yaml's caps stays under the 15 GiB target in a 16 GiB cap."""
    (result,) = ts.main(["--device", "cuda", "--steps", "2", "--warmup", "1", "--memory-cap-gib", "16"])
    assert result.status == "ok", result.note
    assert result.peak_reserved_gib <= ts.TARGET_PEAK_GIB
