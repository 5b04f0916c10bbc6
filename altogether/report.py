"""A self-contained HTML evaluation report: metrics per condition, then captions side by side.

The file has no external assets (images are embedded as base64 JPEG thumbnails, CSS is inline), so
it opens offline and can be mailed around. All text is HTML-escaped. Each condition's caption is
shown as a word-level diff against the reference caption: words the reference does not have are
marked ``<ins>``, reference words the caption lacks are shown struck through as ``<del>``.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .io import atomic_write_text

THUMBNAIL_SIZE = 224

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; }
th, td { border: 1px solid #d0d0d7; padding: 6px 8px; vertical-align: top; text-align: left; }
th { background: #eef0f6; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td.na { color: #8a8a8a; text-align: center; }
table.examples { width: 100%; table-layout: fixed; }
table.examples td.image { width: 232px; }
img.thumb { max-width: 224px; max-height: 224px; display: block; }
img.figure { max-width: 100%; }
td.alt { background: #fbf8ec; }
ins { background: #c9f2cf; text-decoration: none; }
del { background: #f8d0d0; color: #7a2020; }
.legend { color: #555; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; font-family: ui-monospace, monospace; }
"""

_WORD_EDGES = re.compile(r"^\W+|\W+$")


@dataclass
class Example:
    """One evaluated record: its image, alt-text, reference caption and a caption per condition."""

    alt_text: str
    reference: str
    captions: dict[str, str]
    image: Image.Image | None = None
    id: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # shown under the id, e.g. per-example scores


def write_report(
    path: str | os.PathLike,
    metrics: Mapping[str, Mapping[str, float | None]],
    examples: Sequence[Example],
    title: str = "Altogether evaluation",
    meta: Mapping[str, Any] | None = None,
    figures: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Write the report atomically to ``path`` and return it.

    ``metrics`` is ``{condition: {metric: value or None}}``; ``figures`` maps captions to PNG files
    (e.g. the training-curve plot) that are embedded; ``meta`` is shown as a key/value list.
    """
    path = Path(path)
    document = render_report(metrics, examples, title=title, meta=meta or {}, figures=figures or {})
    return atomic_write_text(path, document)


def render_report(
    metrics: Mapping[str, Mapping[str, float | None]],
    examples: Sequence[Example],
    title: str,
    meta: Mapping[str, Any],
    figures: Mapping[str, str | os.PathLike],
) -> str:
    """The report as one HTML string (see :func:`write_report`)."""
    # Conditions in the metrics' order, then any that only the examples have.
    # Caption columns in the metrics' order, but only rows that have captions (not e.g. a "reference" row).
    captioned = {c for ex in examples for c in ex.captions}
    conditions = [c for c in dict.fromkeys([*metrics, *captioned]) if c in captioned]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        _meta_list(meta),
        "<h2>Metrics</h2>",
        _metrics_table(metrics),
        _figures(figures),
        f"<h2>Examples ({len(examples)})</h2>",
        '<p class="legend">Captions are compared word by word with the reference: '
        "<ins>words not in the reference</ins>, <del>reference words missing</del>.</p>",
        _examples_table(examples, conditions),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


def highlight_diff(reference: str, caption: str) -> str:
    """HTML of ``caption`` with a word-level diff against ``reference`` (case and edge punctuation ignored)."""
    ref_words, cap_words = reference.split(), caption.split()
    matcher = difflib.SequenceMatcher(
        a=[_diff_key(w) for w in ref_words], b=[_diff_key(w) for w in cap_words], autojunk=False
    )
    out = []
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            out.append(_esc(" ".join(cap_words[b0:b1])))
            continue
        if a1 > a0:
            out.append(f"<del>{_esc(' '.join(ref_words[a0:a1]))}</del>")
        if b1 > b0:
            out.append(f"<ins>{_esc(' '.join(cap_words[b0:b1]))}</ins>")
    return " ".join(out)


def _diff_key(word: str) -> str:
    return _WORD_EDGES.sub("", word.lower()) or word


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _meta_list(meta: Mapping[str, Any]) -> str:
    if not meta:
        return ""
    rows = "".join(
        f"<dt>{_esc(k)}</dt><dd>{_esc(v if isinstance(v, str) else json.dumps(v, default=str))}</dd>"
        for k, v in meta.items()
    )
    return f'<dl class="meta">{rows}</dl>'


def _metrics_table(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    if not metrics:
        return "<p>No metrics.</p>"
    columns = list(dict.fromkeys(name for values in metrics.values() for name in values))
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    rows = []
    for condition, values in metrics.items():
        cells = []
        for column in columns:
            value = values.get(column)
            if value is None:
                cells.append('<td class="na" title="not computed">n/a</td>')
            else:
                cells.append(f"<td>{float(value):.2f}</td>")
        rows.append(f"<tr><th>{_esc(condition)}</th>{''.join(cells)}</tr>")
    return f'<table class="metrics"><tr><th>condition</th>{head}</tr>{"".join(rows)}</table>'


def _figures(figures: Mapping[str, str | os.PathLike]) -> str:
    if not figures:
        return ""
    items = []
    for caption, png in figures.items():
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        items.append(
            f'<figure><img class="figure" alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
        )
    return "<h2>Figures</h2>" + "".join(items)


def _thumbnail(image: Image.Image | None) -> str:
    if image is None:
        return "<em>no image</em>"
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="thumb" alt="thumbnail" src="data:image/jpeg;base64,{data}">'


def _examples_table(examples: Sequence[Example], conditions: list[str]) -> str:
    if not examples:
        return "<p>No examples.</p>"
    head = "".join(f"<th>{_esc(c)}</th>" for c in ["image", "alt-text", "reference", *conditions])
    rows = []
    for example in examples:
        label = f"<div><code>{_esc(example.id)}</code></div>" if example.id else ""
        label += "".join(f"<div>{_esc(k)}: {_esc(v)}</div>" for k, v in example.extra.items())
        cells = [
            f'<td class="image">{_thumbnail(example.image)}{label}</td>',
            f'<td class="alt">{_esc(example.alt_text)}</td>',
            f"<td>{_esc(example.reference)}</td>",
        ]
        for condition in conditions:
            caption = example.captions.get(condition)
            cells.append("<td><em>n/a</em></td>" if caption is None else f"<td>{highlight_diff(example.reference, caption)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="examples"><tr>{head}</tr>{"".join(rows)}</table>'
