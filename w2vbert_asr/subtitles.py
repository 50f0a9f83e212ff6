"""Subtitles (SRT) from timed words: one line of whole words per cue.

Usage:
    from w2vbert_asr.subtitles import to_srt
    text = to_srt(transcript.words, max_seconds=7.0, max_chars=42, max_gap=1.0)

Words are anything with `.word`, `.start` and `.end` (seconds), such as `transcribe.Word`.
"""

from __future__ import annotations

from collections.abc import Sequence

def srt_time(seconds: float, decimal_mark: str = ",") -> str:
    """Seconds -> SRT `HH:MM:SS,mmm` (WebVTT: decimal_mark=".")."""
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal_mark}{ms:03d}"


def subtitle_cues(words: Sequence, max_seconds: float = 7.0, max_chars: int = 42,
                  max_gap: float = 1.0) -> list[tuple[float, float, str]]:
    """Group words into one-line cues: a new cue starts when the line would exceed max_chars or
    max_seconds, or after a pause longer than max_gap. -> [(start, end, text)]"""
    cues: list[list] = []
    for w in words:
        if cues:
            cue = cues[-1]
            text_len = sum(len(x.word) + 1 for x in cue) + len(w.word)
            if text_len <= max_chars and w.end - cue[0].start <= max_seconds and w.start - cue[-1].end <= max_gap:
                cue.append(w)
                continue
        cues.append([w])
    return [(c[0].start, c[-1].end, " ".join(x.word for x in c)) for c in cues]


def to_srt(words: Sequence, **limits) -> str:
    cues = subtitle_cues(words, **limits)
    blocks = []
    for i, (start, end, text) in enumerate(cues, 1):
        end = max(end, start + 0.001)  # players drop zero-length cues
        blocks.append(f"{i}\n{srt_time(start)} --> {srt_time(end)}\n{text}\n")
    return "\n".join(blocks)
