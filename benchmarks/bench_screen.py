"""Benchmark: one screen of the edit search, a full forward per candidate (0.3.0) against the pass
that starts at the first edited block (0.4.0, ``refusalkit.repair.screen.BlockInputs``). One command:

    python benchmarks/bench_screen.py --run DIR --variant wanda-0.5 [--scale 16] [--repeats 3]

``DIR`` is a run directory with a base direction and the variant (``refusalkit run`` makes one).
Loads the variant, takes its held-out search prompts as ``refusalkit repair`` does, applies the
paper's edit at the direction's block (``source``) at ``--scale`` times the paper's alphas (zeros
kept), and times the screen both ways (median of ``--repeats``), with the one-off pass that keeps
the block inputs, and the prompt tokens each runs. Prints both screens' figures, which must be equal.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--scale", type=float, default=16.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from refusalkit.core import artifacts
    from refusalkit.core.layout import RunLayout
    from refusalkit.core.settings import load_config
    from refusalkit.direction.forward import STATS
    from refusalkit.models.loading import load_model
    from refusalkit.repair.aird import PAPER_ALPHAS, apply_aird, edit_block_index
    from refusalkit.repair.screen import BlockInputs, refusal_screen
    from refusalkit.repair.search import search_prompts

    layout = RunLayout(args.run)
    cfg = load_config(args.run / "config.yaml")
    info = artifacts.read_json(layout.direction("base", "direction.json"))
    direction = artifacts.load_tensors(layout.direction("base", "direction.safetensors"))["direction"]
    data = search_prompts(cfg, layout, cfg.repair)
    lm = load_model(
        cfg.model, dtype=cfg.dtype, device=cfg.device, chat_template=cfg.chat_template,
        path_override=str(layout.model(args.variant)),
    )  # fmt: skip
    block = edit_block_index(int(info["layer"]), "source", lm.n_layers)
    first = edit_block_index(int(info["layer"]), "previous", lm.n_layers)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.variant}: {lm.n_layers} blocks, edit at block {block} "
        f"x{args.scale:g} (zeros kept), blocks from {first} run; {len(data.harmful)} + {len(data.harmless)} prompts"
    )

    def timed(fn):
        secs, toks, out = [], 0, None
        for _ in range(args.repeats):
            t0, n0 = time.perf_counter(), STATS["tokens"]
            out = fn()
            secs.append(time.perf_counter() - t0)
            toks = STATS["tokens"] - n0
        return statistics.median(secs), toks, out

    t0 = time.perf_counter()
    inputs = BlockInputs(lm, cfg, data.harmful, data.harmless, first)
    keep = time.perf_counter() - t0
    alphas = {k: a * args.scale for k, a in PAPER_ALPHAS.items()}
    edit = apply_aird(lm.model, direction, block, alphas=alphas, keep_zeros=True)
    try:
        full, full_toks, a = timed(lambda: refusal_screen(lm, cfg, data.harmful, data.harmless))
        skip, skip_toks, b = timed(lambda: refusal_screen(lm, cfg, data.harmful, data.harmless, inputs))
    finally:
        edit.remove()
    print(f"full forward   : {full:6.1f} s per screen, {full_toks} prompt tokens; {a}")
    print(f"from block {first:<3d} : {skip:6.1f} s per screen, {skip_toks} prompt tokens; {b}")
    print(f"kept inputs    : {keep:6.1f} s once per search; speed-up per screen {full / skip:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
