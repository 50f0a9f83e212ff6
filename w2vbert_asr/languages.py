"""The recipe's language code (`lang`: ISO 639-1 or 639-3, with or without a region, e.g. `sw`, `swh`, `sv-SE`)
as each baseline family spells it, checked against what the model itself covers.

The tables are the libraries' and the models' own, never ours:
    Whisper       transformers' Whisper LANGUAGES / TO_LANGUAGE_CODE (baseline_whisper.whisper_language)
    omniASR LLM   ISO 639-3 + script, e.g. `swh_latn`: ISO 639-1 codes through transformers' OmniASR table
                  (ISO_639_1_TO_LANGUAGE), checked against the <|lang:...|> tokens of the checkpoint's tokenizer;
                  a 639-3 code is completed with the one script the tokenizer has for it
    MMS           ISO 639-3 (`swh`): the same table's 639-3 part, checked against the languages of the
                  checkpoint's vocabulary (one adapter each)
A code the model does not cover is one UsageError naming what it does cover that comes closest, and the
setting to pass (`baseline.language=<code>`: a related language, said so when the baseline is reported).

Usage:
    from w2vbert_asr.languages import mms_language, omniasr_language
    omniasr_language("sw", ["swh_latn", "eng_latn"])      # -> "swh_latn"
    mms_language("sv-SE", ["swe", "eng"])                 # -> "swe"
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from . import UsageError


def _iso_table() -> dict[str, str]:
    from transformers.models.omniasr.processing_omniasr import ISO_639_1_TO_LANGUAGE

    return ISO_639_1_TO_LANGUAGE


def primary_subtag(code: str) -> str:
    """'sv-SE' -> 'sv', 'zh_CN' -> 'zh', 'SWH' -> 'swh' (lower case; a code with a script, 'swh_Latn', is kept)."""
    key = str(code).strip().lower().replace("-", "_")
    head, _, tail = key.partition("_")
    return key if len(tail) == 4 and tail.isalpha() else head  # a 4-letter subtag is a script, else a region


def iso639_3(code: str) -> str | None:
    """The ISO 639-3 code of an ISO 639-1 or 639-3 code (None for a two-letter code the table lacks)."""
    key = primary_subtag(code).partition("_")[0]
    if len(key) == 3:
        return key
    found = _iso_table().get(key)
    return found.partition("_")[0] if found else None


def _not_covered(model: str, code: str, available: Iterable[str], hint: str) -> UsageError:
    available = sorted(available)
    close = difflib.get_close_matches(primary_subtag(code), available, n=5, cutoff=0.5)
    near = f"; closest codes: {', '.join(close)}" if close else ""
    return UsageError(f"{model} does not cover language {code!r} ({len(available)} languages{near}). Set "
                      f"baseline.language=<code> {hint} to a language it covers (the closest relative, or the one "
                      "whose spelling your references use) and say so when you report the baseline")


def omniasr_language(code: str, available: Iterable[str], model: str = "this omniASR LLM") -> str:
    """Our code -> the omniASR code `<iso639-3>_<script>` among `available` (the tokenizer's, lower case)."""
    available = {a.lower() for a in available}
    key = primary_subtag(code)
    if key in available:
        return key
    mapped = _iso_table().get(key)
    if mapped in available:
        return mapped
    three = iso639_3(code)
    scripts = sorted(a for a in available if three and a.partition("_")[0] == three)
    if len(scripts) == 1:
        return scripts[0]
    if scripts:
        raise UsageError(f"{model} has {three!r} in {len(scripts)} scripts ({', '.join(scripts)}): set "
                         "baseline.language=<code>_<script> to the one your references are written in")
    raise _not_covered(model, code, available, "(ISO 639-3 and script, e.g. eng_latn)")


def mms_language(code: str, available: Iterable[str], model: str = "this MMS checkpoint") -> str:
    """Our code -> the MMS adapter's ISO 639-3 code among `available`."""
    available = set(available)
    for candidate in (str(code).strip(), primary_subtag(code), iso639_3(code)):
        if candidate in available:
            return candidate
    raise _not_covered(model, code, available, "(ISO 639-3, e.g. eng)")


def standin_language(family: str, code: str) -> list[str]:
    """The language codes a random stand-in of `family` is built with, so that it covers `code`."""
    if family == "mms":
        three = iso639_3(code)
        return [three] if three else []
    if family == "omniasr_llm":
        key = primary_subtag(code)
        mapped = key if "_" in key else _iso_table().get(key)
        return [mapped] if mapped else []
    return []
