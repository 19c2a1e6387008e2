"""Benchmark: two runs of the same study judged prompt by prompt, one command.

    python benchmarks/compare_runs.py --a DIR_BEFORE --b DIR_AFTER

For a speed change that should not change results: every completion record both runs hold (each
model's evaluation records, the validation and control completions, the repair search's measured
points) is paired by prompt, and every label that differs is shown with both completions; then the
stage times side by side, and the report's verdicts (``results.json``) that differ. Nothing is run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def labels(root: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """``{record: {prompt key: (label, completion)}}`` of every completion file of a run."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for path in sorted(root.glob("*/eval/*.jsonl")):
        rec = out.setdefault(f"{path.parent.parent.name}/{path.stem}", {})
        for r in _rows(path):
            v = r.get("verdicts", {}).get("substring", {}).get("label")
            rec[r["key"]] = (v, r["completion"])
    for path in sorted(root.glob("*/direction/*.jsonl")):
        for r in _rows(path):
            key = f"{path.parent.parent.name}/{path.stem}:{r['condition']}"
            out.setdefault(key, {})[r["prompt"]] = (r["verdict"], r["completion"])
    return out


def search_labels(root: Path) -> dict[str, dict[str, str]]:
    """The repair search's per-prompt labels of its references and measured points."""
    out: dict[str, dict[str, str]] = {}
    for path in sorted(root.glob("repair/*.search.json")):
        rec = json.loads(path.read_text())
        points = {"base": rec.get("base"), "unrepaired": rec.get("unrepaired"), **rec.get("points", {})}
        for name, point in points.items():
            for kind, labs in ((point or {}).get("labels") or {}).items():
                out[f"{path.stem}:{name}:{kind}"] = {str(i): lab for i, lab in enumerate(labs)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    args = ap.parse_args()
    a, b = Path(args.a), Path(args.b)
    la, lb = labels(a), labels(b)
    n_same = n_pairs = 0
    flips = []
    for rec in sorted(set(la) & set(lb)):
        for key in sorted(set(la[rec]) & set(lb[rec])):
            n_pairs += 1
            (x, cx), (y, cy) = la[rec][key], lb[rec][key]
            n_same += x == y
            if x != y:
                flips.append((rec, key, x, y, cx, cy))
    only = sorted(set(la) ^ set(lb))
    print(f"{n_pairs} paired completions in {len(set(la) & set(lb))} records: {n_pairs - n_same} labels differ")
    for rec, key, x, y, cx, cy in flips:
        print(f"  - {rec}: {key[:60]!r}: {x} -> {y}\n      a: {cx[:150]!r}\n      b: {cy[:150]!r}")
    if only:
        print(f"records in one run only: {', '.join(only)}")
    sa, sb = search_labels(a), search_labels(b)
    diff = [(k, i) for k in set(sa) & set(sb) for i in sa[k] if sa[k][i] != sb[k].get(i)]
    print(f"repair search: {sum(len(sa[k]) for k in set(sa) & set(sb))} paired labels, {len(diff)} differ")
    for k, i in diff:
        print(f"  - {k} prompt {i}: {sa[k][i]} -> {sb[k][i]}")
    ta = json.loads((a / "run.json").read_text())["stages"]
    tb = json.loads((b / "run.json").read_text())["stages"]
    print("\n| stage | a s | b s | a tokens | b tokens |\n|---|---|---|---|---|")
    for key in list(ta) + [k for k in tb if k not in ta]:
        x, y = ta.get(key, {}), tb.get(key, {})
        print(f"| {key} | {x.get('seconds', '–')} | {y.get('seconds', '–')} | {x.get('forward_tokens', '–')} | "
              f"{y.get('forward_tokens', '–')} |")  # fmt: skip
    sa_s = sum(v.get("seconds", 0) for v in ta.values())
    sb_s = sum(v.get("seconds", 0) for v in tb.values())
    print(f"| total | {sa_s:.0f} | {sb_s:.0f} | | |")
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    fa, fb = ({f["id"]: f["verdict"] for f in r.get("findings", [])} for r in (ra, rb))
    changed = [
        k for k in set(fa) | set(fb) if json.dumps(fa.get(k), sort_keys=True) != json.dumps(fb.get(k), sort_keys=True)
    ]
    print(f"\nreport findings that differ: {', '.join(sorted(changed)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
