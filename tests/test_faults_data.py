"""Faults around prepared data: an edited release is re-prepared, a full disk during prepare is named.

(To be merged into tests/test_faults.py.)
"""

from __future__ import annotations

import errno
import json
import os

import pytest
from datasets.arrow_writer import ArrowWriter

from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose
from w2vbert_asr.data import load_prepared, prepare


def _release(corpus, root, rows=(12, 3, 3)):
    """A small Common Voice folder: the first rows of each split of `corpus`, clips/ a symlink to its clips."""
    root.mkdir()
    (root / "clips").symlink_to(corpus / "clips", target_is_directory=True)
    for split, n in zip(("train", "dev", "test"), rows):
        lines = (corpus / f"{split}.tsv").read_text().splitlines()
        (root / f"{split}.tsv").write_text("\n".join(lines[: n + 1]) + "\n")
    return root


def _cfg(out, root, *extra):
    return compose([f"output_dir={out}", f"data.root={root}", "lang=sw", *extra])


def _mtime(path):
    return path.stat().st_mtime_ns


def test_edited_release_is_re_prepared_and_says_what_changed(tmp_path, sw_corpus, capsys):
    root = _release(sw_corpus, tmp_path / "cv")
    out = tmp_path / "out"
    train_file = out / "prepared" / "train.arrow"
    prepare(_cfg(out, root))
    capsys.readouterr()
    first = _mtime(train_file)

    prepare(_cfg(out, root))  # nothing changed: nothing redone
    assert _mtime(train_file) == first
    assert "re-preparing" not in capsys.readouterr().out

    # Edit one sentence of train.tsv.
    header, *rows = (root / "train.tsv").read_text().splitlines()
    col = header.split("\t").index("sentence")
    cells = rows[0].split("\t")
    cells[col] = "habari mpya kabisa"
    rows[0] = "\t".join(cells)
    (root / "train.tsv").write_text("\n".join([header, *rows]) + "\n")
    prepare(_cfg(out, root))
    assert "train.tsv changed: re-preparing" in capsys.readouterr().out
    assert "habari mpya kabisa" in list(load_prepared(out, "train")["text"])

    # Add rows (the dev rows, appended to train): trained on, not the old rows only.
    dev_rows = (root / "dev.tsv").read_text().splitlines()[1:]
    with open(root / "train.tsv", "a") as f:
        f.write("\n".join(dev_rows) + "\n")
    report = prepare(_cfg(out, root))
    assert "train.tsv changed" in capsys.readouterr().out
    assert report["splits"]["train"]["rows"] == len(rows) + len(dev_rows)
    assert len(load_prepared(out, "train")) == report["splits"]["train"]["kept"] == len(rows) + len(dev_rows)

    # An audio file replaced under the same name (new size and mtime): re-prepared, no decoding needed to see it.
    clip = (root / "test.tsv").read_text().splitlines()[1].split("\t")[header.split("\t").index("path")]
    private = tmp_path / "clips"
    private.mkdir()
    for p in (root / "clips").iterdir():
        os.symlink(p.resolve(), private / p.name)
    (root / "clips").unlink()
    private.rename(root / "clips")
    (root / "clips" / clip).unlink()
    (root / "clips" / clip).write_bytes((sw_corpus / "clips" / clip).read_bytes() + b"\0" * 10)
    prepare(_cfg(out, root))
    assert "audio of test.tsv changed: re-preparing" in capsys.readouterr().out

    # data.force_prepare=true redoes it all although nothing changed; it is not part of the fingerprint.
    before = _mtime(train_file)
    prepare(_cfg(out, root, "data.force_prepare=true"))
    assert "data.force_prepare=true: re-preparing" in capsys.readouterr().out
    assert _mtime(train_file) != before
    before = _mtime(train_file)
    prepare(_cfg(out, root))
    assert _mtime(train_file) == before


def test_older_prepared_format_is_re_prepared(tmp_path, sw_corpus, capsys):
    """Prepared folders from before the int16 format (their DONE holds a bare fingerprint) are redone."""
    root = _release(sw_corpus, tmp_path / "cv")
    out = tmp_path / "out"
    prepare(_cfg(out, root))
    (out / "prepared" / "DONE").write_text("0123456789abcdef")
    capsys.readouterr()
    prepare(_cfg(out, root))
    assert "older format" in capsys.readouterr().out
    assert json.loads((out / "prepared" / "DONE").read_text())["format"] == 2


def test_full_disk_during_prepare_is_one_clear_error_and_leaves_no_partial_file(tmp_path, sw_corpus, monkeypatch):
    root = _release(sw_corpus, tmp_path / "cv", rows=(40, 3, 3))
    out = tmp_path / "out"
    original, calls = ArrowWriter.write_table, []

    def write_until_full(self, table, *args, **kwargs):
        calls.append(len(table))
        if len(calls) > 1:  # the first chunk reaches the file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, table, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, "write_table", write_until_full)
    with pytest.raises(UsageError) as e:
        prepare(_cfg(out, root))
    message = str(e.value)
    assert "disk full" in message and str(out / "prepared") in message and "free" in message
    assert len(calls) == 2
    prepared = out / "prepared"
    assert not [p.name for p in prepared.iterdir() if p.name.endswith(".tmp")]
    assert not (prepared / "DONE").exists()
    monkeypatch.setattr(ArrowWriter, "write_table", original)
    report = prepare(_cfg(out, root))  # once there is room again, the same command completes
    assert report["splits"]["train"]["kept"] == 40
