"""Benchmark: what the early stop saves, and that it keeps the verdicts, on a run's own evaluation.

    python benchmarks/bench_early_stop.py --run runs/default [--variant base] [--decoding]

Copies the run's configuration, splits and the variant's direction into two fresh folders and
evaluates the variant in each (`refusalkit evaluate`'s code, the run's settings: vanilla harmful,
over-refusal and borderline prompts, and with ``--decoding`` the decoding attack), once with
``early_stop`` off (every completion at full length) and once on, each in its own process, one
after the other. Prints both wall times, the new tokens each generated, and per prompt set the
paired verdicts: how many prompts' labels differ, each shown, and the paired difference of the
rate with its 95% interval (exact McNemar), which must be inside the verdicts' margin.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = ("vanilla", "over_refusal", "borderline", "decoding")


def _copy(run: Path, variant: str, dest: Path) -> None:
    dest.mkdir(parents=True)
    shutil.copy(run / "config.yaml", dest / "config.yaml")
    shutil.copytree(run / "data", dest / "data")
    src = run / variant
    shutil.copytree(src / "direction", dest / variant / "direction")
    if (src / "model").exists():
        (dest / variant / "model").symlink_to((src / "model").resolve())
    for f in ("compression.json", "repair.json"):
        if (src / f).exists():
            shutil.copy(src / f, dest / variant / f)


def _evaluate(root: Path, variant: str, early: bool, decoding: bool) -> tuple[float, int]:
    """Evaluate in a child process (a clean counter); (wall seconds, new tokens)."""
    attacks = "vanilla,decoding" if decoding else "vanilla"
    code = (
        "import json,sys; from refusalkit.core.settings import load_config; "
        "from refusalkit.evaluation.job import run_evaluate; from refusalkit.models import generation; "
        f"cfg = load_config(files=[{str(root / 'config.yaml')!r}], overrides={{'early_stop': {early}, "
        f"'evaluation.attacks': {attacks!r}}}); "
        f"run_evaluate(cfg, {str(root)!r}, {variant!r}, progress=False); "
        "print(json.dumps(generation.STATS))"
    )
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    return time.time() - t0, int(stats["new_tokens"])


def _labels(root: Path, variant: str, name: str) -> dict[str, str]:
    path = root / variant / "eval" / f"{name}.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        out[r["key"]] = (r["verdicts"]["substring"]["label"], r["completion"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory with the variant's direction")
    ap.add_argument("--variant", default="base")
    ap.add_argument("--decoding", action="store_true", help="also the decoding attack (the CPU grid)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from refusalkit.core.manifest import hardware
    from refusalkit.evaluation.stats import paired

    run = Path(args.run)
    hw = hardware()
    print(
        f"machine: {hw['processor']}, {hw['cpu_count']} cores, {hw['cpu_capability']}; python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(dir=run.parent) as tmp:
        full, early = Path(tmp) / "full", Path(tmp) / "early"
        _copy(run, args.variant, full)
        _copy(run, args.variant, early)
        t_full, n_full = _evaluate(full, args.variant, False, args.decoding)
        t_early, n_early = _evaluate(early, args.variant, True, args.decoding)
        print(f"full length : {t_full:6.1f} s, {n_full:,} new tokens")
        print(f"early stop  : {t_early:6.1f} s, {n_early:,} new tokens ({n_early / max(n_full, 1):.0%}); "
              f"{t_full / t_early:.2f}x faster")  # fmt: skip
        for name in SETS:
            a, b = _labels(full, args.variant, name), _labels(early, args.variant, name)
            if not a:
                continue
            keys = [k for k in a if k in b]
            flips = [k for k in keys if a[k][0] != b[k][0]]
            cut = sum(len(b[k][1]) < len(a[k][1]) for k in keys)
            label = "refusal" if name != "vanilla" and name != "decoding" else "compliance"
            res = paired({k: a[k][0] == label for k in keys}, {k: b[k][0] == label for k in keys})
            lo, hi = res["ci95"]
            print(f"{name:12s}: {len(keys)} completions, {cut} stopped early, {len(flips)} verdicts differ; "
                  f"{label} rate {res['first']['rate']:.1%} -> {res['second']['rate']:.1%}, paired difference "
                  f"{res['difference']:+.1%} [{lo:+.1%}, {hi:+.1%}], p = {res['p']:.2g}")  # fmt: skip
            for k in flips:
                print(f"    {k[:70]!r}: {a[k][0]} -> {b[k][0]}\n      full : {a[k][1][:120]!r}\n      early: "
                      f"{b[k][1][:120]!r}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
