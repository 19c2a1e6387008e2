"""``refusalkit compare``: a variant's refusal direction against the base model's."""

from __future__ import annotations

import argparse

from refusalkit.cli.settings import command_config


def run(args: argparse.Namespace) -> int:
    from refusalkit.direction.compare import run_compare

    cfg, layout = command_config(args, needs={})
    res = run_compare(cfg, args.run, args.variant, quality=not args.no_quality, force=args.force)
    b, v = res["base_source"], res["variant_source"]
    q = res["quality"]
    if v is None:
        source = f"base L{b['layer']}/pos {b['position']}; the variant was extracted without a selection"
        cos = f"at the base source {res['cosine_at_base_source']:.3f}"
    else:
        shift = (
            "shifted" if res["source_shifted"] else "within noise" if res.get("source_shift_within_noise") else "same"
        )
        source = f"base L{b['layer']}/pos {b['position']}  ->  variant L{v['layer']}/pos {v['position']}  ({shift})"
        cos = f"selected {res['cosine_selected']:.3f}, at the base source {res['cosine_at_base_source']:.3f}"
    lines = [
        f"{args.variant} vs base",
        f"  source          {source}",
        f"  cosine          {cos}",
        "  by layer        " + " ".join(f"{c:.2f}" for c in res["cosine_by_layer"]),
    ]
    noise = res.get("cosine_at_base_source_noise")
    if noise:
        lines.append(
            f"  noise floor     {noise['null_floor']:.3f} at the base source (null mean {noise['null_mean']:.3f}, "
            f"{res['noise']['resamples']} bootstrap resamples): {'moved' if noise['moved'] else 'within noise'}"
        )
    if res["single_direction_evidence"]:
        lines.append(
            f"  single direction mediates refusal: {'yes' if res['single_direction'] else 'no'} "
            f"({res['single_direction_evidence']['basis']})"
        )
    if q.get("base_direction_on_variant"):
        o = q["base_direction_on_variant"]
        lines.append(
            f"  base direction on the variant: ablation {o['ablation_score']:+.2f} (baseline "
            f"{o['baseline']['harmful_score']:+.2f}), addition {o['addition_score']:+.2f} (baseline "
            f"{o['baseline']['harmless_score']:+.2f}), KL {o['kl']:.3f}"
        )
    lines.append(f"  written to {layout.compare(args.variant)}")
    print("\n".join(lines))
    return 0
