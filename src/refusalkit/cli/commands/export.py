"""``refusalkit export``: a variant in the format it is served in, with its model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from refusalkit.cli.settings import command_config


def run(args: argparse.Namespace) -> int:
    from refusalkit.export.job import check_request, run_export

    check_request(args.format, args.type, Path(args.out), args.force, args.push_to_hub)  # before any loading
    cfg, layout = command_config(args, needs={})
    rec = run_export(
        cfg,
        layout,
        args.variant,
        args.format,
        Path(args.out),
        args.type,
        args.force,
        args.push_to_hub,
        check=args.check,
        progress=not args.quiet,
    )
    print(summary(rec, Path(args.out)))
    return 0


def summary(rec: dict, out: Path) -> str:
    kind = rec["format"] + (f" {rec['type']}" if rec["format"] == "gguf" else "")
    lines = [
        f"{rec['variant']} exported as {kind} to {out}",
        f"  size            {rec['size_bytes'] / 2**20:.0f} MiB (dense checkpoint {rec['dense_bytes'] / 2**20:.0f} MiB)",
    ]
    if rec.get("scheme"):
        sc = rec["scheme"]
        grid = f"group {sc['group_size']}" if sc["group_size"] > 0 else "per row"
        lines.append(
            f"  grid            {sc['format']}, {sc['bits']} bits, {grid}, "
            + ("symmetric" if sc["symmetric"] else "zero points")
            + f"; {rec['matrices_quantized']} matrices, largest change {rec['max_abs_error']:.1e}"
        )
    if rec.get("keeps_zeros") is False:
        lines.append("  note            this type stores a per-block minimum: pruned weights are not exactly zero")
    for k, v in (rec.get("edit_survival") or {}).items():
        kept = "-" if v["kept"] is None else f"{v['kept']:.3f}"
        lines.append(f"  edit kept       {kept} of the intended edit of {k}")
    if rec.get("recheck"):
        from refusalkit.export.recheck import text

        lines.append(
            f"  re-checked      {rec['recheck']['variant']}: export keeps the verdict: {rec['recheck']['verdict']}"
        )
        lines += [f"    {line}" for line in text(rec["recheck"])]
    lines.append(f"  card            {out / 'README.md'}, {out / 'reproduce.json'}")
    if rec.get("pushed_to"):
        lines.append(f"  pushed to       https://huggingface.co/{rec['pushed_to']}")
    return "\n".join(lines)
