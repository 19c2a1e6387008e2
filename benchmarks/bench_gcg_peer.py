"""Benchmark: refusalkit's GCG against nanogcg, its maintained peer, on the same problem, in one run.

    python benchmarks/bench_gcg_peer.py [--model smollm2-135m] [--steps 10] [--search-width 64]
                                        [--topk 256] [--batch 32] [--seeds 0 1] [--goal N]

Both optimize one suffix (Zou et al. Alg. 1) for the same AdvBench goal (``--goal``: its index,
default the last) and target (``"Sure, here is how to ..."``), from the same initial suffix (20 "!"),
with the same steps, candidates per step (search width), top-k substitutions and candidates per
forward pass (``--batch``), no early stop and no non-ASCII tokens; the model is loaded once and
both run in this process. Printed per seed: seconds per step of each and their ratio, and the best
loss after the last step (mean cross-entropy of the target tokens, the quantity both minimize; the
two draw their candidates from different random streams, so one seed's losses differ by chance:
compare them over seeds).

nanogcg (``pip install --no-deps nanogcg``: it pins an old transformers) runs with
``use_prefix_cache=False``: its prefix cache indexes the KV cache as tuples, which current
transformers no longer returns. refusalkit caches the prompt's prefix (the chat template and the
goal) once per attack, so each candidate forward covers only the suffix, the template's tail and
the target. What nanogcg has no counterpart for (universal suffixes over several prompts, transfer
of suffixes between variants, attacks under a directional ablation) is why refusalkit keeps its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--search-width", type=int, default=64)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="candidates per forward pass (both)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--goal", type=int, default=-1, help="index of the AdvBench goal")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import nanogcg
    except ImportError:
        print("nanogcg is not installed; run: pip install --no-deps nanogcg", file=sys.stderr)
        return 2
    import logging

    import torch

    from refusalkit import __version__
    from refusalkit.data.prompts import load_prompts
    from refusalkit.evaluation import gcg as G
    from refusalkit.models.loading import load_model, resolve_device

    lm = load_model(args.model, dtype=args.dtype, device=resolve_device("auto"))
    goal = load_prompts("advbench")[args.goal]
    target = G.default_target(goal)
    init = " ".join(["!"] * 20)
    cuda = lm.device.type == "cuda"
    where = (
        torch.cuda.get_device_name()
        if cuda
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"refusalkit {__version__}, nanogcg {getattr(nanogcg, '__version__', '0.3.0')}, torch {torch.__version__}")
    print(f"model {lm.spec} ({next(lm.model.parameters()).dtype}) on {lm.device} ({where})")
    print(
        f"goal: {goal!r}; {args.steps} steps, search width {args.search_width}, top-k {args.topk}, {args.batch} per forward"
    )
    logging.getLogger("nanogcg").setLevel(logging.WARNING)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def ours(seed: int, steps: int) -> tuple[float, float]:
        cfg = G.GCGConfig(
            n_steps=steps,
            search_width=args.search_width,
            topk=args.topk,
            suffix_init=init,
            seed=seed,
            eval_batch_size=args.batch,
            early_stop=False,
            progressive=False,
        )
        sync()
        t0 = time.perf_counter()
        res = G.gcg(lm, [goal], [target], cfg)
        sync()
        return (time.perf_counter() - t0) / max(1, res.n_steps), res.best_loss

    def peer(seed: int, steps: int) -> tuple[float, float]:
        cfg = nanogcg.GCGConfig(
            num_steps=steps,
            optim_str_init=init,
            search_width=args.search_width,
            batch_size=args.batch,
            topk=args.topk,
            early_stop=False,
            use_prefix_cache=False,
            allow_non_ascii=False,
            seed=seed,
            verbosity="WARNING",
        )
        sync()
        t0 = time.perf_counter()
        res = nanogcg.run(lm.model, lm.tokenizer, goal + " {optim_str}", target, cfg)
        sync()
        return (time.perf_counter() - t0) / steps, res.best_loss

    ours(0, 1), peer(0, 1)  # warm-up: kernels, allocator
    print(
        f"{'seed':>4} {'refusalkit s/step':>18} {'nanogcg s/step':>15} {'ratio':>6} {'loss refusalkit':>16} {'loss nanogcg':>13}"
    )
    for seed in args.seeds:
        (a, la), (b, lb) = ours(seed, args.steps), peer(seed, args.steps)
        print(f"{seed:>4} {a:>18.2f} {b:>15.2f} {b / a:>6.2f} {la:>16.3f} {lb:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
