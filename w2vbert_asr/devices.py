"""Which device and which precision a command runs on.

Usage:
    from w2vbert_asr.devices import pick_device, resolve_mixed_precision
    device = pick_device("auto")                  # CUDA when there is one, else the CPU
    precision = resolve_mixed_precision("auto")   # bf16 where the device multiplies bf16 natively, ...
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from . import UsageError

log = logging.getLogger(__name__)


def pick_device(setting: str | None = "auto") -> torch.device:
    """`auto` (CUDA when there is one, else CPU), `cpu`, `cuda` or `cuda:N`; anything else is a UsageError."""
    setting = str(setting or "auto").strip()
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except (RuntimeError, ValueError):
        raise UsageError(f"device {setting!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {setting!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {setting!r} asked for, but torch sees no CUDA device; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {setting!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def device_name(device: torch.device) -> str:
    """What a speed was measured on, for metrics.json: the GPU's name, or the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def cpu_native_bf16() -> bool:
    """Does this CPU have bf16 dot-product instructions (AVX-512 BF16 or AMX tiles)?"""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_mixed_precision(setting: str) -> str:
    """`train.mixed_precision` -> accelerate's mixed precision: auto is bf16 where the device has native bf16
    (CUDA Ampere+, CPUs with AVX-512 BF16 or AMX), else fp16 on CUDA and no (fp32) on the CPU, where bf16
    would be emulated and slower than fp32 (measurements: benchmarks/README.md)."""
    if setting == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "bf16" if cpu_native_bf16() else "no"
    if setting == "bf16" and not torch.cuda.is_available() and not cpu_native_bf16():
        log.warning("mixed_precision=bf16 on a CPU without AVX-512 BF16/AMX: bf16 is emulated there, slower than fp32")
    return setting


@contextmanager
def own_accelerator_state():
    """Run a training with an accelerate state of its own precision.

    accelerate keeps the mixed precision in a process-wide singleton and refuses any other value for later
    Accelerators, and it has no public way to drop it. So an earlier Accelerator of another precision (a
    notebook, a benchmark, a test) is forgotten on the way in, and ours on the way out, with the call
    transformers' TrainingArguments makes for the same reason. The process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state()
