"""libespeak-ng driven through ctypes: reproducible speech for the synthetic corpora (synth.py).

The library and its voice data come from the PyPI package `espeakng-loader`. espeak-ng keeps state in C
globals, so every utterance is spoken by a freshly loaded private copy of the library (see below).

Usage:
    from w2vbert_asr.espeak import speak
    audio, sample_rate = speak("habari rafiki", "sw", "m1")     # float32 (T,), 22050 Hz
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import os
import shutil
import tempfile
import threading
from pathlib import Path

import espeakng_loader
import numpy as np

VOICE_DIRECTIVE = "# voice:"  # optional word-list header when espeak's voice name != CV locale

# --- libespeak-ng constants (speak_lib.h) ---------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return errors instead of exit()ing the Python process
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE, _PARAM_PUNCTUATION = 1, 3, 4, 5
_EE_OK = 0
_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# espeak-ng keeps its state in C globals, some never reset (e.g. the pitch-flutter phase), so
# its audio depends on everything synthesised before in the same library instance. For
# reproducible audio every utterance gets a fresh instance: dlopen a private copy of the
# library, synthesise, dlclose (unloads it; ~0.5 ms). One lock serialises all of it (one
# instance at a time, one shared PCM buffer).
_LOCK = threading.Lock()
_CHUNKS: list[np.ndarray] = []
_PRIVATE_COPY: dict[int, str] = {}  # pid -> path of this process's copy of the library
_unload = getattr(_ctypes, "dlclose", None) or _ctypes.FreeLibrary  # POSIX / Windows


@_SynthCallback
def _on_audio(wav, num_samples, _events):
    """Called by espeak (synchronously, inside espeak_Synth) with int16 PCM chunks."""
    if num_samples > 0 and wav:
        _CHUNKS.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0  # 0 = keep synthesising


def _private_library() -> str:
    """Path of a per-process copy of libespeak-ng: a path nobody else dlopens, so dlclose
    really unloads it and the next dlopen starts from pristine C globals."""
    path = _PRIVATE_COPY.get(os.getpid())
    if path is None:
        tmp = tempfile.mkdtemp(prefix="w2vbert_asr_espeak_")
        atexit.register(shutil.rmtree, tmp, True)
        src = espeakng_loader.get_library_path()
        path = _PRIVATE_COPY[os.getpid()] = shutil.copy(src, Path(tmp) / Path(src).name)
    return path


def _synthesize_pcm(text: str, voice: str, variant: str | None, rate: int, pitch: int,
                    pitch_range: int) -> tuple[np.ndarray, int]:
    """`text` -> (int16 PCM `(T,)`, espeak sample rate) from a freshly loaded espeak-ng."""
    data = espeakng_loader.get_data_path()
    if variant and not (Path(data) / "voices" / "!v" / variant).is_file():
        raise ValueError(f"espeak-ng has no voice variant {variant!r}; see {data}/voices/!v")
    encoded = text.encode("utf-8") + b"\0"
    with _LOCK:
        lib = ctypes.CDLL(_private_library())
        sample_rate = 0
        try:
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_Synth.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
            ]
            sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), _INITIALIZE_DONT_EXIT)
            if sample_rate <= 0:
                raise RuntimeError(f"espeak_Initialize failed (data path {data}); reinstall espeakng-loader")
            lib.espeak_SetSynthCallback(_on_audio)
            err = lib.espeak_SetVoiceByName(f"{voice}+{variant}".encode() if variant else voice.encode())
            if err != _EE_OK:
                raise ValueError(
                    f"espeak-ng has no voice {voice!r} (error {err}); see the voices under "
                    f"{data}/lang, or set '{VOICE_DIRECTIVE} <name>' in the word list"
                )
            for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch),
                                 (_PARAM_RANGE, pitch_range), (_PARAM_PUNCTUATION, 0)):
                lib.espeak_SetParameter(param, int(value), 0)
            _CHUNKS.clear()
            err = lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            pcm = np.concatenate(_CHUNKS) if _CHUNKS else np.zeros(0, np.int16)
        finally:
            _CHUNKS.clear()
            if sample_rate > 0:
                lib.espeak_Terminate()
            _unload(lib._handle)
    if err != _EE_OK or pcm.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {text!r} with voice {voice!r} (error {err})")
    return pcm, sample_rate


def speak(
    text: str, lang: str, voice_variant: str | None = None, rate: int = 175, pitch: int = 50,
    pitch_range: int = 50,
) -> tuple[np.ndarray, int]:
    """Synthesise `text` with espeak-ng voice `lang` (optionally `+variant`, e.g. "m3", "f1").

    Returns (audio `(T,)` float32 in [-1, 1], espeak's sample rate, 22050 Hz).
    Thread-safe and reproducible (the same arguments give the same samples) for the
    `VOICE_VARIANTS`; "breath" variants such as "f2" work but are not reproducible.
    """
    pcm, sample_rate = _synthesize_pcm(text, lang, voice_variant, rate, pitch, pitch_range)
    return pcm.astype(np.float32) / 32768.0, sample_rate
