"""notebooks/walkthrough.ipynb: committed clean, and runs start to finish headless on the demo corpus.

The full run (synthesis, ~200 training steps, evaluation, transcription, baseline, compare, push dry
run) takes about 90 s on 2 idle CPU cores; it is part of the default run, so CI executes the notebook.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"
CELL_TIMEOUT_S = 600  # the training cell is the longest; far above its CPU time, a hang still fails
MAX_CER_PERCENT = 90.0  # the trained model must be clearly better than emitting nothing (100 %)
# Every step of the walkthrough is a section heading: "## 1. ..." .. "## 8. ...".
SECTIONS = 8


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


def test_notebook_code_parses_and_covers_every_step():
    nb = _read()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            ast.parse(cell.source, filename=f"{NOTEBOOK.name} cell {i}")
    headings = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()
                if re.match(r"## \d+\. ", line)]
    assert [int(re.match(r"## (\d+)\.", h).group(1)) for h in headings] == list(range(1, SECTIONS + 1))
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    # The real-run section shows the exact commands for a GPU run with the real checkpoint.
    for command in ("w2vbert-asr train recipe=mn data.root=$CV model=w2v_bert_2 train=v100_16gb",
                    "baseline.name_or_path=openai/whisper-large-v3", "HF_TOKEN="):
        assert command in markdown


def test_notebook_runs_headless(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    out = tmp_path / "out"
    monkeypatch.setenv("WALKTHROUGH_OUT", str(out))  # the kernel inherits the environment
    nb = _read()
    # Raises CellExecutionError (with the failing cell's traceback) if any cell fails.
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
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
