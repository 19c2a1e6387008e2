"""Writing the report: :func:`write_report` reads a run directory and writes its Markdown, PNGs and HTML."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from refusalkit.core import artifacts
from refusalkit.core.layout import RunLayout
from refusalkit.study.report.blocks import Figure
from refusalkit.study.report.document import build_report
from refusalkit.study.report.load import load_run
from refusalkit.study.report.render import render_html, render_md


def write_figures(layout: RunLayout, figures: list[Figure]) -> None:
    """Write the Markdown's PNGs to ``DIR/report_files/`` and drop the ones of earlier reports."""
    keep = {f.file for f in figures if f.file is not None}
    for f in figures:
        if f.file is not None:
            with artifacts.atomic_path(f.file) as tmp:
                tmp.write_bytes(f.png)
    if layout.report_files.is_dir():
        for stale in layout.report_files.glob("*.png"):
            if stale not in keep:
                stale.unlink()


def write_report(root: str | Path, cfg: Any = None) -> dict[str, Any]:
    """Write ``DIR/report.md`` (plots in ``DIR/report_files/``) and a self-contained ``DIR/report.html``.

    Also writes ``DIR/results.json`` and ``DIR/results.csv`` (:mod:`~refusalkit.study.report.results`).
    Returns ``{"md", "html", "results", "variants", "findings"}``: the three paths, the variants in
    report order and the findings (``id``, ``claim``, ``verdict``, ``evidence``).
    """
    from refusalkit.study.report.results import build_results, write_results
    from refusalkit.study.report.verdicts import verdict_sentences

    layout = RunLayout(root)
    run = load_run(layout, cfg)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    blocks, findings = build_report(run, generated)
    write_figures(layout, [b for b in blocks if isinstance(b, Figure)])
    md, page = layout.report_md, layout.report_html
    artifacts.write_text(md, render_md(blocks))
    artifacts.write_text(page, render_html(blocks, f"refusalkit report: {run.model}"))
    write_results(run, build_results(run, findings, verdict_sentences(run), generated))
    return {
        "md": str(md),
        "html": str(page),
        "results": str(layout.results_json),
        "variants": [v.name for v in run.variants],
        "findings": [f.to_json() for f in findings],
    }
