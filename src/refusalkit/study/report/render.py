"""Blocks → text: :func:`render_md` (figures linked to their PNG files) and :func:`render_html` (self-contained).

The HTML page has its CSS inline and every figure as a ``data:image/png;base64`` URI; a small script
records in the body's ``data-images-loaded`` how many images decoded.
"""

from __future__ import annotations

import base64
from html import escape

from refusalkit.study.report.blocks import (
    Block,
    Bullets,
    Figure,
    Findings,
    Heading,
    Paragraph,
    Table,
)

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 1em 0; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; }
tr.broken td { background: #fff1f0; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 12px; color: #555; }
.verdict { font-weight: bold; }
.holds { color: #1a7f37; }
.does-not-hold { color: #cf222e; }
.not-measured { color: #777; }
"""

IMAGES_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = String(imgs.length);
  document.body.dataset.imagesLoaded = String(imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0;
  }).length);
});
"""


# --------------------------------------------------------------------------- Markdown


def md_cell(text: str) -> str:
    """A table cell with its pipes escaped."""
    return text.replace("|", "\\|")


def md_table(t: Table) -> str:
    """A pipe table (Markdown cannot highlight ``marked`` rows: the ASR cells carry the flag)."""
    lines = ["| " + " | ".join(map(md_cell, t.headers)) + " |", "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(map(md_cell, row)) + " |" for row in t.rows]
    return "\n".join(lines)


def md_block(b: Block) -> str:
    """One block as Markdown."""
    if isinstance(b, Heading):
        return "#" * b.level + " " + b.text
    if isinstance(b, Paragraph):
        return b.text
    if isinstance(b, Bullets):
        return "\n".join(f"- {item}" for item in b.items)
    if isinstance(b, Table):
        return md_table(b)
    if isinstance(b, Figure):
        return f"![{b.caption}]({b.md_path})\n\n*{b.caption}*"
    return "\n".join(f"- **{f.key}** {f.claim}: **{f.verdict}** — {f.evidence}" for f in b.items)


def render_md(blocks: list[Block]) -> str:
    """Markdown; figures link to their PNG files, relative to the run directory."""
    return "\n\n".join(md_block(b) for b in blocks) + "\n"


# --------------------------------------------------------------------------- HTML


def html_table(t: Table) -> str:
    """A scrollable table; ``marked`` rows get the ``broken`` class."""
    head = "".join(f"<th>{escape(h)}</th>" for h in t.headers)
    marked = t.marked or [False] * len(t.rows)
    rows = "".join(
        ('<tr class="broken">' if m else "<tr>") + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
        for row, m in zip(t.rows, marked)
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def html_figure(f: Figure) -> str:
    """The figure's PNG inline, with its caption."""
    uri = "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")
    return f'<figure><img src="{uri}" alt="{escape(f.caption)}"><figcaption>{escape(f.caption)}</figcaption></figure>'


def html_findings(b: Findings) -> str:
    """The findings as a list, each verdict coloured by its class (``holds``, ``does-not-hold``, ``not-measured``)."""
    return (
        '<ul class="findings">'
        + "".join(
            f'<li><b>{escape(f.key)}</b> {escape(f.claim)}: <span class="verdict {f.verdict.replace(" ", "-")}">'
            f"{escape(f.verdict)}</span> — {escape(f.evidence)}</li>"
            for f in b.items
        )
        + "</ul>"
    )


def html_block(b: Block) -> str:
    """One block as HTML."""
    if isinstance(b, Heading):
        return f"<h{b.level}>{escape(b.text)}</h{b.level}>"
    if isinstance(b, Paragraph):
        return f"<p>{escape(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{escape(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        return html_table(b)
    if isinstance(b, Figure):
        return html_figure(b)
    return html_findings(b)


def render_html(blocks: list[Block], title: str) -> str:
    """A self-contained page; its script records in ``data-images-loaded`` how many images decoded."""
    n_images = sum(isinstance(b, Figure) for b in blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
        f"<style>{CSS}</style>\n</head>\n"
        f'<body data-images-total="{n_images}" data-images-loaded="0">\n'
        + "\n".join(html_block(b) for b in blocks)
        + f"\n<script>{IMAGES_SCRIPT}</script>\n</body>\n</html>\n"
    )
