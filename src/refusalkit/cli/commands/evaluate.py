"""``refusalkit evaluate``: attack success rates, over-refusal and utility of a variant, and their table."""

from __future__ import annotations

import argparse
from typing import Any

from refusalkit.cli.settings import asked_to_create, command_config
from refusalkit.core.layout import prepare


def run(args: argparse.Namespace) -> int:
    from refusalkit.evaluation.job import run_evaluate

    cfg, layout = command_config(
        args, may_create=asked_to_create(args), needs={"utility": args.utility, "evaluates": True}
    )
    if not layout.config.exists():
        prepare(cfg, layout.root, force=False)
    res = run_evaluate(
        cfg, layout.root, args.variant, utility_eval=args.utility, force=args.force, progress=not args.quiet
    )
    print(eval_table(res))
    return 0


def pct(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{r['rate']:6.1%}  [{lo:.1%}, {hi:.1%}]  ({r['k']}/{r['n']})"


def eval_table(res: dict[str, Any]) -> str:
    p = res["plan"]
    lines = [
        f"evaluation of {res['variant']} ({p['max_new_tokens']} new tokens; decoding grid {p['grid']}, "
        f"{p['n_decodings']} configurations x {len(p['systems'])} system prompt settings)"
    ]
    for attack, s in res["asr"].items():
        lines.append(
            f"  ASR {attack:9s} {pct(s['asr'])}   judge {s['judge']}; degenerate "
            f"{s['judges'][s['judge']]['verdicts']['degenerate']['rate']:.1%} of completions"
        )
        if attack == "suffix" and "universal" in s:
            lines.append(f"      universal   {pct(s['universal']['asr'])}")
        for pair, a in (s.get("agreement") or {}).items():
            lines.append(f"      agreement {pair}: {a['agreement']:.1%}, kappa {a['kappa']:.2f}")
    if "over_refusal" in res:
        lines.append(f"  over-refusal  {pct(res['over_refusal']['refusal_rate'])} of harmless prompts refused")
    u = res.get("utility")
    if u:
        for name, t in u["tasks"].items():
            lines.append(f"  {name:22s} acc {t['acc']:.3f} ± {t['acc_stderr']:.3f} (n={t['n']})")
        if "perplexity" in u:
            lines.append(f"  perplexity (held-out Wikipedia) {u['perplexity']['perplexity']:.2f}")
        for name, why in (u.get("skipped") or {}).items():
            lines.append(f"  {name}: skipped ({why})")
    lines.append(f"  results in {res.get('out', '')}  ({res['seconds']:.0f} s)")
    return "\n".join(lines)
