"""Reading audio: the one home of decoding, resampling and the prepared int16 storage.

Everything the toolkit reads goes through soundfile (libsndfile: WAV, FLAC, OGG/Opus, MP3, ...) and soxr,
never torchcodec/FFmpeg (which `datasets` 5 would need). Two ways in, one error type:
    load_audio(path or bytes)   the whole clip at once -> mono float32 (N,) at 16 kHz (prepare, pseudolabel)
    read_blocks(path)           block by block, for files of any length (transcribe)
Both raise `AudioError` naming the file and what is wrong with it.

Usage:
    from w2vbert_asr.audio import load_audio, read_blocks
    wave = load_audio("clip.mp3")                       # (N,) float32 in [-1, 1), 16 kHz
    for block in read_blocks("interview.flac"): ...     # (n,) float32 blocks whose concatenation is the file
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from . import UsageError
from .geometry import SAMPLING_RATE

INT16_SCALE = 2.0**15  # prepared audio is stored as 16-bit PCM
# File extensions per libsndfile format; only formats that soundfile reports on this machine are used.
# RAW (header-less) and MAT (Matlab data) are left out: a folder's .raw/.mat files are rarely audio.
FORMAT_EXTENSIONS = {
    "WAV": ("wav",), "WAVEX": ("wav",), "RF64": ("wav", "rf64"), "W64": ("w64",), "FLAC": ("flac",),
    "OGG": ("ogg", "oga", "opus"), "MP3": ("mp3",), "AIFF": ("aif", "aiff", "aifc"), "AU": ("au", "snd"),
    "CAF": ("caf",), "NIST": ("nist", "sph"), "IRCAM": ("sf",), "VOC": ("voc",), "AVR": ("avr",),
    "SVX": ("8svx", "iff"), "PAF": ("paf",), "PVF": ("pvf",), "SD2": ("sd2",), "SDS": ("sds",), "XI": ("xi",),
    "WVE": ("wve",), "HTK": ("htk",),
}
# Blocks are read in whole MPEG frames (1152 samples; MPEG-2's 576 and Layer I's 384 divide it): libsndfile
# 1.2.2 decodes an MP3 read that ends inside a frame wrongly from there on, and a short first read
# differently for the next ~1,000 samples; whole frames of a few seconds match one read of the whole file
# to float rounding (tests/test_transcribe.py).
MPEG_FRAME = 1152
# Files are decoded this many seconds at a time: a few MB per block at 44.1 kHz stereo, whatever the file's length.
READ_BLOCK_SECONDS = 10.0


class AudioError(UsageError):
    """An audio file that cannot be used: missing, empty, truncated or in a format soundfile cannot read.
    Its message names the file."""


def audio_extensions() -> set[str]:
    """Lower-case extensions (no dot) of the formats the installed libsndfile reads."""
    available = sf.available_formats()
    return {ext for fmt, exts in FORMAT_EXTENSIONS.items() if fmt in available for ext in exts}


def _undecodable(name: str, error: Exception) -> AudioError:
    why = getattr(error, "error_string", None) or str(error)
    # libsndfile says "File does not exist" of an existing file it cannot parse (an empty or cut MP3),
    # which sends users looking in the wrong place
    detail = "" if "does not exist" in why else f" ({why})"
    return AudioError(f"{name}: empty or undecodable audio{detail}")


def _check_file(path: str | Path) -> None:
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty or undecodable audio (the file is empty)")


def _mono(data: np.ndarray) -> np.ndarray:
    """(n, channels) -> (n,): the channel mean."""
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]


def load_audio(source: str | Path | bytes, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Decode a whole file (or its bytes) to mono float32 at `sampling_rate`: (N,)."""
    name = "audio bytes" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        if not source:
            raise AudioError(f"{name}: empty or undecodable audio (no bytes)")
    else:
        _check_file(source)
    try:
        data, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32",
                           always_2d=True)
    except Exception as e:  # soundfile raises several types for corrupt files; all mean the same here
        raise _undecodable(name, e) from e
    if data.shape[0] == 0:
        raise AudioError(f"{name}: empty or undecodable audio (0 samples decoded)")
    wave = _mono(data)
    if sr != sampling_rate:
        wave = soxr.resample(wave, sr, sampling_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)


def read_blocks(path: str | Path, sampling_rate: int = SAMPLING_RATE,
                block_seconds: float = READ_BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Decode an audio file block by block -> mono float32 blocks `(n,)` at `sampling_rate` (resampled by a
    soxr stream when the file's rate differs). Their concatenation equals `load_audio(path)` sample for
    sample (the same channel mean; soxr's stream gives the samples of its one-shot resample), except for
    MP3, where libsndfile's reads in blocks differ by float rounding (see MPEG_FRAME). Checks the file
    when first iterated."""
    name = str(path)
    _check_file(path)
    try:
        audio = sf.SoundFile(name)
    except Exception as e:  # soundfile raises several types for a corrupt file; all mean the same here
        raise _undecodable(name, e) from None
    with audio:
        rate = audio.samplerate
        stream = None if rate == sampling_rate else soxr.ResampleStream(rate, sampling_rate, 1, dtype="float32",
                                                                          quality="HQ")
        size = max(1, round(block_seconds * rate / MPEG_FRAME)) * MPEG_FRAME
        total = 0
        while True:
            try:
                data = audio.read(size, dtype="float32", always_2d=True)
            except Exception as e:  # noqa: BLE001 - a file cut short mid-stream
                raise AudioError(f"{name}: undecodable audio after {total / rate:.1f} s ({e})") from e
            total += len(data)
            if len(data) == 0:
                break
            wave = _mono(data)
            yield np.ascontiguousarray(stream.resample_chunk(wave) if stream else wave, dtype=np.float32)
        if total == 0:
            raise AudioError(f"{name}: empty or undecodable audio (0 samples decoded)")
        if stream is not None:
            yield stream.resample_chunk(np.zeros(0, np.float32), last=True)


# --------------------------------------------------------------------------------------------- storage
def to_int16(wave: np.ndarray) -> np.ndarray:
    """float32 (N,) in [-1, 1) -> int16 PCM (N,), as prepared data stores it (rounded, clipped)."""
    return np.clip(np.rint(wave * INT16_SCALE), -INT16_SCALE, INT16_SCALE - 1).astype(np.int16)


def to_float(audio) -> np.ndarray:
    """A prepared `audio` value -> float32 (N,) in [-1, 1): int16 PCM is scaled by 1/32768; float audio
    (datasets built in memory, older files) passes through. Every reader of the `audio` column uses it."""
    a = np.asarray(audio)
    if a.dtype.kind in "iu":
        return np.multiply(a, np.float32(1.0 / INT16_SCALE), dtype=np.float32)  # one pass, no int copy
    return a.astype(np.float32, copy=False)


def waves_of(audios: Iterable) -> list[np.ndarray]:
    """A batch of prepared `audio` values (a column slice, or one per example) -> float32 waves, for `pad_waves`."""
    return [to_float(a) for a in audios]
