"""Benchmark: what a shorter generation horizon would change in a run's verdicts, one command.

    python benchmarks/bench_horizon.py --run DIR [--tokens 16 20 24]

Greedy decoding is prefix-consistent: the first k tokens of a 32-token greedy completion are the
k-token completion (the same arithmetic). So the verdicts a horizon of k tokens would give are the
substring judge's verdicts on each recorded completion cut to its first k tokens, and the decode
work it would save is the tokens past k. For every greedy record of the run (each model's vanilla,
over-refusal and borderline evaluation, the validation and control completions), this prints per
horizon: completions whose label changes (each one shown), and the share of new tokens kept.

The completion's tokens are recovered by tokenizing its text (what the judge read) with the run's
model's tokenizer; a completion the early stop cut keeps its label at every horizon past its cut.
No model is run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def records(root: Path) -> dict[str, list[tuple[str, str]]]:
    """``{record name: [(prompt, completion)]}`` for every greedy completion file of the run."""
    out: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(root.glob("*/eval/*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("attack", {}).get("decoding", {}).get("name", "greedy") == "greedy"]
        if rows:
            out[f"{path.parent.parent.name}/{path.stem}"] = [(r["prompt"], r["completion"]) for r in rows]
    for name in ("completions.jsonl", "control.jsonl"):
        for path in sorted(root.glob(f"*/direction/{name}")):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for r in rows:
                key = f"{path.parent.parent.name}/{path.stem}:{r['condition']}"
                out.setdefault(key, []).append((r["prompt"], r["completion"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 20, 24])
    args = ap.parse_args()
    from refusalkit.core.settings import load_config
    from refusalkit.data.prompts import load_refusal_phrases
    from refusalkit.data.refusal import SubstringJudge
    from refusalkit.models.loading import load_tokenizer, resolve_model

    root = Path(args.run)
    cfg = load_config(files=[str(root / "config.yaml")])
    tok = load_tokenizer(cfg.model, resolve_model(cfg.model), cfg.chat_template)
    judge = SubstringJudge(load_refusal_phrases(cfg.validation.refusal_phrases))
    recs = records(root)
    total = sum(len(v) for v in recs.values())
    print(
        f"run {root}: {total} greedy completions in {len(recs)} records (max_new_tokens {cfg.validation.max_new_tokens})"
    )
    ids = {k: [tok(c, add_special_tokens=False)["input_ids"] for _, c in v] for k, v in recs.items()}
    full = sum(len(x) for v in ids.values() for x in v)
    for k in args.tokens:
        flips, kept = [], 0
        for name, rows in recs.items():
            for (prompt, comp), t in zip(rows, ids[name]):
                cut = tok.decode(t[:k], skip_special_tokens=True).strip()
                kept += min(len(t), k)
                a, b = judge.judge(comp).label, judge.judge(cut).label
                if a != b:
                    flips.append((name, prompt, a, b, comp))
        print(f"\nhorizon {k} tokens: {len(flips)} of {total} labels change; {kept / full:.0%} of the new tokens kept")
        by: dict[str, int] = {}
        for name, *_ in flips:
            by[name.split(":")[0]] = by.get(name.split(":")[0], 0) + 1
        for name, n in sorted(by.items()):
            print(f"  {name}: {n}")
        for name, prompt, a, b, comp in flips:
            print(f"  - {name}: {a} -> {b}: {prompt[:60]!r} -> {comp[:120]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
