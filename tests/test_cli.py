"""The command line: help, composed config, and Hydra's own messages for mistakes (no tracebacks)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "w2vbert_asr.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


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


def test_required_value_is_named():
    proc = _cli("prepare", "recipe=mn")
    assert proc.returncode != 0 and "data.root" in proc.stdout + proc.stderr
