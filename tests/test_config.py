"""The typed config schema (w2vbert_asr/config.py) and its checks (w2vbert_asr/checks.py): a mistake on the
command line or in a recipe is one `error:` line at compose time (exit code 2), and everything that worked before still composes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from w2vbert_asr import UsageError, checks, config
from w2vbert_asr.cli import compose

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
TOKEN = "hf_" + "q" * 34  # shaped like a Hub token


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "w2vbert_asr.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------------- the real CLI, in a subprocess
@pytest.mark.parametrize("override, expected", [
    ("train.max_stepz=3", "error: train.max_stepz is not a config key; did you mean train.max_steps?"),
    ("+train.max_stepz=3", "error: train.max_stepz is not a config key; did you mean train.max_steps?"),
    ("train.mixed_precision=bf61", "error: train.mixed_precision=bf61: choose one of auto, no, fp16, bf16"),
    (f"+push.hub_token={TOKEN}", "error: push.hub_token is not a config key: secrets never go into the config"),
])
def test_cli_mistake_is_one_error_line(override, expected, tmp_path):
    line = _one_error_line(_cli("train", "recipe=demo", override, cwd=tmp_path))
    assert line.startswith(expected), line
    assert TOKEN not in line and "HYDRA_FULL_ERROR" not in line
    assert not list(tmp_path.iterdir())  # refused before anything is written or locked


def test_cli_cfg_job_still_shows_the_composed_config(tmp_path):
    """`--cfg job` with `model=<dir>` and positional audio: the new per-section keys follow the old ones."""
    (tmp_path / "run" / "model").mkdir(parents=True)
    proc = _cli("transcribe", "model=run/model", "clip.wav", "export.quantize=int8", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job = OmegaConf.create(proc.stdout)
    assert job.model_dir == "run/model" and list(job.transcribe.inputs) == ["clip.wav"]
    assert job.transcribe.quantize == job.eval.quantize == "int8"  # both follow export.quantize
    assert "sampling_rate" not in job.data


# ------------------------------------------------------------------------- compose(): the same checks
@pytest.mark.parametrize("override, message", [
    ("pseudolabel.threshold=1.1", "pseudolabel.threshold=1.1: give a number within [0, 1]"),
    ("pseudolabel.threshold=-0.5", "pseudolabel.threshold=-0.5: give a number within [0, 1]"),
    ("compare.confidence=1", "compare.confidence=1.0: give a number within (0, 1)"),
    ("lm.order=7", "lm.order=7: give a number within [2, 6]"),
    ("train.max_batch_size=0", "train.max_batch_size=0: give a number >= 1"),
    ("data.min_duration=40", "data.min_duration=40.0 is above data.max_duration=30.0"),
    ("transcribe.overlap_seconds=20", "transcribe.overlap_seconds=20.0 must be below transcribe.chunk_seconds=20.0"),
    ("confidence.alpha=1", "confidence.alpha=1 with confidence.measure=tsallis: the entropy order must differ"),
    ("data.num_proc=0", "data.num_proc=0: give auto or a whole number >= 1"),
    ("transcribe.batch_size=many", "transcribe.batch_size=many: give auto or a whole number >= 1"),
    ("transcribe.formats=[txt,pdf]", "transcribe.formats[1]=pdf: choose one of txt, json, srt"),
    ("eval.device=gpu", "eval.device=gpu: choose auto, cpu, cuda or cuda:N"),
    ("export.quantize=int4", "export.quantize=int4: choose one of null, int8"),
    ("train.lr_scheduler=cosin", "train.lr_scheduler=cosin: choose one of linear, cosine"),
    ("train.log_with=tensorbord", "did you mean tensorboard?"),
    ("text.digits=drop", "text.digits=drop: choose one of keep, remove, drop_row"),
    ("confidence.measure=entropy", "confidence.measure=entropy: choose one of max_prob, gibbs, tsallis, renyi"),
    ("train.max_steps=abc", "train.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("+model.config_overrides.mask_time_prop=0.1", "model.config_overrides.mask_time_prop is not a "
                                                   "Wav2Vec2BertConfig setting; did you mean "
                                                   "model.config_overrides.mask_time_prob?"),
    ("trian.max_steps=3", "trian is not a config key; did you mean train?"),
    ("+HF_TOKEN=x", "HF_TOKEN is not a config key: secrets never go into the config"),
    ("recipe=mnn", "recipe=mnn is not an option; did you mean recipe=mn?"),
    ("train.max_steps=[", "cannot parse train.max_steps=[:"),
])
def test_a_mistake_is_one_line_naming_the_key(override, message):
    with pytest.raises(checks.ConfigError) as err:
        compose(["recipe=demo", override])
    assert isinstance(err.value, UsageError) and message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["data.sampling_rate=16000", "+data.sampling_rate=22050"])
def test_the_sampling_rate_is_not_a_setting(override):
    with pytest.raises(checks.ConfigError, match=r"^data.sampling_rate was removed: audio is always resampled to "):
        compose(["recipe=demo", override])


@pytest.mark.parametrize("override", ["train.lr=1e-3", "+train.lr=1e-3"])
def test_a_renamed_key_names_its_new_name(override, monkeypatch):
    monkeypatch.setitem(checks.RENAMED, "train.lr", "train.learning_rate")
    with pytest.raises(checks.ConfigError, match=r"^train.lr was renamed: use train.learning_rate$"):
        compose(["recipe=demo", override])


def test_a_recipe_key_the_source_lacks_names_the_recipe():
    with pytest.raises(checks.ConfigError, match=r"^in recipe/demo: data.root is not a config key"):
        compose(["recipe=demo", "data=hf"])


# ------------------------------------------------------------------------- what worked before still works
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    cfg = compose([f"recipe={recipe}", "data.root=/data/corpus"])
    assert OmegaConf.get_type(cfg.data) is config.CommonVoiceData
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("overrides, source", [
    (["lang=sw", "data.root=/data/cv/sw"], config.CommonVoiceData),
    (["lang=sw", "data=hf", "data.name=org/speech"], config.HFData),
    (["lang=sw", "data=manifest", "data.files.train=a.tsv", "data.files.dev=b.tsv", "data.files.test=c.tsv"],
     config.ManifestData),
    (["lang=sw", "data.root=x", "train=v100_16gb", "model=tiny", "compare.runs=[a,b]"], config.CommonVoiceData),
])
def test_each_source_has_its_own_schema(overrides, source):
    cfg = compose(overrides)
    assert OmegaConf.get_type(cfg.data) is source
    OmegaConf.to_container(cfg.data, resolve=True)


def test_sections_read_their_own_keys():
    cfg = compose(["lang=sw", "export.quantize=int8", "eval.lm=lm_dir"])
    assert cfg.eval.quantize == cfg.transcribe.quantize == "int8"
    assert cfg.pseudolabel.lm == "lm_dir" and cfg.eval.device == "auto"
    cfg = compose(["lang=sw", "eval.quantize=int8", "pseudolabel.lm=other"])
    assert cfg.export.quantize is None and cfg.transcribe.quantize is None and cfg.eval.lm is None


def test_values_stay_plain_strings_in_what_training_writes():
    from w2vbert_asr.redact import config_yaml

    cfg = compose(["recipe=demo"])
    written = config_yaml(cfg)
    assert "mixed_precision: auto" in written and "num_proc: auto" in written and "log_with: tensorboard" in written
    assert json.loads(json.dumps(OmegaConf.to_container(cfg.train)))["mixed_precision"] == "auto"
    assert f"{cfg.train.mixed_precision}/{cfg.transcribe.batch_size}" == "auto/auto"


def test_a_token_in_a_string_key_is_redacted_from_config_yaml():
    from w2vbert_asr.redact import config_yaml

    cfg = compose(["recipe=demo", f"push.commit_message={TOKEN}"])
    cfg.push.command = "w2vbert-asr train recipe=demo"  # what cli.run sets at run time
    assert TOKEN not in config_yaml(cfg) and "commit_message: <redacted>" in config_yaml(cfg)


def test_self_training_rounds_replace_the_data_section():
    """pseudolabel._round_config assigns a plain dict to `data` and sets keys under open_dict."""
    from w2vbert_asr.pseudolabel import _round_config

    cfg = compose(["recipe=selftrain_demo"])
    new = _round_config(cfg, Path("rounds/round1"), ["rounds/round1/pseudo/pseudo.tsv"], "rounds/round0/model")
    assert new.data.root == "selftrain_out/corpus" and list(new.data.extra_train) == ["rounds/round1/pseudo/pseudo.tsv"]
    assert new.train.init_from == "rounds/round0/model" and new.eval.results_dir == "rounds/round1"
    checks.validate(new)


def test_missing_required_values_pass_composition():
    """lang and data.root are reported by the command that reads them (cli: one `error:` line)."""
    cfg = compose(["model=tiny"])
    assert OmegaConf.is_missing(cfg, "lang") and OmegaConf.is_missing(cfg.data, "root")


# ------------------------------------------------------------------------- the schema itself
def _schemas() -> set[type]:
    """Every dataclass of the schema: the registered ones and the sections nested in them."""
    seen, todo = set(), list(config.SCHEMAS.values())
    while todo:
        schema = todo.pop()
        if schema not in seen:
            seen.add(schema)
            todo += [t for t in typing.get_type_hints(schema).values() if dataclasses.is_dataclass(t)]
    return seen


def test_conf_gives_every_value_and_the_schema_none():
    """A default lives in conf/ only: the dataclasses hold no values, and conf/ sets every key but the ones
    a user must give."""
    assert {config.TranscribeConfig, config.Int8Config, config.ManifestData} <= _schemas()
    for schema in _schemas():
        for f in dataclasses.fields(schema):
            assert f.default is MISSING and f.default_factory is dataclasses.MISSING, f"{schema.__name__}.{f.name}"
    required = {"lang", "data.root", "data.name", "data.files.train", "data.files.dev", "data.files.test"}
    for overrides in ([], ["data=hf"], ["data=manifest"], ["model=tiny", "train=v100_16gb"]):
        cfg = compose(overrides)
        missing = {key for key in _leaves(cfg) if OmegaConf.is_missing(cfg, key)}
        assert missing <= required, missing - required


def _leaves(node, prefix=""):
    for key in node:
        value = node._get_node(key)
        if OmegaConf.is_dict(value) and not value._is_none() and not OmegaConf.is_missing(node, key):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"
