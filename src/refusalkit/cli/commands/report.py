"""``refusalkit report``: DIR/report.md and DIR/report.html, and their summary on the terminal."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from refusalkit.cli.settings import require_run
from refusalkit.core.layout import RunLayout


def report_summary(rep: dict[str, Any]) -> str:
    """The report's variant table (Markdown) and one line per finding, then the two paths."""
    md = Path(rep["md"]).read_text(encoding="utf-8")
    table = []
    if "## Variants" in md:
        for line in md.split("## Variants", 1)[1].strip().splitlines():
            if not line.startswith("|"):
                break
            table.append(line)
    lines = table + [""] if table else []
    lines += [f"{f['id']} {f['verdict']:13s} {f['claim']}" for f in rep["findings"]]
    lines.append(f"report: {rep['md']}\n        {rep['html']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from refusalkit.study.report import write_report

    require_run(RunLayout(args.run))
    print(report_summary(write_report(args.run)))
    return 0
