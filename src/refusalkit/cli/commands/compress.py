"""``refusalkit compress``: a named variant of the run's base model, and its summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from refusalkit.cli.settings import asked_to_create, command_config
from refusalkit.core.errors import UserError


def run(args: argparse.Namespace) -> int:
    from refusalkit.compress.job import CompressSpec, run_compress

    if args.from_ is not None:
        return _import(args)
    cfg, layout = command_config(args, may_create=asked_to_create(args), needs={"methods": [args.method]})
    spec = CompressSpec.from_config(args.method, cfg.compress, sparsity=args.sparsity, bits=args.bits, name=args.name)
    info = run_compress(cfg, layout.root, spec, force=args.force, progress=not args.quiet)
    if info["reused"]:
        print(f"variant {info['variant']} exists in {layout.root}; reused (use --force to redo it)")
    print(summary(info, layout.root))
    return 0


def _import(args: argparse.Namespace) -> int:
    from refusalkit.compress.imported import run_import

    if args.sparsity is not None or args.bits is not None:
        raise UserError("--sparsity and --bits set a compression method; an imported model's are measured")
    cfg, layout = command_config(args, may_create=asked_to_create(args), needs={})
    info = run_import(cfg, layout.root, args.from_, args.name, force=args.force)
    if info["reused"]:
        print(f"variant {info['variant']} exists in {layout.root}; reused (use --force to import it again)")
    print(import_summary(info, layout.root))
    return 0


def import_summary(info: dict[str, Any], root: Path) -> str:
    m = info["measured"]
    bits = "not quantized" if info["bits"] is None else f"{m['bits_per_weight']:.2f} stored bits per weight"
    types = ", ".join(f"{k} x{v}" for k, v in sorted(info["types"].items()))
    return "\n".join(
        [
            f"variant {info['variant']} of {info['base_model']['spec']}: imported {info['format']} ({info['source']['given']})",
            f"  sha256          {info['source']['sha256']}",
            f"  measured        {m['sparsity']:.2%} zeros in {info['n_compressed_params']:,} block weights; {bits}",
            f"  stored types    {types or '-'}",
            f"  saved in        {root / info['variant']}/model (use --variant {info['variant']})",
        ]
    )


def summary(info: dict[str, Any], root: Path) -> str:
    from refusalkit.compress.methods import METHODS

    method = METHODS[info["method"]].title if info["method"] in METHODS else info["method"]
    cal = info.get("calibration")
    lines = [
        f"variant {info['variant']} of {info['base_model']['spec']}: {method}",
        f"  sparsity        {info['sparsity']:.2%} of {info['n_compressed_params']:,} weights in decoder linears",
    ]
    if info.get("bits"):
        group = f" (group {info['parameters'].get('group_size')})" if info["method"] != "llm-int8" else ""
        lines.append(f"  bits            {info['bits']}{group}")
    if cal:
        lines.append(
            f"  calibration     {cal['source']}: {cal['n_samples']} samples, {cal['n_tokens']} tokens, "
            f"chat template {'on' if cal['chat_template'] else 'off'}"
        )
    lines += [
        f"  size on disk    {info['size_on_disk_bytes'] / 2**20:.0f} MiB",
        f"  time, peak RSS  {info['wall_seconds']:.0f} s, {info['peak_rss_bytes'] / 2**30:.2f} GiB",
        f"  saved in        {root / info['variant']}/model (use --variant {info['variant']})",
    ]
    return "\n".join(lines)
