"""The report page as one structure, written as Markdown and as a self-contained HTML file.

:mod:`gsnr_stats.report` builds a list of blocks (:class:`Heading`, :class:`Para`,
:class:`Formula`, :class:`Table`, :class:`Figure`, :class:`Items`); :func:`to_markdown`
and :func:`to_html` write the same blocks, so the two files cannot say different things.
The HTML needs nothing beside it: figures are embedded as ``data:image/png;base64`` URIs,
the style sheet is inline, and there is no script and no link to another file (a recipient
gets one file that opens in any browser). Standard library only.

Inline markup in text: only ``code`` spans between backticks.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: significant figures of every non-integer number on the page
SIG = 4


def fmt(x: Any) -> str:
    """How every number is printed: integers in full, floats to 4 significant figures.

    ``nan``/``inf`` as such; strings unchanged. Four figures: the estimates carry sampling
    errors of a few per cent at best (their jackknife SE), so more digits only make the
    tables harder to read.
    """
    if isinstance(x, str):
        return x
    if isinstance(x, bool | np.bool_):
        return str(bool(x))
    if isinstance(x, int | np.integer):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{SIG}g}"


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Formula:
    """A formula and, right beside it, what it means in plain words."""

    expr: str
    meaning: str


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str = ""


@dataclass
class Items:
    items: Sequence[str]


@dataclass
class Doc:
    title: str
    blocks: list[Any] = field(default_factory=list)

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(blocks)


# -- Markdown ------------------------------------------------------------------------------


def _md_cell(v: Any) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Doc) -> str:
    """The page as GitHub-flavoured Markdown (figures linked as PNG files beside it)."""
    L = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            L += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            L += [b.text, ""]
        elif isinstance(b, Formula):
            L += [f"Formula: `{b.expr}`  ", f"In plain words: {b.meaning}", ""]
        elif isinstance(b, Table):
            if b.caption:
                L += [b.caption, ""]
            L += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            L += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in b.rows]
            L += [""]
        elif isinstance(b, Figure):
            L += [f"![{b.path.stem}]({b.path.name})", ""]
            if b.caption:
                L += [f"*{b.caption}*", ""]
        elif isinstance(b, Items):
            L += [f"- {it}" for it in b.items] + [""]
        else:  # pragma: no cover - a programming error in report.py
            raise TypeError(f"unknown report block {b!r}")
    return "\n".join(L)


# -- HTML ----------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 60em;
       margin: 2em auto; padding: 0 1em; line-height: 1.45; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; }
code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .2em .6em; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; }
.formula { margin-bottom: .1em; } .meaning { margin-top: 0; color: #333; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: .9em; color: #444; }
"""


def _inline(text: str) -> str:
    """Escaped text with ``code`` spans as <code>."""
    parts = re.split(r"`([^`]*)`", text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(parts))


def _td(v: Any) -> str:
    s = fmt(v)
    numeric = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
    return f"<td>{html.escape(s)}</td>" if numeric else f'<td class="text">{_inline(s)}</td>'


def png_data_uri(path: Path) -> str | None:
    """``data:image/png;base64,...`` of a PNG file, None when the file is not a PNG."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def to_html(doc: Doc) -> str:
    """The page as one self-contained HTML5 file: figures embedded, no external reference."""
    t = html.escape(doc.title)
    H = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{t}</title>", f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{t}</h1>"]
    for b in doc.blocks:
        if isinstance(b, Heading):
            H.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            H.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Formula):
            H += [f'<p class="formula">Formula: <code>{html.escape(b.expr)}</code></p>',
                  f'<p class="meaning">In plain words: {_inline(b.meaning)}</p>']
        elif isinstance(b, Table):
            if b.caption:
                H.append(f"<p>{_inline(b.caption)}</p>")
            H.append("<table>")
            H.append("<thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in b.header)
                     + "</tr></thead>")
            H.append("<tbody>")
            H += ["<tr>" + "".join(_td(v) for v in r) + "</tr>" for r in b.rows]
            H.append("</tbody></table>")
        elif isinstance(b, Figure):
            uri = png_data_uri(b.path)
            H.append("<figure>")
            if uri is None:  # drawing failed or was skipped: say so rather than a broken image
                H.append(f"<p>(figure {html.escape(b.path.name)} could not be embedded: not "
                         "a PNG file)</p>")
            else:
                H.append(f'<img src="{uri}" alt="{html.escape(b.path.stem)}">')
            if b.caption:
                H.append(f"<figcaption>{_inline(b.caption)}</figcaption>")
            H.append("</figure>")
        elif isinstance(b, Items):
            H.append("<ul>" + "".join(f"<li>{_inline(it)}</li>" for it in b.items) + "</ul>")
        else:  # pragma: no cover - a programming error in report.py
            raise TypeError(f"unknown report block {b!r}")
    H += ["</body>", "</html>", ""]
    return "\n".join(H)
