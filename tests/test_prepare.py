"""prepare on Common Voice releases (with injected faults), manifests and `datasets` folders."""

from __future__ import annotations

import csv
import json
import unicodedata

import numpy as np
import pytest
import soundfile as sf

from w2vbert_asr import UsageError
from w2vbert_asr.cli import compose
from w2vbert_asr.audio import AudioError, load_audio, to_float
from w2vbert_asr.prepared import load_prepared
from w2vbert_asr.prepare import prepare
from w2vbert_asr.testing import make_faulty_release


def _cfg(out, root, *extra):
    return compose([f"output_dir={out}", f"data.root={root}", *extra])


def _vocab_is_clean(chars):
    for c in chars:
        cat = unicodedata.category(c)
        assert not c.isupper(), c
        assert cat[0] not in "PSM", f"{c!r} is {cat}"


@pytest.fixture(scope="module")
def faulty_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty_sw")
    return root, make_faulty_release(root, "sw", num_clips=30, seed=1)


def test_faulty_release_every_bad_row_counted_under_its_reason(tmp_path, faulty_release, capsys):
    root, expected = faulty_release
    report = prepare(_cfg(tmp_path, root, "lang=sw"))
    skipped = {}
    for split in report["splits"].values():
        for reason, n in split["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == expected
    on_disk = json.loads((tmp_path / "prepare_report.json").read_text())
    assert on_disk["splits"]["train"]["skipped"] == report["splits"]["train"]["skipped"]
    example = on_disk["splits"]["train"]["examples"]["path_escape"][0]
    assert example["file"].endswith("train.tsv") and example["row"] > 1 and "etc/passwd" in example["detail"]
    assert "skipped" in capsys.readouterr().out
    _vocab_is_clean(report["vocab"]["chars"])
    # The tricky-but-valid rows survive: a bare opening quote, and NFD letters stored as NFC.
    train = load_prepared(tmp_path, "train")
    ids = set(train["id"])
    assert {"common_voice_sw_faulty_bare_quote", "common_voice_sw_faulty_nfd"} <= ids
    assert all(unicodedata.is_normalized("NFC", t) for t in train["text"])
    # Stored as int16 PCM; read back as float32 in [-1, 1).
    assert train.features["audio"].feature.dtype == "int16"
    wave = to_float(train[0]["audio"])
    assert wave.dtype == np.float32 and 0 < np.abs(wave).max() < 1


def test_unseen_language_non_latin_script_with_zero_code(tmp_path):
    """A language without a recipe, in another script: only lang + data.root are given."""
    root = tmp_path / "ka"
    expected = make_faulty_release(root, "ka", num_clips=24, seed=2)
    report = prepare(_cfg(tmp_path / "out", root, "lang=ka"))
    counted = {}
    for split in report["splits"].values():
        for reason, n in split["skipped"].items():
            counted[reason] = counted.get(reason, 0) + n
    assert counted == expected
    chars = report["vocab"]["chars"]
    _vocab_is_clean(chars)
    assert any(unicodedata.name(c).startswith("GEORGIAN") for c in chars)
    assert (tmp_path / "out" / "processor" / "vocab.json").is_file()


def test_prepare_is_cached_and_refreshes_when_text_rules_change(tmp_path, sw_corpus):
    cfg = _cfg(tmp_path, sw_corpus, "lang=sw")
    prepare(cfg)
    stamp = (tmp_path / "prepared" / "DONE").read_text()
    mtime = (tmp_path / "prepared" / "train.arrow").stat().st_mtime_ns
    prepare(cfg)
    assert (tmp_path / "prepared" / "train.arrow").stat().st_mtime_ns == mtime
    prepare(_cfg(tmp_path, sw_corpus, "lang=sw", "text.lowercase=false"))
    assert (tmp_path / "prepared" / "DONE").read_text() != stamp


def test_empty_split_stops_with_a_clear_message_after_writing_the_report(tmp_path, sw_corpus):
    with pytest.raises(UsageError, match="no usable rows.*prepare_report.json"):
        prepare(_cfg(tmp_path, sw_corpus, "lang=sw", "data.min_duration=25"))
    report = json.loads((tmp_path / "prepare_report.json").read_text())  # the file the error points at
    assert report["splits"]["train"]["skipped"]["duration"] == report["splits"]["train"]["rows"] > 0
    assert not (tmp_path / "prepared" / "DONE").exists()


def test_missing_release_folder_message(tmp_path):
    with pytest.raises(UsageError, match="Common Voice language folder"):
        prepare(_cfg(tmp_path, tmp_path / "nope", "lang=sw"))


def test_oov_characters_of_eval_splits_reported(tmp_path, sw_corpus):
    root = tmp_path / "cv"
    root.mkdir()
    (root / "clips").symlink_to(sw_corpus / "clips")
    for split in ("train", "dev", "test"):
        text = (sw_corpus / f"{split}.tsv").read_text()
        if split == "dev":  # a character the train split never has
            lines = text.splitlines()
            cols = lines[1].split("\t")
            cols[3] = cols[3] + " ß"
            lines[1] = "\t".join(cols)
            text = "\n".join(lines) + "\n"
        (root / f"{split}.tsv").write_text(text)
    report = prepare(_cfg(tmp_path / "out", root, "lang=sw"))
    assert report["oov"]["dev"]["chars"] == {"ß": 1}
    assert report["oov"]["dev"]["rate"] > 0


def _write_manifest_corpus(corpus, tmp_path):
    """CSV (quoted commas) and JSONL manifests over the synthetic clips."""
    rows = {}
    for split in ("train", "dev", "test"):
        with open(corpus / f"{split}.tsv", newline="") as f:
            rows[split] = [(f"clips/{r['path']}", r["sentence"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    files = {}
    for split, items in rows.items():
        if split == "test":
            path = tmp_path / "test.jsonl"
            path.write_text("".join(json.dumps({"path": p, "text": t}) + "\n" for p, t in items))
        else:
            path = tmp_path / f"{split}.csv"
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "text"])
                w.writerows(items)
        files[split] = path
    return files


def test_manifest_source(tmp_path, sw_corpus):
    files = _write_manifest_corpus(sw_corpus, tmp_path)
    cfg = compose(["data=manifest", "lang=sw", f"output_dir={tmp_path / 'out'}", f"data.root={sw_corpus}",
                   *(f"data.files.{s}={p}" for s, p in files.items())])
    report = prepare(cfg)
    assert report["splits"]["train"]["kept"] == report["splits"]["train"]["rows"] > 0
    assert report["splits"]["test"]["kept"] > 0


def test_hf_dataset_source_decodes_without_torchcodec(tmp_path, sw_corpus):
    import datasets

    with open(sw_corpus / "train.tsv", newline="") as f:
        recs = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    def split(rs):
        ds = datasets.Dataset.from_dict({"audio": [str(sw_corpus / "clips" / r["path"]) for r in rs],
                                         "sentence": [r["sentence"] for r in rs]})
        return ds.cast_column("audio", datasets.Audio(decode=False))
    dd = datasets.DatasetDict({"train": split(recs[:20]), "validation": split(recs[20:26]), "test": split(recs[26:32])})
    dd.save_to_disk(str(tmp_path / "hfds"))
    report = prepare(compose(["data=hf", "lang=sw", f"data.name={tmp_path / 'hfds'}", f"output_dir={tmp_path / 'out'}"]))
    assert report["splits"]["train"]["kept"] == 20
    assert set(report["splits"]) == {"train", "validation", "test"}


def _small_release(corpus, root, rows=(12, 3, 3)):
    """A Common Voice folder with the first rows of each split of `corpus`; clips/ is a real folder whose
    clips are symlinks into `corpus` (outside this release). -> {split: [(clip name, sentence)]}"""
    (root / "clips").mkdir(parents=True)
    kept = {}
    for split, n in zip(("train", "dev", "test"), rows):
        lines = (corpus / f"{split}.tsv").read_text().splitlines()
        (root / f"{split}.tsv").write_text("\n".join(lines[: n + 1]) + "\n")
        header = lines[0].split("\t")
        kept[split] = [(r[header.index("path")], r[header.index("sentence")])
                       for r in (line.split("\t") for line in lines[1 : n + 1])]
        for name, _ in kept[split]:
            (root / "clips" / name).symlink_to(corpus / "clips" / name)
    return kept


def test_manifest_paths_absolute_dotdot_and_symlinked_clips_folder(tmp_path, sw_corpus):
    """Manifests are the user's own layout: absolute paths, `../` paths and a clips folder that is a symlink
    are all read (they were all refused as path_escape)."""
    rows = _small_release(sw_corpus, tmp_path / "cv")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "clips").symlink_to(sw_corpus / "clips", target_is_directory=True)
    styles = [lambda n: str(sw_corpus / "clips" / n), lambda n: f"../cv/clips/{n}", lambda n: f"clips/{n}"]
    files = {}
    for split, items in rows.items():
        files[split] = manifests / f"{split}.csv"
        with open(files[split], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "text"])
            w.writerows((styles[i % 3](name), text) for i, (name, text) in enumerate(items))
    report = prepare(compose(["data=manifest", "lang=sw", f"output_dir={tmp_path / 'out'}",
                              *(f"data.files.{s}={p}" for s, p in files.items())]))
    for split, items in rows.items():
        assert report["splits"][split] | {"skipped": {}} == report["splits"][split], report["splits"][split]
        assert report["splits"][split]["kept"] == len(items)


def test_commonvoice_guard_compares_normalised_paths_and_keeps_symlinked_clips(tmp_path, sw_corpus):
    """In a Common Voice folder a path is a name inside clips/: `a/../b` is fine, `../x` and absolute paths
    are refused, and clips that are symlinks to files elsewhere are read (no symlink resolution)."""
    root = tmp_path / "cv"
    rows = _small_release(sw_corpus, root)
    name, text = rows["train"][0]
    extra = [f"nothing/../{name}", "../train.tsv", str(sw_corpus / "clips" / name)]
    header = (root / "train.tsv").read_text().splitlines()[0].split("\t")
    with open(root / "train.tsv", "a") as f:
        for path in extra:
            f.write("\t".join({"path": path, "sentence": text}.get(c, "") for c in header) + "\n")
    report = prepare(_cfg(tmp_path / "out", root, "lang=sw"))
    train = report["splits"]["train"]
    assert train["kept"] == len(rows["train"]) + 1
    assert train["skipped"] == {"path_escape": 2}
    assert [e["row"] for e in train["examples"]["path_escape"]] == [len(rows["train"]) + 3, len(rows["train"]) + 4]


def test_unreadable_audio_is_named_empty_or_undecodable(tmp_path):
    """libsndfile calls an empty or cut MP3 "File does not exist"; load_audio names the file and says what
    is wrong with it instead (transcribe uses the same function)."""
    good = tmp_path / "good.mp3"
    sf.write(good, np.sin(np.arange(48_000) / 7).astype(np.float32) * 0.3, 48_000, format="MP3")
    (tmp_path / "empty.mp3").write_bytes(b"")
    (tmp_path / "cut.mp3").write_bytes(good.read_bytes()[:200])
    for name in ("empty.mp3", "cut.mp3"):
        with pytest.raises(AudioError, match="empty or undecodable") as e:
            load_audio(tmp_path / name)
        assert name in str(e.value) and "does not exist" not in str(e.value)
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "missing.mp3")
    assert load_audio(good).shape == (16_000,)


def test_train_merges_several_source_splits(tmp_path, sw_corpus):
    """The blog recipe trains on train + dev: both TSVs end up in one prepared train split."""
    report = prepare(_cfg(tmp_path, sw_corpus, "lang=sw", "data.train_splits=[train,dev]", "data.eval_split=test"))
    rows = sum(1 for s in ("train", "dev") for _ in open(sw_corpus / f"{s}.tsv")) - 2
    assert report["splits"]["train"]["rows"] == rows
    assert set(report["splits"]) == {"train", "test"}
    train = load_prepared(tmp_path, "train")
    assert len(train) == report["splits"]["train"]["kept"] == rows
    assert not list((tmp_path / "prepared").glob("*.tmp"))


def test_output_and_report_identical_whatever_num_proc(tmp_path, faulty_release, monkeypatch):
    """Parallel decoding changes nothing on disk: same Arrow bytes, same skip counts and examples in order.
    Small chunks put many of them in flight at once, so results come back out of order."""
    from w2vbert_asr import pool

    monkeypatch.setattr(pool, "CHUNK_ROWS", 2)
    root, _ = faulty_release
    outs = {n: tmp_path / f"np{n}" for n in (1, 2)}
    reports = {n: prepare(_cfg(out, root, "lang=sw", f"data.num_proc={n}")) for n, out in outs.items()}
    assert reports[1] == reports[2]
    assert sum(sum(s["skipped"].values()) for s in reports[1]["splits"].values()) > 0
    for name in ("prepare_report.json", "prepared/train.arrow", "prepared/dev.arrow", "prepared/test.arrow"):
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_num_proc_auto_follows_the_cores_the_process_may_use():
    """`auto` counts the cores this process is allowed on (a container's or taskset's CPU set), not the
    machine's: pinned to one core it decodes in one process. Checked in a child pinned with sched_setaffinity."""
    import os
    import subprocess
    import sys

    from w2vbert_asr.pool import num_processes

    probe = ("import os, sys; from {m} import num_processes as n; os.sched_setaffinity(0, {{int(sys.argv[1])}}); "
             "print(n('auto'), n(None))").format(m=num_processes.__module__)
    for cpu in sorted(os.sched_getaffinity(0))[:2]:
        out = subprocess.run([sys.executable, "-c", probe, str(cpu)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["1", "1"]
    assert num_processes(3) == 3
    for bad in (0, -1, "many"):
        with pytest.raises(UsageError, match=r"data\.num_proc="):
            num_processes(bad)


# ------------------------------------------------ no dev or test clip in train, whatever the route
def _held_out_audio(out, splits=("dev", "test")):
    """Real paths and int16 audio bytes of the prepared held-out splits."""
    import os

    paths, audio = set(), set()
    for split in splits:
        ds = load_prepared(out, split)
        paths |= {os.path.realpath(p) for p in ds["path"]}
        audio |= {np.asarray(a).tobytes() for a in ds["audio"]}
    return paths, audio


def test_dev_and_test_clips_never_reach_train(tmp_path, sw_corpus, capsys):
    """A dev or test clip is refused from train by every route: an absolute path, a `../` path, a symlink,
    a byte-identical copy under another name; through data.extra_train and through train.tsv itself. Each
    is counted as held_out_clip; a train transcript that is also a dev one is reported, not dropped."""
    import os

    root = tmp_path / "cv"
    rows = _small_release(sw_corpus, root, rows=(30, 3, 3))
    header = (sw_corpus / "train.tsv").read_text().splitlines()[0].split("\t")
    lines = (sw_corpus / "train.tsv").read_text().splitlines()
    spare = [line.split("\t")[header.index("path")] for line in lines[31:33]]  # corpus clips not in the release
    dev, test, train_text = rows["dev"], rows["test"], rows["train"][0][1]
    # train.tsv: a copy of a test clip inside clips/, and a new clip whose sentence is a dev sentence.
    (root / "clips" / "testcopy_tsv.mp3").write_bytes((root / "clips" / test[2][0]).read_bytes())
    (root / "clips" / spare[0]).symlink_to(sw_corpus / "clips" / spare[0])
    with open(root / "train.tsv", "a") as f:
        for path, sentence in (("testcopy_tsv.mp3", train_text), (spare[0], dev[2][1])):
            f.write("\t".join({"path": path, "sentence": sentence}.get(c, "") for c in header) + "\n")
    # data.extra_train (pseudo.tsv's columns): four routes to held-out clips, and one clip of its own.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "link_dev.mp3").symlink_to(root / "clips" / dev[0][0])
    (elsewhere / "testcopy_0.mp3").write_bytes((root / "clips" / test[2][0]).read_bytes())
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    extra = [(str(root / "clips" / test[0][0]), train_text), (f"../cv/clips/{test[1][0]}", train_text),
             (str(elsewhere / "link_dev.mp3"), train_text), (str(elsewhere / "testcopy_0.mp3"), train_text),
             (str(sw_corpus / "clips" / dev[1][0]), train_text), (str(sw_corpus / "clips" / spare[1]), train_text)]
    (manifests / "pseudo.tsv").write_text("path\ttext\n" + "".join(f"{p}\t{t}\n" for p, t in extra))
    out = tmp_path / "out"
    report = prepare(_cfg(out, root, "lang=sw", f"data.extra_train=[{manifests / 'pseudo.tsv'}]"))
    printed = capsys.readouterr().out

    assert report["splits"]["train"]["skipped"] == {"held_out_clip": 1}
    assert report["splits"]["train"]["kept"] == 31
    assert report["extra_train"]["skipped"] == {"held_out_clip": 5}
    assert report["extra_train"]["kept"] == 1
    details = [e["detail"] for e in report["extra_train"]["examples"]["held_out_clip"]]
    assert sum(" as test clip " in d for d in details) == 3 and sum(" as dev clip " in d for d in details) == 2
    assert sum(d.startswith("the same audio as") for d in details) == 1, details  # the copy under another name
    train = load_prepared(out, "train")
    assert len(train) == 32
    paths, audio = _held_out_audio(out)
    assert not {os.path.realpath(p) for p in train["path"]} & paths
    assert not {np.asarray(a).tobytes() for a in train["audio"]} & audio
    shared = report["shared_transcripts"]
    assert shared["dev"]["rows"] == 1 and "test" not in shared
    assert shared["dev"]["examples"][0]["id"] == spare[0].rsplit(".", 1)[0]
    assert "held_out_clip" in printed and "also in dev" in printed
