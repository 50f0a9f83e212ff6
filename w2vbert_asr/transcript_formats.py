"""A Transcript in the response formats of OpenAI's `POST /v1/audio/transcriptions`: json, text, srt, vtt and
verbose_json (segments and words with start/end, plus our confidences).

`text` and `srt` are byte for byte the `.txt` and `.srt` files `w2vbert-asr transcribe` writes; the words of
`verbose_json` are its `.json` words. Segments are the subtitle cues (subtitles.subtitle_cues with the
transcribe.srt_* limits), so a client can rebuild the SRT from them. OpenAI's segment fields that a CTC model
has no value for are filled so that clients written for Whisper keep working: `avg_logprob` is the mean log
of the segment's word confidences, `temperature` 0 (greedy or beam search, no sampling), `no_speech_prob` 0.

Usage:
    from w2vbert_asr.transcript_formats import render
    body, media_type = render(transcript, "verbose_json", {"word", "segment"}, srt_limits, language="sw")
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Collection, Sequence

from .confidence import aggregate
from .subtitles import srt_time, subtitle_cues, to_srt

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain; charset=utf-8",
               "srt": "application/x-subrip; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}


def vtt_time(seconds: float) -> str:
    """Seconds -> WebVTT `HH:MM:SS.mmm`."""
    return srt_time(seconds, decimal_mark=".")


def to_vtt(words: Sequence, **limits) -> str:
    """WebVTT with the cues of to_srt."""
    blocks = ["WEBVTT\n"]
    for start, end, text in subtitle_cues(words, **limits):
        end = max(end, start + 0.001)  # players drop zero-length cues
        blocks.append(f"{vtt_time(start)} --> {vtt_time(end)}\n{text}\n")
    return "\n".join(blocks)


def segments(words: Sequence, limits: dict, utterance_aggregation: str = "mean",
             tokenize: Callable[[str], list[int]] | None = None) -> list[dict]:
    """The subtitle cues as OpenAI verbose_json segments, each with the confidence of its words."""
    out, i = [], 0
    for start, end, text in subtitle_cues(words, **limits):
        cue_words = words[i:i + len(text.split(" "))]
        i += len(cue_words)
        confs = [w.confidence for w in cue_words if w.confidence is not None]
        logprob = sum(math.log(max(c, 1e-12)) for c in confs) / len(confs) if confs else 0.0
        raw = text.encode("utf-8")
        segment = {"id": len(out), "seek": 0, "start": round(start, 3), "end": round(end, 3), "text": text,
                   "tokens": tokenize(text) if tokenize else [], "temperature": 0.0,
                   "avg_logprob": round(logprob, 4),
                   "compression_ratio": round(len(raw) / len(zlib.compress(raw)), 4) if raw else 0.0,
                   "no_speech_prob": 0.0}
        if confs:
            segment["confidence"] = round(aggregate(confs, utterance_aggregation), 4)
        out.append(segment)
    return out


def verbose_json(transcript, language: str, granularities: Collection[str], limits: dict,
                 utterance_aggregation: str = "mean", tokenize: Callable[[str], list[int]] | None = None) -> dict:
    out = {"task": "transcribe", "language": language, "duration": round(transcript.duration, 3),
           "text": transcript.text}
    if "segment" in granularities:
        out["segments"] = segments(transcript.words, limits, utterance_aggregation, tokenize)
    if "word" in granularities:
        out["words"] = [w.to_dict() for w in transcript.words]
    if transcript.confidence is not None:
        out["confidence"] = round(transcript.confidence, 4)
    out["decoding"] = transcript.decoding
    out["usage"] = usage(transcript)
    return out


def usage(transcript) -> dict:
    return {"type": "duration", "seconds": round(transcript.duration, 3)}


def render(transcript, response_format: str, granularities: Collection[str], limits: dict, language: str = "",
           utterance_aggregation: str = "mean", tokenize: Callable[[str], list[int]] | None = None
           ) -> tuple[dict | str, str]:
    """-> (a dict for the JSON formats, else the text body; its media type)."""
    if response_format == "json":
        body = {"text": transcript.text, "usage": usage(transcript)}
    elif response_format == "verbose_json":
        body = verbose_json(transcript, language, granularities, limits, utterance_aggregation, tokenize)
    elif response_format == "text":
        body = transcript.text + "\n"  # what transcribe writes to <name>.txt
    elif response_format == "srt":
        body = to_srt(transcript.words, **limits)
    elif response_format == "vtt":
        body = to_vtt(transcript.words, **limits)
    else:
        raise ValueError(f"response_format={response_format!r}: choose one of {', '.join(RESPONSE_FORMATS)}")
    return body, MEDIA_TYPES[response_format]
