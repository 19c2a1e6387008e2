"""Benchmark: does one calibration seed give one pruning mask on every CPU? One command.

    python benchmarks/bench_mask_determinism.py [--model default] [--method wanda-0.5] [--n-calibration 16]

Prunes the model four times, each in a fresh process: with the calibration forward in float64
(``compress.calibration_dtype=float64``, the default on a CPU) and in the model's float32
(``model``), each under two kernel sets of the same machine: its defaults (AVX-512 or AVX2) and
``ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2`` (ATen's scalar kernels and MKL's
SSE4.2 path; ATen's flag alone leaves MKL's matrix products unchanged). Prints, per precision, the
number of mask entries that differ between the two kernel sets (the goal: at most one in a
million, 0 better) and the time the compression took (the cost of float64).
The settings default to those of the ``cpu`` profile of ``refusalkit run`` (16 samples of 256 tokens,
seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KERNELS = {"defaults": {}, "sse4.2/scalar": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}}


def child(args: argparse.Namespace) -> None:
    import torch

    from refusalkit.compress.calibration import build_calibration
    from refusalkit.compress.job import CompressSpec, compress_model
    from refusalkit.models.loading import load_model
    from refusalkit.models.structure import decoder_layers

    lm = load_model(args.model, dtype="auto", device="cpu")
    spec = CompressSpec(
        method=args.method,
        n_calibration=args.n_calibration,
        seq_len=args.seq_len,
        seed=args.seed,
        calibration_dtype=args.dtype,
    )
    cal = build_calibration(lm.tokenizer, spec.calibration, spec.n_calibration, spec.seq_len, spec.seed, None, None)
    t = time.perf_counter()
    compress_model(lm, spec, cal)
    seconds = time.perf_counter() - t
    masks = {}
    for i, block in enumerate(decoder_layers(lm.model)):
        for n, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                masks[f"{i}.{n}"] = m.weight.detach() == 0
    torch.save(masks, args.child)
    Path(args.child + ".json").write_text(
        json.dumps({"seconds": seconds, "capability": torch.backends.cpu.get_cpu_capability()})
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", default="wanda-0.5")
    ap.add_argument("--n-calibration", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", nargs="+", default=["float64", "model"])
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child(args)
        return 0
    import torch

    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            for kernels, env in KERNELS.items():
                out = str(Path(tmp) / f"{dtype}-{kernels.replace('/', '_')}.pt")
                cmd = [sys.executable, __file__, "--child", out, "--dtype", dtype, "--model", args.model,
                       "--method", args.method, "--n-calibration", str(args.n_calibration),
                       "--seq-len", str(args.seq_len), "--seed", str(args.seed)]  # fmt: skip
                subprocess.run(cmd, check=True, env={**os.environ, **env})
                info = json.loads(Path(out + ".json").read_text())
                results.setdefault(dtype, {})[kernels] = {"masks": torch.load(out), **info}
                print(f"{dtype} {kernels} ({info['capability']}): {info['seconds']:.1f} s", file=sys.stderr, flush=True)
    cpu = platform.processor() or platform.machine()
    print(
        f"\n{args.model}, {args.method}, {args.n_calibration} x {args.seq_len} calibration tokens, seed {args.seed}; "
        f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}"
    )
    print("| calibration | kernels | capability | compress s | mask entries differing | of | rate |")
    print("|---|---|---|---|---|---|---|")
    for dtype, runs in results.items():
        a, b = (runs[k] for k in KERNELS)
        total = sum(m.numel() for m in a["masks"].values())
        diff = sum(int((a["masks"][n] != b["masks"][n]).sum()) for n in a["masks"])
        first = next((n for n in a["masks"] if (a["masks"][n] != b["masks"][n]).any()), None)
        for k, r in runs.items():
            print(f"| {dtype} | {k} | {r['capability']} | {r['seconds']:.1f} | {diff} | {total} | {diff / total:.2e} |")
        if first:
            print(f"  ({dtype}: the first matrix that differs is {first})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
