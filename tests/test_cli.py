"""The command line: help, composed config, and one `error:` line for mistakes (no tracebacks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from w2vbert_asr import cli

SECRET = "hf_" + "s" * 34  # a Hub token pasted into a key that does not look secret
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


ROOT = Path(__file__).resolve().parents[1]
# Runs `w2vbert-asr <command> --help` and `... --cfg job` for every command in one process (Hydra exits
# after each) -> JSON {command: {flag: [exit code, stdout]}}.
EVERY_COMMAND_HELP = """
import contextlib, io, json, sys
from w2vbert_asr.cli import COMMANDS, main

out = {}
for command in COMMANDS:
    for flag in ("--help", "--cfg job"):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                code = main([command, *flag.split()])
        except SystemExit as e:
            code = e.code
        out.setdefault(command, {})[flag] = [code or 0, buf.getvalue()]
print(json.dumps(out))
"""


def _documented_commands() -> set[str]:
    """Every `w2vbert-asr <command>` that the README and the package's own docstrings tell users to run."""
    import re

    texts = [ROOT / "README.md", *sorted((ROOT / "w2vbert_asr").glob("*.py"))]
    return {m for path in texts for m in re.findall(r"\bw2vbert-asr ([a-z][a-z_-]*)", path.read_text(encoding="utf-8"))}


def test_help_lists_every_command_and_recipe_and_each_command_resolves():
    """The command table is the CLI's own (nothing to go stale here): every command is listed by --help with
    its line, is the set the docs use, and names a function that exists (--help never imports it, so a module
    renamed under the table would only fail when a user runs that command)."""
    import importlib
    import inspect

    proc = _cli("--help")
    assert proc.returncode == 0 and _cli().stdout == proc.stdout  # no arguments: the same usage
    for command, (module, function, help_) in cli.COMMANDS.items():
        assert any(line.split() == [command, *help_.split()] for line in proc.stdout.splitlines()), command
        target = getattr(importlib.import_module(f"w2vbert_asr.{module}"), function, None)
        assert callable(target), f"{command}: w2vbert_asr.{module}.{function} does not exist"
        assert len(inspect.signature(target).parameters) >= 1, f"{command}: {module}.{function} takes no cfg"
    assert _documented_commands() == set(cli.COMMANDS)
    recipes = next(line for line in proc.stdout.splitlines() if line.startswith("recipes:"))
    for recipe in sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")):
        assert f" {recipe}" in recipes.replace(",", " "), recipe


def test_every_command_help_shows_the_config_it_would_run(tmp_path):
    """`w2vbert-asr <command> --help` works for every command: Hydra's help with the config groups and the very
    config `--cfg job` says the command would run with, and it writes nothing (no folder, no lock)."""
    import json

    import yaml

    proc = _cli(script=EVERY_COMMAND_HELP, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert set(results) == set(cli.COMMANDS)
    for command, runs in results.items():
        (help_code, help_text), (job_code, job_text) = runs["--help"], runs["--cfg job"]
        assert help_code == 0 and job_code == 0, (command, help_text[-500:], job_text[-500:])
        assert "== Configuration groups ==" in help_text and "recipe: " in help_text, command
        shown = help_text.split("== Config ==", 1)[1].split("\n", 2)[2]  # after the heading and its one line ...
        shown = shown.split("\nPowered by Hydra", 1)[0]                    # ... up to Hydra's footer
        config = yaml.safe_load(shown)
        assert config == yaml.safe_load(job_text), command
        assert {"data", "train", "push", "transcribe", "export"} <= set(config), command
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # help writes nothing where it runs


def test_unknown_command():
    proc = _cli("trian")
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


def test_cfg_job_prints_the_recipe_delta_applied():
    proc = _cli("train", "recipe=mn", "data.root=/data/cv/mn", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "lang: mn" in proc.stdout and "drop_latin_words: true" in proc.stdout
    assert "ctc_loss_reduction: mean" in proc.stdout and "add_adapter: true" in proc.stdout


@pytest.mark.parametrize("args, expected", [
    (["recipe=mnn"], "error: recipe=mnn is not an option; did you mean recipe=mn? (conf/recipe/ has bakeoff_demo, "
                     "demo, mn, "),
    (["recipe=demo", "train.lrr=1"], "error: train.lrr is not a config key; train has max_steps, num_epochs, "),
    (["recipe=demo", "model=huge"], "error: model=huge is not an option; conf/model/ has omniasr_ctc_1b, "
                                     "omniasr_ctc_300m, omniasr_ctc_tiny, tiny, w2v_bert_2"),
])
def test_mistakes_are_one_error_line_not_hydra_reports(args, expected):
    proc = _cli("prepare", *args)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
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
    """A token-shaped value in any key is redacted; a secret-looking key is refused (tests/test_config.py)."""
    args = ["train", "recipe=demo", f"push.dataset_name={SECRET}", f"push.commit_message=hf_{'y' * 34}",
            "train.learning_rate=1e-3"]
    proc = _cli(*args, script=STAND_IN_CLI, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    command = next(line for line in proc.stdout.splitlines() if line.startswith("COMMAND:"))
    assert command == ("COMMAND: w2vbert-asr train recipe=demo 'push.dataset_name=<redacted>' "
                       "'push.commit_message=<redacted>' train.learning_rate=1e-3")
    assert SECRET not in proc.stdout + proc.stderr and "y" * 34 not in proc.stdout


def test_failure_report_lists_no_overrides(tmp_path):
    """Hydra's own report starts with every override: the internal push.command, and any secret typed."""
    proc = _cli("train", "recipe=demo", f"push.dataset_name={SECRET}", "train.learning_rate=13", script=STAND_IN_CLI,
                cwd=tmp_path)
    assert proc.returncode == 1
    assert "RuntimeError: a bug" in proc.stderr and "Traceback" in proc.stderr  # a bug still shows where it is
    assert "push.command" not in proc.stderr and SECRET not in proc.stderr and "overrides" not in proc.stderr
