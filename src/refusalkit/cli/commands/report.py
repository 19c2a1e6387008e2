"""``refusalkit report``: DIR/report.md and DIR/report.html, and their summary on the terminal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from refusalkit.cli.settings import command_config


def _pct(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.0f}%" + (f" [{100 * lo:.0f}–{100 * hi:.0f}]" if lo is not None else "")


def summary_table(results: dict[str, Any]) -> list[str]:
    """The variants as a short Markdown table read from ``results.json``."""
    lines = [
        "| variant | compression | direction source | cos at base source | ASR vanilla | over-refusal | perplexity | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in results["variants"]:
        comp = "–"
        if v["sparsity"] is not None and v["kind"] == "pruned":
            comp = f"{100 * v['sparsity']:.0f}% zeros"
        elif v["bits"] is not None:
            comp = f"{v['bits']} bit"
        elif v["kind"] == "repaired":
            comp = f"AIRD on {v['repaired_from']}"
        src = f"L{v['source']['layer']} / pos {v['source']['position']}" if v["source"] else "–"
        cos = "–" if v["cosine_at_base_source"] is None else f"{v['cosine_at_base_source']:.3f}"
        ppl = "–" if v["perplexity"] is None else f"{v['perplexity']:.2f}"
        status = "BROKEN" if v["broken"] else "ok"
        lines.append(
            f"| {v['name']} | {comp} | {src} | {cos} | {_pct(v['asr'].get('vanilla'))} | {_pct(v['over_refusal'])} "
            f"| {ppl} | {status} |"
        )
    return lines


def report_summary(rep: dict[str, Any]) -> str:
    """The variants' table and the verdicts (from ``results.json``), one line per finding, then the paths."""
    results = json.loads(Path(rep["results"]).read_text(encoding="utf-8"))
    lines = [*summary_table(results), ""]
    lines += [f"- {s}" for s in results["verdicts"]] + [""]
    lines += [f"{f['id']} {f['verdict']:13s} {f['claim']}" for f in results["findings"]]
    lines.append(f"report: {rep['md']}\n        {rep['html']}\n        {rep['results']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from refusalkit.study.report import write_report

    cfg, _ = command_config(args)
    asked = bool(args.config or args.set)  # else the run's own config.yaml, as the run wrote it
    rep = write_report(args.run, cfg if asked else None)
    if getattr(args, "json", False):
        print(Path(rep["results"]).read_text(encoding="utf-8"), end="")
    else:
        print(report_summary(rep))
    return 0
