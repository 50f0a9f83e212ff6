"""Faults, as a user meets them: kill -9 at any point, planted pickles, a full disk, two runs on one
folder, an edited release.

Every killed run resumed with `resume=true` must end with a model.safetensors byte-identical to the
uninterrupted run's; nothing a kill leaves half-written may be trusted; a checkpoint never runs code;
a full disk gives one clear error and leaves no partial files behind; a second command on a folder in
use is refused at once, and a dead holder's lock is taken over; an edited release is re-prepared.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets.arrow_writer import ArrowWriter

from w2vbert_asr import UsageError, cli
from w2vbert_asr.cli import LOCKED_FOLDER, compose
from w2vbert_asr.prepared import PREPARED, load_prepared
from w2vbert_asr.prepare import prepare
from w2vbert_asr.storage import LOCK_FILE, folder_lock
from w2vbert_asr.train import train

# -------------------------------------------- kill -9, planted pickles, a full disk in training
FAULTS = Path(__file__).with_name("faults.py")
# 4 steps, a checkpoint every 2, only the newest kept (+ the best, which ties at the start keep at step 2).
COMMON = ["train.max_steps=4", "train.eval_steps=2", "train.warmup_steps=2", "train.max_batch_seconds=30",
          "train.save_total_limit=1", "data.test_split=null"]


def _clone_prepared(src_cfg, dst: Path) -> None:
    """Reuse the prepared data of the `prepared_run` fixture (decoding MP3 again would only cost time)."""
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


def _train_with_faults(out: Path, run_overrides, corpus, fault: str, *extra: str):
    """train() in a real process with `fault` injected at the loop's hook points (tests/faults.py)."""
    cmd = [sys.executable, str(FAULTS), fault, *run_overrides(out, corpus, *COMMON, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run
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
    killed = _train_with_faults(tmp_path, run_overrides, sw_corpus, fault)  # a real process, really killed
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]  # SIGKILL, as kill -9
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    capsys.readouterr()
    _train_one_thread(run_overrides(tmp_path, sw_corpus, *COMMON, "resume=true"))
    return capsys.readouterr().out, left


@pytest.mark.slow
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
    out, left = _kill_and_resume(tmp_path, capsys, run_overrides, prepared_run, sw_corpus, "kill@model")
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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

    from w2vbert_asr.checkpoint import check_checkpoint_files

    ckpt = tmp_path / "step-00000002"
    state = {"model.w": torch.randn(3, 4), "model.b": torch.zeros(2, dtype=torch.bfloat16), "step": torch.tensor(3)}
    dcp.save(state, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"))
    check_checkpoint_files(ckpt, 1, 0)  # the real thing passes
    marker = tmp_path / "payload-ran"
    (ckpt / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UsageError, match="metadata"):
        check_checkpoint_files(ckpt, 1, 0)
    assert not marker.exists()


# -------------------------------------------- kill -9 during export: the onnx backend works or says to export
# Every point where the export's state on disk changes (tests/faults.py; export.ExportHooks): the three
# files complete in the staging folder, the old record removed, each of the four files moved into place
# (fp32, int8 and their external data; the tiny model has none, so two moves), the new record written.
# A kill inside a file's write leaves the same state as the point after it: a partial file in staging only.
EXPORT_KILLS = ["exported", "optimized", "quantized", "unpublished", "moved:1", "moved:2", "recorded"]
QUICK_KILLS = {("quantized", True), ("moved:1", True)}  # the old export whole; a mix of old and new: the rest -m slow
EXPORT_CASES = [pytest.param(point, previous, id=f"{point}-{'over_an_export' if previous else 'first_export'}",
                             marks=() if (point, previous) in QUICK_KILLS else pytest.mark.slow)
                for point in EXPORT_KILLS for previous in (True, False)]


@pytest.fixture(scope="module")
def export_model(tmp_path_factory, prepared_run) -> Path:
    """A random tiny model folder as `train` writes it, exported once (fp32 and int8) into onnx/."""
    from transformers import Wav2Vec2BertProcessor

    from w2vbert_asr.export import export_model_dir
    from w2vbert_asr.model import build_model
    from w2vbert_asr.text import Normalizer

    folder = tmp_path_factory.mktemp("export_model") / "model"
    processor = Wav2Vec2BertProcessor.from_pretrained(Path(prepared_run.output_dir) / "processor")
    torch.manual_seed(0)
    build_model(prepared_run.model, processor.tokenizer).save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    Normalizer().save(folder)
    export_model_dir(folder, compose(["lang=model", "export.quantize=int8"]).export)
    return folder


def _onnx_transcribe(model_dir: Path, clip: Path, out: Path, capsys) -> str:
    """`transcribe transcribe.backend=onnx export.quantize=int8` in this process -> "works", or its one line."""
    capsys.readouterr()
    try:
        cli.main(["transcribe", f"model={model_dir}", str(clip), "transcribe.backend=onnx", "export.quantize=int8",
                  f"transcribe.output_dir={out}"])
    except SystemExit as e:
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert e.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
        return errors[0]
    assert (out / f"{clip.stem}.json").is_file()
    return "works"


@pytest.mark.parametrize("point, previous", EXPORT_CASES)
def test_kill_during_export_then_the_onnx_backend_works_or_says_export_again(point, previous, tmp_path, capsys,
                                                                               export_model):
    import soundfile as sf

    model_dir = tmp_path / "model"
    shutil.copytree(export_model, model_dir, ignore=None if previous else shutil.ignore_patterns("onnx"))
    killed = subprocess.run([sys.executable, str(FAULTS), "export", f"kill@{point}", "lang=model",
                             f"model_dir={model_dir}", "export.quantize=int8"], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]  # SIGKILL, as kill -9
    clip = tmp_path / "clip.wav"
    sf.write(clip, 0.1 * np.random.default_rng(0).standard_normal(24_000).astype(np.float32), 16_000)
    outcome = _onnx_transcribe(model_dir, clip, tmp_path / "out", capsys)
    # Before the old record goes, the old export is whole; after the new one is written, the new one is.
    loads = point == "recorded" or (previous and point in ("exported", "optimized", "quantized"))
    if loads:
        assert outcome == "works"
    else:
        assert f"`w2vbert-asr export model={model_dir} export.quantize=int8`" in outcome, outcome
    cli.main(["export", f"model={model_dir}", "export.quantize=int8"])  # exporting again always mends it
    assert not (model_dir / "onnx" / ".staging").exists()
    assert _onnx_transcribe(model_dir, clip, tmp_path / "again", capsys) == "works"


# -------------------------------------------------- two runs on one folder: the output-dir lock
# The CLI with the command's work replaced: it prints "running <pid>" and waits for a line on stdin
# ("fork": fork a child that keeps the lock, then die without releasing it, as a killed run with a live
# data loader worker would).
HOLDING_CLI = """
import os, sys, time
import w2vbert_asr.push

def hold(cfg):
    print("running", os.getpid(), flush=True)
    if sys.stdin.readline().strip() == "fork":
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print("child", child, flush=True)
        os._exit(0)

w2vbert_asr.push.push = hold
from w2vbert_asr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "w2vbert_asr.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _holder(*args, env=None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDING_CLI, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    assert line.startswith("running"), line
    return proc, int(line.split()[1])


def _args(out, *extra):
    # No model there: a command that gets past the lock stops at once with its own error.
    return ["push", "lang=sw", f"output_dir={out}", f"model_dir={out}/no-such-model", "push.dry_run=true", *extra]


def _got_past_the_lock(proc) -> bool:
    return proc.returncode == 2 and "is in use" not in proc.stderr and "no-such-model is not a model" in proc.stderr


def _locked_by_another_process(lock_file) -> bool:
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_second_command_on_a_locked_output_dir_is_refused(tmp_path):
    out = tmp_path / "sw"
    holder, pid = _holder(*_args(out))
    try:
        proc = _cli(*_args(out, "push.private=true"))
        assert proc.returncode == 2
        started = time.strftime("%H:%M", time.localtime(json.loads((out / LOCK_FILE).read_text())["started"]))
        assert proc.stderr.strip().splitlines() == [
            f"error: {out} is in use by pid {pid} (started {started}); wait, or choose another output_dir"]
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0
    # Released: the next command gets past the lock (and stops at its own missing data.root).
    assert _got_past_the_lock(_cli(*_args(out)))


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    assert _got_past_the_lock(_cli(*_args(out)))

    # Killed mid-run, but a process it forked (a data loader worker) still holds the lock it inherited.
    holder, pid = _holder(*_args(out))
    holder.stdin.write("fork\n")
    holder.stdin.flush()
    child = int(holder.stdout.readline().split()[1])
    holder.wait(timeout=60)
    try:
        assert _locked_by_another_process(out / LOCK_FILE)  # the orphan really holds it
        assert _got_past_the_lock(_cli(*_args(out)))
    finally:
        os.kill(child, signal.SIGKILL)


def test_other_ranks_neither_wait_nor_fail(tmp_path):
    """Under `accelerate launch` every rank runs the CLI; only RANK 0 takes the lock."""
    out = tmp_path / "sw"
    holder, _ = _holder(*_args(out), env={"RANK": "0", "LOCAL_RANK": "0"})
    try:
        rank1, _ = _holder(*_args(out), env={"RANK": "1", "LOCAL_RANK": "1"})
        rank1.communicate("done\n", timeout=60)
        assert rank1.returncode == 0
        # A second launch's main process is refused.
        assert "is in use" in _cli(*_args(out), env={"RANK": "0", "LOCAL_RANK": "0"}).stderr
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0


@pytest.mark.parametrize("command", sorted(LOCKED_FOLDER))
def test_each_writing_command_locks_the_folder_it_writes(command, tmp_path, monkeypatch):
    cfg = compose(["lang=sw", f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'corpus'}"])
    folder = {"output_dir": tmp_path / "run", "eval.results_dir": tmp_path / "run",
              "baseline.results_dir": tmp_path / "run" / "baseline", "synth.output_dir": tmp_path / "corpus",
              "transcribe.output_dir": tmp_path / "run" / "transcripts",
              "export.output_dir": tmp_path / "run" / "model" / "onnx",  # null: <model_dir>/onnx
              "pseudolabel.output_dir": tmp_path / "run" / "pseudo",
              "audit.output_dir": tmp_path / "run" / "audit",
              "bakeoff.output_dir": tmp_path / "run" / "bakeoff"}[LOCKED_FOLDER[command]]
    seen = []

    def check(cfg):
        with pytest.raises(UsageError, match=re.escape(f"{folder} is in use by pid {os.getpid()} ")):
            with folder_lock(folder, LOCKED_FOLDER[command]):
                pass
        seen.append(command)

    module, func, _ = cli.COMMANDS[command]
    monkeypatch.setattr(f"w2vbert_asr.{module}.{func}", check)
    cli.run(command, cfg, "w2vbert-asr " + command)
    assert seen == [command]
    with folder_lock(folder):  # released afterwards
        pass


@pytest.mark.parametrize("command, override, folder", [
    ("export", None, "run/model/onnx"), ("export", "export.output_dir={tmp}/elsewhere", "elsewhere"),
    ("pseudolabel", None, "run/pseudo"), ("pseudolabel", "self_training.thresholds=[0.5]", "run"),
])
def test_export_and_pseudolabel_lock_the_folder_they_write(command, override, folder, tmp_path, monkeypatch):
    """export locks the folder it writes (<model>/onnx or export.output_dir), not the run around the model;
    pseudolabel locks pseudolabel.output_dir, and output_dir (where the rounds go) when it runs the rounds."""
    extra = [override.format(tmp=tmp_path)] if override else []
    cfg = compose(["lang=sw", f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'corpus'}", *extra])
    folder = tmp_path / folder
    seen = []

    def check(cfg):
        with pytest.raises(UsageError, match=re.escape(f"{folder} is in use by pid {os.getpid()} ")):
            with folder_lock(folder):
                pass
        with folder_lock(tmp_path / "run" / ("model" if command == "export" else "other")):  # not locked
            pass
        seen.append(command)

    module, func, _ = cli.COMMANDS[command]
    monkeypatch.setattr(f"w2vbert_asr.{module}.{func}", check)
    cli.run(command, cfg, "w2vbert-asr " + command)
    assert seen == [command]


def test_self_training_rounds_lock_their_folders(tmp_path, monkeypatch):
    """Each round's folder is locked while the round labels and trains in it (a `train output_dir=<round>`
    started meanwhile is refused)."""
    from w2vbert_asr import pseudolabel
    from w2vbert_asr import train as train_module

    seen = []

    def locked(folder: Path) -> bool:
        try:
            with folder_lock(folder):
                return False
        except UsageError:
            return True

    def fake_train(cfg):
        out = Path(cfg.output_dir)
        seen.append((out.name, locked(out)))
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "prepare_report.json").write_text(json.dumps({"splits": {"train": {"kept": 10}}}))
        (out / "metrics.json").write_text(json.dumps({"splits": {}}))

    def fake_label(cfg, model_dir, output_dir, threshold, cap=None, lm_dir=None):
        run = Path(output_dir).parent
        seen.append((f"label {run.name}", locked(run)))
        return {"kept": 1, "kept_share": 0.5, "manifest": str(output_dir / "pseudo.tsv")}

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(pseudolabel, "label_pool", fake_label)
    pseudolabel.self_train(compose(["lang=sw", f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path}",
                                    "self_training.thresholds=[0.5]"]))
    assert seen == [("round0", True), ("label round1", True), ("round1", True)]
    assert not locked(tmp_path / "run" / "round1")  # released afterwards


def test_a_lock_leaves_nothing_behind(tmp_path):
    with folder_lock(tmp_path / "new" / "run") as lock:
        assert lock.is_file()
    assert not (tmp_path / "new").exists()  # a command that wrote nothing leaves no empty folder
    with folder_lock(tmp_path / "run"):
        (tmp_path / "run" / "metrics.json").write_text("{}")
    assert os.listdir(tmp_path / "run") == ["metrics.json"]


def test_unwritable_folder_is_one_error_line(tmp_path):
    (tmp_path / "sw").write_text("a file where the folder should be")
    with pytest.raises(UsageError, match="cannot write into .*sw .*; choose another output_dir"):
        with folder_lock(tmp_path / "sw", "output_dir"):
            pass


# --------------------------- prepared data: edited releases re-prepared, a full disk in prepare
def _release(corpus, root, rows=(12, 3, 3)):
    """A small Common Voice folder: the first rows of each split of `corpus`, clips/ a symlink to its clips."""
    root.mkdir()
    (root / "clips").symlink_to(corpus / "clips", target_is_directory=True)
    for split, n in zip(("train", "dev", "test"), rows):
        lines = (corpus / f"{split}.tsv").read_text().splitlines()
        (root / f"{split}.tsv").write_text("\n".join(lines[: n + 1]) + "\n")
    return root


def _cfg(out, root, *extra):
    return compose([f"output_dir={out}", f"data.root={root}", "lang=sw", *extra])


def _mtime(path):
    return path.stat().st_mtime_ns


def test_edited_release_is_re_prepared_and_says_what_changed(tmp_path, sw_corpus, capsys):
    root = _release(sw_corpus, tmp_path / "cv")
    out = tmp_path / "out"
    train_file = out / "prepared" / "train.arrow"
    prepare(_cfg(out, root))
    capsys.readouterr()
    first = _mtime(train_file)

    prepare(_cfg(out, root))  # nothing changed: nothing redone
    assert _mtime(train_file) == first
    assert "re-preparing" not in capsys.readouterr().out

    # Edit one sentence of train.tsv.
    header, *rows = (root / "train.tsv").read_text().splitlines()
    col = header.split("\t").index("sentence")
    cells = rows[0].split("\t")
    cells[col] = "habari mpya kabisa"
    rows[0] = "\t".join(cells)
    (root / "train.tsv").write_text("\n".join([header, *rows]) + "\n")
    prepare(_cfg(out, root))
    assert "train.tsv changed: re-preparing" in capsys.readouterr().out
    assert "habari mpya kabisa" in list(load_prepared(out, "train")["text"])

    # Add rows (more of the corpus's train rows; dev rows would be refused as held-out clips): trained on,
    # not the old rows only.
    new_rows = (sw_corpus / "train.tsv").read_text().splitlines()[len(rows) + 1:len(rows) + 4]
    with open(root / "train.tsv", "a") as f:
        f.write("\n".join(new_rows) + "\n")
    report = prepare(_cfg(out, root))
    assert "train.tsv changed" in capsys.readouterr().out
    assert report["splits"]["train"]["rows"] == len(rows) + len(new_rows)
    assert len(load_prepared(out, "train")) == report["splits"]["train"]["kept"] == len(rows) + len(new_rows)

    # An audio file replaced under the same name (new size and mtime): re-prepared, no decoding needed to see it.
    clip = (root / "test.tsv").read_text().splitlines()[1].split("\t")[header.split("\t").index("path")]
    private = tmp_path / "clips"
    private.mkdir()
    for p in (root / "clips").iterdir():
        os.symlink(p.resolve(), private / p.name)
    (root / "clips").unlink()
    private.rename(root / "clips")
    (root / "clips" / clip).unlink()
    (root / "clips" / clip).write_bytes((sw_corpus / "clips" / clip).read_bytes() + b"\0" * 10)
    prepare(_cfg(out, root))
    assert "audio of test.tsv changed: re-preparing" in capsys.readouterr().out

    # data.force_prepare=true redoes it all although nothing changed; it is not part of the fingerprint.
    before = _mtime(train_file)
    prepare(_cfg(out, root, "data.force_prepare=true"))
    assert "data.force_prepare=true: re-preparing" in capsys.readouterr().out
    assert _mtime(train_file) != before
    before = _mtime(train_file)
    prepare(_cfg(out, root))
    assert _mtime(train_file) == before


def test_older_prepared_format_is_re_prepared(tmp_path, sw_corpus, capsys):
    """Prepared folders from before the int16 format (their DONE holds a bare fingerprint) are redone."""
    root = _release(sw_corpus, tmp_path / "cv")
    out = tmp_path / "out"
    prepare(_cfg(out, root))
    (out / "prepared" / "DONE").write_text("0123456789abcdef")
    capsys.readouterr()
    prepare(_cfg(out, root))
    assert "older format" in capsys.readouterr().out
    assert json.loads((out / "prepared" / "DONE").read_text())["format"] == 2


def test_full_disk_during_prepare_is_one_clear_error_and_leaves_no_partial_file(tmp_path, sw_corpus, monkeypatch):
    root = _release(sw_corpus, tmp_path / "cv", rows=(40, 3, 3))
    out = tmp_path / "out"
    original, calls = ArrowWriter.write_table, []

    def write_until_full(self, table, *args, **kwargs):
        calls.append(len(table))
        if len(calls) > 1:  # the first chunk reaches the file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, table, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, "write_table", write_until_full)
    with pytest.raises(UsageError) as e:
        prepare(_cfg(out, root))
    message = str(e.value)
    assert "disk full" in message and str(out / "prepared") in message and "free" in message
    assert len(calls) == 2
    prepared = out / "prepared"
    assert not [p.name for p in prepared.iterdir() if p.name.endswith(".tmp")]
    assert not (prepared / "DONE").exists()
    monkeypatch.setattr(ArrowWriter, "write_table", original)
    report = prepare(_cfg(out, root))  # once there is room again, the same command completes
    assert report["splits"]["train"]["kept"] == 40
