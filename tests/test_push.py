"""`w2vbert-asr push`: the generated model card, the staged folder, and the calls made to the Hub.

The real Hugging Face Hub cannot be reached from the test machines (no network), so uploads are checked
with a recording stand-in for `huggingface_hub.HfApi`: the exact create_repo/upload_folder calls, the
files in the folder at upload time, and that the token never leaks into files or output.
"""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from huggingface_hub import ModelCard
from omegaconf import OmegaConf
from transformers import Wav2Vec2BertForCTC, Wav2Vec2BertProcessor

import w2vbert_asr.push as pushing
from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose

FAKE_TOKEN = "hf_FAKEtokenFORtestsONLY0123456789abcd"
BASE_MODEL = "facebook/w2v-bert-2.0"
METRICS = {"system": "w2v-bert-2.0-ctc", "parameters": 2469803, "splits": {
    "dev": {"wer": 0.25, "cer": 0.08, "utterances": 40, "audio_hours": 0.02, "decoding": "greedy"},
    "test": {"wer": 0.3, "cer": 0.1, "utterances": 40, "audio_hours": 0.02, "decoding": "greedy"},
    "test+lm": {"wer": 0.2, "cer": 0.09, "utterances": 40, "audio_hours": 0.02, "decoding": "beam+lm"}}}
COMPARISON = """# Comparison on split `test`

| system | model | WER % | CER % |
|---|---|---:|---:|
| w2v-bert-2.0-ctc | demo_out/model | 30.00 | 10.00 |
| whisper | openai/whisper-large-v3 | 80.00 | 40.00 |

## Where the systems disagree most (top 1 of 40)

1. `clip-1`: SECRET_TRANSCRIPT_TEXT
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """<run>/model like train exports it, with <run>/config.yaml, metrics.json and compare/comparison.md."""
    from w2vbert_asr.model import build_model
    from w2vbert_asr.text import Normalizer, Vocabulary, build_processor

    run = tmp_path_factory.mktemp("run")
    model = run / "model"
    processor = build_processor(Vocabulary.build(["habari ya asubuhi", "jambo rafiki"]), model)
    cfg = compose(["recipe=demo", f"output_dir={run}", f"model.name_or_path={BASE_MODEL}"])
    # compose refuses secret-looking keys; a config.yaml written by an older version can still hold one
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.data.hub_token = "should_never_show"
    torch.manual_seed(0)
    build_model(compose(["recipe=demo"]).model, processor.tokenizer).save_pretrained(model, safe_serialization=True)
    Normalizer().save(model)
    (model / "pytorch_model.bin").write_bytes(b"pickle")  # must never be published
    (model / ".cache").mkdir()
    (model / ".cache" / "x").write_text("hidden")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run / "metrics.json").write_text(json.dumps(METRICS))
    (run / "compare").mkdir()
    (run / "compare" / "comparison.md").write_text(COMPARISON)
    return model


def push_cfg(model_dir, tmp_path, *extra):
    return compose(["lang=model", f"output_dir={tmp_path}", f"model_dir={model_dir}",
                    f"push.staging_dir={tmp_path / 'staging'}", *extra])


class RecordingHfApi:
    """Stand-in for HfApi: records calls and what the uploaded folder holds at upload time."""

    calls: ClassVar[list] = []

    def __init__(self, *args, **kwargs):
        RecordingHfApi.calls.append(("init", args, kwargs))

    def create_repo(self, repo_id, **kwargs):
        RecordingHfApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        from pathlib import Path

        root = Path(kwargs["folder_path"])
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        RecordingHfApi.calls.append(("upload_folder", kwargs, files))

        class Commit:
            oid = "0" * 40

        return Commit()


@pytest.fixture
def recorder(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(pushing, "HfApi", RecordingHfApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return RecordingHfApi


def test_card_metadata_round_trip(model_dir, tmp_path):
    card = pushing.build_card(model_dir, "me/w2v-bert-sw", compose(["recipe=demo"]).push)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.language == "sw" and data.license == "apache-2.0" and data.base_model == BASE_MODEL
    assert data.metrics == ["wer", "cer"] and data.pipeline_tag == "automatic-speech-recognition"
    assert {"automatic-speech-recognition", "ctc", "w2v-bert-2.0"} <= set(data.tags)
    got = {(r.dataset_split, r.metric_type, r.metric_name): r.metric_value for r in data.eval_results}
    assert got == {("dev", "wer", "WER"): 25.0, ("dev", "cer", "CER"): 8.0, ("test", "wer", "WER"): 30.0,
                   ("test", "cer", "CER"): 10.0, ("test", "wer", "WER (n-gram LM)"): 20.0,
                   ("test", "cer", "CER (n-gram LM)"): 9.0}
    assert all(r.task_type == "automatic-speech-recognition" for r in data.eval_results)
    assert "model-index" in data.to_dict()
    text = loaded.text
    assert "| test | greedy | 30.00 | 10.00 |" in text and "| test | beam+lm | 20.00 | 9.00 |" in text
    assert "whisper-large-v3 | 80.00" in text and "SECRET_TRANSCRIPT_TEXT" not in text  # table, not the examples
    assert "| learning rate | `0.002` |" in text and "| LR schedule | `cosine` |" in text
    assert "should_never_show" not in text and "<redacted>" in text


def test_dry_run_writes_exactly_the_upload_folder(model_dir, tmp_path, recorder, capsys):
    result = pushing.push(push_cfg(model_dir, tmp_path, "push.repo_id=me/w2v-bert-sw", "push.dry_run=true"))
    staging = tmp_path / "staging"
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    assert result["files"] == files and result["uploaded"] is False
    assert "README.md" in files and "model.safetensors" in files and "normalizer.json" in files
    assert "pytorch_model.bin" not in files and not any(f.startswith(".") for f in files)
    assert recorder.calls == []  # nothing touched the Hub
    model = Wav2Vec2BertForCTC.from_pretrained(staging, use_safetensors=True)
    processor = Wav2Vec2BertProcessor.from_pretrained(staging)
    assert model.config.vocab_size == len(processor.tokenizer)
    # A second dry run rebuilds the folder from scratch (a stale file disappears).
    (staging / "stale.txt").write_text("old")
    pushing.push(push_cfg(model_dir, tmp_path, "push.dry_run=true"))
    assert not (staging / "stale.txt").exists()


def test_push_uploads_the_staging_folder_and_never_leaks_the_token(model_dir, tmp_path, recorder, capsys, caplog):
    dry = pushing.push(push_cfg(model_dir, tmp_path, "push.repo_id=me/w2v-bert-sw", "push.dry_run=true"))
    result = pushing.push(push_cfg(model_dir, tmp_path, "push.repo_id=me/w2v-bert-sw", "push.private=true"))
    staging = tmp_path / "staging"
    assert recorder.calls == [
        ("init", (), {}),
        ("create_repo", "me/w2v-bert-sw", {"private": True, "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", {"repo_id": "me/w2v-bert-sw", "folder_path": str(staging), "repo_type": "model",
                           "commit_message": "Upload W2v-BERT 2.0 CTC model"}, dry["files"]),
    ]
    assert result["uploaded"] and result["files"] == dry["files"] and result["private"] is True
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err + caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_public_push_passes_private_false(model_dir, tmp_path, recorder):
    pushing.push(push_cfg(model_dir, tmp_path, "push.repo_id=org/name"))
    assert recorder.calls[1] == ("create_repo", "org/name", {"private": False, "exist_ok": True, "repo_type": "model"})


def test_token_in_a_model_file_stops_the_push(tmp_path, model_dir, recorder):
    import shutil

    leaky = tmp_path / "leaky" / "model"
    shutil.copytree(model_dir, leaky)
    (leaky / "notes.json").write_text(json.dumps({"token": FAKE_TOKEN}))
    with pytest.raises(UsageError, match="token would be published: .*leaky/model/notes.json contains it") as err:
        pushing.push(push_cfg(leaky, tmp_path, "push.repo_id=me/x"))
    assert FAKE_TOKEN not in str(err.value)
    assert recorder.calls == [] and not (tmp_path / "staging").exists()


def test_clear_errors(model_dir, tmp_path, recorder):
    with pytest.raises(UsageError, match="push.repo_id"):
        pushing.push(push_cfg(model_dir, tmp_path))
    with pytest.raises(UsageError, match="not a Hub repo id"):
        pushing.push(push_cfg(model_dir, tmp_path, "push.repo_id=no-namespace"))
    with pytest.raises(UsageError, match="not a model folder"):
        pushing.push(push_cfg(tmp_path, tmp_path / "x", "push.repo_id=me/x"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="not empty"):
        pushing.push(compose(["lang=model", f"model_dir={model_dir}", f"push.staging_dir={tmp_path / 'mine'}",
                          "push.dry_run=true"]))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert recorder.calls == []


def _run_with_config(tmp_path, model_dir, config_text: str):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    (run / "config.yaml").write_text(config_text)
    return run / "model"


def test_secrets_typed_on_the_train_command_line_reach_no_file(model_dir, tmp_path, recorder):
    """`+push.hub_token=…` and a token-shaped value: not in config.yaml, not in the card's command or config."""
    from w2vbert_asr.cli import shown_command
    from w2vbert_asr.redact import config_yaml

    from w2vbert_asr.checks import ConfigError

    args = ["recipe=demo", "+push.hub_token=hf_abc", f"push.commit_message={FAKE_TOKEN}", "train.learning_rate=1e-3"]
    with pytest.raises(ConfigError, match="push.hub_token is not a config key: secrets never go into the config") as e:
        compose(args)
    assert "hf_abc" not in str(e.value)
    cfg = compose([a for a in args if "hub_token" not in a])
    cfg.push.command = shown_command("train", args)
    assert "hf_abc" not in cfg.push.command and "train.learning_rate=1e-3" in cfg.push.command
    written = config_yaml(cfg)
    assert FAKE_TOKEN not in written and "commit_message: <redacted>" in written
    # A run folder written before redaction (the command and the key in plain text) still gives a clean card.
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.push.hub_token = "hf_abc"
    cfg.push.command = "w2vbert-asr train " + " ".join(args)
    for text in (written, OmegaConf.to_yaml(cfg, resolve=True)):
        card = pushing.build_card(_run_with_config(tmp_path / str(len(text)), model_dir, text), "me/x",
                              compose(["recipe=demo"]).push).content
        assert "hf_abc" not in card and FAKE_TOKEN not in card
        assert "'+push.hub_token=<redacted>'" in card and "train.learning_rate=1e-3" in card


def test_token_in_what_the_card_quotes_names_its_source(model_dir, tmp_path, recorder, monkeypatch):
    token = "private-0123456789"  # not shaped like a Hub token, under a key that does not look secret
    monkeypatch.setenv("HF_TOKEN", token)
    model = _run_with_config(tmp_path, model_dir,
                             f"lang: sw\npush:\n  command: w2vbert-asr train push.commit_message={token}\n")
    with pytest.raises(UsageError, match=r"card would quote it from .*run/config.yaml \(push.command\)") as err:
        pushing.push(push_cfg(model, tmp_path, "push.dry_run=true"))
    assert token not in str(err.value) and not (tmp_path / "staging").exists()


def test_no_token_says_where_tokens_come_from(model_dir, tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalTokenNotFoundError

    class NoToken(RecordingHfApi):
        def create_repo(self, repo_id, **kwargs):
            raise LocalTokenNotFoundError("no token")

    monkeypatch.setattr(pushing, "HfApi", NoToken)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UsageError, match=r"no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again$"):
        pushing.push(push_cfg(model_dir, tmp_path, "push.repo_id=me/x"))


@pytest.mark.parametrize("key, secret", [("+push.hub_token", True), ("+HF_TOKEN", True), ("wandb.api_key", True),
                                         ("db-password", True), ("baseline.max_new_tokens", False),
                                         ("model.tokenizer", False), ("push.command", False)])
def test_which_keys_are_secret(key, secret):
    from w2vbert_asr.redact import is_secret_key

    assert is_secret_key(key) is secret
