"""The model card of an export (``README.md``: the Hub's YAML metadata and a body a person reads)
and the upload of the export folder to the Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout


def _row(layout: RunLayout, variant: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """The variant's row of ``results.json``, its repair verdict and the verdict lines naming it."""
    if not layout.results_json.exists():
        return None, None, []
    results = artifacts.read_json(layout.results_json)
    row = next((v for v in results.get("variants", []) if v.get("name") == variant), None)
    repair = next((r for r in results.get("repairs", []) if r.get("variant") == variant), None)
    lines = [v for v in results.get("verdicts", []) if v.startswith(variant + ":") or f" {variant} (" in v]
    return row, repair, lines


def _rate(rec: dict[str, Any] | None) -> str | None:
    if not rec or rec.get("rate") is None:
        return None
    lo, hi = rec.get("ci95") or (None, None)
    ci = f" [{100 * lo:.0f}, {100 * hi:.0f}]" if lo is not None else ""
    return f"{100 * rec['rate']:.0f}%{ci} ({rec.get('k')}/{rec.get('n')})"


def _base_model_id(cfg: Config, record: dict[str, Any]) -> str | None:
    """The base model's hub id: the run's model when it is one, else what its GGUF header names."""
    if cfg.model.count("/") == 1 and not Path(cfg.model).expanduser().exists():
        return cfg.model
    template = record.get("template")
    if template:
        try:
            from gguf import GGUFReader

            fields = GGUFReader(template).fields
            for key in (
                "general.base_model.0.repo_url",
                "general.source.repo_url",
                "general.source.huggingface.repository",
            ):
                if key in fields:
                    url = str(fields[key].contents())
                    return url.removeprefix("https://huggingface.co/").strip("/") or None
        except Exception:  # noqa: BLE001 - a header without these keys
            return None
    return None


def model_card(cfg: Config, layout: RunLayout, variant: str, record: dict[str, Any]) -> str:
    """``README.md`` of the export folder."""
    row, repair, lines = _row(layout, variant)
    base_id = _base_model_id(cfg, record)
    repaired = layout.repair_info(variant).exists()
    quantized = record["format"] == "gguf" or record.get("scheme") is not None
    relation = "finetune" if repaired else "quantized" if quantized else "finetune"
    tags = ["refusalkit", "refusal", "safety", record["format"]] + (["aird"] if repaired else [])
    tags += ["vllm"] if record["format"] == "compressed-tensors" else []
    meta: dict[str, Any] = {"tags": tags, "library_name": "gguf" if record["format"] == "gguf" else "transformers"}
    if base_id:
        meta["base_model"] = base_id
        meta["base_model_relation"] = relation
    results = []
    if row:
        for key, name in (("asr", "vanilla ASR (AdvBench, substring judge)"),):
            rec = (row.get(key) or {}).get("vanilla")
            if rec and rec.get("rate") is not None:
                results.append({"name": name, "value": round(100 * rec["rate"], 1)})
        for key, name in (("over_refusal", "over-refusal (harmless prompts)"), ("borderline", "borderline refusal")):
            rec = row.get(key)
            if rec and rec.get("rate") is not None:
                results.append({"name": name, "value": round(100 * rec["rate"], 1)})
        if row.get("perplexity") is not None:
            results.append({"name": "perplexity (Wikipedia leads)", "value": round(row["perplexity"], 2)})
    if results:
        meta["model-index"] = [
            {
                "name": variant,
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"name": "refusalkit study", "type": "refusalkit"},
                        "metrics": [{"type": r["name"], "value": r["value"]} for r in results],
                    }
                ],
            }
        ]
    return _yaml(meta) + _body(cfg, variant, record, row, repair, lines, base_id)


def _yaml(meta: dict[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def _body(
    cfg: Config,
    variant: str,
    record: dict[str, Any],
    row: dict[str, Any] | None,
    repair: dict[str, Any] | None,
    lines: list[str],
    base_id: str | None,
) -> str:
    size, dense = record["size_bytes"], record["dense_bytes"]
    what = f"`{variant}` of {base_id or cfg.model}, exported by refusalkit {record['refusalkit_version']} as "
    what += f"{record['format']}" + (f" ({record['type']})" if record["format"] == "gguf" else "")
    out = [
        f"# {variant} ({record['format']}{', ' + record['type'] if record['format'] == 'gguf' else ''})",
        "",
        what + ".",
    ]
    out.append(
        f"Files: {', '.join(f'`{f}`' for f in record['files'])}: {size / 2**20:.0f} MiB (dense checkpoint {dense / 2**20:.0f} MiB)."
    )
    out += _storage(record)
    out += ["", "## What was measured", ""]
    if row:
        out.append("| measure | value (95% interval) |")
        out.append("|---|---|")
        for label, rec in (
            ("vanilla ASR", (row.get("asr") or {}).get("vanilla")),
            ("over-refusal", row.get("over_refusal")),
            ("borderline refusal", row.get("borderline")),
        ):
            shown = _rate(rec)
            if shown:
                out.append(f"| {label} | {shown} |")
        if row.get("perplexity") is not None:
            out.append(f"| perplexity | {row['perplexity']:.2f} |")
        out.append("")
        out.append(
            "These were measured on the variant inside refusalkit, before export; the exported type can move them."
        )
    else:
        out.append("No report in the run: run `refusalkit report` before exporting to include the measurements.")
    if lines:
        out += ["", "## Verdicts", ""] + [f"- {line}" for line in lines]
    if repair:
        out += ["", f"Repair verdict: **{repair.get('verdict')}** ({json.dumps(repair.get('parts'))})."]
    surv = record.get("edit_survival")
    if surv:
        out += ["", "## The repair in this file", "", "| matrix | edit kept | residual |", "|---|---|---|"]
        for k, v in surv.items():
            kept = "–" if v["kept"] is None else f"{v['kept']:.3f}"
            res = "–" if v["residual"] is None else f"{v['residual']:.3f}"
            out.append(f"| `{k}` | {kept} | {res} |")
    if record.get("recheck"):
        from refusalkit.export.recheck import text

        rc = record["recheck"]
        out += [
            "",
            "## This file, re-checked",
            "",
            f"Read back by {' and by '.join(r['runtime'] for r in rc['runtimes'])} and evaluated on the same prompts, "
            f"paired with the variant before export: **{rc['verdict']}**.",
            "",
        ]
        out += [("  - " + line.strip()) if line.startswith(" ") else f"- {line}" for line in text(rc)]
    out += ["", "## Reproduce", "", "```", f"pip install refusalkit=={record['refusalkit_version']}"]
    typ = f" --type {record['type']}" if record["format"] == "gguf" else ""
    out.append(
        record.get("command") or f"refusalkit export --run RUN --variant {variant} --format {record['format']}{typ}"
    )
    out += [
        "```",
        "",
        f"Configuration, seeds (run seed {record['seed']}) and the sha256 of every input and output: `reproduce.json`.",
        "",
    ]
    return "\n".join(out)


def _storage(record: dict[str, Any]) -> list[str]:
    """What the file stores that a reader must know: offsets that unzero pruned weights, the integer grid."""
    out = []
    if record.get("keeps_zeros") is False:
        out.append("This type stores a per-block minimum: pruned weights are not exactly zero in this file.")
    sc = record.get("scheme")
    if sc:
        grid = f"groups of {sc['group_size']}" if sc["group_size"] > 0 else "one group per row"
        out.append(
            f"Weights: {sc['bits']}-bit integers in {grid}, "
            + ("symmetric" if sc["symmetric"] else "with zero points")
            + f", compressed-tensors {sc['format']} (written with compressed-tensors "
            f"{record.get('compressed_tensors_version')}); the variant's own grid, so the weights are refusalkit's to "
            f"within {record.get('max_abs_error', 0):.1e}. Serve it with `vllm serve <this folder>`, or load it in "
            "transformers with the compressed-tensors library installed."
        )
    return out


def push(folder: Path, repo: str) -> None:
    """Upload the export folder to the Hub repository ``repo`` (token: ``HF_TOKEN`` or a saved login)."""
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise UserError("--push-to-hub needs huggingface_hub; run: pip install huggingface_hub") from None
    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise UserError(f"--push-to-hub {repo}: no Hugging Face token; set HF_TOKEN (the export is in {folder})")
    try:
        api = HfApi(token=token)
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo)
    except Exception as e:  # noqa: BLE001 - network, permissions
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--push-to-hub {repo} failed ({first}); the export is in {folder}") from None
