"""The report as data: ``DIR/results.json`` (validated against ``results.schema.json``, shipped beside this
module) and ``DIR/results.csv`` (the variants' table), so that a script never parses Markdown.

``results.json`` holds the refusalkit version, the run's resolved configuration, the machine the run
recorded (its manifest), every variant's row as numbers, the verdict sentences, every repair's
verdict with its parts, decisions and figures, every refusal-preserving setting's comparison with its
plain method (``prevention``), and the findings.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from typing import Any

from refusalkit.core import artifacts
from refusalkit.study.report.blocks import Finding
from refusalkit.study.report.load import Run, Variant, read_json

SCHEMA = "results.schema.json"


def schema() -> dict[str, Any]:
    """The JSON Schema of ``results.json`` (draft 2020-12)."""
    return json.loads(resources.files("refusalkit.study.report").joinpath(SCHEMA).read_text(encoding="utf-8"))


def _rate(r: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(r, dict) or r.get("rate") is None:
        return None
    lo, hi = r.get("ci95") or (None, None)
    return {"rate": float(r["rate"]), "k": r.get("k"), "n": r.get("n"), "ci95": [lo, hi]}


def _number(x: Any) -> float | None:
    return None if x is None else float(x)


def variant_record(run: Run, v: Variant) -> dict[str, Any]:
    """One variant's row of the report's table, as numbers (None: not measured)."""
    d = v.direction or {}
    comp = v.compression or {}
    spec = comp.get("spec") if isinstance(comp.get("spec"), dict) else {}
    return {
        "name": v.name,
        "kind": v.kind,
        "method": v.method,
        "sparsity": _number(comp.get("sparsity")) if v.kind not in ("base", "repaired") else None,
        "bits": comp.get("bits"),
        "calibration_seed": spec.get("seed") if v.calibrated else None,
        "repaired_from": (v.repair or {}).get("source_variant"),
        "source": {"layer": int(d["layer"]), "position": int(d["position"])} if "layer" in d else None,
        "cosine_selected": _number(v.cosine_selected),
        "cosine_at_base_source": _number(v.cosine_at_base_source),
        "source_shifted": v.shifted,
        "moved": v.moved(run.moved_cosine),
        "asr": {a: _rate(v.attack(a)) for a in v.asr if _rate(v.attack(a)) is not None},
        "degenerate_rate": _number(v.degenerate_rate),
        "over_refusal": _rate((v.over_refusal or {}).get("refusal_rate")),
        "borderline": _rate((v.borderline or {}).get("refusal_rate")),
        "perplexity": _number(v.perplexity),
        "mean_acc": _number(v.mean_acc),
        "broken": run.broken(v),
    }


def _config(run: Run) -> dict[str, Any]:
    """The run's resolved configuration (its config.yaml over the defaults; older keys migrated), or the
    one the report was asked for (``report --config`` / ``--set``)."""
    from refusalkit.core.settings import load_config

    if run.config is not None:
        return run.config

    return load_config(files=[run.layout.config] if run.layout.config.is_file() else []).to_dict()


def _machine(run: Run) -> dict[str, Any]:
    m = read_json(run.layout.manifest) or {}
    hw = m.get("hardware") or {}
    return {
        "processor": hw.get("processor"),
        "cpu_count": hw.get("cpu_count"),
        "cpu_capability": hw.get("cpu_capability"),
        "memory_gb": hw.get("memory_gb"),
        "gpus": hw.get("gpus") or [],
        "platform": hw.get("platform"),
        "python": m.get("python"),
        "packages": {k: v for k, v in (m.get("packages") or {}).items() if v is not None},
    }


def build_results(run: Run, findings: list[Finding], sentences: list[str], generated: str) -> dict[str, Any]:
    """``results.json``'s content (see the schema for every key)."""
    from refusalkit import __version__
    from refusalkit.study.report.prevention import prevention_verdicts
    from refusalkit.study.report.verdicts import repair_verdict

    repairs = [v for v in run.variants if v.kind == "repaired"]
    return {
        "refusalkit_version": __version__,
        "generated": generated,
        "model": run.model,
        "config": _config(run),
        "machine": _machine(run),
        "variants": [variant_record(run, v) for v in run.variants],
        "verdicts": sentences,
        "repairs": [_jsonable(repair_verdict(run, v, across=not run.later_draw(v)).to_json()) for v in repairs],
        "prevention": [_jsonable(pv.to_json()) for pv in prevention_verdicts(run)],
        "findings": [f.to_json() for f in findings],
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


CSV_COLUMNS = (
    "name", "kind", "method", "sparsity", "bits", "calibration_seed", "repaired_from", "source_layer",
    "source_position", "cosine_selected", "cosine_at_base_source", "source_shifted", "moved", "asr_vanilla",
    "asr_vanilla_lo", "asr_vanilla_hi", "degenerate_rate", "over_refusal", "borderline", "perplexity", "mean_acc",
    "broken",
)  # fmt: skip


def results_csv(results: dict[str, Any]) -> str:
    """The variants' table as CSV, one row a variant (rates as fractions, empty when not measured)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in results["variants"]:
        van = r["asr"].get("vanilla") or {}
        lo, hi = van.get("ci95") or (None, None)
        row = {
            **r,
            "source_layer": (r["source"] or {}).get("layer"),
            "source_position": (r["source"] or {}).get("position"),
            "asr_vanilla": van.get("rate"),
            "asr_vanilla_lo": lo,
            "asr_vanilla_hi": hi,
            "over_refusal": (r["over_refusal"] or {}).get("rate"),
            "borderline": (r["borderline"] or {}).get("rate"),
        }
        w.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    return out.getvalue()


def write_results(run: Run, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.csv`` atomically."""
    artifacts.write_json(run.layout.results_json, results)
    artifacts.write_text(run.layout.results_csv, results_csv(results))


# ------------------------------------------------------------------------------------------------ schema


def _type_schema(typ: Any) -> dict[str, Any]:
    t = str(typ).replace("typing.", "")
    nullable = "None" in t
    base = t.replace(" | None", "").replace("None | ", "").strip()
    names = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
    if base.startswith("list["):
        out: dict[str, Any] = {"type": "array", "items": {"type": names[base[5:-1]]}}
    else:
        out = {"type": names[base]}
        if base == "float":
            out = {"type": "number"}
    if nullable:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def config_schema() -> dict[str, Any]:
    """The schema of the resolved configuration, generated from :class:`~refusalkit.core.config.Config`:
    every setting with its type and its help text."""
    import dataclasses

    from refusalkit.core.config import Config

    def section(obj: Any) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                props[f.name] = {**section(value), "description": (type(value).__doc__ or "").strip().splitlines()[0]}
            else:
                props[f.name] = {**_type_schema(f.type), "description": f.metadata.get("help", "")}
        return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}

    return section(Config())
