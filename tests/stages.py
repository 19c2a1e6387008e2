"""Every stage function ``run_all`` and ``run_point`` import when they run, replaced by recorders, for the
tests of what a run does in which order and with which arguments (no model runs)."""

from __future__ import annotations

from refusalkit.core import artifacts
from refusalkit.core.layout import RunLayout


def stub_stages(monkeypatch, moved: bool = True) -> list[tuple[str, dict]]:
    """Recorders that write only what ``run_all`` itself reads back (a repair's repair.json); every
    direction ``moved`` or none; ``prepare`` is recorded and still runs. The calls, in order, each with
    its keyword arguments."""
    import refusalkit.study.report as report
    from refusalkit.compress import job as compress_job
    from refusalkit.core import layout
    from refusalkit.direction import compare, control
    from refusalkit.direction import job as direction_job
    from refusalkit.evaluation import job as evaluation_job
    from refusalkit.repair import job as repair_job

    calls: list[tuple[str, dict]] = []

    def record(name, result):
        def fn(*args, **kw):
            calls.append((name, kw))
            return result(*args, **kw)

        return fn

    def repair(cfg, root, variant, *, name=None, **kw):
        name = name or f"{variant}+aird"
        info = {"variant": name, "alpha_scale": 2.0, "placement": "source", "direction": "raw",
                "source_variant": variant}  # fmt: skip
        artifacts.write_json(RunLayout(root).repair_info(name), info)
        return info

    compared = {"moved": moved, "source_shifted": False, "cosine_at_base_source": 0.5 if moved else 1.0}
    monkeypatch.setattr(
        compress_job, "run_compress", record("compress", lambda c, r, spec, **k: {"variant": spec.variant})
    )
    monkeypatch.setattr(direction_job, "run_extract", record("extract", lambda *a, **k: {}))
    monkeypatch.setattr(compare, "run_compare", record("compare", lambda *a, **k: compared))
    monkeypatch.setattr(control, "run_control", record("control", lambda *a, **k: {}))
    monkeypatch.setattr(evaluation_job, "run_evaluate", record("evaluate", lambda *a, **k: {}))
    monkeypatch.setattr(repair_job, "run_repair", record("repair", repair))
    monkeypatch.setattr(report, "write_report", record("report", lambda *a, **k: {"stub": True}))
    monkeypatch.setattr(layout, "prepare", record("prepare", layout.prepare))
    return calls
