"""Benchmark: every compression method on a model (default: the embedded default model), one command.

    python benchmarks/bench_compress.py [--model default] [--run runs/bench-compress] [--methods ...]

For each method it runs ``refusalkit compress`` in a fresh process (so the peak RSS is that of
the compression alone) with the default calibration (32 windows of 256 tokens of the bundled
Wikipedia text), then loads the variant and measures:

* wall time and peak RSS of the compression (from ``compression.json``),
* measured sparsity over all pruned matrices, and bits,
* perplexity on held-out Wikipedia text (every tenth article, never used for calibration),
  non-overlapping 512-token windows, ``--ppl-tokens`` tokens,
* the refusal rate on the first ``--n-refusal`` AdvBench prompts (greedy, chat template,
  ``--max-new-tokens`` tokens, refusalkit's substring judge).

Variants that exist in the run directory are reused (delete them, or use a new --run, to time again).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_METHODS = ["magnitude-0.5", "wanda-0.5", "sparsegpt-0.5", "wanda-2:4", "llm-int8", "awq-w8", "awq-w4", "rtn-w4"]


def evaluate(model: str, path: str | None, ppl_ids: list[int], prompts: list[str], max_new_tokens: int) -> dict:
    from refusalkit.data.prompts import load_refusal_phrases
    from refusalkit.data.refusal import SubstringJudge, summarize
    from refusalkit.direction.generate import generate
    from refusalkit.evaluation.perplexity import perplexity
    from refusalkit.models.chat import tokenize_instructions
    from refusalkit.models.loading import load_model

    lm = load_model(model, dtype="auto", device="auto", path_override=path)
    t = time.time()
    ppl = perplexity(lm, ppl_ids)
    t_ppl = time.time() - t
    t = time.time()
    outs = generate(lm, tokenize_instructions(lm.tokenizer, prompts), max_new_tokens=max_new_tokens, batch_size=32)
    verdicts = SubstringJudge(load_refusal_phrases()).judge_many(prompts, outs)
    s = summarize(verdicts)
    res = {
        "perplexity": ppl["perplexity"],
        "ppl_tokens": ppl["n_tokens"],
        "ppl_seconds": round(t_ppl, 1),
        "refusal_rate": s["refusal_rate"],
        "degenerate_rate": s["degenerate_rate"],
        "gen_seconds": round(time.time() - t, 1),
        "example": outs[0][:120],
    }
    del lm
    gc.collect()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--run", default="runs/bench-compress")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--n-refusal", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer

    from refusalkit.data.corpus import corpus_ids
    from refusalkit.data.prompts import load_prompts
    from refusalkit.models.loading import resolve_model

    root = Path(args.run)
    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    ppl_ids = corpus_ids(tok, "wikipedia", held_out=True)[: args.ppl_tokens + 512]
    prompts = load_prompts("advbench")[: args.n_refusal]
    rows = [{"method": "base (uncompressed)", **evaluate(args.model, None, ppl_ids, prompts, args.max_new_tokens)}]
    print(f"base: {rows[0]}", file=sys.stderr, flush=True)
    for m in args.methods:
        t = time.time()
        cmd = [
            sys.executable,
            "-m",
            "refusalkit.cli",
            "-q",
            "compress",
            "--run",
            str(root),
            "--method",
            m,
            "--model",
            args.model,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{m}: compress failed: {proc.stderr.strip()}", file=sys.stderr)
            continue
        name = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("variant "))
        info = json.loads((root / name / "compression.json").read_text())
        ev = evaluate(args.model, str(root / name / "model"), ppl_ids, prompts, args.max_new_tokens)
        row = {
            "method": name,
            "wall_seconds": info["wall_seconds"],
            "peak_rss_gb": info["peak_rss_bytes"] / 2**30,
            "sparsity": info["sparsity"],
            "bits": info.get("bits"),
            "size_mib": info["size_on_disk_bytes"] / 2**20,
            "calibration_tokens": (info.get("calibration") or {}).get("n_tokens"),
            **ev,
        }
        rows.append(row)
        print(f"{name}: {row} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)

    cpu = platform.processor() or platform.machine()
    print(
        f"\nmodel {args.model}; {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; perplexity on {rows[0]['ppl_tokens']} held-out Wikipedia tokens; "
        f"refusal on {len(prompts)} AdvBench prompts, greedy, {args.max_new_tokens} tokens"
    )
    print(
        f"| {'variant':20s} | time s | peak RSS GB | sparsity | bits | size MiB | perplexity | refusal | degenerate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "–"
        rss = f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else "–"
        sp = f"{r['sparsity']:.1%}" if "sparsity" in r else "–"
        bits = str(r.get("bits") or "–")
        size = f"{r['size_mib']:.0f}" if "size_mib" in r else "–"
        print(
            f"| {r['method']:20s} | {t} | {rss} | {sp} | {bits} | {size} | {r['perplexity']:.2f} | "
            f"{r['refusal_rate']:.1%} | {r['degenerate_rate']:.1%} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
