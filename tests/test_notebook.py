"""notebooks/walkthrough.ipynb: committed clean, and runs start to finish headless on the demo corpus.

The default run executes it small (30 clips, 10 training steps) and checks what every step computes. The
full-size run (synthesis, ~200 training steps, evaluation, transcription, baseline, compare, push dry run)
takes about 90 s on 2 idle CPU cores and is marked slow (`-m slow`): it also checks that the model learns.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"
CELL_TIMEOUT_S = 600  # the training cell is the longest; far above its CPU time, a hang still fails
MAX_CER_PERCENT = 90.0  # the trained model must be clearly better than emitting nothing (100 %)


def _read() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def _text(cell) -> str:
    """All printed and displayed plain text of one executed code cell."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(out.data.get("text/markdown", "") + out.data.get("text/plain", ""))
    return "".join(parts)


def test_committed_notebook_is_clean():
    """No outputs and no execution counts in git: diffs stay readable and no run's paths leak in."""
    nb = _read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"cells {dirty} carry outputs or execution counts; clear them before committing"
    assert nb.metadata.kernelspec.name == "python3"


def test_real_run_commands_compose():
    """The commands the real-run section tells a GPU user to type are valid: each composes its config (no
    stale key, group or recipe), the way the CLI would."""
    from w2vbert_asr import cli

    markdown = "\n".join(c.source for c in _read().cells if c.cell_type == "markdown")
    block = re.search(r"```bash\n(.*?)```", markdown, re.S).group(1)
    commands = [re.search(r"\bw2vbert-asr (\S+)(.*)", line.split("#")[0]) for line in block.splitlines()]
    # The user fills in the dataset folder and <placeholders> such as <user>.
    commands = [(m.group(1), re.sub(r"<(\w+)>", r"\1", m.group(2).replace("$CV", "/data/cv/mn")).split())
                for m in commands if m]
    assert {name for name, _ in commands} >= {"train", "evaluate", "baseline", "compare", "transcribe", "push"}
    for name, args in commands:
        assert name in cli.COMMANDS, name
        cfg = cli.compose([a for a in cli._translate(name, args) if not a.startswith("-")])
        assert cfg.lang == "mn" or cfg.model_dir == "outputs/mn/model", (name, args)


# The notebook's own values, printed by a cell added after its last one.
PROBE = """
import json as _json
print("PROBE " + _json.dumps({"steps": STEPS, "injected": injected, "report": report, "vocab": vocab, "loss": loss,
                              "test": test, "words": words, "recording": str(recording), "staged": staged},
                             default=str))
"""


def _execute(tmp_path, monkeypatch, **settings) -> tuple[list, Path, dict]:
    """Run the notebook headless (WALKTHROUGH_<NAME> = settings) -> (its executed code cells, its output
    folder, the values its kernel computed)."""
    from nbclient import NotebookClient

    out = tmp_path / "out"
    monkeypatch.setenv("WALKTHROUGH_OUT", str(out))  # the kernel inherits the environment
    for name, value in settings.items():
        monkeypatch.setenv(f"WALKTHROUGH_{name.upper()}", str(value))
    nb = _read()
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    # Raises CellExecutionError (with the failing cell's traceback) if any cell fails.
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    probe = json.loads(re.search(r"^PROBE (.*)$", _text(code[-1]), re.M).group(1))
    return code[:-1], out, probe


def _check_what_it_computed(code: list, out: Path, probe: dict) -> None:
    """What each step printed or returned is what its files hold, recomputed independently."""
    import jiwer

    from w2vbert_asr.prepared import load_prepared

    text = "\n".join(_text(c) for c in code)
    # Step 1-2: prepare rejected exactly the rows the faulty release broke, each under its reason.
    report = probe["report"]
    skipped: dict[str, int] = {}
    for split in report["splits"].values():
        assert split["kept"] + sum(split["skipped"].values()) == split["rows"]
        for reason, n in split["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == probe["injected"]
    # The vocabulary spells every prepared training transcript ('|' is the word delimiter).
    train_chars = {ch for t in load_prepared(out, "train")["text"] for ch in str(t).replace(" ", "|")}
    assert train_chars <= set(probe["vocab"])
    # Step 3: the run made the steps asked for.
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert json.loads((last / "trainer_state.json").read_text())["step"] == probe["steps"]
    assert probe["loss"] and all(math.isfinite(v) for _, v in probe["loss"])
    # Step 4: the printed CER is metrics.json's, which is jiwer's on the written predictions.
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["splits"]["test"]
    rows = [json.loads(line) for line in (out / "eval" / "predictions" / "test.jsonl").read_text().splitlines()]
    assert metrics["utterances"] == len(rows) == report["splits"]["test"]["kept"]
    refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
    assert metrics["cer"] == pytest.approx(jiwer.cer(refs, hyps)) and metrics["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert f"test CER {100 * metrics['cer']:.1f} %" in text
    # Step 6: the transcript's words run in order inside the recording, and the text is those words.
    import soundfile as sf

    duration = sf.info(probe["recording"]).duration
    words = probe["words"]
    assert words["text"] == " ".join(w["word"] for w in words["words"])
    times = [t for w in words["words"] for t in (w["start"], w["end"])]
    assert times == sorted(times) and all(0 <= t <= duration + 0.05 for t in times)
    # Step 7: the comparison's numbers are each run's own.
    comparison = json.loads((out / "compare" / "comparison.json").read_text())
    by_system = {r["system"]: r for r in comparison["runs"]}
    assert by_system["w2v-bert-2.0-ctc"]["wer"] == metrics["wer"]
    whisper = [json.loads(line) for line in (out / "baseline" / "predictions" / "test.jsonl").read_text().splitlines()]
    assert {r["hypothesis"] for r in whisper} == {"habari dunia"}  # the scripted stand-in, normalised
    assert by_system["whisper"]["wer"] == pytest.approx(jiwer.wer([r["reference"] for r in whisper],
                                                                   [r["hypothesis"] for r in whisper]))
    # Step 8: the staged folder is the model plus its card, whose model-index holds the test scores.
    staged = Path(probe["staged"]["staging_dir"])
    model_files = sorted(p.name for p in (out / "model").iterdir())
    assert sorted(probe["staged"]["files"]) == sorted([*model_files, "README.md"]) and not probe["staged"]["uploaded"]
    assert (staged / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()
    import yaml

    card = yaml.safe_load((staged / "README.md").read_text(encoding="utf-8").split("---\n", 2)[1])
    scores = {(r["dataset"]["split"], m["type"]): m["value"] for r in card["model-index"][0]["results"]
              for m in r["metrics"]}
    assert scores[("test", "wer")] == round(100 * metrics["wer"], 2)
    assert scores[("test", "cer")] == round(100 * metrics["cer"], 2)


def test_notebook_computes_what_its_files_hold(tmp_path, monkeypatch):
    """The whole walkthrough, run small (30 clips, 10 steps: it learns nothing yet), computes every step's
    numbers from the run's files: skip counts, vocabulary, steps, CER, word times, comparison, staged card."""
    _check_what_it_computed(*_execute(tmp_path, monkeypatch, clips=30, steps=10))


@pytest.mark.slow
def test_notebook_runs_headless(tmp_path, monkeypatch):
    """At its own size the walkthrough's model learns: a falling loss and a test CER clearly below 100 %."""
    code, out, probe = _execute(tmp_path, monkeypatch)
    _check_what_it_computed(code, out, probe)
    text = "\n".join(_text(c) for c in code)

    # Step 2: prepare reported the rows the faulty release breaks on purpose.
    for reason in ("missing_file", "undecodable_audio", "empty_text", "path_escape", "duration"):
        assert reason in text
    # Step 3: the live plot was drawn (a PNG display) and training logged a falling loss.
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    m = re.search(r"first logged loss ([\d.]+), last ([\d.]+)", text)
    assert m and float(m.group(2)) < float(m.group(1))
    # Step 4: the printed test CER is a real number, clearly below 100 %.
    m = re.search(r"test CER ([\d.]+) %", text)
    assert m, "no cell printed the test CER"
    assert float(m.group(1)) < MAX_CER_PERCENT
    # Step 6: a transcript with subtitles was written.
    srt = list((out / "transcripts").glob("*.srt"))
    assert srt and "-->" in srt[0].read_text(encoding="utf-8")
    # Step 7: the comparison shows both systems.
    comparison = (out / "compare" / "comparison.md").read_text(encoding="utf-8")
    assert "whisper" in comparison and "w2v-bert" in comparison
    assert (out / "compare" / "comparison.png").stat().st_size > 0
    # Step 8: the final cell names the staged model card, and that card exists.
    m = re.search(r"model card: (\S+)", _text(code[-1]))
    assert m, "the last cell did not print the model card path"
    card = Path(m.group(1))
    assert card.is_file() and card.parent == out / "push"
    assert "model-index" in card.read_text(encoding="utf-8")
    assert not (card.parent / "optimizer.bin").exists()  # only the model folder is staged
