"""Benchmark: generation throughput and the cost of each attack per prompt, one command.

    python benchmarks/bench_eval.py [--model default] [--n 32] [--max-new-tokens 64] [--gcg-steps 5]

Prints, on the same model in the same process:

* greedy generation throughput (new tokens per second) of refusalkit's batched sampler (left
  padding, the shared chat-template prefix run once, one prefill per prompt suffix, every row
  decoded together; and the same with whole prompts prefilled, as before 0.5.0), of Hugging Face ``generate`` on
  the same batches, and of a one-prompt-at-a-time ``generate`` loop — the completions of the
  three paths are checked to be identical;
* the decoding attack's throughput with the prompt's cache shared across configurations;
* the cost per prompt of each attack: vanilla (1 greedy completion), decoding (the CPU-sized
  grid: greedy + 7 configurations, with and without the system prompt), and GCG (seconds per
  step at the CPU defaults: 64 candidates, top-k 256, 20-token suffix), extrapolated to the
  configured number of steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _tokens(tok, texts: list[str]) -> int:
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=32, help="prompts for the throughput comparison")
    ap.add_argument("--n-single", type=int, default=8, help="prompts for the one-at-a-time loop (slow)")
    ap.add_argument("--n-decoding", type=int, default=4, help="prompts for the decoding attack timing")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--gcg-steps", type=int, default=3, help="GCG steps timed (the cost is per step)")
    ap.add_argument(
        "--gcg-planned-steps", type=int, default=20, help="steps of the CPU default, for the per-prompt cost"
    )
    ap.add_argument("--gcg-search-width", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from refusalkit.data.prompts import load_prompts
    from refusalkit.evaluation.gcg import GCGConfig, default_target, gcg
    from refusalkit.evaluation.plan import SYSTEM_NONE
    from refusalkit.evaluation.sampling import GREEDY, sample, small_grid
    from refusalkit.models.chat import tokenize_instructions
    from refusalkit.models.generation import batches, default_stop_ids, pad_left
    from refusalkit.models.loading import load_model

    lm = load_model(args.model)
    tok = lm.tokenizer
    prompts = load_prompts("advbench")[-args.n :]  # the end of AdvBench: never in a default run's training split order
    ids = tokenize_instructions(tok, prompts)
    T = args.max_new_tokens
    rows = []

    t = time.time()
    ours = [c[0] for c in sample(lm, ids, [GREEDY], max_new_tokens=T, batch_size=args.batch_size)]
    dt = time.time() - t
    n_tok = _tokens(tok, ours)
    rows.append(("refusalkit sampler, batched", len(ids), n_tok, dt))

    # the shared chat-template prefix run once (0.5.0) against every prompt prefilled whole (before)
    from refusalkit.evaluation.sampling import sample_ids

    t = time.time()
    whole = sample_ids(lm, ids, [GREEDY], max_new_tokens=T, batch_size=args.batch_size, share_prefix=False)
    dt = time.time() - t
    whole_text = [tok.decode(r[0], skip_special_tokens=True).strip() for r in whole]
    rows.append(
        ("refusalkit sampler, batched, whole prompts prefilled (before 0.5.0)", len(ids), _tokens(tok, whole_text), dt)
    )
    same_prefix = sum(a == b for a, b in zip(ours, whole_text))

    stop = set(default_stop_ids(lm))

    def generate(lm, rows, max_new_tokens, batch_size):
        """Hugging Face ``generate(do_sample=False)`` on left-padded batches (refusalkit's own greedy
        path is the sampler above), each completion cut after its first stop token."""
        out = []
        for sl in batches(len(rows), batch_size):
            x, mask = pad_left(rows[sl], tok.pad_token_id, lm.device)
            with torch.inference_mode():
                gen = lm.model.generate(
                    input_ids=x,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            for row in gen[:, x.shape[1] :].tolist():
                row = row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))]
                out.append(tok.decode(row, skip_special_tokens=True).strip())
        return out

    t = time.time()
    hf = generate(lm, ids, max_new_tokens=T, batch_size=args.batch_size)
    dt = time.time() - t
    rows.append(("HF generate, batched", len(ids), _tokens(tok, hf), dt))

    k = min(args.n_single, len(ids))
    t = time.time()
    single = [generate(lm, [x], max_new_tokens=T, batch_size=1)[0] for x in ids[:k]]
    dt = time.time() - t
    rows.append(("HF generate, one prompt at a time", k, _tokens(tok, single), dt))
    same = sum(a == b for a, b in zip(ours, hf))
    same_single = sum(a == b for a, b in zip(ours[:k], single))

    decs = [GREEDY] + small_grid()
    dp = prompts[: args.n_decoding]
    t = time.time()
    n_dec_tok = 0
    for system in (None, SYSTEM_NONE):
        outs = sample(
            lm, tokenize_instructions(tok, dp, system), decs, max_new_tokens=T, batch_size=args.batch_size, keys=dp
        )
        n_dec_tok += _tokens(tok, [c for row in outs for c in row])
    dec_dt = time.time() - t
    rows.append(
        (f"decoding attack ({len(decs)} configs x 2 system settings)", len(dp) * len(decs) * 2, n_dec_tok, dec_dt)
    )

    cfg = GCGConfig(n_steps=args.gcg_steps, search_width=args.gcg_search_width, topk=256, early_stop=False)
    goal = prompts[0]
    t = time.time()
    res = gcg(lm, [goal], [default_target(goal)], cfg)
    gcg_dt = time.time() - t
    per_step = gcg_dt / max(res.n_steps, 1)

    cpu = platform.processor() or platform.machine()
    print(
        f"\nmodel {args.model} ({lm.info['dtype']}); {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; AdvBench prompts, {T} new tokens at most, batch {args.batch_size} rows"
    )
    print("| path | completions | new tokens | seconds | new tokens/s |")
    print("|---|---|---|---|---|")
    for name, n, ntok, dt in rows:
        print(f"| {name} | {n} | {ntok} | {dt:.1f} | {ntok / dt:.1f} |")
    print(
        f"\nidentical greedy completions: sampler vs HF batched {same}/{len(ours)}, "
        f"sampler vs one-at-a-time {same_single}/{k}, shared prefix vs whole prompts {same_prefix}/{len(ours)}"
    )
    vanilla = rows[0][3] / rows[0][1]
    print("\n| attack | cost per prompt |")
    print("|---|---|")
    print(f"| vanilla (1 greedy completion, batched) | {vanilla:.2f} s |")
    print(f"| decoding ({len(decs)} x 2 completions, shared prompt cache) | {dec_dt / len(dp):.1f} s |")
    print(
        f"| GCG ({args.gcg_search_width} candidates/step) | {per_step:.1f} s per step; "
        f"{per_step * args.gcg_planned_steps:.0f} s for {args.gcg_planned_steps} steps (loss {res.losses[0]:.2f} -> {res.best_loss:.2f} "
        f"in {res.n_steps} steps) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
