"""The configs and recipes ship inside the wheel, so an installed package composes the same configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_configs_and_recipes_and_composes_them(tmp_path):
    # Offline: the build backend (hatchling, in the test extra) comes from this environment, and pip may not
    # look at any index (no build isolation, no dependencies, --no-index).
    pytest.importorskip("hatchling", reason="the test extra installs hatchling, the build backend")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("w2vbert_asr-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "w2vbert_asr/conf/config.yaml" in names
    assert {"w2vbert_asr/conf/recipe/demo.yaml", "w2vbert_asr/conf/recipe/mn.yaml"} <= set(names)
    assert "w2vbert_asr/wordlists/sw.txt" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("from w2vbert_asr.cli import compose, conf_dir; c = compose(['recipe=mn', 'data.root=/x']); "
             "print(conf_dir()); print(c.text.drop_latin_words, c.model.config_overrides.ctc_loss_reduction)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    conf, values = run.stdout.splitlines()[-2:]
    assert conf.startswith(str(site)) and values == "True mean"
