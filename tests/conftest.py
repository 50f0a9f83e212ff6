"""Shared fixtures: small synthetic corpora spoken by libespeak-ng, prepared once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from w2vbert_asr.cli import compose
from w2vbert_asr.synth import synthesize_corpus

# Big enough for every split to have speakers and a vocabulary; small enough to synthesise in seconds.
SMALL_CORPUS_CLIPS = 60


def _run_overrides(output_dir, data_root, *extra: str) -> list[str]:
    """The demo recipe on a given corpus, sized for tests: a few steps, no worker processes."""
    return ["recipe=demo", f"output_dir={output_dir}", f"data.root={data_root}", "train.num_workers=0",
            "train.logging_steps=1", *extra]


@pytest.fixture(scope="session")
def run_overrides():
    return _run_overrides


@pytest.fixture(scope="session")
def sw_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw_corpus")
    synthesize_corpus(root, "sw", num_clips=SMALL_CORPUS_CLIPS, seed=0)
    return root


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory, sw_corpus):
    """A prepared output_dir on the small Swahili corpus -> its config."""
    from w2vbert_asr.prepare import prepare

    cfg = compose(_run_overrides(tmp_path_factory.mktemp("prepared_run"), sw_corpus))
    prepare(cfg)
    return cfg


@pytest.fixture(scope="session")
def load_benchmark():
    """benchmarks/<name>.py imported as a module (benchmarks are scripts, not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load
