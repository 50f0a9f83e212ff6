"""audit.html: the worst clips of an audit on one page that works offline (no script, no external file).

Per clip: an audio player (the clip file itself embedded as a data: URI, or, when there is no file or it is
large, its 16 kHz audio as WAV), the score, CER, duration and characters per second, and the reference above
the greedy hypothesis with their differences marked word by word (struck out: reference words the hypothesis
lacks; underlined: hypothesis words the reference lacks), every hypothesis word shaded by its confidence (red:
low) with the value under it. Above the clips: the counts per split, the histogram of scores with the
threshold, and the planted-fault figures when the release has them.

Usage:
    from w2vbert_asr.audit_report import write_report
    write_report(Path("audit/audit.html"), scorer.worst_clips(), summary, scores, skipped)
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import math
from pathlib import Path

import numpy as np

from .alignment import SCORE
from .geometry import SAMPLING_RATE
from .storage import atomic_write_text

EMBED_MAX_BYTES = 4 << 20  # a clip file up to this size is embedded as it is; beyond, its 16 kHz audio as WAV
MIME = {".mp3": "audio/mpeg", ".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg",
        ".opus": "audio/ogg", ".m4a": "audio/mp4", ".webm": "audio/webm"}
BINS = 40
STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top}th{background:#f4f4f4}.num{text-align:right}
del{background:#fdd;color:#900}ins{text-decoration:underline 2px #06c;background:#def}
.w{display:inline-block;text-align:center;margin:0 2px;padding:0 2px;border-radius:3px}
.w sub{display:block;font-size:10px;color:#555;line-height:1}.ref{margin-bottom:6px}.muted{color:#777}
audio{width:230px}h2{margin-top:28px}"""


def _e(text) -> str:
    return html.escape(str(text))


def audio_src(record: dict, audio: np.ndarray) -> str:
    """A data: URI of the clip: its file's bytes when small enough, else its 16 kHz audio as WAV."""
    import soundfile as sf

    path = Path(record.get("path") or "")
    mime = MIME.get(path.suffix.lower())
    if mime and path.is_file() and path.stat().st_size <= EMBED_MAX_BYTES:
        data = path.read_bytes()
    else:
        buffer = io.BytesIO()
        sf.write(buffer, np.asarray(audio), SAMPLING_RATE, format="WAV", subtype="PCM_16")
        mime, data = "audio/wav", buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def marked(reference: str, words: list[tuple[str, float]]) -> tuple[str, str]:
    """(reference HTML, hypothesis HTML) with word differences marked and hypothesis words shaded."""
    ref, hyp = reference.split(), [w for w, _ in words]
    ref_html, hyp_html = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ref, hyp, autojunk=False).get_opcodes():
        ref_html += [(f"<del>{_e(w)}</del>" if op != "equal" else _e(w)) for w in ref[i1:i2]]
        for word, conf in words[j1:j2]:
            shade = f"rgba(220,40,40,{0.55 * (1 - conf):.2f})"
            inner = f"<ins>{_e(word)}</ins>" if op != "equal" else _e(word)
            hyp_html.append(f'<span class="w" style="background:{shade}" title="confidence {conf:.2f}">{inner}'
                            f"<sub>{conf:.2f}</sub></span>")
    return " ".join(ref_html) or '<span class="muted">(empty)</span>', \
        " ".join(hyp_html) or '<span class="muted">(nothing recognised)</span>'


def histogram_svg(scores: list[float], threshold: float, width: int = 640, height: int = 160) -> str:
    """Inline SVG histogram of the finite scores; bins below the threshold red, the threshold a dashed line."""
    values = np.array([s for s in scores if np.isfinite(s)], dtype=np.float64)
    if values.size == 0:
        return "<p class='muted'>no finite scores</p>"
    low, high = float(min(values.min(), threshold)), float(max(values.max(), threshold))
    high = high if high > low else low + 1.0
    counts, edges = np.histogram(values, bins=BINS, range=(low, high))
    top, pad = max(1, counts.max()), 24
    x = lambda v: pad + (v - low) / (high - low) * (width - 2 * pad)  # noqa: E731
    bar_w = (width - 2 * pad) / BINS
    bars = []
    for c, left in zip(counts, edges[:-1]):
        h = (height - 2 * pad) * math.sqrt(c / top)  # square-root scale: the few bad clips stay visible
        colour = "#d33" if left + (edges[1] - edges[0]) <= threshold else "#69c"
        bars.append(f'<rect x="{x(left):.1f}" y="{height - pad - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                    f'fill="{colour}"><title>{c} clips from {left:.3f}</title></rect>')
    t = x(threshold)
    axis = (f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>'
            f'<text x="{pad}" y="{height - 6}" font-size="11">{low:.2f}</text>'
            f'<text x="{width - pad}" y="{height - 6}" font-size="11" text-anchor="end">{high:.2f}</text>'
            f'<line x1="{t:.1f}" y1="{pad - 8}" x2="{t:.1f}" y2="{height - pad}" stroke="#000" stroke-dasharray="4 3"/>'
            f'<text x="{t + (4 if t < width / 2 else -4):.1f}" y="{pad - 10}" font-size="11" '
            f'text-anchor="{"start" if t < width / 2 else "end"}">threshold {threshold:g}</text>')
    return f'<svg width="{width}" height="{height}" role="img">{"".join(bars)}{axis}</svg>'


def _summary_html(summary: dict, scores: list[float]) -> str:
    rows = "".join(
        f"<tr><td>{_e(n)}</td><td class=num>{s['rows']}</td><td class=num>{s['scored']}</td>"
        f"<td class=num>{s['flagged']}</td><td>{_e(', '.join(f'{k} {v}' for k, v in s['skipped'].items()) or '-')}"
        f"</td></tr>" for n, s in summary["splits"].items())
    q = summary["distribution"]["quantiles"]
    quantiles = " &middot; ".join(f"{float(k) * 100:g} %: {v:.3f}" for k, v in q.items())
    parts = [f"<p>Score: <b>{_e(SCORE)}</b>, log p(transcript | audio) minus the model's own best path, per frame "
             f"(0: the transcript is what the model hears; lower: it fits the audio worse). Flagged: score below "
             f"<b>{summary['threshold']:g}</b>: {summary['flagged']} of {summary['distribution']['clips']} scored clips "
             f"({100 * summary['flagged_share']:.1f} %)."
             + (f" Train clips scored by {len(summary['folds'])} cross-fitted models, each trained without them "
                f"(audit.folds); the other splits by {_e(summary['model'])}." if summary.get("folds") else "")
             + "</p>",
             "<table><tr><th>split</th><th>clips</th><th>scored</th><th>flagged</th>"
             f"<th>skipped by prepare's rules</th></tr>{rows}</table>",
             f"<p>{histogram_svg(scores, summary['threshold'])}<br><span class=muted>quantiles: {quantiles}</span></p>"]
    planted = summary.get("planted")
    if planted:
        kinds = "".join(f"<tr><td>{_e(k)}</td><td class=num>{v['planted']}</td><td class=num>{v['flagged']}</td>"
                        f"<td class=num>{v['skipped_by_rules']}</td><td class=num>{100 * v['recall']:.0f} %</td></tr>"
                        for k, v in planted["kinds"].items())
        parts.append(f"<h2>Planted faults</h2><p>precision {100 * planted['precision']:.1f} %, recall "
                     f"{100 * planted['recall']:.1f} %</p><table><tr><th>kind</th><th>planted</th><th>flagged</th>"
                     f"<th>skipped by prepare</th><th>recall</th></tr>{kinds}</table>")
    return "".join(parts)


def _clip_row(rank: int, record: dict, audio: np.ndarray, threshold: float, faults: dict) -> str:
    ref, hyp = marked(record["reference"], record["words"])
    flag = " &#9873;" if record["score"] < threshold else ""
    fault = faults.get(Path(record.get("path") or "").name)
    planted = f"<br><b>planted: {_e(fault['kind'])}</b>" if fault else ""
    return (f"<tr><td class=num>{rank}{flag}</td><td>{_e(record['split'])}<br><span class=muted>{_e(record['id'])}"
            f"</span>{planted}</td><td class=num>{record['score']:.3f}</td><td class=num>{100 * record['cer']:.0f} %</td>"
            f"<td class=num>{record['duration']:.1f} s<br>{record['chars_per_second']:.1f} c/s</td>"
            f'<td><audio controls preload="none" src="{audio_src(record, audio)}"></audio></td>'
            f'<td><div class="ref">{ref}</div><div>{hyp}</div></td></tr>')


def write_report(path: Path, worst: list[tuple[dict, np.ndarray]], summary: dict, scores: list[float],
                 skipped: list[dict], faults: dict | None = None) -> Path:
    """The whole page into `path` (atomically); `faults`: a synthetic release's planted faults, shown per clip."""
    threshold = summary["threshold"]
    clips = "".join(_clip_row(i, r, a, threshold, faults or {}) for i, (r, a) in enumerate(worst, 1))
    dropped = "".join(f"<tr><td>{_e(r['split'])}</td><td>{_e(r['id'])}</td><td>{_e(r['reason'])}</td>"
                      f"<td>{_e(r.get('detail', ''))}</td></tr>" for r in skipped[:100])
    body = [f"<h1>Audit of {_e(summary['model'])}</h1>", _summary_html(summary, scores),
            f"<h2>The {len(worst)} worst clips</h2>",
            "<p class=muted>Reference above, greedy hypothesis below; <del>struck</del>: missing from the hypothesis, "
            "<ins>underlined</ins>: not in the reference; shading and the number under a word: its confidence.</p>",
            "<table><tr><th>rank</th><th>clip</th><th>score</th><th>CER</th><th>length</th><th>audio</th>"
            f"<th>reference / hypothesis</th></tr>{clips}</table>"]
    if skipped:
        body.append(f"<h2>Skipped by prepare's rules ({len(skipped)})</h2><table><tr><th>split</th><th>clip</th>"
                    f"<th>reason</th><th>detail</th></tr>{dropped}</table>")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>audit</title><style>{STYLE}</style></head>'
            f"<body>{''.join(body)}</body></html>\n")
    return atomic_write_text(path, page)
