"""Benchmark: each stage of a run against this machine's limits, one command.

    python benchmarks/bench_stages.py --run DIR [--seconds 2]

Reads ``DIR/run.json`` (what ``refusalkit run`` recorded per stage: wall seconds and its model
forwards, split into prefill and decode with their own seconds: :mod:`refusalkit.core.counters`),
measures this machine's float32 matrix-product peak at the model's shapes (the blocks' projections
on 512 tokens, best of several timings) and its memory bandwidth (a large copy), and prints per
stage: tokens, the share of the stage's time spent in model forwards, the prefills' achieved GFLOP/s
and their fraction of the peak, the share of prefill tokens that were padding, the decode steps'
GFLOP/s and weight-read bandwidth against the measured bandwidth.

FLOPs are 2 per weight per token (the blocks for every token, the output head once per prefill row
and per decoded token); attention's own products are left out, so the rates are slight
underestimates. Work outside the model's forward (compression's calibration, the repair screen's
block-by-block passes, judging, writing files) is in a stage's seconds but not in its forwards; a
stage whose prefills took under half a second in all (compression's calibration forwards stop at the
first block) shows no prefill rate.
Run it on the machine that made the run, alone: the peak is this machine's now.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def best_rate(fn, work: float, seconds: float) -> float:
    """Best of repeated timings of ``fn`` (``work`` units per call) within about ``seconds``: units/s."""
    fn()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        best = max(best, work / (time.perf_counter() - t))
    return best


def gemm_peak(d: int, ffn: int, tokens: int = 512, seconds: float = 2.0) -> float:
    """GFLOP/s of the block's two largest products ([tokens, d] x [d, ffn] and back), float32."""
    x, up, down = torch.randn(tokens, d), torch.randn(d, ffn), torch.randn(ffn, d)
    h = torch.empty(tokens, ffn)
    y = torch.empty(tokens, d)

    def step():
        torch.mm(x, up, out=h)
        torch.mm(h, down, out=y)

    return best_rate(step, 4.0 * tokens * d * ffn, seconds) / 1e9


def bandwidth(mb: int = 512, seconds: float = 2.0) -> float:
    """GB/s of a large float32 copy (bytes read plus bytes written)."""
    n = mb * 2**20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    return best_rate(lambda: dst.copy_(src), 8.0 * n, seconds) / 1e9


def model_shapes(spec: str) -> dict[str, int]:
    """Blocks' and head's weights, width and MLP width of the run's model, read from its config."""
    from transformers import AutoConfig

    from refusalkit.core.external import converted_default_model
    from refusalkit.models.facts import model_facts

    facts = model_facts(spec)
    if isinstance(facts, str):
        sys.exit(f"bench_stages: cannot read the model's size: {facts}")
    folder = converted_default_model() if spec == "default" else Path(spec)
    ffn = 4 * facts.d_model
    if folder is not None and (Path(folder) / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(str(folder))
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        ffn = int(getattr(text, "intermediate_size", None) or ffn)
    head = facts.d_model * facts.vocab
    return {"block": facts.matmul_params - head, "head": head, "d": facts.d_model, "ffn": ffn}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, fmt: str = "{:.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run directory refusalkit run made")
    ap.add_argument("--seconds", type=float, default=2.0, help="time given to each machine measurement")
    args = ap.parse_args()
    from refusalkit.core.counters import forward_rates
    from refusalkit.core.manifest import hardware
    from refusalkit.core.settings import load_config

    root = Path(args.run)
    state = json.loads((root / "run.json").read_text())["stages"]
    cfg = load_config(files=[str(root / "config.yaml")])
    shapes = model_shapes(cfg.model)
    weight_bytes = 4 * (shapes["block"] + shapes["head"])
    peak, bw = gemm_peak(shapes["d"], shapes["ffn"], seconds=args.seconds), bandwidth(seconds=args.seconds)
    hw = hardware()
    print(f"machine: {hw['processor']}, {hw['torch_threads']} torch threads, kernels {hw['cpu_capability']}")
    print(
        f"run: {root} (model {cfg.model}: {shapes['block'] / 1e6:.0f} M block weights, head {shapes['head'] / 1e6:.0f} M)"
    )
    print(f"float32 matmul peak at the model's shapes: {peak:.0f} GFLOP/s; memory bandwidth (copy): {bw:.1f} GB/s\n")
    cols = ["stage", "s", "in forwards", "prefill tok", "prefill GFLOP/s", "of peak", "padding",
            "decode tok", "decode GFLOP/s", "decode GB/s", "of bandwidth"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    totals = {"s": 0.0, "fwd": 0.0}
    for key, st in state.items():
        work = st.get("forward")
        if st.get("status") != "done" or not work:
            continue
        r = forward_rates(work, block_params=shapes["block"], head_params=shapes["head"], weight_bytes=weight_bytes)
        if work["prefill_seconds"] < 0.5:  # forwards stopped at the first block (compression's calibration)
            r["prefill_gflops"] = r["padding_share"] = None
        fwd_s = work["prefill_seconds"] + work["decode_seconds"]
        secs = float(st["seconds"])
        totals["s"] += secs
        totals["fwd"] += fwd_s
        row = [key, f"{secs:.0f}", _pct(fwd_s / secs if secs else None), f"{work['prefill_tokens']:,}",
               _num(r["prefill_gflops"]), _pct(None if r["prefill_gflops"] is None else r["prefill_gflops"] / peak),
               _pct(r["padding_share"]), f"{work['decode_tokens']:,}", _num(r["decode_gflops"]),
               _num(r["decode_gbytes_per_s"], "{:.1f}"),
               _pct(None if r["decode_gbytes_per_s"] is None else r["decode_gbytes_per_s"] / bw)]  # fmt: skip
        print("| " + " | ".join(row) + " |")
    if totals["s"]:
        print(f"\nstages recorded: {totals['s']:.0f} s, of which {totals['fwd']:.0f} s in model forwards")
    else:
        print("no stage of this run recorded its forwards (made before refusalkit 0.7.8): run it again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
