"""Two commands on one folder: the second is refused while the first runs; a dead holder's lock is taken over.

Each command is a real `w2vbert-asr` process (`push`, which locks output_dir like train and starts in a
second). The first one's work is replaced by a stand-in that holds still until the test lets it go, so
"while the first holds it" is a fact, not a race. Which folder each command locks is checked in-process.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from w2vbert_asr import UsageError, cli
from w2vbert_asr.cli import LOCKED_FOLDER, compose
from w2vbert_asr.storage import LOCK_FILE, folder_lock

# The CLI with the command's work replaced: it prints "running <pid>" and waits for a line on stdin
# ("fork": fork a child that keeps the lock, then die without releasing it, as a killed run with a live
# data loader worker would).
HOLDING_CLI = """
import os, sys, time
import w2vbert_asr.hub

def hold(cfg):
    print("running", os.getpid(), flush=True)
    if sys.stdin.readline().strip() == "fork":
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print("child", child, flush=True)
        os._exit(0)

w2vbert_asr.hub.push = hold
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
              "transcribe.output_dir": tmp_path / "run" / "transcripts"}[LOCKED_FOLDER[command]]
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
