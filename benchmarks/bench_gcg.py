"""Benchmark: where a GCG step's time goes, and how it depends on ``eval_batch_size``.

    python benchmarks/bench_gcg.py [--model default] [--steps 10] [--search-width 512]
                                   [--eval-batch-sizes 64,512] [--goals 1]
    python benchmarks/bench_gcg.py --random-weights DIR ...   # DIR: config.json + tokenizer files

Runs refusalkit's GCG (Zou et al. Alg. 1, or Alg. 2 with ``--goals`` > 1) for ``--steps`` steps
without early stopping, once per candidate batch size, and prints seconds per step split into
its phases: the gradient (one forward + backward per goal), sampling the candidates, the
retokenization filter (decode + encode of every candidate, on the CPU), and the exact losses of
the candidates (``eval_batch_size`` candidates per forward, the prompt's prefix cached). On a GPU
each phase is timed with ``torch.cuda.synchronize`` around it.

``--random-weights DIR`` builds the model from ``DIR/config.json`` with random weights (a GCG
step costs the same whatever the weights; only the suffix found differs): a way to time a model
whose weights are not on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--random-weights", help="folder with config.json and tokenizer files: random weights")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--search-width", type=int, default=512)
    ap.add_argument("--eval-batch-sizes", default="64,512")
    ap.add_argument("--goals", type=int, default=1, help="prompts optimized together (1: per prompt)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from refusalkit.data.prompts import load_prompts
    from refusalkit.evaluation import gcg as G
    from refusalkit.models.loading import LoadedModel, load_model, resolve_device, resolve_dtype

    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(args.dtype, device)
        torch.manual_seed(0)
        conf = AutoConfig.from_pretrained(args.random_weights)
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype).to(device).eval()
        tok = AutoTokenizer.from_pretrained(args.random_weights)
        lm = LoadedModel(model=model, tokenizer=tok, spec=args.random_weights, source="random weights")
    else:
        lm = load_model(args.model, dtype=args.dtype, device=resolve_device("auto"))
    cuda = lm.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            times[name] += time.perf_counter() - t
            return out

        return wrapper

    # Time the phases of every step by wrapping the objective's methods and the sampler.
    G.GCGObjective.gradient = timed("gradient", G.GCGObjective.gradient)
    G.GCGObjective.consistent = timed("retokenization filter", G.GCGObjective.consistent)
    G.GCGObjective.losses = timed("candidate losses", G.GCGObjective.losses)
    from refusalkit.evaluation.gcg import attack as GA  # the optimization loop looks these up in its own module

    GA.sample_candidates = timed("sampling", GA.sample_candidates)
    GA.top_k_substitutions = timed("sampling", GA.top_k_substitutions)

    goals = load_prompts("advbench")[-args.goals :]
    targets = [G.default_target(g) for g in goals]
    n_params = sum(p.numel() for p in lm.model.parameters())
    print(
        f"model {lm.spec} ({n_params / 1e6:.0f}M parameters, {next(lm.model.parameters()).dtype}) on {lm.device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if cuda
            else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    )
    print(f"GCG: {args.steps} steps, search width {args.search_width}, top-k 256, {len(goals)} goal(s), no early stop")
    print(
        f"{'eval batch':>10} {'s/step':>8}  "
        + "  ".join(f"{k:>22}" for k in ("gradient", "sampling", "retokenization filter", "candidate losses"))
    )
    for bs in [int(x) for x in args.eval_batch_sizes.split(",")]:
        cfg = G.GCGConfig(
            n_steps=args.steps, search_width=args.search_width, eval_batch_size=bs, early_stop=False, progressive=False
        )
        G.gcg(
            lm,
            goals,
            targets,
            G.GCGConfig(
                n_steps=1,
                search_width=min(64, args.search_width),
                eval_batch_size=bs,
                early_stop=False,
                progressive=False,
            ),
        )  # warm-up
        times.clear()
        sync()
        t0 = time.perf_counter()
        res = G.gcg(lm, goals, targets, cfg)
        sync()
        per = (time.perf_counter() - t0) / max(1, res.n_steps)
        cols = [
            times[k] / max(1, res.n_steps)
            for k in ("gradient", "sampling", "retokenization filter", "candidate losses")
        ]
        print(
            f"{bs:>10} {per:>8.3f}  "
            + "  ".join(f"{c:>20.3f} s" for c in cols)
            + f"   (loss {res.initial_loss:.2f} -> {res.best_loss:.2f})"
        )
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
