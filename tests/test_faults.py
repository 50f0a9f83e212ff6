"""Faults, as a user meets them: kill -9 at any point, planted pickles, a full disk.

Every killed run resumed with `resume=true` must end with a model.safetensors byte-identical to the
uninterrupted run's; nothing a kill leaves half-written may be trusted; a checkpoint never runs code;
a full disk gives one clear error and leaves no partial files behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose
from w2vbert_asr.train import FAULT_ENV, train

from w2vbert_asr.data import PREPARED

# 4 steps, a checkpoint every 2, only the newest kept (+ the best, which ties at the start keep at step 2).
COMMON = ["train.max_steps=4", "train.eval_steps=2", "train.warmup_steps=2", "train.max_batch_seconds=30",
          "train.save_total_limit=1", "data.test_split=null"]


def _clone_prepared(src_cfg, dst: Path) -> None:
    """Reuse the session's prepared data (decoding MP3 again would only cost time)."""
    src = Path(src_cfg.output_dir)
    shutil.copytree(src / PREPARED, dst / PREPARED)
    shutil.copytree(src / "processor", dst / "processor")
    shutil.copy(src / "prepare_report.json", dst / "prepare_report.json")


@pytest.fixture(scope="module")
def stopped_at_2(tmp_path_factory, run_overrides, prepared_run, sw_corpus) -> Path:
    """An output_dir stopped (stop_at_step=2) with its step-2 checkpoint; copy it before changing it."""
    out = tmp_path_factory.mktemp("stopped_at_2")
    _clone_prepared(prepared_run, out)
    assert train(compose(run_overrides(out, sw_corpus, *COMMON, "train.stop_at_step=2")))["stopped"]
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for f in ("train.log", "config.yaml"):
        (dst / f).unlink(missing_ok=True)
    return dst


def _cli_train(out: Path, run_overrides, corpus, *extra: str, fault: str | None = None):
    cmd = [sys.executable, "-m", "w2vbert_asr.cli", "train", *run_overrides(out, corpus, *COMMON, *extra)]
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["OMP_NUM_THREADS"] = "1"  # the same arithmetic in every run
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _train_one_thread(overrides: list[str]) -> dict:
    """train() in this process with one thread, the arithmetic of the OMP_NUM_THREADS=1 subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(compose(overrides))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_overrides, prepared_run, sw_corpus) -> bytes:
    """model.safetensors of the uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _clone_prepared(prepared_run, out)
    _train_one_thread(run_overrides(out, sw_corpus, *COMMON))
    return (out / "model" / "model.safetensors").read_bytes()


def _kill_and_resume(tmp_path, capsys, run_overrides, prepared_run, sw_corpus, fault: str) -> tuple[str, Path]:
    _clone_prepared(prepared_run, tmp_path)
    killed = _cli_train(tmp_path, run_overrides, sw_corpus, fault=fault)  # a real process, really killed
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]  # SIGKILL, as kill -9
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    capsys.readouterr()
    _train_one_thread(run_overrides(tmp_path, sw_corpus, *COMMON, "resume=true"))
    return capsys.readouterr().out, left


def test_kill_between_checkpoints_resumes_byte_identical(tmp_path, capsys, reference, run_overrides, prepared_run,
                                                         sw_corpus):
    out, left = _kill_and_resume(tmp_path, capsys, run_overrides, prepared_run, sw_corpus, "kill@step:3")
    assert left == ["step-00000002"]
    assert "step-00000002 at step 2" in out
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == reference


@pytest.mark.slow
def test_kill_during_checkpoint_write_resumes_byte_identical(tmp_path, capsys, reference, run_overrides,
                                                             prepared_run, sw_corpus):
    out, left = _kill_and_resume(tmp_path, capsys, run_overrides, prepared_run, sw_corpus, "kill@checkpoint:4")
    assert left == ["step-00000002", "step-00000004.tmp"]  # the half-written one, never trusted ...
    assert "step-00000002 at step 2" in out
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == reference
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # ... and removed by the next save


@pytest.mark.slow
def test_kill_during_export_resumes_byte_identical(tmp_path, capsys, reference, run_overrides, prepared_run,
                                                   sw_corpus):
    out, left = _kill_and_resume(tmp_path, capsys, run_overrides, prepared_run, sw_corpus, "kill@export")
    assert "step-00000004" in left
    assert "step-00000004 at step 4" in out  # nothing to train: resume goes straight to the export
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == reference
    assert not (tmp_path / "model.tmp").exists()


class _Payload:
    """Unpickling this creates `marker`: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_planted_pickle_is_never_executed(tmp_path, stopped_at_2, run_overrides, sw_corpus):
    _copy_run(stopped_at_2, tmp_path)
    overrides = run_overrides(tmp_path, sw_corpus, *COMMON)
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                                      "trainer_state.json"]
    marker = tmp_path / "payload-ran"
    originals = {name: (ckpt / name).read_bytes() for name in ("optimizer.bin", "random_states_0.pkl")}
    # Where accelerate keeps registered objects (and unpickles them with weights_only=False), and in
    # place of each torch.save file the checkpoint really holds.
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"):
        torch.save(_Payload(marker), ckpt / name)
        with pytest.raises(UsageError) as err:
            train(compose([*overrides, "resume=true"]))
        assert not marker.exists(), f"a pickle planted as {name} ran on resume"
        assert str(ckpt) in str(err.value)
        if name in originals:
            (ckpt / name).write_bytes(originals[name])
        else:
            (ckpt / name).unlink()
    assert train(compose([*overrides, "resume=true"]))["steps"] == 4  # the real files still resume
    assert not marker.exists()


def _disk(free: int):
    def disk_usage(path):
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)

    return disk_usage


@pytest.mark.parametrize("failure", ["enospc", "unexpected_pos", "precheck"])
def test_full_disk_in_checkpoint_save(tmp_path, monkeypatch, stopped_at_2, run_overrides, sw_corpus, failure):
    _copy_run(stopped_at_2, tmp_path)
    overrides = run_overrides(tmp_path, sw_corpus, *COMMON)
    root = tmp_path / "checkpoints"
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin"):  # the model is written; the disk fills up on the next file
            if failure == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(shutil, "disk_usage", _disk(10 * 2**20))  # torch names no errno here
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1114")
        return real_save(obj, f, *args, **kwargs)

    if failure == "precheck":  # less free than the last checkpoint took: refuse before writing
        monkeypatch.setattr(shutil, "disk_usage", _disk(2**20))
    else:
        monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(UsageError) as err:
        train(compose([*overrides, "resume=true"]))
    message = str(err.value)
    assert str(root) in message and "free" in message
    assert "step-00000002 with resume=true" in message  # the last good checkpoint, and what to do
    assert ("not enough disk space" if failure == "precheck" else "disk full") in message
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # no partial step-4 left to trust
    if failure == "enospc":  # space freed: the run continues from the last good checkpoint
        monkeypatch.undo()
        assert train(compose([*overrides, "resume=true"]))["steps"] == 4


def test_full_disk_in_export(tmp_path, monkeypatch, stopped_at_2, run_overrides, sw_corpus):
    import transformers.modeling_utils

    _copy_run(stopped_at_2, tmp_path)
    overrides = run_overrides(tmp_path, sw_corpus, *COMMON)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(UsageError) as err:
        train(compose([*overrides, "resume=true"]))
    message = str(err.value)
    assert "disk full" in message and str(tmp_path) in message and "free" in message
    assert "resume=true" in message and "step-00000004" in message  # training is safe in the last checkpoint
    assert not (tmp_path / "model.tmp").exists() and not (tmp_path / "model").exists()
    monkeypatch.undo()
    assert train(compose([*overrides, "resume=true"]))["steps"] == 4  # resume goes straight to the export
    assert (tmp_path / "model" / "model.safetensors").is_file()


def _launch_two(out: Path, run_overrides, corpus, *extra: str):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "w2vbert_asr.cli", "train", *run_overrides(out, corpus, *COMMON, *extra)]
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_two_process_stop_and_resume_is_exact(tmp_path, run_overrides, prepared_run, sw_corpus):
    """Each rank has its own dropout/SpecAugment stream (seed + rank) and its own saved RNG state:
    a 2-process run stopped and resumed ends byte-identical to the uninterrupted 2-process run."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for d in (straight, interrupted):
        _clone_prepared(prepared_run, d)
    _launch_two(straight, run_overrides, sw_corpus, "train.stop_at_step=null")
    _launch_two(interrupted, run_overrides, sw_corpus, "train.stop_at_step=3")
    out = _launch_two(interrupted, run_overrides, sw_corpus, "resume=true")
    assert "at step 3" in out and "weights identical on all 2 processes" in out
    assert ((straight / "model" / "model.safetensors").read_bytes()
            == (interrupted / "model" / "model.safetensors").read_bytes())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, on purpose
def test_planted_checkpoint_metadata_is_never_executed(tmp_path):
    """FSDP's sharded checkpoints keep a .metadata that torch.distributed.checkpoint reads with plain
    pickle: resume reads it first through an allow-list of the globals real metadata names."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from w2vbert_asr.train import check_checkpoint_files

    ckpt = tmp_path / "step-00000002"
    state = {"model.w": torch.randn(3, 4), "model.b": torch.zeros(2, dtype=torch.bfloat16), "step": torch.tensor(3)}
    dcp.save(state, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"))
    check_checkpoint_files(ckpt, 1, 0)  # the real thing passes
    marker = tmp_path / "payload-ran"
    (ckpt / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UsageError, match="metadata"):
        check_checkpoint_files(ckpt, 1, 0)
    assert not marker.exists()
