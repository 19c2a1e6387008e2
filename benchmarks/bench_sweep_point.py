"""Benchmark: the wall time of one sweep point and what dominates it, one command.

    python benchmarks/bench_sweep_point.py --run DIR [--method rtn --bits 4 | --method wanda --sparsity 0.5]
        [--set KEY=VALUE ...]

DIR is a run directory whose base model is finished (``refusalkit run`` or ``refusalkit sweep``
made it: base direction, noise floor, base evaluation). The benchmark copies the base's records
(not any variant) into a temporary run directory with the same configuration and takes one point
through ``refusalkit sweep``'s stages there — compress, candidate directions, comparison against the
noise floor, evaluation (vanilla ASR, over-refusal, borderline prompts, perplexity) — then prints
the seconds of each stage, the evaluation's parts, the peak resident memory, and the issue's goal
(3 minutes a point on 2 cores). Run it alone: another torch process on 2 cores slows both ~10×.

``--set`` changes the point's settings as ``refusalkit sweep --set`` does, e.g. the issue's
figure set (vanilla ASR on 100 prompts and perplexity, no over-refusal sets):
``--set evaluation.n_harmless=0 --set evaluation.borderline=none``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 180.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory with the base model finished")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--sparsity", help="pruning: one ratio or N:M")
    ap.add_argument("--bits", help="quantization: one bit width (default 4 for rtn / awq)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory (printed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for the point")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from refusalkit.core import artifacts
    from refusalkit.core.layout import RunLayout, recorded_config
    from refusalkit.study.sweep import build_points, run_point

    src = RunLayout(Path(args.run))
    if not (src.config.is_file() and src.eval("base", "asr.json").is_file()):
        print(f"error: {args.run} has no finished base model; run refusalkit run or sweep there first", file=sys.stderr)
        return 2
    from refusalkit.cli.parser import set_overrides
    from refusalkit.core.settings import apply_dotted

    cfg = recorded_config(src)
    apply_dotted(cfg, set_overrides(args.set))
    cfg.evaluation.attacks = ["vanilla"]
    bits = [args.bits] if args.bits else ([] if args.sparsity else ["4"])
    (point,) = build_points(cfg, [args.method], [args.sparsity] if args.sparsity else [], bits, [])

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-point-"))
    root = tmp / "run"
    root.mkdir()
    for name in ("config.yaml", "manifest.json"):
        if (src.root / name).is_file():
            shutil.copy2(src.root / name, root / name)
    for name in ("data", "base"):
        shutil.copytree(src.root / name, root / name)
    print(f"refusalkit sweep point {point.name} on {cfg.model} (threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)")  # fmt: skip
    t0 = time.time()
    rec = run_point(cfg, root, point, select=False, repair=False, drop_models=True, progress=False, echo=print)
    wall = time.time() - t0
    layout = RunLayout(root)

    def seconds(file: str, *keys: str) -> float | None:
        path = layout.eval(point.name, file)
        if not path.is_file():
            return None
        d = artifacts.read_json(path)
        for k in keys:
            d = (d or {}).get(k)
        return d

    parts = {
        "vanilla ASR": seconds("asr.json", "vanilla", "seconds"),
        "over-refusal": seconds("over_refusal.json", "seconds"),
        "borderline": seconds("borderline.json", "seconds"),
        "perplexity": seconds("utility.json", "seconds"),
    }
    e = cfg.evaluation
    print("\nstage                 seconds")
    for stage, s in rec["seconds"].items():
        if stage != "total":
            print(f"  {stage:<20}{s:8.1f}")
    sizes = {"vanilla ASR": e.n_prompts, "over-refusal": e.n_harmless, "borderline": e.n_borderline,
             "perplexity": f"{e.ppl_tokens} tokens"}  # fmt: skip
    for part, s in parts.items():
        if s is not None:
            print(f"    evaluate: {part:<14}{s:7.1f}   ({sizes[part]} prompts, {e.max_new_tokens} new tokens)"
                  if part != "perplexity" else f"    evaluate: {part:<14}{s:7.1f}   ({sizes[part]})")  # fmt: skip
    other = rec["seconds"]["evaluate"] - sum(s for s in parts.values() if s is not None)
    print(f"    evaluate: loading etc.{other:7.1f}")
    print(f"  {'total':<20}{wall:8.1f}   (goal {GOAL_SECONDS:.0f} s: {'met' if wall <= GOAL_SECONDS else 'not met'})")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    print(f"cosine at the base source {rec['cosine_at_base_source']:.4f} (floor {rec['noise']['null_floor']:.4f}), "
          f"vanilla ASR {100 * rec['asr']['rate']:.0f}%")  # fmt: skip
    if args.keep:
        print(f"kept: {root}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
