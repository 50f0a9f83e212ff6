"""benchmarks/serve_load.py: its clients against a real server (in this process), and the whole run (two
server processes, batching on and off) on a tiny model, marked slow."""

from __future__ import annotations

import asyncio

import pytest

from serving import ThreadServer, save_tiny_model
from w2vbert_asr.cli import compose


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("serve_load")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, sw_corpus):
    d = tmp_path_factory.mktemp("serve_load")
    return save_tiny_model(d / "model"), sw_corpus


def test_clients_count_answers_audio_and_latency(bench, tiny_run):
    model, corpus = tiny_run
    clips = bench.load_clips(corpus, "test", limit=3)
    assert len(clips) == 3 and all(c.seconds > 0.5 for c in clips)
    bad = bench.Clip("bad.wav", 1.0, bench.build_request("bad.wav", b"not audio" * 10))
    cfg = compose(["lang=sw", f"model_dir={model}", f"output_dir={model.parent}", "transcribe.device=cpu"])
    server = ThreadServer(cfg)
    with server as url:
        port = int(url.rsplit(":", 1)[1])
        level = asyncio.run(bench.run_level(port, clips, clients=3, rounds=2, mode="on"))
        assert (level.requests, level.ok, level.errors, level.dropped) == (18, 18, 0, 0)
        assert level.audio_seconds == pytest.approx(6 * sum(c.seconds for c in clips))
        assert len(level.latencies) == 18 and 0 < level.percentile(50) <= level.percentile(95)
        assert server.engine.batcher.stats.items == 18 + 0  # one chunk per short clip
        mixed = asyncio.run(bench.run_level(port, [clips[0], bad], clients=2, mode="on"))
        assert (mixed.ok, mixed.errors, mixed.server_errors, mixed.dropped) == (2, 2, 0, 0)
    closed = asyncio.run(bench.run_level(port, clips[:1], clients=2, mode="on", timeout=5))
    assert closed.dropped == 2 and closed.ok == 0  # the server is gone: no answer at all


@pytest.mark.slow
def test_the_whole_benchmark_on_a_tiny_model(bench, tiny_run, tmp_path, capsys):
    model, corpus = tiny_run
    levels = bench.main(["--model", str(model), "--corpus", str(corpus), "--limit", "2", "--clients", "1", "3",
                         "--server-threads", "1", "--work", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert [(lv.mode, lv.clients) for lv in levels] == [("on", 1), ("off", 1), ("on", 3), ("off", 3)]
    assert all(lv.ok == lv.requests == 2 * lv.clients and lv.peak_rss_mb > lv.idle_rss_mb * 0.5 for lv in levels)
    out = capsys.readouterr().out
    assert "batching on / off at 3 clients:" in out and "reproduce: python benchmarks/serve_load.py" in out
