"""The bad-input table of `w2vbert-asr serve` (docs/serving.md): every case gets its status code over a real
socket, and the server stays up and keeps answering after each. Plus what needs a slow model to show:
503 with Retry-After when the queue is full, 504 past serve.timeout_s, concurrent cancellations, and the
default queue taking 64 concurrent requests without one 503."""

from __future__ import annotations

import io
import json
import re
import select
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from serving import ROOT, ThreadServer, get, save_tiny_model, spoken_wave
from w2vbert_asr.cli import compose

KEY = "test-key-" + "k" * 24
BOUNDARY = "w2vbertboundary"
MAX_UPLOAD_MB = 1
TIMEOUT_S = 3.0


# --------------------------------------------------------------------------------------------- raw HTTP
def multipart(fields: dict | None = None, files: list[tuple[str, str, bytes]] = ()) -> bytes:
    parts = []
    for name, value in (fields or {}).items():
        for v in value if isinstance(value, list) else [value]:
            parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{v}\r\n'.encode())
    for name, filename, data in files:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def head(path="/v1/audio/transcriptions", method="POST", key=KEY, length: int | None = None,
         content_type=f"multipart/form-data; boundary={BOUNDARY}", extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict, bytes]:
    """-> (status, headers, body); status 0 when the server closed the connection without answering."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, data
        data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def exchange(url: str, request_head: bytes, chunks=(), pause: float = 0.0, timeout: float = 30):
    """Send a head, then body chunks (stopping early when the server answers), -> read_response."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request_head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered (or closed) before the body was whole
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            if pause:
                time.sleep(pause)
        return read_response(sock, timeout)


def post(url: str, body: bytes, **head_args):
    return exchange(url, head(length=len(body), **head_args), [body])


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_inputs")
    model = save_tiny_model(d / "model")
    wave = spoken_wave(["habari ya asubuhi rafiki", "jambo sana"])
    buf = io.BytesIO()
    sf.write(buf, wave, 16_000, format="WAV")
    mp3 = io.BytesIO()
    sf.write(mp3, spoken_wave(["habari ya asubuhi rafiki yangu", "asante sana"], 48_000), 48_000, format="MP3")
    return {"dir": d, "model": model, "wav": buf.getvalue(), "mp3": mp3.getvalue()}


def config(tiny, *overrides):
    return compose(["lang=sw", f"model_dir={tiny['model']}", f"output_dir={tiny['dir']}", "transcribe.device=cpu",
                    *overrides])


@pytest.fixture(scope="module")
def server(tiny):
    cfg = config(tiny, f"serve.api_key={KEY}", f"serve.max_upload_mb={MAX_UPLOAD_MB}", f"serve.timeout_s={TIMEOUT_S}")
    server = ThreadServer(cfg)
    with server as url:
        yield url, server.engine


# --------------------------------------------------------------------------------------------- the table
def _slow_body(url, tiny):
    body = multipart({"model": "m"}, [("file", "clip.wav", tiny["wav"])])
    return exchange(url, head(length=len(body)), [body[:200], *(body[200 + i:201 + i] for i in range(40))], pause=0.25)


def _slow_headers(url, tiny):
    start = f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n".encode()
    return exchange(url, start, [b"X-Slow: " + b"a" * i + b"\r\n" for i in range(40)], pause=0.25)


def _chunked_too_large(url, tiny):
    """A well-formed multipart file part that never ends, sent chunked (no Content-Length)."""
    start = multipart({}, [("file", "big.wav", tiny["wav"])]).rsplit(b"\r\n--", 1)[0]
    chunks = [start, *[b"\0" * 65536] * (MAX_UPLOAD_MB * 16 + 64)]
    return exchange(url, head(extra="Transfer-Encoding: chunked\r\n"), [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks])


def _path_like(filename):
    def case(url, tiny):
        return post(url, multipart({"model": "m"}, [("file", filename, tiny["wav"])]))
    return case


def _file(filename, data, **fields):
    def case(url, tiny):
        return post(url, multipart({"model": "m", **fields}, [("file", filename, data(tiny) if callable(data) else data)]))
    return case


# case id -> (send it, expected status; 0: the server closes the connection without an answer)
CASES = {
    "no-file": (lambda url, t: post(url, multipart({"model": "m"})), 400),
    "file-as-text-field": (lambda url, t: post(url, multipart({"model": "m", "file": "clip.wav"})), 400),
    "two-files": (lambda url, t: post(url, multipart({}, [("file", "a.wav", t["wav"]), ("file", "b.wav", t["wav"])])),
                  400),
    "empty-file": (_file("clip.wav", b""), 400),
    "text-named-wav": (_file("clip.wav", b"this is not audio, only text pretending to be a WAV file\n" * 50), 400),
    "truncated-mp3-header": (_file("clip.mp3", lambda t: t["mp3"][:600]), 400),
    "truncated-mp3-midway": (_file("clip.mp3", lambda t: t["mp3"][: len(t["mp3"]) // 2]), 200),
    "tiny-clip-10ms": (_file("clip.wav", lambda t: _wav(np.zeros(160, np.float32))), 200),
    "upload-2gb-declared": (lambda url, t: exchange(url, head(length=2 * 2**30)), 413),
    "upload-over-limit-chunked": (_chunked_too_large, 413),
    "wrong-content-type-json": (lambda url, t: post(url, b'{"file": "clip.wav"}', content_type="application/json"),
                                415),
    "raw-audio-body": (lambda url, t: post(url, t["wav"], content_type="audio/wav"), 415),
    "malformed-multipart": (lambda url, t: post(url, b"--nottheboundary\r\ngarbage\r\n"), 400),
    "unknown-response-format": (_file("clip.wav", lambda t: t["wav"], response_format="docx"), 400),
    "unknown-granularity": (_file("clip.wav", lambda t: t["wav"], **{"timestamp_granularities[]": "char"}), 400),
    "stream-true": (_file("clip.wav", lambda t: t["wav"], stream="true"), 400),
    "bad-language": (_file("clip.wav", lambda t: t["wav"], language="../../etc"), 400),
    "missing-key": (lambda url, t: post(url, multipart({}, [("file", "clip.wav", t["wav"])]), key=None), 401),
    "wrong-key": (lambda url, t: post(url, multipart({}, [("file", "clip.wav", t["wav"])]), key=KEY[:-1] + "x"), 401),
    "models-without-key": (lambda url, t: exchange(url, head("/v1/models", "GET", key=None, content_type=None)), 401),
    "slow-body-slowloris": (_slow_body, 408),
    "slow-headers-slowloris": (_slow_headers, 0),
    "path-like-filename": (_path_like("../../../../tmp/w2vbert-evil.wav"), 200),
    "absolute-windows-filename": (_path_like("C:\\Windows\\..\\evil\x01.wav"), 200),
    "get-instead-of-post": (lambda url, t: exchange(url, head(method="GET", content_type=None)), 405),
    "unknown-path": (lambda url, t: exchange(url, head("/v1/audio/translations", length=0)), 404),
}


def _wav(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, 16_000, format="WAV")
    return buf.getvalue()


def assert_still_serving(url, tiny, engine):
    assert get(url + "/health")[0] == 200
    status, _, body = post(url, multipart({"response_format": "text"}, [("file", "ok.wav", tiny["wav"])]))
    assert status == 200, body[:300]
    deadline = time.monotonic() + 10
    while engine.admitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.admitted == 0
    assert not list(engine.tmp.iterdir()), "a temporary file was left behind"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_its_status_and_the_server_keeps_answering(case, server, tiny, caplog):
    url, engine = server
    send, expected = CASES[case]
    started = time.monotonic()
    status, headers, body = send(url, tiny)
    assert status == expected, (case, body[:500])
    if status >= 400:
        error = json.loads(body)["error"]
        assert error["message"] and error["type"]
        assert "/tmp/" not in error["message"] and "w2vbert-serve-" not in error["message"]  # no server path
    if case == "missing-key":
        assert headers.get("www-authenticate") == "Bearer"
    if case.endswith("slowloris"):
        assert TIMEOUT_S - 0.5 < time.monotonic() - started < TIMEOUT_S + 8
    assert not Path("/tmp/w2vbert-evil.wav").exists()
    assert_still_serving(url, tiny, engine)
    assert KEY not in caplog.text


def test_the_docs_table_lists_every_case_with_its_status():
    table = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    documented = {m.group(1): int(m.group(2)) if m.group(2).isdigit() else 0
                  for m in re.finditer(r"^\| `([a-z0-9-]+)` \|[^|]*\| (\d{3}|closed)[^|]*\|", table, re.MULTILINE)}
    expected = {case: status for case, (_, status) in CASES.items()}
    expected |= {"queue-full": 503, "past-timeout": 504, "concurrent-cancellations": 499}
    assert documented == expected
    assert len(expected) >= 12


def test_the_batched_forward_keeps_no_autograd_graph(server):
    """Grad mode is per thread: the batcher's thread must run the model without one (it held ~25 MB per
    request in flight, and slowed every pass)."""
    _, engine = server
    [future] = engine.batcher.submit([np.zeros(16_000, np.float32)])
    logits = future.result(timeout=60)
    assert not logits.requires_grad and logits.grad_fn is None


def test_a_client_name_never_becomes_a_server_path(server, tiny):
    url, _ = server
    status, _, body = post(url, multipart({}, [("file", "../../x/evil.txt", b"not audio" * 20)]))
    message = json.loads(body)["error"]["message"]
    assert status == 400 and message.startswith("evil.txt: empty or undecodable audio"), message


# --------------------------------------------------------------------------------------------- slow model
class SlowModel(torch.nn.Module):
    """The tiny model, `delay` seconds slower per forward pass."""

    def __init__(self, model, delay: float):
        super().__init__()
        self.inner, self.config, self.delay = model, model.config, delay

    def forward(self, **inputs):
        time.sleep(self.delay)
        return self.inner(**inputs)


def slow_engine(cfg, delay: float):
    from w2vbert_asr.serve_engine import BatchedTranscriber, TranscriptionEngine
    from w2vbert_asr.transcribe import load_model

    model, processor = load_model(cfg.model_dir)
    return TranscriptionEngine(cfg, BatchedTranscriber(SlowModel(model, delay), processor, "cpu", batch_size=1))


def _in_thread(fn, *args, **kwargs):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def test_queue_full_is_503_with_retry_after(tiny):
    cfg = config(tiny, "serve.queue_size=0", "serve.max_batch=1")  # room for 2 requests, none waiting
    engine = slow_engine(cfg, delay=1.5)
    body = multipart({"response_format": "text"}, [("file", "clip.wav", tiny["wav"])])
    with ThreadServer(cfg, engine) as url:
        running = [_in_thread(post, url, body, key=None) for _ in range(engine.capacity)]
        deadline = time.monotonic() + 20
        while engine.admitted < engine.capacity and time.monotonic() < deadline:
            time.sleep(0.02)
        status, headers, _ = post(url, body, key=None)
        assert status == 503 and int(headers["retry-after"]) >= 1
        for thread, result in running:
            thread.join(30)
            assert result["value"][0] == 200
        assert post(url, body, key=None)[0] == 200  # room again


def test_past_the_timeout_is_504_and_the_work_is_cancelled(tiny):
    cfg = config(tiny, "serve.timeout_s=1", "serve.max_batch=1")
    engine = slow_engine(cfg, delay=2.5)
    with ThreadServer(cfg, engine) as url:
        started = time.monotonic()
        status, _, body = post(url, multipart({}, [("file", "clip.wav", tiny["wav"])]), key=None)
        assert status == 504 and time.monotonic() - started < 2.4, body
        deadline = time.monotonic() + 10
        while engine.admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.admitted == 0 and not list(engine.tmp.iterdir())


def test_concurrent_cancellations_free_everything(tiny):
    """Clients that hang up mid-request: their queued chunks are dropped, their threads stop, their files go."""
    cfg = config(tiny, "serve.max_batch=2")
    engine = slow_engine(cfg, delay=0.4)
    body = multipart({}, [("file", "clip.wav", tiny["wav"])])
    with ThreadServer(cfg, engine) as url:
        port = int(url.rsplit(":", 1)[1])
        sockets = []
        for _ in range(12):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head(length=len(body), key=None) + body)
            sockets.append(sock)
        time.sleep(0.3)
        for sock in sockets:
            sock.close()
        deadline = time.monotonic() + 15
        while engine.admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.admitted == 0 and engine.running == 0
        assert engine.batcher.stats.items < 12  # chunks of cancelled requests never ran
        assert not list(engine.tmp.iterdir())
        assert post(url, multipart({"response_format": "text"}, [("file", "ok.wav", tiny["wav"])]), key=None)[0] == 200


def test_the_default_queue_takes_64_concurrent_requests(tiny):
    """Default settings, 64 clients at once: every one is answered 200, none gets 503."""
    cfg = config(tiny)
    short = _wav(spoken_wave(["jambo"])[: 16_000])
    body = multipart({"response_format": "json"}, [("file", "clip.wav", short)])
    with ThreadServer(cfg) as url:
        results = [_in_thread(post, url, body, key=None) for _ in range(64)]
        for thread, _ in results:
            thread.join(120)
        assert [r["value"][0] for _, r in results] == [200] * 64
