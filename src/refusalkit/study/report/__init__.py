"""``refusalkit report``: a run's tables, plots and the paper's findings as Markdown and HTML.

:func:`write_report` reads what the other stages left in a run directory and writes

* ``DIR/report.md``, with its plots in ``DIR/report_files/*.png``;
* ``DIR/report.html``, self-contained: CSS inline, every plot a ``data:image/png;base64`` URI.

Both carry the same blocks (tables, plots, findings, notes), built once from the run's files.
Only the base direction is required; anything else missing shows as "–" or leaves its plot or
finding out ("not measured"), never an error.

Modules, in the order the report is made:

* :mod:`~refusalkit.study.report.load`: the run directory read into a ``Run`` of ``Variant`` records;
* :mod:`~refusalkit.study.report.tables`: the variants and repairs tables;
* :mod:`~refusalkit.study.report.figures`: the plots;
* :mod:`~refusalkit.study.report.findings`: the paper's findings F1–F5;
* :mod:`~refusalkit.study.report.document`: all of it as blocks, in order (:mod:`~refusalkit.study.report.blocks`);
* :mod:`~refusalkit.study.report.render`: blocks → Markdown and HTML;
* :mod:`~refusalkit.study.report.write`: :func:`write_report`, the only part that writes files.
"""

from refusalkit.study.report.blocks import Finding
from refusalkit.study.report.document import build_report
from refusalkit.study.report.load import Run, Variant, load_run
from refusalkit.study.report.write import write_report

__all__ = ["Finding", "Run", "Variant", "build_report", "load_run", "write_report"]
