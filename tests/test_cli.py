"""The command line: help, composed config, and Hydra's own messages for mistakes (no tracebacks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from w2vbert_asr import cli

SECRET = "hf_abc"  # what a user might type as +push.hub_token=...
# The CLI with `train` replaced: it prints what the model card would show as the training command, or fails
# the way a bug would.
STAND_IN_CLI = """
import sys, types

def train(cfg):
    if cfg.train.learning_rate == 13:
        raise RuntimeError("a bug")
    print("COMMAND:", cfg.push.command)

sys.modules["w2vbert_asr.train"] = types.SimpleNamespace(train=train)  # (the real module takes seconds to import)
from w2vbert_asr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(*args, cwd=None, script=None):
    entry = ["-c", script] if script else ["-m", "w2vbert_asr.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=env)


def test_help_lists_commands_and_recipes():
    proc = _cli("--help")
    assert proc.returncode == 0
    for command in ("synth", "prepare", "train", "evaluate", "baseline", "compare", "transcribe", "lm", "push"):
        assert f"  {command} " in proc.stdout
    assert "demo" in proc.stdout and "mn" in proc.stdout


def test_unknown_command():
    proc = _cli("trian")
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


def test_cfg_job_prints_the_recipe_delta_applied():
    proc = _cli("train", "recipe=mn", "data.root=/data/cv/mn", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "lang: mn" in proc.stdout and "drop_latin_words: true" in proc.stdout
    assert "ctc_loss_reduction: mean" in proc.stdout and "add_adapter: true" in proc.stdout


@pytest.mark.parametrize("args, expected", [
    (["recipe=mnn"], "Available options in 'recipe'"),
    (["recipe=demo", "train.lrr=1"], "Key 'lrr' is not in struct"),
    (["recipe=demo", "model=huge"], "Available options in 'model'"),
])
def test_mistakes_give_hydra_messages_not_tracebacks(args, expected):
    proc = _cli("prepare", *args)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_user_errors_are_one_clear_line(tmp_path):
    proc = _cli("prepare", "lang=xx", f"data.root={tmp_path / 'missing'}", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "error: data.root=" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["prepare", "recipe=mn"], "error: data.root is not set: pass data.root=<the dataset folder"),
    (["prepare", "data.root=x"], "error: lang is not set (output_dir needs it): pass lang=<language code"),
])
def test_a_missing_value_is_one_error_line(args, expected, tmp_path):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert not list(tmp_path.rglob(".lock"))  # the lock on outputs/<lang> is gone with the command


def test_model_path_is_not_the_model_config_group(tmp_path):
    """`model=tiny_runs/model` names a folder; `model=tiny` names conf/model/tiny.yaml unless a `tiny` path exists."""
    (tmp_path / "tiny_runs" / "model").mkdir(parents=True)
    proc = _cli("transcribe", "model=tiny_runs/model", "clip.wav", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "model_dir: tiny_runs/model" in proc.stdout and "architecture: null" in proc.stdout
    assert f"output_dir: {(tmp_path / 'tiny_runs').resolve()}" in proc.stdout
    assert "model=tiny" in cli._translate("transcribe", ["model=tiny", "x.wav"])
    os.chdir(tmp_path)
    try:
        (tmp_path / "tiny").mkdir()
        assert "model_dir='tiny'" in cli._translate("transcribe", ["model=tiny", "x.wav"])
    finally:
        os.chdir(Path(__file__).parent)


def test_secrets_never_reach_the_training_command(tmp_path):
    args = ["train", "recipe=demo", f"+push.hub_token={SECRET}", "+HF_TOKEN=hf_" + "x" * 34,
            f"push.commit_message=hf_{'y' * 34}", "train.learning_rate=1e-3"]
    proc = _cli(*args, script=STAND_IN_CLI, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    command = next(line for line in proc.stdout.splitlines() if line.startswith("COMMAND:"))
    assert command == ("COMMAND: w2vbert-asr train recipe=demo '+push.hub_token=<redacted>' '+HF_TOKEN=<redacted>' "
                       "'push.commit_message=<redacted>' train.learning_rate=1e-3")
    assert SECRET not in proc.stdout + proc.stderr and "x" * 34 not in proc.stdout


def test_failure_report_lists_no_overrides(tmp_path):
    """Hydra's own report starts with every override: the internal push.command, and any secret typed."""
    proc = _cli("train", "recipe=demo", f"+push.hub_token={SECRET}", "train.learning_rate=13", script=STAND_IN_CLI,
                cwd=tmp_path)
    assert proc.returncode == 1
    assert "RuntimeError: a bug" in proc.stderr and "Traceback" in proc.stderr  # a bug still shows where it is
    assert "push.command" not in proc.stderr and SECRET not in proc.stderr and "overrides" not in proc.stderr
