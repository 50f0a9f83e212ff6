"""Offline clusters: a command that needs weights checks, before it prepares any data, that they are cached or
reachable, else says so in one line naming the model and the download command; `download` lists what a recipe
needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose


def _offline_env(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("command, args, model", [
    ("train", [], "facebook/w2v-bert-2.0"),
    ("bakeoff", [], "openai/whisper-large-v3"),
])
def test_missing_weights_offline_are_one_line_and_nothing_is_prepared(tmp_path, sw_corpus, command, args, model):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "w2vbert_asr.cli", command, "lang=sw", f"data.root={sw_corpus}",
                           f"output_dir={out}", *args], capture_output=True, text=True, timeout=300,
                          env=_offline_env(tmp_path / "empty_cache"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {command} needs the model {model}, which is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in lines[0] and "w2vbert-asr download" in lines[0]
    assert not list(out.rglob("prepared")) and not list(out.rglob("*.arrow"))


def test_a_cached_model_passes_offline(tmp_path, monkeypatch):
    """A model in the cache's layout (models--org--name/snapshots/<rev>/ + refs/main) needs no Hub."""
    from huggingface_hub import constants

    from w2vbert_asr import weights
    from w2vbert_asr.standins import build_tiny_omniasr_ctc

    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    build_tiny_omniasr_ctc(snapshot, ["habari ya leo"] * 5)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert weights.cached_folder("org/tiny") == snapshot
    weights.require(["org/tiny"], "baseline")
    with pytest.raises(UsageError, match="baseline needs the model org/other"):
        weights.require(["org/other"], "baseline")
    assert weights.hub_ids([str(snapshot), None, "org/tiny", "org/tiny", "not a/hub id"]) == ["org/tiny"]
    shutil.rmtree(tmp_path / "hub")


def test_download_lists_what_the_recipe_s_commands_need():
    from w2vbert_asr.download import needed

    cfg = compose(["recipe=mn", "data.root=/data/mn", "bakeoff.overrides=['recipe=mn','data.root=/data/mn']"])
    ids = [repo_id for repo_id, _ in needed(cfg)]
    assert ids == ["facebook/w2v-bert-2.0", "openai/whisper-large-v3", "hf-audio/omniasr-ctc-300m-v2",
                   "hf-audio/omniasr-ctc-1b-v2", "facebook/mms-1b-all", "hf-audio/omniasr-llm-7b-v2"]
    demo = compose(["recipe=bakeoff_demo", "bakeoff.overrides=['recipe=bakeoff_demo']"])
    assert needed(demo) == []  # tiny models from config and random stand-ins: nothing to fetch


def test_download_offline_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "w2vbert_asr.cli", "download", "recipe=demo"], capture_output=True,
                          text=True, timeout=120, env=_offline_env(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: HF_HUB_OFFLINE is set")
