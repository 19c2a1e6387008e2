"""The refusal-preserving methods' per-writer solve (refusalkit.compress.refusal.solve_update) at a
model's shapes: time and the memory it adds above its inputs, each shape in a fresh process.

    python benchmarks/bench_rp_solve.py [--shapes 896x4864 4096x11008] [--tokens 1071] [--repeats 3]

A shape ``d_model x d_in`` is a writer's output and input width (the default model's MLP down
projection is 896 x 4864, a 7B Llama's 4096 x 11008); ``--tokens`` the refusal prompts' loss rows
(1071 at the default 32 + 32 prompts on the default model). The inputs (the calibration Gram matrix,
the refusal rows, a 50 % mask) are made first; the figure is the process's peak resident memory
during the solves (VmHWM, reset just before them) minus its resident memory then.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    """Linux: set the process's peak resident memory (VmHWM) to its current resident memory."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one(d_model: int, d_in: int, tokens: int, repeats: int) -> dict:
    import torch

    from refusalkit.compress.refusal import solve_update

    torch.manual_seed(0)
    x = torch.randn(2 * d_in, d_in)
    h = (x.t() @ x).double() / x.shape[0]
    del x
    xr = torch.randn(tokens, d_in, dtype=torch.float64)
    e = torch.randn(tokens, dtype=torch.float64)
    r = torch.randn(d_model, dtype=torch.float64)
    r /= r.norm()
    keep = torch.rand(d_model, d_in) < 0.5
    _reset_peak()
    before = _status_bytes("VmRSS")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        delta, info = solve_update(xr, e, h, keep, r)
        times.append(time.perf_counter() - t)
        del delta
    peak = _status_bytes("VmHWM")
    return {
        "shape": f"{d_model}x{d_in}",
        "tokens": tokens,
        "seconds": [round(s, 3) for s in times],
        "added_peak_mib": round((peak - before) / 2**20, 1),
        "gram_mib": round(d_in * d_in * 8 / 2**20, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["896x4864", "4096x11008"])
    p.add_argument("--tokens", type=int, default=1071)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        d_model, d_in = map(int, a.child.split("x"))
        print(json.dumps(one(d_model, d_in, a.tokens, a.repeats)))
        return
    import torch

    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, python {platform.python_version()}"
    )
    for shape in a.shapes:
        cmd = [sys.executable, __file__, "--child", shape, "--tokens", str(a.tokens), "--repeats", str(a.repeats)]
        res = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
        print(
            f"{res['shape']:>12s}  {res['tokens']} rows  solve {min(res['seconds']):.2f} s (best of {len(res['seconds'])}, "
            f"{res['threads']} threads)  memory added {res['added_peak_mib']:.0f} MiB "
            f"({res['added_peak_mib'] / res['gram_mib']:.1f} Gram matrices of {res['gram_mib']:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
