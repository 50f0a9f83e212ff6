"""`w2vbert-asr serve` as a user runs it (the CLI in its own process), called by the official `openai` client:
every response format, with the text `w2vbert-asr transcribe` writes for the same file; the model list,
health and page; the key; and logs that hold neither the key nor the audio."""

from __future__ import annotations

import re

import pytest
import soundfile as sf
import torch

from serving import ROOT, CliServer, get, save_tiny_model, spoken_wave
from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose

openai = pytest.importorskip("openai", reason="the test extra installs the openai client")

KEY = "sk-test-" + "q" * 32
AUDIO_MARKER = b"AUDIO-BYTES-MUST-NOT-BE-LOGGED"
SENTENCES = ["habari ya asubuhi rafiki yangu", "jambo sana", "asante kwa chakula kizuri", "karibu tena kesho"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_api")
    model = save_tiny_model(d / "model")
    clips = {"talk.wav": d / "talk.wav", "short.mp3": d / "short.mp3"}
    sf.write(clips["talk.wav"], spoken_wave(SENTENCES), 16_000)
    sf.write(clips["short.mp3"], spoken_wave(SENTENCES[:2], 44_100), 44_100)
    server = CliServer([f"model={model}", "transcribe.device=cpu"], d, env={"W2VBERT_ASR_API_KEY": KEY})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield {"dir": d, "model": model, "clips": clips, "server": server, "client": client}
    server.close()


@pytest.fixture(scope="module")
def transcribed(served):
    """What `w2vbert-asr transcribe model=<dir> <clips>` writes, with one thread like the server."""
    from w2vbert_asr.cli import main

    out = served["dir"] / "transcripts"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["transcribe", f"model={served['model']}", *map(str, served["clips"].values()),
                     f"transcribe.output_dir={out}", "transcribe.device=cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def create(served, name, **kwargs):
    with open(served["clips"][name], "rb") as f:
        return served["client"].audio.transcriptions.create(model="w2vbert-asr", file=f, **kwargs)


@pytest.mark.parametrize("name", ["talk.wav", "short.mp3"])
def test_every_response_format_equals_transcribe(served, transcribed, name):
    import json

    stem = name.split(".")[0]
    txt = (transcribed / f"{stem}.txt").read_text(encoding="utf-8")
    srt = (transcribed / f"{stem}.srt").read_text(encoding="utf-8")
    data = json.loads((transcribed / f"{stem}.json").read_text(encoding="utf-8"))
    assert data["text"] and data["words"]  # random weights still emit letters

    assert create(served, name).text == data["text"]
    assert create(served, name, response_format="json").text == data["text"]
    assert create(served, name, response_format="text") == txt
    assert create(served, name, response_format="srt") == srt
    vtt = create(served, name, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    srt_cues = [re.sub(r"^\d+\n", "", block).replace(",", ".") for block in srt.strip().split("\n\n")]
    assert vtt[len("WEBVTT\n\n"):].strip().split("\n\n") == srt_cues

    verbose = create(served, name, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert verbose.text == data["text"] and verbose.duration == data["duration"]
    words = [w.model_dump() for w in verbose.words]
    assert words == data["words"]  # word, start, end and our confidence
    assert verbose.model_extra["confidence"] == data["confidence"]
    rebuilt = "\n".join(f"{i}\n{_srt_time(s.start)} --> {_srt_time(max(s.end, s.start + 0.001))}\n{s.text}\n"
                        for i, s in enumerate(verbose.segments, 1))
    assert rebuilt == srt  # segments are the subtitle cues
    assert all(0 < s.model_extra["confidence"] <= 1 for s in verbose.segments)
    only_words = create(served, name, response_format="verbose_json", timestamp_granularities=["word"])
    assert only_words.segments is None and len(only_words.words) == len(words)


def _srt_time(seconds: float) -> str:
    from w2vbert_asr.subtitles import srt_time

    return srt_time(seconds)


def test_models_health_and_the_page(served):
    client, url = served["client"], served["server"].url
    [model] = client.models.list().data
    assert model.id == "serve_api0" and model.owned_by == "w2vbert-asr"  # the run folder of train's model/
    status, health = get(url + "/health")
    assert status == 200 and health["status"] == "ok" and health["capacity"] == 16 + 64
    status, page = get(url + "/")
    assert status == 200 and "/static/app.js" in page and "/static/style.css" in page
    for name in ("index.html", "app.js", "style.css"):
        text = (ROOT / "w2vbert_asr" / "static" / name).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{name} loads from elsewhere"
        assert get(url + f"/static/{name}")[0] == 200
    import urllib.request

    with urllib.request.urlopen(url + "/") as r:
        assert "default-src 'self'" in r.headers["content-security-policy"]


def test_a_missing_or_wrong_key_is_401_and_logs_hold_no_secret_or_audio(served):
    url = served["server"].url
    client = openai.OpenAI(base_url=url + "/v1", api_key="wrong-" + KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.audio.transcriptions.create(model="m", file=("clip.wav", AUDIO_MARKER * 50))
    with pytest.raises(openai.BadRequestError, match="undecodable"):
        served["client"].audio.transcriptions.create(model="m", file=("clip.wav", AUDIO_MARKER * 50))
    log = served["server"].output()
    assert "undecodable" in log  # the failure is logged ...
    assert KEY not in log and AUDIO_MARKER.decode() not in log  # ... without the key or the audio
    assert not list(served["server"].tmpdir.glob("w2vbert-serve-*/*"))  # every upload removed


def test_binding_beyond_loopback_needs_a_key_or_consent():
    from w2vbert_asr.serve import check_bind

    base = ["lang=sw", "serve.api_key=null"]
    with pytest.raises(UsageError, match="serve.host=0.0.0.0 lets other machines in"):
        check_bind(compose([*base, "serve.host=0.0.0.0"]).serve)
    check_bind(compose([*base, "serve.host=0.0.0.0", "serve.allow_anonymous=true"]).serve)
    check_bind(compose(["lang=sw", "serve.host=0.0.0.0", "serve.api_key=k"]).serve)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(compose([*base, f"serve.host={host}"]).serve)
