"""Benchmark: extract + select on a model (default: the embedded default model), one command.

    python benchmarks/bench_extract.py [--model default] [--compare-full]

Prints: wall time of extraction and of selection, tokens/s of the activation passes, their
achieved GFLOP/s against a float32 matmul peak measured in the same run, peak RSS against the
float model's size, and (with --compare-full) whether the fast selection picks the same
candidate as full scoring of every candidate.

FLOPs of a forward pass are counted as 2 · (non-embedding parameters) per token processed
(prefix tokens once per batch call, suffix tokens per prompt, padding included for the
batch matmuls); attention-score FLOPs are left out (short prompts), so the figure is a
slight underestimate of the work done.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def matmul_peak(n: int = 2048, reps: int = 4, trials: int = 5) -> float:
    """Best of ``trials`` timings of ``reps`` float32 n×n matmuls (GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--compare-full", action="store_true", help="also run full scoring of every candidate")
    ap.add_argument("--out", help="write the selection scores (fast, and full if run) to this JSON file")
    args = ap.parse_args()

    from refusalkit import load_config, load_model
    from refusalkit.data.prompts import load_prompts, refusal_first_phrases, split_prompts
    from refusalkit.direction.extract import candidate_directions, mean_activations
    from refusalkit.direction.forward import STATS
    from refusalkit.direction.select import Scorer, refusal_token_ids, select_direction
    from refusalkit.models.chat import post_instruction_ids, tokenize_instructions

    cfg = load_config(overrides={"model": args.model, "n_train": args.n_train, "n_val": args.n_val})
    peak = matmul_peak()
    t0 = time.perf_counter()
    lm = load_model(cfg.model, dtype="float32", device="cpu")
    t_load = time.perf_counter() - t0
    n_embed = lm.model.get_input_embeddings().weight.numel()
    out_emb = lm.model.get_output_embeddings()
    n_head = out_emb.weight.numel() if out_emb is not None else 0
    n_body = (
        sum(p.numel() for p in lm.model.parameters())
        - n_embed
        - (n_head if out_emb.weight is not lm.model.get_input_embeddings().weight else 0)
    )
    model_gb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**30

    splits = {
        k: split_prompts(load_prompts(src), cfg.n_train, cfg.n_val, 0, cfg.seed)
        for k, src in (("harmful", cfg.harmful), ("harmless", cfg.harmless))
    }
    post = post_instruction_ids(lm.tokenizer)
    t1 = time.perf_counter()
    STATS["tokens"] = STATS["padded_tokens"] = 0
    means = {
        k: mean_activations(lm, tokenize_instructions(lm.tokenizer, s.train), len(post)) for k, s in splits.items()
    }
    t_extract = time.perf_counter() - t1
    tokens, padded = STATS["tokens"], STATS["padded_tokens"]
    cands = candidate_directions(means["harmful"], means["harmless"])

    rids = refusal_token_ids(lm.tokenizer, refusal_first_phrases())
    val = {k: tokenize_instructions(lm.tokenizer, s.val) for k, s in splits.items()}
    sc = cfg.selection
    t2 = time.perf_counter()
    scorer = Scorer(lm, val["harmful"], val["harmless"], rids, len(post))
    fast = select_direction(
        lm, cands, scorer, mode="fast", screen_prompts=sc.screen_prompts, screen_keep=sc.screen_keep
    )
    t_select = time.perf_counter() - t2

    # Achieved throughput: the extraction passes, 2·N_body FLOPs per processed token (+ the output
    # head is skipped there), padding counted since the matmuls run over it.
    gflops = 2 * n_body * padded / t_extract / 1e9
    rows = [
        ("model", f"{args.model} ({lm.info['architecture']}, {lm.n_layers} layers, d={lm.d_model}, float32)"),
        ("model load", f"{t_load:.1f} s"),
        ("extraction", f"{t_extract:.1f} s for {2 * cfg.n_train} prompts"),
        (
            "selection (fast)",
            f"{t_select:.1f} s -> layer {fast.layer}, position {fast.position}"
            f"{' (fallback)' if fast.fallback else ''}; {fast.n_fully_scored} fully scored",
        ),
        ("extract + select", f"{t_extract + t_select:.1f} s (goal <= 300 s)"),
        ("activation passes", f"{tokens / t_extract:.0f} tokens/s ({padded / t_extract:.0f} incl. padding)"),
        ("achieved", f"{gflops:.0f} GFLOP/s = {gflops / peak:.0%} of matmul peak {peak:.0f} GFLOP/s (goal >= 50%)"),
        (
            "peak RSS",
            f"{peak_rss_gb():.2f} GB vs float model {model_gb:.2f} GB = {peak_rss_gb() / model_gb:.2f}x (goal <= 1.5x)",
        ),
    ]
    if args.compare_full:
        t3 = time.perf_counter()
        full = select_direction(lm, cands, scorer, mode="full")
        rows.append(
            (
                "selection (full)",
                f"{time.perf_counter() - t3:.1f} s -> layer {full.layer}, position {full.position}; "
                f"same choice as fast: {(full.layer, full.position) == (fast.layer, fast.position)}",
            )
        )
    rows.append(("peak (end of run)", f"{matmul_peak():.0f} GFLOP/s"))
    if args.out:
        import json

        with open(args.out, "w") as f:
            json.dump({"fast": fast.to_json(), "full": full.to_json() if args.compare_full else None}, f, indent=1)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
