"""``refusalkit repair``: AIRD on a compressed variant, and what it did."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from refusalkit.cli.settings import command_config


def run(args: argparse.Namespace) -> int:
    from refusalkit.repair.job import run_repair

    cfg, layout = command_config(args, needs={"evaluates": True})
    info = run_repair(cfg, layout.root, args.variant, name=args.name, force=args.force, progress=not args.quiet)
    if info.get("reused"):
        print(f"variant {info['variant']} exists; reused (use --force to redo it)")
    print(summary(info, layout.root))
    return 0


def summary(info: dict[str, Any], root: Path) -> str:
    """What the edit did: block, alphas and gains, sparsity, per-matrix change, the α curve."""
    lines = [
        f"{info['variant']}: AIRD on {info['source_variant']} at block {info['layer']} "
        f"(direction layer {info['direction_layer']}, placement {info['placement']}, r {info['direction']}, "
        f"norm {info['direction_norm']:.2f})",
        "  alphas          "
        + ", ".join(f"{k} {a:.4g} (gain {info['gain'][k]:.3g})" for k, a in info["alphas"].items()),
        f"  model sparsity  {info['model_sparsity_before']:.2%} -> {info['model_sparsity_after']:.2%}",
    ]
    for k, m in info["matrices"].items():
        lines.append(
            f"  {k:15s} |dW| {m['delta_norm']:.4g} ({m['rel_delta']:.2%} of |W|), zeros "
            f"{m['sparsity_before']:.2%} -> {m['sparsity_after']:.2%}"
        )
    w = info.get("writes_along_r") or {}
    if all(isinstance(w.get(k), dict) and "harmless" in w[k] for k in ("attn_out", "mlp_down")):
        lines.append(
            "  writes along r  "
            + ", ".join(
                f"{k} {w[k]['harmful']:+.3f} harmful / {w[k]['harmless']:+.3f} harmless"
                for k in ("attn_out", "mlp_down")
            )
            + f"; gap change {info['predicted_gap_change']:+.3f} (first order)"
        )
    if info.get("quantization"):
        lines.append(f"  requantized     {info['quantization']['survival']:.0%} of the edit survives")
    c = info.get("curve")
    if c:
        lines.append(
            f"  alpha curve     target ASR {c['target_asr']:.0%} ({c['target_from']}); unrepaired ASR "
            f"{c['unrepaired']['asr']['rate']:.0%}"
        )
        for p in c["points"]:
            lines.append(
                f"    x{p['alpha_scale']:<6g} ASR {p['asr']['rate']:5.0%}  over-refusal "
                f"{p.get('over_refusal', {}).get('rate', float('nan')):5.0%}  degenerate {p['degenerate_rate']:5.0%}"
                f"  ppl {p.get('perplexity', float('nan')):7.2f}"
                + (f"  over budget: {'; '.join(p['over_budget'])}" if p["over_budget"] else "")
            )
        if info["auto"]:
            lines.append(
                f"  chosen          x{info['alpha_scale']:g}"
                + ("" if c["chosen"]["target_reached"] else " (target not reached within the budgets)")
            )
    if info.get("search"):
        lines += search_lines(info)
    lines.append(f"  saved in        {root / info['variant']}/model (use --variant {info['variant']})")
    return "\n".join(lines)


def search_lines(info: dict[str, Any]) -> list[str]:
    """The search over edits: the screen, the confirmed candidates and the choice."""
    s = info["search"]
    lines = [
        f"  search          target ASR {s['target_asr']:.0%} ({s['target_from']}); unrepaired ASR "
        f"{s['unrepaired']['asr']['rate']:.0%}; {len(s['screened'])} edits screened, "
        f"{len(s['passed_screen'])} passed, {s['generated']} generated"
    ]
    for p in s["confirmed"]:
        form = "zeros kept" if p["keep_zeros"] else "every weight"
        lines.append(
            f"    {p['placement']:8s} x{p['scale']:<6g} {form:12s} ASR {p['asr']['rate']:5.0%}  over-refusal "
            f"{p.get('over_refusal', {}).get('rate', float('nan')):5.0%}  ppl {p.get('perplexity', float('nan')):7.2f}"
            + (f"  over budget: {'; '.join(p['over_budget'])}" if p["over_budget"] else "")
        )
    for p in s.get("perplexity_rejected", []):
        form = "zeros kept" if p["keep_zeros"] else "every weight"
        lines.append(f"    {p['placement']:8s} x{p['scale']:<6g} {form:12s} not generated: {p['over_budget'][0]}")
    c = s["chosen"]
    lines.append(
        f"  chosen          {c['placement']} x{c['scale']:g}"
        + (
            ""
            if c["target_reached"]
            else " (target not reached within the budgets: the edit with the lowest bound on its ASR above the base model's)"
        )
    )
    return lines
