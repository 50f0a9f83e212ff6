"""`w2vbert-asr serve model=<dir>`: an OpenAI-compatible transcription API and a try-it page, on Starlette + uvicorn.

Usage:
    w2vbert-asr serve model=demo_out/model                        # http://127.0.0.1:8000/
    w2vbert-asr serve model=demo_out/model transcribe.backend=onnx transcribe.lm=demo_out/lm serve.port=9000
    W2VBERT_ASR_API_KEY=... w2vbert-asr serve model=demo_out/model serve.host=0.0.0.0

    curl -F file=@clip.mp3 -F response_format=srt http://127.0.0.1:8000/v1/audio/transcriptions
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").audio.transcriptions.create(model="demo", file=f)

Endpoints:
    POST /v1/audio/transcriptions   multipart `file` (+ `model`, `language`, `response_format` = json | text |
                                    srt | vtt | verbose_json, `timestamp_granularities[]` = word | segment)
    GET  /v1/models                 the one model served
    GET  /health                    status, queue and batching counters
    GET  /                          the try-it page (w2vbert_asr/static/: microphone or file, no CDN)

A request is transcribed by `transcribe`'s own path (serve_engine.py), its chunks batched with those of
concurrent requests. Safe by default: it listens on 127.0.0.1, and anywhere else only with serve.api_key (a
Bearer token, compared in constant time) or serve.allow_anonymous=true. Every failure is a JSON error in
OpenAI's shape with its status (docs/serving.md has the table): 400 bad form or audio, 401 key, 408 upload
too slow, 413 too large, 415 not multipart, 503 queue full (Retry-After), 504 past serve.timeout_s. Uploads go
to the server's own temporary folder under names it makes, and are removed when the request ends; a
failure is logged with its reason, never with the audio or the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import re
import shutil
import socket
import time
from pathlib import Path

from . import UsageError
from .audio import AudioError, audio_extensions
from .serve_engine import Cancelled, Options, QueueFull, TimedOut, TranscriptionEngine
from .transcript_formats import GRANULARITIES, RESPONSE_FORMATS

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
FORM_OVERHEAD = 64 * 1024  # bytes a multipart body may hold beyond the file: boundaries and the small fields
# The page loads nothing but its own files: no CDN, no inline script, no other origin.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class RequestError(Exception):
    """A request the server refuses: its status and the message the client gets (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class UploadTooLarge(Exception):
    pass


# --------------------------------------------------------------------------------------------- command
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(scfg) -> None:
    """Listening beyond this machine needs a key, or saying that anyone may use it."""
    if not is_loopback(str(scfg.host)) and not scfg.api_key and not scfg.allow_anonymous:
        raise UsageError(f"serve.host={scfg.host} lets other machines in: set a key (W2VBERT_ASR_API_KEY=... or "
                         "serve.api_key=...), or serve.allow_anonymous=true to serve without one")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections queue from now on, while the model loads
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def header_deadline_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline on each request's headers: uvicorn has none, so a client that
    trickles its headers (slowloris) would hold its connection for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _timer = None
        _armed_for = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            self._arm()  # before a pipelined next request starts its cycle
            super().on_response_complete()

        def handle_events(self):
            super().handle_events()
            if self._timer is not None and self.cycle is not self._armed_for:
                self._disarm()  # the headers of a new request arrived

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self._disarm()
            self._armed_for = self.cycle
            self._timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self):
            self._timer = None
            if self.cycle is self._armed_for and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def uvicorn_config(app, scfg):
    import uvicorn

    return uvicorn.Config(app, http=header_deadline_protocol(float(scfg.timeout_s)), ws="none", lifespan="on",
                          log_config=None, access_log=False, timeout_keep_alive=5)


def serve(cfg) -> None:
    """`w2vbert-asr serve model=<dir>`: serve until Ctrl-C."""
    import uvicorn

    scfg = cfg.serve
    check_bind(scfg)
    sock = bind_socket(str(scfg.host), int(scfg.port))
    try:
        engine = TranscriptionEngine(cfg)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"w2vbert-asr serve: {engine.model_name} ({engine.backend} on {engine.transcriber.device}, batches of "
              f"up to {scfg.max_batch}) at http://{shown}:{port}/ - API: http://{shown}:{port}/v1/audio/"
              f"transcriptions{' (Bearer key required)' if scfg.api_key else ''}", flush=True)
        uvicorn.Server(uvicorn_config(create_app(cfg, engine), scfg)).run(sockets=[sock])
    finally:
        sock.close()


# --------------------------------------------------------------------------------------------- app
def create_app(cfg, engine: TranscriptionEngine | None = None):
    """The Starlette app: routes, error handlers, security headers; the engine starts and stops with it."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    engine = engine or TranscriptionEngine(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    async def http_error(request, exc: HTTPException):
        return _error(RequestError(exc.status_code, str(exc.detail)))

    app = Starlette(routes=[
        Route("/", _page), Route("/health", _health), Route("/v1/models", _models),
        Route("/v1/audio/transcriptions", _transcriptions, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ], exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.engine, app.state.serve = engine, cfg.serve
    app.add_middleware(SecurityHeaders)
    return app


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (pure ASGI: the request body is not touched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                from starlette.datastructures import MutableHeaders

                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def _error(e: RequestError):
    from starlette.responses import JSONResponse

    kind = "invalid_request_error" if e.status < 500 else "server_error"
    body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


async def _page(request):
    from starlette.responses import FileResponse

    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")


async def _health(request):
    from starlette.responses import JSONResponse

    return JSONResponse(request.app.state.engine.health())


async def _models(request):
    from starlette.responses import JSONResponse

    engine = request.app.state.engine
    try:
        _authorize(request, request.app.state.serve.api_key)
    except RequestError as e:
        return _error(e)
    return JSONResponse({"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                                     "owned_by": "w2vbert-asr", "language": engine.language}]})


def _authorize(request, key: str | None) -> None:
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), str(key).encode()):
        raise RequestError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# --------------------------------------------------------------------------------------------- transcriptions
async def _transcriptions(request):
    engine, scfg = request.app.state.engine, request.app.state.serve
    path: Path | None = None
    form = None
    name = "upload"
    try:
        deadline = time.monotonic() + float(scfg.timeout_s)
        _authorize(request, scfg.api_key)
        limit = _check_headers(request, scfg)
        if engine.full():  # before reading the upload
            raise QueueFull(engine.retry_after())
        request, form = await _read_form(request, limit, deadline)
        options, upload = _options(form)
        name = _safe_name(upload.filename)
        path = engine.temp_path(_suffix(name))
        await asyncio.to_thread(_save, upload.file, path)
        body, media_type = await engine.transcribe(path, options, deadline, request.is_disconnected)
        return _response(body, media_type)
    except Exception as e:  # noqa: BLE001 - every failure becomes a status (and a log line without the audio)
        return _failure(request, e, {str(path): name} if path else {})
    finally:
        if form is not None:
            await form.close()
        if path is not None:
            path.unlink(missing_ok=True)


def _check_headers(request, scfg) -> int:
    """-> the body size limit; refuses what is not a multipart form, or declares a body over the limit."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        shown = content_type.split(";")[0][:80] or "none"
        raise RequestError(415, f"send multipart/form-data with the audio in the field `file` (Content-Type was "
                                f"{shown})")
    limit = int(float(scfg.max_upload_mb) * 2**20) + FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge()
    return limit


async def _read_form(request, limit: int, deadline: float):
    """-> (a request whose body reads count against `limit`, its parsed form). 408 past the deadline."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    seen = 0
    receive = request.receive

    async def counted():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise UploadTooLarge()
        return message

    counted_request = Request(request.scope, counted)
    try:
        form = await asyncio.wait_for(counted_request.form(max_files=1, max_fields=32, max_part_size=FORM_OVERHEAD),
                                      max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise RequestError(408, "the upload did not arrive within serve.timeout_s",
                           headers={"Connection": "close"}) from None
    except (MultiPartException, HTTPException) as e:
        raise RequestError(400, f"malformed multipart form: {getattr(e, 'message', None) or e.detail}") from None
    return counted_request, form


def _options(form) -> tuple[Options, object]:
    upload = form.get("file")
    if upload is None:
        raise RequestError(400, "no file: send the audio in the multipart field `file`", param="file")
    if isinstance(upload, str):
        raise RequestError(400, "`file` is a text field: send it as a file (with a filename)", param="file")
    fmt = form.get("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise RequestError(400, f"response_format={str(fmt)[:40]!r}: choose one of {', '.join(RESPONSE_FORMATS)}",
                           param="response_format")
    granularities = [*form.getlist("timestamp_granularities[]"), *form.getlist("timestamp_granularities")]
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise RequestError(400, f"timestamp_granularities: {str(unknown[0])[:40]!r} is not one of "
                                f"{', '.join(GRANULARITIES)}", param="timestamp_granularities")
    if str(form.get("stream", "false")).lower() in ("true", "1"):
        raise RequestError(400, "stream=true is not supported: the response comes whole", param="stream")
    language = form.get("language") or None
    if language is not None and not re.fullmatch(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})?", str(language)):
        raise RequestError(400, "language: give an ISO 639 code such as sw", param="language")
    return Options(fmt, tuple(granularities) or GRANULARITIES, language), upload


def _safe_name(filename: str | None) -> str:
    """The client's file name for messages only: its last part, printable, at most 100 characters."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:100]
    return name or "upload"


def _suffix(name: str) -> str:
    """The temporary file's extension: the upload's, when it names a format soundfile reads (some formats
    are told apart by it); else none."""
    ext = Path(name).suffix.lower().lstrip(".")
    return f".{ext}" if ext in audio_extensions() else ""


def _save(source, path: Path) -> None:
    source.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(source, out, 2**20)


def _response(body, media_type: str):
    from starlette.responses import JSONResponse, Response

    if isinstance(body, dict):
        return JSONResponse(body)
    return Response(body, media_type=media_type)


def _failure(request, e: Exception, names: dict[str, str]):
    """An exception of a transcription request -> its error response, logged without audio or key."""
    from starlette.responses import Response

    if isinstance(e, UploadTooLarge):
        # No `Connection: close`: uvicorn reads and drops the rest of the body, so a client still sending gets
        # this answer instead of a reset; the header deadline then closes an idle connection.
        e = RequestError(413, f"the upload is larger than serve.max_upload_mb="
                              f"{request.app.state.serve.max_upload_mb:g} MB")
    elif isinstance(e, AudioError):
        message = str(e)
        for server_path, client_name in names.items():
            message = message.replace(server_path, client_name)  # the client never sees a server path
        e = RequestError(400, message, param="file")
    elif isinstance(e, QueueFull):
        e = RequestError(503, "the server is busy: too many requests are waiting; retry after the Retry-After "
                              "seconds", headers={"Retry-After": str(e.retry_after)})
    elif isinstance(e, TimedOut):
        e = RequestError(504, "not transcribed within serve.timeout_s")
    elif isinstance(e, Cancelled):
        log.info("POST /v1/audio/transcriptions: the client disconnected; its transcription was cancelled")
        return Response(status_code=499)  # nobody reads it
    elif not isinstance(e, RequestError):
        log.error("POST /v1/audio/transcriptions failed: %s: %s", type(e).__name__, str(e)[:300], exc_info=e)
        e = RequestError(500, "the transcription failed on the server (see its log)")
    if e.status != 401:  # a wrong key is the client's own business, and frequent: not logged
        log.warning("POST /v1/audio/transcriptions -> %d: %s", e.status, e.message)
    return _error(e)
