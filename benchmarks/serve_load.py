"""Load test of `w2vbert-asr serve`: N concurrent clients send the demo test clips; throughput, latency, errors and
the server's peak RSS, with dynamic batching on and off in the same run.

Usage:
    python benchmarks/serve_load.py                                   # demo_out/model, demo_out/corpus test split
    python benchmarks/serve_load.py --model /tmp/demo/model --corpus /tmp/demo/corpus --clients 1 4 16 64
    python benchmarks/serve_load.py --rounds 2 --json serve_load.json --server-threads 1

Servers: two `w2vbert-asr serve model=<model> serve.port=0` processes, started together and left idle in
turn: `on` with the defaults (serve.max_batch=8, serve.max_wait_ms=10), `off` with serve.max_batch=1 (one
chunk per forward pass: one request at a time in the model; its two request threads still overlap reading
audio with the model). Each is warmed up (every clip once), then its idle RSS is read. The levels alternate
(on 1, off 1, on 4, off 4, ...) so that a change in the machine's load hits both modes alike.

A level of N clients: N asyncio clients at once, each on one keep-alive connection, each sending every
test clip (in its own rotated order) --rounds times, each request after the previous answer
(response_format=json). Throughput = seconds of audio answered 200 / wall seconds of the level; latency per
request from its first byte sent to the answer's last byte read; errors = answers other than 200 (5xx and
503 counted too); dropped = requests with no answer (connection error, --request-timeout). Server CPU per request: the
server process's user + system seconds during the level / requests answered 200; on a shared machine it
moves far less than wall-clock throughput, and on a dedicated CPU-bound one throughput follows its inverse.
Peak RSS: the server process sampled every 20 ms during the level; "over idle" subtracts its idle RSS.

Prints a markdown table, the on/off throughput ratio per level, `uptime` before and after, and the command
that reproduces the run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"on": [], "off": ["serve.max_batch=1"]}


@dataclass
class Clip:
    name: str
    seconds: float
    request: bytes = b""


@dataclass
class Level:
    mode: str
    clients: int
    requests: int = 0
    ok: int = 0
    errors: int = 0
    server_errors: int = 0  # 5xx, 503 included
    busy: int = 0  # 503
    dropped: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    latencies: list = field(default_factory=list)
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    server_cpu_seconds: float = 0.0  # user + system time of the server process during the level

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.server_cpu_seconds / self.ok if self.ok else float("nan")

    @property
    def throughput(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def row(self) -> str:
        return (f"| {self.mode} | {self.clients} | {self.requests} | {self.errors} ({self.server_errors} 5xx, "
                f"{self.busy} 503) | {self.dropped} | {self.throughput:.1f} | {1000 * self.percentile(50):.0f} | "
                f"{1000 * self.percentile(95):.0f} | {self.cpu_ms_per_request:.1f} | {self.peak_rss_mb:.0f} | "
                f"{self.peak_rss_mb - self.idle_rss_mb:+.0f} |")


# --------------------------------------------------------------------------------------------- clips
def load_clips(corpus: Path, split: str = "test", limit: int | None = None) -> list[Clip]:
    """The split's clips of a Common Voice layout (<corpus>/<split>.tsv, clips/), as ready-made requests."""
    import soundfile as sf

    with open(corpus / f"{split}.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    clips = []
    for row in rows:
        path = corpus / "clips" / row["path"]
        clips.append(Clip(path.name, sf.info(str(path)).duration, build_request(path.name, path.read_bytes())))
    return clips


def build_request(filename: str, audio: bytes, response_format: str = "json") -> bytes:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nw2vbert-asr\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="response_format"\r\n\r\n{response_format}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    return head + body


# --------------------------------------------------------------------------------------------- clients
async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return status, body


async def _client(port: int, clips: list[Clip], level: Level, timeout: float) -> None:
    reader = writer = None
    for clip in clips:
        level.requests += 1
        started = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(clip.request)
            status, _ = await asyncio.wait_for(_answer(reader), timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            level.dropped += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        level.latencies.append(time.perf_counter() - started)
        if status == 200:
            level.ok += 1
            level.audio_seconds += clip.seconds
        else:
            level.errors += 1
            level.server_errors += status >= 500
            level.busy += status == 503
    if writer is not None:
        writer.close()


async def run_level(port: int, clips: list[Clip], clients: int, rounds: int = 1, mode: str = "",
                    timeout: float = 300.0) -> Level:
    """N clients at once, each sending every clip (rotated by its index) `rounds` times -> Level."""
    level = Level(mode, clients)
    plans = [[clips[(i + j) % len(clips)] for j in range(len(clips))] * rounds for i in range(clients)]
    started = time.perf_counter()
    await asyncio.gather(*(_client(port, plan, level, timeout) for plan in plans))
    level.wall_seconds = time.perf_counter() - started
    return level


# --------------------------------------------------------------------------------------------- servers
class Server:
    """`w2vbert-asr serve model=<model> serve.port=0 <overrides>` in its own process."""

    def __init__(self, model: str, overrides: list[str], threads: int | None, log: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("W2VBERT_ASR_API_KEY", None)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = log
        self.command = [sys.executable, "-m", "w2vbert_asr.cli", "serve", f"model={model}", "serve.port=0",
                        *overrides]
        self.proc = subprocess.Popen(self.command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"at http://127\.0\.0\.1:(\d+)/", self.log.read_text())
            if found:
                self.port = int(found.group(1))
                return self.port
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start: {self.log.read_text()[-2000:]}")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measured(server: Server, clips: list[Clip], clients: int, rounds: int, mode: str, timeout: float) -> Level:
    """run_level while a thread samples the server's RSS every 20 ms."""
    peak, stop = [server.rss_mb()], threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], server.rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu = server.cpu_seconds()
    try:
        level = asyncio.run(run_level(server.port, clips, clients, rounds, mode, timeout))
    finally:
        stop.set()
        sampler.join()
    level.peak_rss_mb = peak[0]
    level.server_cpu_seconds = server.cpu_seconds() - cpu
    return level


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "uptime unavailable"


# --------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="demo_out/model", help="model folder (w2vbert-asr train recipe=demo)")
    p.add_argument("--corpus", default="demo_out/corpus", help="Common Voice layout whose --split clips are sent")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="at most this many clips")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=1, help="times each client sends the clips")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the servers (default: unset)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--work", default=None, help="folder for the server logs (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Level]:
    import tempfile

    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/serve_load.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    clips = load_clips(Path(args.corpus), args.split, args.limit)
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_load_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{len(clips)} clips, {sum(c.seconds for c in clips):.1f} s of audio; load before: {uptime()}", flush=True)
    servers = {m: Server(args.model, MODES[m], args.server_threads, work / f"server_{m}.log") for m in args.modes}
    levels: list[Level] = []
    try:
        idle = {}
        for mode, server in servers.items():
            server.wait()
            asyncio.run(run_level(server.port, clips, 1, 1, mode, args.request_timeout))  # warm-up
            time.sleep(1.0)
            idle[mode] = server.rss_mb()
        for clients in args.clients:
            for mode, server in servers.items():
                level = measured(server, clips, clients, args.rounds, mode, args.request_timeout)
                level.idle_rss_mb = idle[mode]
                levels.append(level)
                print(f"  {mode:>3} x{clients:<3} {level.throughput:7.1f} audio-s/s  p50 "
                      f"{1000 * level.percentile(50):6.0f} ms  errors {level.errors}  dropped {level.dropped}",
                      flush=True)
    finally:
        for server in servers.values():
            server.close()
    report(levels, args, command)
    return levels


def report(levels: list[Level], args, command: str) -> None:
    print("\n| batching | clients | requests | errors | dropped | audio-s/s | p50 ms | p95 ms | server CPU ms/request | "
          "peak RSS MB | over idle MB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for level in levels:
        print(level.row())
    by = {(lv.mode, lv.clients): lv for lv in levels}
    print()
    for clients in args.clients:
        on, off = by.get(("on", clients)), by.get(("off", clients))
        if on and off and off.throughput:
            print(f"batching on / off at {clients} clients: {on.throughput / off.throughput:.2f}x throughput, "
                  f"{off.cpu_ms_per_request / on.cpu_ms_per_request:.2f}x less server CPU per request")
    print(f"load after: {uptime()}")
    print(f"reproduce: {command}")
    if args.json:
        rows = [{**{k: v for k, v in asdict(lv).items() if k != "latencies"}, "throughput": lv.throughput,
                 "p50_s": lv.percentile(50), "p95_s": lv.percentile(95), "cpu_ms_per_request": lv.cpu_ms_per_request}
                for lv in levels]
        Path(args.json).write_text(json.dumps({"command": command, "levels": rows}, indent=2))


if __name__ == "__main__":
    main()
