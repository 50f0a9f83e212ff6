"""Helpers of the `w2vbert-asr serve` tests: a tiny model folder, spoken clips, and servers to talk to.

    save_tiny_model(folder)          a random tiny Wav2Vec2BertForCTC saved as train exports it
    spoken_clip(path, sentences)     espeak sentences with pauses, written in the format of path's extension
    ThreadServer(cfg, engine)        the app on uvicorn in a thread of this process, on a free loopback port
    CliServer(args, tmp)             `w2vbert-asr serve ... serve.port=0` as a subprocess, its stdout and stderr kept
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from w2vbert_asr.cli import compose

ROOT = Path(__file__).resolve().parents[1]
SR = 16_000


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    from w2vbert_asr.model import build_model
    from w2vbert_asr.text import Normalizer, Vocabulary, build_processor

    processor = build_processor(Vocabulary.build(["habari ya asubuhi", "jambo rafiki yangu", "asante sana"]),
                                folder.parent / f"{folder.name}_processor")
    torch.manual_seed(seed)
    model = build_model(compose(["recipe=demo"]).model, processor.tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    Normalizer().save(folder)
    return folder


def spoken_wave(sentences: list[str], rate: int = SR, seed: int = 0) -> np.ndarray:
    """espeak sentences at `rate` separated by 0.6 s pauses, over faint room tone."""
    import soxr

    from w2vbert_asr.synth import speak

    parts = [np.zeros(int(0.4 * rate), np.float32)]
    for text in sentences:
        audio, native = speak(text, "sw")
        parts += [soxr.resample(audio, native, rate).astype(np.float32), np.zeros(int(0.6 * rate), np.float32)]
    wave = np.concatenate(parts)
    return wave + np.random.default_rng(seed).normal(0, 3e-3, wave.size).astype(np.float32)


def spoken_clip(path: Path, sentences: list[str], rate: int = SR) -> Path:
    sf.write(path, spoken_wave(sentences, rate), rate)
    return path


def get(url: str, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


class ThreadServer:
    """`with ThreadServer(cfg, engine) as url:` the real app and protocol (serve.create_app, uvicorn_config)
    on 127.0.0.1, in a thread; the engine (and its model) may be built by the test."""

    def __init__(self, cfg, engine=None):
        from w2vbert_asr.serve import create_app

        self.cfg = cfg
        self.app = create_app(cfg, engine)
        self.engine = self.app.state.engine

    def __enter__(self) -> str:
        import uvicorn

        from w2vbert_asr.serve import bind_socket, uvicorn_config

        self.sock = bind_socket("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.cfg.serve))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(400):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "the server did not start"
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class CliServer:
    """`w2vbert-asr serve model=<dir> serve.port=0 <args>` in a subprocess (TMPDIR=<tmp>/tmp, one thread)."""

    def __init__(self, args: list[str], tmp: Path, env: dict | None = None):
        self.tmpdir = tmp / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.log = tmp / "server.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(self.tmpdir),
               **(env or {})}
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "w2vbert_asr.cli", "serve", "serve.port=0", *args],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            found = re.search(r"at http://127\.0\.0\.1:(\d+)/", self.log.read_text())
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                if get(self.url + "/health", timeout=60)[0] == 200:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.close()
        raise AssertionError(f"the server did not start: {self.log.read_text()[-3000:]}")

    def output(self) -> str:
        self.out.flush()
        return self.log.read_text()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
