"""ONNX export and the onnxruntime backend: same logits and frame counts as torch on padded batches, same
greedy transcripts, int8 within the CER bound, the model card's onnxruntime-only snippet, clear errors."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose
from w2vbert_asr.export import FP32_FILE, INT8_FILE, ONNX_DIR, CTCWithLengths, export_model_dir
from w2vbert_asr.geometry import SAMPLING_RATE, FrameGeometry
from w2vbert_asr.features import BatchFeatureExtractor, pad_waves

ATOL = 1e-4
# Samples per clip: 1 s and 25 s, and fbank counts (n - 400) // 160 + 1 both odd and even, so the last
# stacked frame is sometimes half padding (see CTCWithLengths).
BATCH_SAMPLES = [16_000, 400_000, 16_160, 56_000, 32_320, 200_000, 17_000]
EXPORT_CFG = compose(["lang=sw", "export.quantize=int8", "export.optimize=basic"]).export


def _save_tiny_model(folder: Path, processor, seed: int = 0) -> Path:
    """A random tiny Wav2Vec2BertForCTC saved as train exports it (weights, processor, normaliser)."""
    from w2vbert_asr.model import build_model
    from w2vbert_asr.text import Normalizer

    torch.manual_seed(seed)
    model = build_model(compose(["recipe=demo"]).model, processor.tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    Normalizer().save(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny model folder exported in fp32 and int8."""
    from w2vbert_asr.text import Vocabulary, build_processor

    d = tmp_path_factory.mktemp("export")
    processor = build_processor(Vocabulary.build(["habari ya asubuhi", "jambo rafiki yangu"]), d / "processor")
    model_dir = _save_tiny_model(d / "model", processor)
    result = export_model_dir(model_dir, EXPORT_CFG)
    return model_dir, result


def _features(model_dir: Path, samples: list[int], seed: int = 0):
    from transformers import Wav2Vec2BertProcessor

    rng = np.random.default_rng(seed)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in samples]
    batch, lengths = pad_waves(waves)
    featurizer = BatchFeatureExtractor.from_hf(Wav2Vec2BertProcessor.from_pretrained(model_dir).feature_extractor)
    feats, mask = featurizer(batch, lengths)
    return feats, mask, lengths


def test_export_writes_dynamic_graphs(exported):
    import onnx

    model_dir, result = exported
    for name in (FP32_FILE, INT8_FILE):
        graph = onnx.load(str(model_dir / ONNX_DIR / name))
        onnx.checker.check_model(graph)
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert dims == {"input_features": ["batch", "time", 160], "attention_mask": ["batch", "time"]}
        assert [o.name for o in graph.graph.output] == ["logits", "output_lengths"]
    assert result["int8_bytes"] < result["fp32_bytes"]


@pytest.mark.parametrize("samples", [BATCH_SAMPLES[:1], BATCH_SAMPLES], ids=["batch1", "batch7"])
def test_ort_fp32_matches_torch_on_a_padded_batch(exported, samples):
    from w2vbert_asr.model import load_ctc_model
    from w2vbert_asr.onnx_model import load_onnx_model

    model_dir, _ = exported
    feats, mask, lengths = _features(model_dir, samples)
    with torch.no_grad():
        expected = load_ctc_model(model_dir)(input_features=feats, attention_mask=mask).logits
    out = load_onnx_model(model_dir)(input_features=feats, attention_mask=mask)
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
    frames = FrameGeometry.of(load_onnx_model(model_dir).config).output_frames(lengths)
    assert out.output_lengths.tolist() == frames.tolist()


def test_in_graph_lengths_equal_output_lengths_on_odd_and_even_frame_counts(exported):
    """Every length from 35 ms to 0.2 s, one sample at a time past each fbank boundary, in one padded batch."""
    from w2vbert_asr.model import load_ctc_model
    from w2vbert_asr.geometry import FrameGeometry

    model_dir, _ = exported
    samples = list(range(560, 3_400, 80))
    fbank = [(n - 400) // 160 + 1 for n in samples]
    assert {f % 2 for f in fbank} == {0, 1}
    feats, mask, lengths = _features(model_dir, samples)
    model = load_ctc_model(model_dir)
    with torch.no_grad():
        _, frames = CTCWithLengths(model)(feats, mask)
    assert frames.tolist() == FrameGeometry.of(model.config).output_frames(lengths).tolist()


def test_int8_logits_stay_close_to_fp32(exported):
    """Fast check of the int8 file on the random tiny model (the CER bound on a trained model is the
    slow test below): same shapes and frame counts, small error, the same argmax on most frames."""
    from w2vbert_asr.onnx_model import load_onnx_model

    model_dir, _ = exported
    feats, mask, _ = _features(model_dir, [n for n in BATCH_SAMPLES if n < 100_000])
    fp32 = load_onnx_model(model_dir)(input_features=feats, attention_mask=mask)
    int8 = load_onnx_model(model_dir, "int8")(input_features=feats, attention_mask=mask)
    assert int8.output_lengths.tolist() == fp32.output_lengths.tolist()
    error = (int8.logits - fp32.logits).abs().mean() / fp32.logits.std()
    assert 0 < error < 0.1, error  # int8 really is different, and close
    agree = (int8.logits.argmax(-1) == fp32.logits.argmax(-1)).float().mean()
    assert agree > 0.9, agree


def test_greedy_transcripts_identical_torch_and_onnx(tmp_path, prepared_run):
    """evaluate with eval.backend=onnx gives exactly the torch backend's hypotheses on the dev split."""
    from transformers import Wav2Vec2BertProcessor

    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.evaluate import evaluate_model

    out = Path(prepared_run.output_dir)
    processor = Wav2Vec2BertProcessor.from_pretrained(out / "processor")
    model_dir = _save_tiny_model(tmp_path / "model", processor, seed=1)
    export_model_dir(model_dir, compose(["lang=sw", "export.optimize=basic"]).export)
    dev = load_prepared(out, "dev")
    rows = {}
    for backend in ("torch", "onnx"):
        cfg = compose(["recipe=demo", f"output_dir={tmp_path}", f"eval.backend={backend}"])
        evaluate_model(model_dir, cfg, {"dev": dev}, tmp_path / backend)
        rows[backend] = [json.loads(line) for line in (tmp_path / backend / "predictions" / "dev.jsonl").open()]
        header = json.loads((tmp_path / backend / "metrics.json").read_text())
    assert "onnxruntime" in header["device"]
    assert len(rows["onnx"]) == len(dev) > 0
    assert [r["hypothesis"] for r in rows["onnx"]] == [r["hypothesis"] for r in rows["torch"]]
    assert any(r["hypothesis"] for r in rows["torch"])  # not trivially equal


def test_transcribe_command_on_onnx_backend(tmp_path, exported):
    """The CLI path: positional audio, transcribe.backend=onnx, the int8 file; txt/json/srt written."""
    from w2vbert_asr.cli import main

    model_dir, _ = exported
    wave = (0.1 * np.random.default_rng(3).standard_normal(SAMPLING_RATE * 3)).astype(np.float32)
    sf.write(tmp_path / "clip.wav", wave, SAMPLING_RATE)
    main(["transcribe", f"model={model_dir}", str(tmp_path / "clip.wav"), "transcribe.backend=onnx",
          "export.quantize=int8", f"transcribe.output_dir={tmp_path / 'out'}", "transcribe.chunk_seconds=2",
          "transcribe.overlap_seconds=0.5"])
    saved = json.loads((tmp_path / "out" / "clip.json").read_text())
    assert saved["duration"] == pytest.approx(3.0)
    assert (tmp_path / "out" / "clip.srt").is_file() and (tmp_path / "out" / "clip.txt").is_file()


def test_model_card_snippet_runs_with_onnxruntime_alone(tmp_path, exported, monkeypatch):
    """The card's ten lines, run as written (the download pointed at the local folder), print the greedy
    transcript that the model's own tokenizer decodes from the same graph."""
    import huggingface_hub

    from w2vbert_asr.push import build_card
    from w2vbert_asr.model import ctc_greedy_ids
    from w2vbert_asr.transcribe import load_model

    model_dir, _ = exported
    card = str(build_card(model_dir, "me/tiny", compose(["recipe=demo"]).push))
    section = card.split("## Run on a CPU with onnxruntime")[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 11  # ten lines + the long call's tail
    assert "w2vbert_asr" not in code and "torch" not in code
    wave = (0.1 * np.random.default_rng(4).standard_normal(SAMPLING_RATE * 2)).astype(np.float32)
    sf.write(tmp_path / "clip.wav", wave, SAMPLING_RATE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(model_dir))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "card", "exec"), {})
    # Expected: the same graph on the same (transformers) features, decoded by the model's tokenizer.
    model, processor = load_model(model_dir, backend="onnx", quantize="int8")
    audio, _ = sf.read(tmp_path / "clip.wav", dtype="float32")  # 16-bit PCM in the file, as the snippet reads it
    x = processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    out = model(input_features=x["input_features"], attention_mask=x["attention_mask"])
    [ids] = ctc_greedy_ids(out.logits, out.output_lengths)
    expected = processor.tokenizer.decode(ids)
    assert expected.strip()
    # (The tokenizer puts spaces around special tokens; a random model emits [UNK] now and then.)
    words = lambda text: text.replace("[UNK]", " ").split()  # noqa: E731
    assert words(printed.getvalue()) == words(expected)


def _copy_model_files(model_dir, dst):
    """The model folder's files without onnx/ (a model as `train` exports it)."""
    dst.mkdir()
    for f in model_dir.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_clear_errors(tmp_path, exported):
    from w2vbert_asr.evaluate import evaluate_model
    from w2vbert_asr.onnx_model import load_onnx_model
    from w2vbert_asr.transcribe import load_model

    model_dir, _ = exported
    bare = _copy_model_files(model_dir, tmp_path / "bare")
    with pytest.raises(UsageError, match=r"w2vbert-asr export model=.*bare"):
        load_model(bare, backend="onnx")
    with pytest.raises(UsageError, match=r"w2vbert-asr export model=.*bare"):
        evaluate_model(bare, compose(["recipe=demo", "eval.backend=onnx"]), {}, tmp_path)
    (bare / ONNX_DIR).mkdir()
    (bare / ONNX_DIR / FP32_FILE).write_bytes((model_dir / ONNX_DIR / FP32_FILE).read_bytes())
    with pytest.raises(UsageError, match=r"export model=.*bare export.quantize=int8"):
        load_onnx_model(bare, "int8")
    with pytest.raises(UsageError, match="choose torch or onnx"):
        load_model(model_dir, backend="tensorrt")
    with pytest.raises(UsageError, match="choose null"):
        load_onnx_model(model_dir, "int4")


def test_cli_export_command(tmp_path, exported, capsys):
    from w2vbert_asr.cli import main

    model_dir, _ = exported
    copy = _copy_model_files(model_dir, tmp_path / "model")
    main(["export", f"model={copy}", "export.optimize=none"])
    assert (copy / ONNX_DIR / FP32_FILE).is_file() and not (copy / ONNX_DIR / INT8_FILE).exists()
    assert "transcribe.backend=onnx" in capsys.readouterr().out


@pytest.mark.slow
def test_trained_model_int8_cer_within_half_a_point(tmp_path, prepared_run, run_overrides):
    """A trained tiny model: ORT fp32 transcribes the dev split exactly as torch does, and int8's test CER
    is at most 0.5 points above fp32's. W2VBERT_DEMO_RUN=<a `make demo` output folder> uses that run
    (its model is exported into a copy); otherwise a model is trained here on the small corpus."""
    import os
    import shutil

    from w2vbert_asr.prepared import load_prepared
    from w2vbert_asr.evaluate import evaluate_model
    from w2vbert_asr.train import train

    if os.environ.get("W2VBERT_DEMO_RUN"):
        run = Path(os.environ["W2VBERT_DEMO_RUN"])
        shutil.copytree(run / "model", tmp_path / "model", ignore=shutil.ignore_patterns("onnx", ".*"))
    else:
        run = tmp_path
        src = Path(prepared_run.output_dir)
        for name in ("prepared", "processor"):
            shutil.copytree(src / name, tmp_path / name)
        shutil.copy(src / "prepare_report.json", tmp_path)
        train(compose(run_overrides(tmp_path, prepared_run.data.root, "train.max_steps=250",
                                    "train.eval_steps=250", "train.warmup_steps=50")))
    model_dir = tmp_path / "model"
    export_model_dir(model_dir, EXPORT_CFG)
    splits = {s: load_prepared(run, s) for s in ("dev", "test")}
    summary, rows = {}, {}
    for name, overrides in {"torch": [], "onnx": ["eval.backend=onnx"],
                            "int8": ["eval.backend=onnx", "export.quantize=int8"]}.items():
        cfg = compose(["recipe=demo", f"output_dir={tmp_path}", *overrides])
        summary[name] = evaluate_model(model_dir, cfg, splits, tmp_path / name)
        rows[name] = [json.loads(line) for line in (tmp_path / name / "predictions" / "dev.jsonl").open()]
    assert [r["hypothesis"] for r in rows["onnx"]] == [r["hypothesis"] for r in rows["torch"]]
    assert summary["onnx"]["test"]["cer"] < 0.5  # trained: the bound below means something
    assert summary["int8"]["test"]["cer"] <= summary["onnx"]["test"]["cer"] + 0.005

def test_push_stages_the_onnx_folder(tmp_path, exported):
    """push (dry run: exactly the folder a real push uploads) carries onnx/ and the card's onnxruntime section."""
    from w2vbert_asr.push import push

    model_dir, _ = exported
    result = push(compose(["recipe=demo", f"model_dir={model_dir}", "push.dry_run=true",
                           f"push.staging_dir={tmp_path / 'stage'}"]))
    assert {f"{ONNX_DIR}/{FP32_FILE}", f"{ONNX_DIR}/{INT8_FILE}"} <= set(result["files"])
    assert "## Run on a CPU with onnxruntime" in (tmp_path / "stage" / "README.md").read_text()


def test_cpu_benchmark_smoke(tmp_path, capsys):
    """benchmarks/onnx_cpu.py on the tiny shape, one short clip: every backend timed, ORT equal to torch."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "onnx_cpu.py"
    spec = importlib.util.spec_from_file_location("onnx_cpu_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--size", "tiny", "--threads", "1", "--batch-sizes", "2", "--seconds", "1", "--repeats", "1",
                    "--work-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(float(c) > 0 for c in cells[4:8])  # RTFx of the four backends
    assert float(cells[-1]) < ATOL  # max |ORT fp32 - torch|


# ------------------------------------- integrity: exports written atomically, incomplete or stale ones refused
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.json",
                   "special_tokens_map.json", "added_tokens.json")


def _error_line(capsys, args: list[str]) -> str:
    """Run the CLI in this process: it must end with exit status 2 and exactly one `error:` line."""
    from w2vbert_asr.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, (e.value.code, err[-3000:])
    return errors[0]


def _copy_export(model_dir: Path, dst: Path) -> Path:
    """A copy of an exported model folder, onnx/ and every file's modification time included."""
    import shutil

    return Path(shutil.copytree(model_dir, dst, ignore=shutil.ignore_patterns(".*")))


def _clip(folder: Path, seconds: float = 2.0) -> Path:
    wave = (0.1 * np.random.default_rng(5).standard_normal(int(SAMPLING_RATE * seconds))).astype(np.float32)
    sf.write(folder / "clip.wav", wave, SAMPLING_RATE)
    return folder / "clip.wav"


def test_export_without_processor_files_is_one_error_line(tmp_path, exported, capsys):
    model_dir, _ = exported
    bare = _copy_model_files(model_dir, tmp_path / "model")
    for name in PROCESSOR_FILES:
        (bare / name).unlink(missing_ok=True)
    line = _error_line(capsys, ["export", f"model={bare}"])
    assert "processor" in line and str(bare) in line
    assert not (bare / ONNX_DIR).exists()


def test_truncated_onnx_is_one_error_line_in_transcribe_and_evaluate(tmp_path, exported, capsys, sw_corpus):
    model_dir, _ = exported
    copy = _copy_export(model_dir, tmp_path / "model")
    graph = copy / ONNX_DIR / FP32_FILE
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # what a kill -9 mid-write left
    line = _error_line(capsys, ["transcribe", f"model={copy}", str(_clip(tmp_path)), "transcribe.backend=onnx",
                                f"transcribe.output_dir={tmp_path / 'out'}"])
    assert f"w2vbert-asr export model={copy}" in line and "again" in line
    line = _error_line(capsys, ["evaluate", f"model={copy}", "eval.backend=onnx", f"data.root={sw_corpus}",
                                "eval.split=dev", f"eval.results_dir={tmp_path / 'eval'}"])
    assert f"w2vbert-asr export model={copy}" in line and "again" in line


def test_stale_or_incomplete_export_is_refused(tmp_path, exported):
    """Weights replaced after the export are not served: the onnx/ record names what it was made from.
    A copy of the folder or a touched file (new times, same bytes) still loads."""
    import os

    from w2vbert_asr.onnx_model import load_onnx_model

    model_dir, _ = exported
    copy = _copy_export(model_dir, tmp_path / "model")
    os.utime(copy / "model.safetensors", ns=(1, 1))  # touched: hashed once, the same bytes
    os.utime(copy / ONNX_DIR / INT8_FILE, ns=(1, 1))
    assert load_onnx_model(copy, "int8").session is not None
    retrained = _save_tiny_model(tmp_path / "other", __import__("transformers").Wav2Vec2BertProcessor
                                 .from_pretrained(model_dir), seed=7)
    (copy / "model.safetensors").write_bytes((retrained / "model.safetensors").read_bytes())
    for quantize in (None, "int8"):
        with pytest.raises(UsageError, match=rf"model.safetensors.*`w2vbert-asr export model={copy}"):
            load_onnx_model(copy, quantize)
    fresh = _copy_export(model_dir, tmp_path / "fresh")
    records = [p for p in (fresh / ONNX_DIR).iterdir() if p.suffix == ".json"]
    assert len(records) == 1
    records[0].unlink()  # an export that never finished writing its record
    with pytest.raises(UsageError, match=rf"incomplete.*`w2vbert-asr export model={fresh}` again"):
        load_onnx_model(fresh)


def test_export_into_a_read_only_model_folder(tmp_path, exported, capsys, monkeypatch):
    """A model folder that cannot be written (a read-only mount, simulated: we may run as root) is one
    error line naming export.output_dir; exported there, the onnx backend uses it."""
    import errno
    import os

    model_dir, _ = exported
    (tmp_path / "ro").mkdir()
    ro = _copy_model_files(model_dir, tmp_path / "ro" / "model")
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(os.path.abspath(path)).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    line = _error_line(capsys, ["export", f"model={ro}", "export.optimize=none"])
    assert "Read-only file system" in line and "export.output_dir" in line
    elsewhere = tmp_path / "onnx_elsewhere"
    from w2vbert_asr.cli import main

    main(["export", f"model={ro}", "export.optimize=none", f"export.output_dir={elsewhere}"])
    assert (elsewhere / FP32_FILE).is_file() and not (ro / ONNX_DIR).exists()
    main(["transcribe", f"model={ro}", str(_clip(tmp_path)), "transcribe.backend=onnx",
          f"export.output_dir={elsewhere}", f"transcribe.output_dir={tmp_path / 'out'}"])
    assert json.loads((tmp_path / "out" / "clip.json").read_text())["duration"] == pytest.approx(2.0)
