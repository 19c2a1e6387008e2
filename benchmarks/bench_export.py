"""Benchmark: does a repair survive export? One command, on a finished run:

    python benchmarks/bench_export.py --run runs/default [--variant wanda-0.5+aird] [--types q8_0 q4_0 q4_k_m]

For each type it exports the repaired variant and its unrepaired source as GGUF with ``--check``
(each file read back by transformers' GGUF loader, registered as ``<variant>.<type>`` and evaluated
with the run's prompts and judge, and, with llama-cpp-python installed, run again in llama.cpp; the
k-quants need it), then prints per type and model: the file size against the dense
checkpoint, how much of the repair's edit the type keeps (per edited matrix), the exported model's
vanilla ASR and over-refusal paired against the same model before export (the export keeps the
verdict when the paired interval lies inside the margin), and, per runtime, the repaired file's ASR
paired against the unrepaired file of the same type (does the repair survive the type?). Exports go to
``--out`` (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--variant", default="wanda-0.5+aird", help="a repaired variant of the run")
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0", "q4_k_m"])
    ap.add_argument("--out", help="keep the exports in this folder")
    args = ap.parse_args()
    import torch

    from refusalkit import __version__
    from refusalkit.core import artifacts
    from refusalkit.core.layout import RunLayout, recorded_config
    from refusalkit.evaluation.records import read_records
    from refusalkit.evaluation.stats import judged_outcomes, paired
    from refusalkit.export.job import run_export
    from refusalkit.export.recheck import RECORDS, text

    layout = RunLayout(args.run)
    cfg = recorded_config(layout)
    source = artifacts.read_json(layout.repair_info(args.variant))["source_variant"]
    print(f"refusalkit {__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows = []
    for typ in args.types:
        for name in (args.variant, source):
            t0 = time.time()
            rec = run_export(
                cfg, layout, name, "gguf", out_root / f"{name}-{typ}", typ, force=True, check=True, progress=False
            )
            rows.append((typ, name, rec, time.time() - t0))
            kept = ", ".join(
                f"{k.split('.')[-2]}: {v['kept']:.3f}" for k, v in (rec.get("edit_survival") or {}).items()
            )
            print(
                f"\n{name} {typ}: {rec['size_bytes'] / 2**20:.0f} MiB (dense {rec['dense_bytes'] / 2**20:.0f} MiB), "
                f"{time.time() - t0:.0f} s; edit kept: {kept or '-'}; export keeps the verdict: {rec['recheck']['verdict']}"
            )
            for line in text(rec["recheck"]):
                print("  " + line)
        label = RECORDS["vanilla"][1]
        for runtime, folder in (("transformers", "eval"), ("llama.cpp", "eval-llama.cpp")):
            a = judged_outcomes(read_records(layout.variant(f"{source}.{typ}") / folder / "vanilla.jsonl"), label)
            b = judged_outcomes(read_records(layout.variant(f"{args.variant}.{typ}") / folder / "vanilla.jsonl"), label)
            if not (a and b):
                continue
            res = paired(a, b)
            lo, hi = res["ci95"]
            print(
                f"repair in {typ} ({runtime}): ASR {100 * res['first']['rate']:.0f}% -> "
                f"{100 * res['second']['rate']:.0f}% ({100 * res['difference']:+.0f} pt [{100 * lo:+.0f}, "
                f"{100 * hi:+.0f}], +{res['only_second']}/-{res['only_first']} prompts, p = {res['p']:.2g})"
            )
    if not args.out:
        import shutil

        shutil.rmtree(out_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
