"""The report's document blocks: what the Markdown and the HTML both show, in order.

A report is a list of :data:`Block`; :mod:`refusalkit.study.report.render` turns it into
Markdown or HTML. Cells and texts are final strings; ``DASH`` marks what was not measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DASH = "–"  # a cell or value that was not measured


@dataclass
class Heading:
    """A section title (``level`` 1: the report's title)."""

    text: str
    level: int = 2


@dataclass
class Paragraph:
    """Plain text."""

    text: str


@dataclass
class Bullets:
    """A bulleted list."""

    items: list[str]


@dataclass
class Table:
    """A table of text cells; ``marked`` rows are shown highlighted (BROKEN variants)."""

    headers: list[str]
    rows: list[list[str]]
    marked: list[bool] = field(default_factory=list)


@dataclass
class Figure:
    """A PNG with its caption; ``md_path`` is where the Markdown links it, relative to the run directory."""

    caption: str
    png: bytes
    md_path: str
    file: Path | None = None  # where the Markdown's copy is written (None: it already exists)


@dataclass
class Finding:
    """One of the paper's findings checked on the run: ``verdict`` is holds, does not hold, undecided or not measured."""

    key: str
    claim: str
    verdict: str
    evidence: str

    def to_json(self) -> dict[str, str]:
        """``{"id", "claim", "verdict", "evidence"}``, as :func:`write_report` returns it."""
        return {"id": self.key, "claim": self.claim, "verdict": self.verdict, "evidence": self.evidence}


@dataclass
class Findings:
    """The list of findings, rendered with their verdicts."""

    items: list[Finding]


Block = Heading | Paragraph | Bullets | Table | Figure | Findings
