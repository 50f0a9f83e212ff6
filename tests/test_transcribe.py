"""Transcription of long audio: chunk plan, stitching, word timestamps, SRT/JSON/TXT output.

Timing ground truth must not depend on how well a model is trained, so the timing tests use a CTC
"model" whose output we control (ToneCTC: band-limited noise bursts in the audio are letters) through
the real Transcriber path (real feature extractor, chunking, batching, stitching, tokenizer offsets).
The real Wav2Vec2BertForCTC path is run end to end with a tiny random model saved to a folder.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import Wav2Vec2BertConfig

from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose
from w2vbert_asr.geometry import FrameGeometry
from w2vbert_asr.transcribe import FAILED_FILE, find_audio, transcribe, Transcriber, Word
from w2vbert_asr.chunking import iter_chunks, plan_chunks
from w2vbert_asr.audio import read_blocks
from w2vbert_asr.subtitles import srt_time, subtitle_cues, to_srt

SR = 16_000
FRAME = 640  # samples per output frame of a W2v-BERT 2.0 model with one stride-2 adapter layer
TIMING_TOLERANCE_S = 0.2
LOW_BAND_HZ, HIGH_BAND_HZ = (300.0, 1200.0), (3000.0, 6000.0)
SRT_CUE = re.compile(r"^(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n(.+)$")


# --------------------------------------------------------------------------------------------- helpers
def make_processor(tmp_path, texts=("ab ba", "habari ya asubuhi", "jambo rafiki")):
    from w2vbert_asr.text import Vocabulary, build_processor

    return build_processor(Vocabulary.build(texts), tmp_path / "processor")


def band_noise(rng, n: int, band: tuple[float, float], rms: float) -> np.ndarray:
    """White noise kept only inside `band` Hz, scaled to `rms`."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spectrum[(freqs < band[0]) | (freqs > band[1])] = 0
    x = np.fft.irfft(spectrum, n)
    return (x * rms / (x.std() + 1e-12)).astype(np.float32)


def tone_clip(seconds: float, seed: int = 0) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Words of letters a (low-band burst) / b (high-band burst) separated by random pauses.
    -> (wave (N,), [(word, start s, end s)])"""
    rng = np.random.default_rng(seed)
    wave = (rng.standard_normal(int(seconds * SR)) * 1e-3).astype(np.float32)  # room tone everywhere
    words, t = [], 0.5
    while True:
        word = str(rng.choice(["a", "b", "ab", "ba", "aba", "bab"]))
        lengths = rng.uniform(0.12, 0.2, len(word))
        if t + lengths.sum() + 0.5 > seconds:
            break
        start = t
        for letter, length in zip(word, lengths):
            n0, n = int(t * SR), int(length * SR)
            wave[n0:n0 + n] += band_noise(rng, n, LOW_BAND_HZ if letter == "a" else HIGH_BAND_HZ, 0.2)
            t += length
        words.append((word, start, t))
        t += rng.uniform(0.25, 1.5)
    return wave, words


class ToneCTC(torch.nn.Module):
    """A CTC model with known output: per output frame (2 stacked feature frames, like the adapter's stride),
    'a' if the low band is loud, 'b' if the high band is, '|' in pauses. Works on the real normalised features."""

    def __init__(self, tokenizer, mel_filters: np.ndarray):
        super().__init__()
        vocab = tokenizer.get_vocab()
        self.config = Wav2Vec2BertConfig(add_adapter=True, num_adapter_layers=1, adapter_stride=2,
                                         adapter_kernel_size=3, vocab_size=len(vocab))
        self.ids = {k: vocab[k] for k in ("a", "b", "|")}
        centres = np.asarray(mel_filters).argmax(axis=0) * SR / 512  # centre frequency of each mel filter
        self.low = torch.tensor(np.flatnonzero((centres > 400) & (centres < 1100)))
        self.high = torch.tensor(np.flatnonzero((centres > 3200) & (centres < 5800)))
        self.calls = 0

    @staticmethod
    def _get_feat_extract_output_lengths(lengths):
        return (lengths - 1) // 2 + 1  # the adapter: kernel 3, stride 2, padding 1

    def forward(self, input_features, attention_mask):
        self.calls += 1
        b, t, _ = input_features.shape
        x = input_features.reshape(b, t, 2, 80).mean(2)  # (B, T, 80): one vector per stacked feature frame
        if t % 2:
            x = torch.cat([x, x.new_zeros(b, 1, 80)], 1)
        x = x.reshape(b, -1, 2, 80).mean(2)  # (B, T_out, 80)
        low, high = x[..., self.low].mean(-1), x[..., self.high].mean(-1)
        token = torch.where(low > high, self.ids["a"], self.ids["b"])
        token = torch.where(torch.maximum(low, high) > 0.75, token, self.ids["|"])
        logits = torch.nn.functional.one_hot(token, self.config.vocab_size).float() * 10

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return make_processor(tmp_path_factory.mktemp("proc"))


@pytest.fixture(scope="module")
def tone_model(processor):
    return ToneCTC(processor.tokenizer, processor.feature_extractor.mel_filters)


@pytest.fixture(scope="module")
def long_tone_clip():
    return tone_clip(180.0, seed=1)


@pytest.fixture(scope="module")
def long_clip_result(processor, tone_model, long_tone_clip):
    """The 3-minute clip through default-sized chunks (20 s, 4 s overlap) in batches of 4 -> (Transcript, calls)."""
    wave, _ = long_tone_clip
    calls = tone_model.calls
    transcriber = Transcriber(tone_model, processor, "cpu", chunk_seconds=20.0, overlap_seconds=4.0, batch_size=4)
    [result] = transcriber.transcribe([wave])
    return result, tone_model.calls - calls


def assert_words_match(words: list[Word], truth):
    assert [w.word for w in words] == [t[0] for t in truth]
    if not truth:
        return
    starts = np.array([w.start - t[1] for w, t in zip(words, truth)])
    ends = np.array([w.end - t[2] for w, t in zip(words, truth)])
    assert np.abs(starts).max() <= TIMING_TOLERANCE_S, starts
    assert np.abs(ends).max() <= TIMING_TOLERANCE_S, ends


# --------------------------------------------------------------------------------------------- chunk plan
@pytest.mark.parametrize("num_samples", [1, 559, SR, 20 * SR, 20 * SR + 1, 37 * SR + 123, 181 * SR + 7])
@pytest.mark.parametrize("chunk_s,overlap_s", [(20.0, 4.0), (8.0, 2.0), (5.0, 0.0)])
def test_chunk_plan_covers_every_frame_once(num_samples, chunk_s, overlap_s):
    chunks = plan_chunks(num_samples, FRAME, chunk_s, overlap_s)
    kept = []
    for c in chunks:
        assert c.start % FRAME == 0 and 0 <= c.start < c.end <= num_samples
        n_frames = num_samples // FRAME if c.end == num_samples else (c.end - c.start) // FRAME
        stop = c.keep_to if c.keep_to is not None else (c.end - c.start) // FRAME
        assert 0 <= c.keep_from <= stop <= max(n_frames, c.keep_from + 1)
        kept += [c.start // FRAME + j for j in range(c.keep_from, stop)]
    assert chunks[0].start == 0 and chunks[-1].end == num_samples
    assert kept == list(range(len(kept)))  # contiguous, no frame twice
    assert len(kept) >= num_samples // FRAME - 1
    if len(chunks) > 1:  # inner chunks keep their centre: half the overlap dropped on each inner side
        half = round(overlap_s * SR / 2 / FRAME)
        assert chunks[1].keep_from >= half and chunks[0].keep_to <= (chunks[0].end - chunks[0].start) // FRAME - half


def test_chunk_plan_rejects_overlap_not_smaller_than_chunk():
    with pytest.raises(UsageError, match="chunk_seconds"):
        plan_chunks(100 * SR, FRAME, 4.0, 4.0)


@pytest.mark.parametrize("chunk_s,overlap_s", [(20.0, 4.0), (5.0, 0.0)])
def test_streamed_chunks_equal_the_plan_and_read_lazily(chunk_s, overlap_s):
    """iter_chunks on audio arriving in blocks of any size makes plan_chunks' plan (known only with the whole
    length) with the same samples, and reads at most a chunk, a frame and a block beyond each chunk it yields."""
    rng = np.random.default_rng(0)
    chunk = round(chunk_s * SR / FRAME) * FRAME
    lengths = [0, 1, 559, SR, chunk - 1, chunk, chunk + 1, chunk + FRAME - 1, chunk + FRAME, chunk + FRAME + 1,
               37 * SR + 123, 181 * SR + 7]
    for n in lengths:
        wave = rng.standard_normal(n).astype(np.float32)
        for block in (1000, 7 * SR + 3, 10**9):
            consumed = []

            def blocks():
                for i in range(0, n, block):
                    consumed.append(min(n, i + block))
                    yield wave[i:i + block]

            got = []
            for c, samples in iter_chunks(blocks(), FRAME, chunk_s, overlap_s):
                assert consumed[-1] <= c.end + chunk + FRAME + block  # nothing read far ahead
                np.testing.assert_array_equal(samples, wave[c.start:c.end])
                got.append(c)
            assert got == (plan_chunks(n, FRAME, chunk_s, overlap_s) if n else []), (n, block)


def test_samples_per_frame_follows_the_adapter():
    assert FrameGeometry.of(Wav2Vec2BertConfig(add_adapter=True, num_adapter_layers=1, adapter_stride=2)).samples_per_frame == 640
    assert FrameGeometry.of(Wav2Vec2BertConfig(add_adapter=True, num_adapter_layers=2, adapter_stride=2)).samples_per_frame == 1280
    assert FrameGeometry.of(Wav2Vec2BertConfig(add_adapter=False)).samples_per_frame == 320


# --------------------------------------------------------------------------------------------- timing
def test_long_clip_words_and_times_with_chunking(long_tone_clip, long_clip_result):
    """3 minutes, 20 s chunks with 4 s overlap: every word once, in order, within 0.2 s of the truth."""
    wave, truth = long_tone_clip
    result, calls = long_clip_result
    assert len(truth) > 100
    assert calls == -(-len(plan_chunks(len(wave), FRAME, 20.0, 4.0)) // 4)  # 11 chunks in batches of 4
    assert_words_match(result.words, truth)
    assert result.text == " ".join(t[0] for t in truth)
    assert result.duration == pytest.approx(len(wave) / SR)


def test_stitching_matches_a_single_pass(processor, tone_model, long_tone_clip):
    """Short chunks with small overlap (many cuts through words) give the same words as one pass."""
    wave, truth = long_tone_clip
    k = max(i for i, t in enumerate(truth) if t[2] < 60.0)
    wave, truth = wave[: int((truth[k][2] + truth[k + 1][1]) / 2 * SR)], truth[: k + 1]  # cut inside a pause
    single = Transcriber(tone_model, processor, "cpu", chunk_seconds=120.0).transcribe([wave])[0]
    chunked = Transcriber(tone_model, processor, "cpu", chunk_seconds=6.0, overlap_seconds=2.0).transcribe([wave])[0]
    assert_words_match(single.words, truth)
    assert_words_match(chunked.words, truth)


def test_batch_of_files_keeps_order_and_offsets(processor, tone_model):
    """Chunks of several files share batches; each file's times start at its own zero."""
    clips = [tone_clip(s, seed=i) for i, s in enumerate([3.0, 45.0, 0.02, 12.0])]
    results = Transcriber(tone_model, processor, "cpu", chunk_seconds=10.0, overlap_seconds=2.0,
                          batch_size=3).transcribe([c[0] for c in clips])
    for (wave, truth), result in zip(clips, results):
        assert_words_match(result.words, truth)
    assert results[2].words == [] and results[2].duration == pytest.approx(0.02)
    assert Transcriber(tone_model, processor, "cpu").transcribe([np.zeros(0, np.float32)])[0].text == ""


def test_lm_beam_search_keeps_word_times(tmp_path, processor, tone_model, long_tone_clip):
    """The n-gram path (pyctcdecode word frames) gives the same words and times as greedy."""
    from w2vbert_asr.lm import beam_search, build_lm

    wave, truth = long_tone_clip
    k = max(i for i, t in enumerate(truth) if t[2] < 40.0)
    wave, truth = wave[: int((truth[k][2] + truth[k + 1][1]) / 2 * SR)], truth[: k + 1]
    processor.save_pretrained(tmp_path / "processor")  # where build_lm finds the tokenizer after `prepare`
    (tmp_path / "text.txt").write_text("ab ba a\nb aba bab ab\nba ab bab\n")
    cfg = compose(["recipe=demo", f"output_dir={tmp_path}", f"lm.text={tmp_path / 'text.txt'}"])
    build_lm(cfg)
    search = beam_search(processor.tokenizer, cfg.lm.output_dir, beam_width=16)
    [result] = Transcriber(tone_model, processor, "cpu", chunk_seconds=10.0, overlap_seconds=2.0,
                           beam_search=search).transcribe([wave])
    assert result.decoding == "beam+lm"
    assert_words_match(result.words, truth)


# --------------------------------------------------------------------------------------------- subtitles
def test_srt_time_format():
    assert srt_time(0) == "00:00:00,000"
    assert srt_time(3661.5) == "01:01:01,500"
    assert srt_time(59.9996) == "00:01:00,000"
    assert srt_time(36_000.042) == "10:00:00,042"


def test_subtitle_cues_respect_limits():
    words = [Word(f"w{i:02d}xxx", i * 0.5, i * 0.5 + 0.4) for i in range(40)] + [Word("late", 40.0, 40.5)]
    cues = subtitle_cues(words, max_seconds=7.0, max_chars=42, max_gap=1.0)
    assert " ".join(c[2] for c in cues).split() == [w.word for w in words]
    for start, end, text in cues:
        assert len(text) <= 42 and end - start <= 7.0
    assert cues[-1][2] == "late"  # a long pause starts a new cue


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    cues = []
    for i, block in enumerate(b for b in text.strip().split("\n\n") if b):
        m = SRT_CUE.match(block)
        assert m, f"bad SRT block {block!r}"
        g = [int(x) for x in m.groups()[:9]]
        assert g[0] == i + 1
        cues.append((g[1] * 3600 + g[2] * 60 + g[3] + g[4] / 1000, g[5] * 3600 + g[6] * 60 + g[7] + g[8] / 1000,
                     m.group(10)))
    return cues


def test_srt_from_long_clip_within_tolerance(long_tone_clip, long_clip_result):
    _, truth = long_tone_clip
    result, _ = long_clip_result
    cues = parse_srt(to_srt(result.words))
    assert " ".join(c[2] for c in cues).split() == [t[0] for t in truth]
    i = 0
    for start, end, text in cues:  # each cue spans from its first word's start to its last word's end
        n = len(text.split())
        assert abs(start - truth[i][1]) <= TIMING_TOLERANCE_S and abs(end - truth[i + n - 1][2]) <= TIMING_TOLERANCE_S
        assert end > start and len(text) <= 42 and end - start <= 7.0 + TIMING_TOLERANCE_S
        i += n
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(cues))


# --------------------------------------------------------------------------------------------- files
def test_find_audio_walks_folders_and_names_outputs(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for p in ["in/x.wav", "in/sub/x.flac", "in/notes.txt", "in/.hidden.wav", "y.wav", "in/y.mp3"]:
        (tmp_path / p).write_bytes(b"")
    found = find_audio([tmp_path / "in", tmp_path / "y.wav", tmp_path / "in" / "x.wav"])
    names = {p.relative_to(tmp_path).as_posix(): n for p, n in found}
    assert names == {"in/sub/x.flac": "sub/x", "in/x.wav": "x", "in/y.mp3": "y", "y.wav": "y.wav"}
    with pytest.raises(UsageError, match="does not exist"):
        find_audio([tmp_path / "missing.wav"])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Wav2Vec2BertForCTC saved like train's export."""
    from w2vbert_asr.model import build_model
    from w2vbert_asr.text import Normalizer

    d = tmp_path_factory.mktemp("tiny_model")
    processor = make_processor(d)
    torch.manual_seed(0)
    model = build_model(compose(["recipe=demo"]).model, processor.tokenizer)
    model.save_pretrained(d / "model", safe_serialization=True)
    processor.save_pretrained(d / "model")
    Normalizer().save(d / "model")
    return d / "model"


def _spoken_sentences(sentences: list[str]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """espeak sentences at 16 kHz separated by 0.8-1.7 s pauses -> (wave (N,), [(start, end) s per sentence])."""
    import soxr

    from w2vbert_asr.synth import speak

    parts, t, spans = [np.zeros(int(0.7 * SR), np.float32)], 0.7, []
    for i, text in enumerate(sentences):
        audio, rate = speak(text, "sw")
        audio = soxr.resample(audio, rate, SR)
        parts += [audio, np.zeros(int((0.8 + 0.3 * (i % 4)) * SR), np.float32)]
        spans.append((t, t + len(audio) / SR))
        t += (len(audio) + len(parts[-1])) / SR
    return np.concatenate(parts), spans


@pytest.fixture(scope="module")
def speech_clip(tmp_path_factory):
    """~20 s of espeak sentences with known pauses, written as 22.05 kHz FLAC and 44.1 kHz stereo WAV."""
    import soxr

    d = tmp_path_factory.mktemp("speech")
    wave, spans = _spoken_sentences(["habari ya asubuhi rafiki yangu", "jambo sana", "asante kwa chakula kizuri"] * 2)
    (d / "folder").mkdir()
    sf.write(d / "talk.flac", soxr.resample(wave, SR, 22_050), 22_050)
    sf.write(d / "folder" / "stereo.wav", np.stack([soxr.resample(wave, SR, 44_100)] * 2, 1), 44_100)
    (d / "short").mkdir()
    sf.write(d / "short" / "hello.ogg", wave[: 3 * SR], SR)  # Ogg Vorbis
    return d, wave, spans


def test_real_model_end_to_end(tmp_path, tiny_model_dir, speech_clip):
    """The real path: model dir -> transcribe(cfg) -> txt/json/srt for a file and a folder."""
    d, wave, _ = speech_clip
    out = tmp_path / "out"
    cfg = compose(["recipe=demo", f"output_dir={tmp_path}", f"model_dir={tiny_model_dir}",
                   f"transcribe.inputs=[{d / 'talk.flac'},{d / 'folder'}]", f"transcribe.output_dir={out}",
                   "transcribe.chunk_seconds=10", "transcribe.overlap_seconds=2", "transcribe.batch_size=4"])
    result = transcribe(cfg)
    assert [Path(f["audio"]).name for f in result["files"]] == ["talk.flac", "stereo.wav"]
    assert result["failed"] == {}
    for name in ("talk", "stereo"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["duration"] == pytest.approx(len(wave) / SR, abs=0.01)
        assert data["model"] == str(tiny_model_dir) and data["decoding"] == "greedy"
        assert (out / f"{name}.txt").read_text() == data["text"] + "\n"
        times = [(w["start"], w["end"]) for w in data["words"]]
        assert all(0 <= s <= e <= data["duration"] + 0.05 for s, e in times)
        assert times == sorted(times)
        cues = parse_srt((out / f"{name}.srt").read_text())
        assert " ".join(c[2] for c in cues).split() == [w["word"] for w in data["words"]]


def test_real_model_stitched_frames_match_the_audio_length(tiny_model_dir, speech_clip):
    from w2vbert_asr.transcribe import load_model

    _, wave, _ = speech_clip
    model, processor = load_model(tiny_model_dir)
    t = Transcriber(model, processor, "cpu", chunk_seconds=8.0, overlap_seconds=3.0, batch_size=8)
    [(_, logits, n)] = list(t.stream_logits([("clip", wave)]))
    assert n == len(wave)
    assert abs(logits.shape[0] - FrameGeometry.of(model.config).output_frames(len(wave))) <= 1
    assert logits.shape[1] == model.config.vocab_size


def test_cli_transcribe_positional_paths(tmp_path, tiny_model_dir, speech_clip, capsys):
    from w2vbert_asr.cli import main

    d, _, _ = speech_clip
    out = tmp_path / "cli_out"
    assert main(["transcribe", f"model={tiny_model_dir}", str(d / "short"), f"transcribe.output_dir={out}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["hello.json", "hello.srt", "hello.txt"]
    assert json.loads((out / "hello.json").read_text())["duration"] == pytest.approx(3.0, abs=0.01)


def test_clear_errors(tmp_path, tiny_model_dir):
    base = ["recipe=demo", f"output_dir={tmp_path}"]
    with pytest.raises(UsageError, match="nothing to transcribe"):
        transcribe(compose(base + [f"model_dir={tiny_model_dir}"]))
    (tmp_path / "a.wav").write_bytes(b"not audio at all" * 100)
    with pytest.raises(UsageError, match="not a model folder"):
        transcribe(compose(base + [f"model_dir={tmp_path}", f"transcribe.inputs=[{tmp_path / 'a.wav'}]"]))
    with pytest.raises(UsageError, match="no file could be read"):
        transcribe(compose(base + [f"model_dir={tiny_model_dir}", f"transcribe.inputs=[{tmp_path / 'a.wav'}]"]))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("W2VBERT_DEMO_MODEL"), reason="set W2VBERT_DEMO_MODEL=<trained demo model dir>")
def test_trained_demo_model_words_fall_inside_their_sentences(tmp_path):
    """With a trained model, every word starts within the (known) span of a sentence, never in a pause.
    The sentences use only the demo word list, so the demo model knows every word."""
    from w2vbert_asr.transcribe import load_model

    wave, spans = _spoken_sentences(["habari asubuhi rafiki yangu", "mama na baba", "chakula nzuri sana"] * 2)
    # Room tone, as in the synthetic corpus: digital silence is something the demo model never heard.
    wave = wave + np.random.default_rng(0).normal(0, 3e-3, wave.size).astype(np.float32)
    model, processor = load_model(os.environ["W2VBERT_DEMO_MODEL"])
    [result] = Transcriber(model, processor, chunk_seconds=10.0, overlap_seconds=2.0).transcribe([wave])
    assert len(result.words) >= len(spans)
    # Onsets only: the tiny demo model sometimes runs two words together across a pause (no word
    # delimiter in its output), which stretches that word's end, not where it starts.
    for w in result.words:
        assert any(s - TIMING_TOLERANCE_S <= w.start <= e for s, e in spans), w


# --------------------------------------------------------------------------------------------- streaming files
def test_read_blocks_equal_the_whole_file_decode(tmp_path, speech_clip):
    """Block-by-block decoding (with a soxr stream when the rate differs, a channel mean for stereo) gives
    the samples load_audio gives for the whole file, for every format and rate (MP3: to float rounding)."""
    import soxr

    from w2vbert_asr.audio import load_audio

    d, wave, _ = speech_clip
    sf.write(tmp_path / "clip.mp3", soxr.resample(wave, SR, 48_000), 48_000)
    sf.write(tmp_path / "clip16.wav", wave, SR)
    for path in [d / "talk.flac", d / "folder" / "stereo.wav", d / "short" / "hello.ogg", tmp_path / "clip.mp3",
                 tmp_path / "clip16.wav"]:
        # MP3: libsndfile 1.2.2 decodes short reads differently (see MPEG_FRAME): blocks of >= 2.4 s there.
        mp3 = path.suffix == ".mp3"
        blocks = list(read_blocks(path, SR, block_seconds=4.0 if mp3 else 0.7))
        assert len(blocks) > 3
        atol = 1e-6 if mp3 else 0
        np.testing.assert_allclose(np.concatenate(blocks), load_audio(path, SR), rtol=0, atol=atol, err_msg=str(path))


def test_long_file_streamed_equals_whole_file(tmp_path, tiny_model_dir, speech_clip):
    """A 2.5-minute 22.05 kHz file read in 1 s blocks gives the same logits, text and word times as the whole
    decoded wave in memory (the path transcribe took before it streamed)."""
    import soxr

    from w2vbert_asr.audio import load_audio
    from w2vbert_asr.transcribe import load_model

    _, wave, _ = speech_clip
    long_wave = np.tile(wave, -(-150 * SR // len(wave)))[: 150 * SR + 1234]
    long_wave = long_wave + np.random.default_rng(0).normal(0, 3e-3, long_wave.size).astype(np.float32)
    path = tmp_path / "long.flac"
    sf.write(path, soxr.resample(long_wave, SR, 22_050), 22_050)
    model, processor = load_model(tiny_model_dir)
    t = Transcriber(model, processor, "cpu", chunk_seconds=10.0, overlap_seconds=2.0, batch_size=3)
    [(_, whole_logits, whole_n)] = t.stream_logits([("whole", load_audio(path, SR))])
    [(_, streamed_logits, streamed_n)] = t.stream_logits([("file", read_blocks(path, SR, block_seconds=1.0))])
    assert streamed_n == whole_n and torch.equal(streamed_logits, whole_logits)
    whole, streamed = t.decode(whole_logits, whole_n), t.decode(streamed_logits, streamed_n)
    assert streamed.words and streamed.text == whole.text and streamed.words == whole.words


def test_a_source_failing_mid_stream_is_reported_and_skipped(processor, tone_model):
    """An input whose audio fails while being read (a file cut short) is reported through on_error; its
    chunks already batched are dropped, and the inputs around it come out as they do alone."""
    clips = [tone_clip(s, seed=i) for i, s in enumerate([30.0, 45.0, 25.0])]

    def failing(wave):
        yield wave[: 12 * SR]
        yield wave[12 * SR: 24 * SR]
        raise ValueError("cut short")

    t = Transcriber(tone_model, processor, "cpu", chunk_seconds=10.0, overlap_seconds=2.0, batch_size=3)
    errors = []
    results = dict(t.stream([("a", [clips[0][0]]), ("bad", failing(clips[1][0])), ("c", clips[2][0])],
                            on_error=lambda key, e: errors.append((key, str(e)))))
    assert errors == [("bad", "cut short")] and list(results) == ["a", "c"]
    alone = t.transcribe([clips[0][0], clips[2][0]])
    assert results["a"] == alone[0] and results["c"] == alone[1]
    assert_words_match(results["c"].words, clips[2][1])
    with pytest.raises(ValueError, match="cut short"):  # without on_error the failure propagates
        list(t.stream([("bad", failing(clips[1][0]))]))


def test_fast_relative_key_bias_equals_transformers(tiny_model_dir, monkeypatch):
    """Our relative_key attention bias gives transformers' logits and gradients (padded batch included)."""
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as w2v_bert

    from w2vbert_asr.features import BatchFeatureExtractor, pad_waves
    from w2vbert_asr.model import relative_key_bias, use_fast_relative_key_bias
    from w2vbert_asr.transcribe import load_model

    model, processor = load_model(tiny_model_dir)  # marks this model's attention for ours
    dispatch = w2v_bert._apply_relative_key_position_encoding
    layer0 = model.wav2vec2_bert.encoder.layers[0].self_attn
    assert layer0._w2vbert_fast_bias and getattr(dispatch, "_w2vbert_dispatch", False)
    rng = np.random.default_rng(0)
    waves, lengths = pad_waves([rng.normal(0, 0.1, n).astype(np.float32) for n in (5 * SR, 3 * SR + 777)])
    feats, mask = BatchFeatureExtractor.from_hf(processor.feature_extractor)(waves, lengths)
    model.train(False)

    def run():
        model.zero_grad()
        logits = model(input_features=feats, attention_mask=mask).logits
        logits.square().mean().backward()
        layer = model.wav2vec2_bert.encoder.layers[0].self_attn
        return logits.detach(), layer.distance_embedding.weight.grad.clone(), layer.linear_q.weight.grad.clone()

    ours = run()
    use_fast_relative_key_bias(model, enable=False)
    theirs = run()
    calls = []
    monkeypatch.setattr("w2vbert_asr.model.relative_key_bias", lambda *a: calls.append(1) or relative_key_bias(*a))
    run()
    assert not calls  # a model not marked (one being trained, a reference) keeps transformers' arithmetic
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cli_failed_inputs_listed_and_exit_1(tmp_path, tiny_model_dir, speech_clip, capsys):
    """Unreadable inputs (not audio, empty, a cut MP3) go to failed.json with the reason and the command
    exits 1, after transcribing the good file; a clean rerun removes the stale list."""
    from w2vbert_asr.cli import main

    d, wave, _ = speech_clip
    inputs = tmp_path / "in"
    inputs.mkdir()
    sf.write(inputs / "good.wav", wave[: 3 * SR], SR)
    (inputs / "noise.wav").write_bytes(b"not audio at all" * 100)
    (inputs / "empty.mp3").write_bytes(b"")
    sf.write(tmp_path / "full.mp3", wave, SR)
    (inputs / "cut.mp3").write_bytes((tmp_path / "full.mp3").read_bytes()[:300])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["transcribe", f"model={tiny_model_dir}", str(inputs), f"transcribe.output_dir={out}"])
    assert exit_info.value.code == 1
    assert (out / "good.txt").is_file() and (out / "good.json").is_file()
    failed = json.loads((out / FAILED_FILE).read_text())
    assert set(failed) == {str(inputs / n) for n in ("noise.wav", "empty.mp3", "cut.mp3")}
    for path, reason in failed.items():
        assert reason.startswith(path) and "undecodable" in reason, reason
    assert "could not be read" in capsys.readouterr().out
    assert main(["transcribe", f"model={tiny_model_dir}", str(inputs / "good.wav"),
                 f"transcribe.output_dir={out}"]) == 0
    assert not (out / FAILED_FILE).exists()


def test_cli_invalid_device_is_one_error_line(tmp_path, tiny_model_dir, speech_clip, capsys):
    from w2vbert_asr.cli import main

    d, _, _ = speech_clip
    with pytest.raises(SystemExit) as exit_info:
        main(["transcribe", f"model={tiny_model_dir}", str(d / "short"), "transcribe.device=tpu",
              f"transcribe.output_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "tpu" in err[0] and "Traceback" not in err[0]


@pytest.mark.slow
def test_transcribe_long_benchmark_runs(tmp_path, capsys):
    """benchmarks/transcribe_long.py end to end on a 15 s file: both systems measured in their own
    processes, the table, the ratios and the command printed."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "transcribe_long.py"
    spec = importlib.util.spec_from_file_location("transcribe_long_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--minutes", "0.25", "--work", str(tmp_path), "--threads", "1"])
    assert {(r["file"], r["system"]) for r in rows} == {(f, s) for f in ("2s", "0.25min") for s in ("ours", "pipeline")}
    for r in rows:
        assert r["wall"] > 0 and r["cpu"] > 0 and r["peak_mb"] > 100
        assert r["audio_seconds"] == pytest.approx(2.0 if r["file"] == "2s" else 15.0)
    out = capsys.readouterr().out
    assert "speed-up" in out and "over the 2 s file" in out and "command: python benchmarks/transcribe_long.py" in out
