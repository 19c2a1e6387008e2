"""``refusalkit extract``: the refusal direction of the base model or a variant, and its summary table."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from refusalkit.cli.settings import command_config
from refusalkit.core.layout import RunLayout, recorded_config


def summary_table(res: dict[str, Any]) -> str:
    d, v = res["direction"], res.get("validation")
    lines = [
        f"refusal direction of {d['model']} [{d['variant']}]",
        f"  source          layer {d['layer']} of {d['n_layers']}, position {d['position']} ({d['token']!r}), norm {d['norm']:.2f}",
        f"  ablation score  {d['ablation_score']:+.2f}   (harmful baseline {d['baseline']['harmful_score']:+.2f})",
        f"  addition score  {d['addition_score']:+.2f}   (harmless baseline {d['baseline']['harmless_score']:+.2f})",
        f"  KL (harmless)   {d['kl']:.3f}",
    ]
    if d.get("fallback"):
        lines.append(f"  FALLBACK        {d['fallback']}")
    if v:
        c = v["conditions"]
        lines += [
            f"  validation by generation ({v['n_test']['harmful']} harmful, {v['n_test']['harmless']} harmless test prompts, {v['max_new_tokens']} tokens)",
            f"    {'':22s}{'refusal':>9s}{'degenerate':>12s}",
        ]
        for name in ("harmful_baseline", "harmful_ablated", "harmless_baseline", "harmless_added"):
            lines.append(f"    {name:22s}{c[name]['refusal_rate']:9.1%}{c[name]['degenerate_rate']:12.1%}")
    lines.append(f"  artifacts in {res['run']}/{res['variant']}/direction/ ({res['seconds']:.0f} s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from refusalkit.direction.job import run_extract

    layout = RunLayout(args.run)
    overrides: dict[str, Any] = {}
    if layout.config.exists() and args.no_validation:  # keep the run's setting; skip this extraction's validation
        overrides["validation.enabled"] = recorded_config(layout).validation.enabled
    # check=False: prepare() checks the settings (or --force replaces them)
    cfg, _ = command_config(args, may_create=True, check=False, overrides=overrides, needs={})
    res = run_extract(
        cfg, args.run, variant=args.variant, force=args.force, progress=not args.quiet, validate=not args.no_validation
    )
    if res["direction"].get("fallback"):
        print(
            f"warning: no candidate passed Arditi's filters; fallback used: {res['direction']['fallback']}",
            file=sys.stderr,
        )
    print(summary_table(res))
    return 0
