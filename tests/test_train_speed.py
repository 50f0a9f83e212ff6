"""The training-speed switches (train.adamw_impl, mixed_precision=auto on CPU) and the bookkeeping of
benchmarks/train_vs_reference.py (its padding collator and its clock)."""

import pytest
import torch
from omegaconf import OmegaConf

from w2vbert_asr import UsageError
from w2vbert_asr import train as train_mod


def _tcfg(**kw):
    from w2vbert_asr.cli import compose

    tcfg = compose(["lang=xx"]).train
    for k, v in kw.items():
        tcfg[k] = v
    return tcfg


def test_adamw_impl_switch_builds_that_optimizer_and_refuses_others():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    assert _tcfg().adamw_impl == "fused"  # the measured default
    for impl, flag in (("fused", "fused"), ("foreach", "foreach")):
        opt = train_mod._optimizer(model, _tcfg(adamw_impl=impl))
        assert opt.defaults[flag] is True
    loop = train_mod._optimizer(model, _tcfg(adamw_impl="for_loop"))
    assert loop.defaults["foreach"] is False and not loop.defaults["fused"]
    # Weight decay only on the matrices; every implementation takes a step.
    groups = train_mod._optimizer(model, _tcfg()).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0
    for impl in ("fused", "foreach", "for_loop"):
        m = torch.nn.Linear(4, 3)
        before = m.weight.detach().clone()
        opt = train_mod._optimizer(m, _tcfg(adamw_impl=impl))
        m(torch.ones(2, 4)).sum().backward()
        opt.step()
        assert not torch.equal(before, m.weight)
    with pytest.raises(UsageError, match="adamw_impl"):
        train_mod._optimizer(model, _tcfg(adamw_impl="adam8bit"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU branch of mixed_precision")
def test_mixed_precision_on_cpu(monkeypatch, caplog):
    monkeypatch.setattr(train_mod, "cpu_native_bf16", lambda: True)
    assert train_mod._mixed_precision("auto") == "bf16"  # measured: 1.6x the reference at the same CER
    assert train_mod._mixed_precision("no") == "no"
    assert train_mod._mixed_precision("bf16") == "bf16" and "emulated" not in caplog.text
    monkeypatch.setattr(train_mod, "cpu_native_bf16", lambda: False)
    assert train_mod._mixed_precision("auto") == "no"  # emulated bf16 is slower than fp32
    assert train_mod._mixed_precision("bf16") == "bf16"  # as asked, with a warning
    assert "emulated" in caplog.text


@pytest.fixture(scope="module")
def tvr(load_benchmark):
    return load_benchmark("train_vs_reference")


def test_reference_collator_pads_and_counts_real_audio(tvr):
    a, b = torch.randn(3, 160), torch.randn(5, 160)
    seconds = {(3, (4, 5)): 0.07, (5, (6,)): 0.11}
    collate = tvr.PaddingCTCCollator(padding_value=1.5, seconds_of=seconds)
    out = collate([{"input_features": a.tolist(), "labels": [4, 5]}, {"input_features": b.tolist(), "labels": [6]}])
    assert out["input_features"].shape == (2, 5, 160)
    assert torch.allclose(out["input_features"][0, :3], a) and (out["input_features"][0, 3:] == 1.5).all()
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[4, 5], [6, -100]]
    assert collate.batch_seconds == [pytest.approx(0.18)]


def test_clock_leaves_out_the_first_steps(tvr):
    # Steps end at t = 10, 11, 13, 16; 5 s of audio each: after skipping 2 steps, steps 3-4 took 5 s for 10 s.
    result = {"stamps": [10.0, 11.0, 13.0, 16.0], "step_seconds": [5.0, 5.0, 5.0, 5.0]}
    s = tvr.speed(result, skip=2)
    assert s["audio_s_per_s"] == pytest.approx(2.0) and s["wall_s"] == pytest.approx(5.0) and s["steps"] == 4
    with pytest.raises(SystemExit):
        tvr.speed(result, skip=3)
