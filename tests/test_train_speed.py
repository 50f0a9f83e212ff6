"""The training-speed switches (train.adamw_impl, mixed_precision=auto on CPU) and the bookkeeping of
benchmarks/train_vs_reference.py (its padding collator and its clock)."""

import pytest
import torch
from omegaconf import OmegaConf

from w2vbert_asr import UsageError
from w2vbert_asr import devices, optim


def _tcfg(**kw):
    from w2vbert_asr.cli import compose

    tcfg = compose(["lang=xx"]).train
    for k, v in kw.items():
        tcfg[k] = v
    return tcfg


def _adamw_run(impl: str, steps: int = 5, grad_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A small model (matrices, biases, a norm) after `steps` AdamW steps of train.adamw_impl=impl on fixed data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    opt = optim.make_optimizer(model, _tcfg(adamw_impl=impl, learning_rate=1e-2, weight_decay=0.1))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        (grad_scale * torch.nn.functional.mse_loss(model(x), y)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_three_adamw_implementations_give_the_same_update():
    """fused, foreach and for_loop are one algorithm: the same weights after several steps up to float32
    rounding, and each really trains (the weights move)."""
    start = {k: v.clone() for k, v in _adamw_run("for_loop", steps=0).items()}
    runs = {impl: _adamw_run(impl) for impl in ("fused", "foreach", "for_loop")}
    for impl, weights in runs.items():
        assert all(not torch.equal(weights[k], start[k]) for k in start), impl
        for k in start:
            torch.testing.assert_close(weights[k], runs["for_loop"][k], rtol=1e-5, atol=1e-6, msg=f"{impl} {k}")


def test_weight_decay_shrinks_matrices_only():
    """With zero gradients AdamW's only move is the decoupled weight decay: matrices shrink by lr x decay,
    biases and norm parameters (decaying them only hurts) stay put."""
    start = _adamw_run("fused", steps=0)
    decayed = _adamw_run("fused", steps=1, grad_scale=0.0)
    for k, w in start.items():
        expected = w * (1 - 1e-2 * 0.1) if w.ndim >= 2 else w
        torch.testing.assert_close(decayed[k], expected, rtol=0, atol=1e-7, msg=k)


def test_unknown_adamw_impl_is_a_usage_error():
    with pytest.raises(UsageError, match="adamw_impl='adam8bit'"):
        optim.make_optimizer(torch.nn.Linear(2, 2), _tcfg(adamw_impl="adam8bit"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU branch of mixed_precision")
def test_mixed_precision_on_cpu(monkeypatch, caplog):
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: True)
    assert devices.resolve_mixed_precision("auto") == "bf16"
    assert devices.resolve_mixed_precision("no") == "no"
    assert devices.resolve_mixed_precision("bf16") == "bf16" and "emulated" not in caplog.text
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: False)
    assert devices.resolve_mixed_precision("auto") == "no"  # emulated bf16 is slower than fp32
    assert devices.resolve_mixed_precision("bf16") == "bf16"  # as asked, with a warning
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
