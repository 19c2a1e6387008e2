"""Benchmark: refusalkit's pure-PyTorch LLM.int8 layer, int8 matmul (torch._int_mm) against the
float path that converts the int8 codes on every call, on a saved llm-int8 variant. One command:

    python benchmarks/bench_int8.py --variant-dir RUN/llm-int8 [--n 32] [--max-new-tokens 32]

(make the variant with ``refusalkit compress --run RUN --method llm-int8``). The model is loaded
with ``REFUSALKIT_INT8_BACKEND=torch`` (refusalkit's :class:`Int8Linear`, what runs when
bitsandbytes is not installed). Prints, for both paths on the same prompts: the time of a
last-position forward over ``n`` prompts (prefill-sized matmuls), greedy generation throughput
(decode-sized matmuls), and whether both paths gave identical logits and completions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant-dir", required=True, help="a run's llm-int8 variant folder (holding model/)")
    ap.add_argument("--n", type=int, default=32, help="AdvBench prompts")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    os.environ["REFUSALKIT_INT8_BACKEND"] = "torch"
    import torch

    from refusalkit.data.prompts import load_prompts
    from refusalkit.direction.forward import forward_last
    from refusalkit.evaluation.sampling import GREEDY, sample
    from refusalkit.models import int8 as int8_mod
    from refusalkit.models.chat import tokenize_instructions
    from refusalkit.models.loading import load_model

    lm = load_model("default", dtype="float32", device="cpu", path_override=os.path.join(args.variant_dir, "model"))
    n_int8 = sum(isinstance(m, int8_mod.Int8Linear) for m in lm.model.modules())
    if not n_int8:
        print("error: the model has no Int8Linear layer; give an llm-int8 variant", file=sys.stderr)
        return 2
    ids = tokenize_instructions(lm.tokenizer, load_prompts("advbench")[: args.n], None)
    plain = int8_mod.int8_matmul

    def measure(use_int_mm: bool) -> tuple[float, float, torch.Tensor, list[str]]:
        int8_mod.int8_matmul = lambda qa, cb, use_int_mm=use_int_mm: plain(qa, cb, use_int_mm)  # noqa: E731
        try:
            forward_last(lm.model, ids[:4], pad_id=lm.tokenizer.pad_token_id)  # warm-up
            t0 = time.perf_counter()
            logits = forward_last(lm.model, ids, pad_id=lm.tokenizer.pad_token_id, batch_size=64)
            t_fwd = time.perf_counter() - t0
            t0 = time.perf_counter()
            outs = [c[0] for c in sample(lm, ids, [GREEDY], max_new_tokens=args.max_new_tokens, batch_size=64)]
            t_gen = time.perf_counter() - t0
        finally:
            int8_mod.int8_matmul = plain
        return t_fwd, t_gen, logits, outs

    print(
        f"{n_int8} Int8Linear layers, {args.n} prompts, {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    res = {name: measure(flag) for name, flag in (("float codes", False), ("torch._int_mm", True))}
    new_tokens = args.n * args.max_new_tokens
    print(f"{'path':16s}{'forward s':>11s}{'generate s':>12s}{'new tok/s':>11s}")
    for name, (t_fwd, t_gen, _, _) in res.items():
        print(f"{name:16s}{t_fwd:11.2f}{t_gen:12.2f}{new_tokens / t_gen:11.1f}")
    (f0, g0, l0, o0), (f1, g1, l1, o1) = res["float codes"], res["torch._int_mm"]
    print(
        f"speed-up: forward {f0 / f1:.2f}x, generation {g0 / g1:.2f}x; identical logits: {torch.equal(l0, l1)}, "
        f"identical completions: {o0 == o1}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
