"""Benchmark: prefilling without the padding (0.7.1), before and after, one command.

    python benchmarks/bench_prefill.py [--model default] [--n 100] [--max-new-tokens 32] [--batch-size 128]

On the evaluation's three prompt sets (the first ``--n`` Alpaca instructions, as over-refusal
uses them; the last ``--n`` AdvBench prompts; the first ``--n`` borderline prompts), greedy, in one
process, each set twice:

* **before**: one padded prefill per decode batch (every suffix padded to the batch's longest)
  and the output head applied to the strided last-position view, as up to 0.7.0;
* **after**: the batch prefilled in runs of similar length whose caches are merged
  (:func:`refusalkit.models.generation.length_batches`, :func:`~refusalkit.models.kv_cache.merge_padded`)
  and the head reading a contiguous copy (:func:`~refusalkit.models.generation.contiguous_head`).

Then the selection-style forward pass (:func:`refusalkit.direction.forward.forward_last`, last-
position logits) over 64 harmful + 64 harmless training-split-sized prompt sets, before and after.
Prints seconds, new tokens per second, the suffix tokens prefilled (real and padded), and whether
the completions (and the logits, to float tolerance) are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from refusalkit.data.prompts import load_prompts
    from refusalkit.direction import forward
    from refusalkit.models import generation
    from refusalkit.models.chat import tokenize_instructions
    from refusalkit.models.generation import STATS, generate_ids
    from refusalkit.models.loading import load_model
    from refusalkit.models.sampler import GREEDY

    lm = load_model(args.model)
    tok = lm.tokenizer
    after_overhead, after_head = generation.CPU_FORWARD_OVERHEAD, generation.contiguous_head

    def mode(name: str) -> None:
        before = name == "before"
        generation.CPU_FORWARD_OVERHEAD = 10**12 if before else after_overhead  # one batch per forward
        head = (lambda model: contextlib.nullcontext()) if before else after_head
        generation.contiguous_head = forward.contiguous_head = head

    generate_ids(lm, tokenize_instructions(tok, ["Hello.", "Hi."]), [GREEDY], max_new_tokens=2)  # warm-up
    sets = {
        "Alpaca (over-refusal)": load_prompts("alpaca")[: args.n],
        "AdvBench (vanilla)": load_prompts("advbench")[-args.n :],
        "borderline": load_prompts("borderline")[: args.n],
    }
    rows, same = [], {}
    for label, prompts in sets.items():
        ids = tokenize_instructions(tok, prompts)
        outs = {}
        for name in ("before", "after"):
            mode(name)
            for k in STATS:
                STATS[k] = 0
            t = time.perf_counter()
            outs[name] = generate_ids(lm, ids, [GREEDY], max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            dt = time.perf_counter() - t
            rows.append((label, name, STATS["new_tokens"], dt, STATS["prefill_tokens"], STATS["prefill_padded"]))
        same[label] = sum(a == b for a, b in zip(outs["before"], outs["after"]))

    harmful, harmless = load_prompts("advbench")[:64], load_prompts("alpaca")[:64]
    ids = tokenize_instructions(tok, harmful + harmless)
    fwd, logits = [], {}
    for name in ("before", "after"):
        mode(name)
        forward.STATS["tokens"] = forward.STATS["padded_tokens"] = 0
        t = time.perf_counter()
        logits[name] = forward.forward_last(lm.model, ids, pad_id=tok.pad_token_id, batch_size=args.batch_size)
        fwd.append((name, time.perf_counter() - t, forward.STATS["tokens"], forward.STATS["padded_tokens"]))
    mode("after")
    diff = float((logits["before"] - logits["after"]).abs().max())

    cpu = platform.processor() or platform.machine()
    print(
        f"\nmodel {args.model} ({lm.info.get('dtype')}); {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; greedy, {args.max_new_tokens} new tokens at most, batch {args.batch_size} rows"
    )
    print("| prompts | path | new tokens | seconds | new tokens/s | suffix tokens prefilled (real / with padding) |")
    print("|---|---|---|---|---|---|")
    for label, name, ntok, dt, real, padded in rows:
        print(f"| {label} | {name} | {ntok} | {dt:.1f} | {ntok / dt:.1f} | {real} / {padded} |")
    print("\nidentical completions (before vs after): " + ", ".join(f"{k} {v}/{args.n}" for k, v in same.items()))
    print("\n| forward_last, 64 + 64 prompts, logits | seconds | tokens (real / with padding) |")
    print("|---|---|---|")
    for name, dt, real, padded in fwd:
        print(f"| {name} | {dt:.1f} | {real} / {padded} |")
    print(f"largest |logit difference| before vs after: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
