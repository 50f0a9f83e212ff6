"""The try-it page in a real browser: Debian's headless Chromium, driven by Playwright. It uploads a clip and
reads the transcript from the page, then records through Chromium's fake microphone and reads that one too.
Skipped where Chromium is not installed (`apt-get install chromium`; docs/serving.md)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serving import ThreadServer, save_tiny_model, spoken_wave
from w2vbert_asr.cli import compose

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Debian's chromium (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
SENTENCES = ["habari ya asubuhi rafiki yangu", "jambo sana", "asante kwa chakula"]
RECORD_SECONDS = 2.5


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_browser")
    model = save_tiny_model(d / "model")
    sf.write(d / "clip.flac", spoken_wave(SENTENCES, 22_050), 22_050)
    # What the fake microphone plays, looped: 16-bit PCM WAV (the format Chromium's fake capture reads).
    sf.write(d / "mic.wav", spoken_wave(SENTENCES, 48_000, seed=1), 48_000, subtype="PCM_16")
    cfg = compose(["lang=sw", f"model_dir={model}", f"output_dir={d}", "transcribe.device=cpu"])
    with ThreadServer(cfg) as url:
        yield {"dir": d, "url": url}


@pytest.fixture(scope="module")
def browser(site):
    args = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={site['dir'] / 'mic.wav'}",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 900, "height": 640}, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(site["url"] + "/")
    page.wait_for_selector("#model:has-text('speak or drop')")  # (no wait_for_function: the CSP forbids eval)
    yield page
    assert not errors, errors
    context.close()


def api(url: str, audio: bytes, name: str, response_format: str) -> str:
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="response_format"\r\n\r\n{response_format}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n').encode()
    body += audio + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/v1/audio/transcriptions", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return r.read().decode()


def download(page, selector: str) -> bytes:
    """Click a download link as a user would -> the downloaded file's bytes."""
    with page.expect_download() as info:
        page.click(selector)
    return Path(info.value.path()).read_bytes()


def shown_words(page) -> list[dict]:
    return page.eval_on_selector_all("#transcript .word", """spans => spans.map(s => ({
        word: s.textContent, tip: s.dataset.tip, confidence: Number(s.dataset.confidence),
        shade: getComputedStyle(s).backgroundColor}))""")


def test_upload_a_clip_and_read_the_transcript(page, site):
    page.set_input_files("#file", str(site["dir"] / "clip.flac"))
    page.wait_for_selector("#transcript[data-state=done]", timeout=60_000)
    clip = (site["dir"] / "clip.flac").read_bytes()
    expected = json.loads(api(site["url"], clip, "clip.flac", "verbose_json"))
    assert page.get_attribute("#transcript", "data-text") == expected["text"]
    words = shown_words(page)
    assert [w["word"] for w in words] == [w["word"] for w in expected["words"]] and words
    assert page.inner_text("#transcript") == expected["text"]
    for shown, truth in zip(words, expected["words"]):
        # Time on hover, and the shade: the less confident, the more opaque the orange behind the word.
        assert shown["tip"] == (f"{truth['start']:.2f}–{truth['end']:.2f} s · confidence "
                                  f"{round(truth['confidence'] * 100)} %")
        alpha = float(re.findall(r"[\d.]+", shown["shade"])[3]) if shown["shade"].startswith("rgba") else 1.0
        assert alpha == pytest.approx(0.85 * (1 - truth["confidence"]), abs=0.01)
    assert download(page, "#download-txt").decode() == expected["text"] + "\n"
    assert download(page, "#download-srt").decode() == api(site["url"], clip, "clip.flac", "srt")
    assert download(page, "#download-audio") == clip
    if os.environ.get("W2VBERT_SCREENSHOT"):
        page.screenshot(path=os.environ["W2VBERT_SCREENSHOT"], full_page=True)


def test_record_through_the_fake_microphone(page, site):
    page.click("#record")
    page.wait_for_selector("#record[aria-pressed=true]")
    page.wait_for_timeout(RECORD_SECONDS * 1000)
    page.click("#record")
    page.wait_for_selector("#transcript[data-state=done]", timeout=60_000)
    # What the page recorded and sent (its Audio link): a 16 kHz WAV of the fake microphone's speech ...
    recorded = download(page, "#download-audio")
    wave, rate = sf.read(io.BytesIO(recorded), dtype="float32")
    assert rate == 16_000 and wave.ndim == 1
    assert 1.0 < len(wave) / rate < RECORD_SECONDS + 2.0
    assert np.sqrt(np.mean(wave**2)) > 0.01  # speech, not silence
    # ... and the page shows the server's transcript of exactly that audio.
    expected = json.loads(api(site["url"], recorded, "recording.wav", "verbose_json"))
    assert page.get_attribute("#transcript", "data-text") == expected["text"]
    assert [w["word"] for w in shown_words(page)] == [w["word"] for w in expected["words"]]
    assert "s of audio" in page.inner_text("#meta")
