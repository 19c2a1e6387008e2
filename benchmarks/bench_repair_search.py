"""Benchmark: the automatic repair's search over edits, before (every candidate generated) and after
(first-token screen, then at most ``--confirm`` candidates generated). One command:

    python benchmarks/bench_repair_search.py --run DIR --variant wanda-0.5 [--scales 1,2,4,8,16,32]

``DIR`` is a run directory with a base direction and the variant (``refusalkit run`` makes one).
Both searches run in a scratch copy of it (the variant's checkpoint is linked, not copied), on the
same held-out search prompts, in this one process, so nothing of ``DIR`` is changed and neither
search reuses the other's measurements. Prints for each: wall time, new tokens generated,
completions, prompt tokens run forward, candidates generated and removed by the screen, and the
edit chosen; "before" measures every (placement, scale) candidate by generation (the 0.2.0 α curve
of each placement) and chooses by the same rule.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def scratch(run: Path, variant: str, dest: Path) -> Path:
    """A run directory in ``dest`` that shares ``run``'s base direction, splits and variant checkpoint."""
    root = dest / "run"
    (root / "base").mkdir(parents=True)
    shutil.copy(run / "config.yaml", root / "config.yaml")
    shutil.copytree(run / "data", root / "data")
    shutil.copytree(run / "base" / "direction", root / "base" / "direction")
    (root / variant).mkdir()
    for f in (run / variant).iterdir():
        if f.is_file():
            shutil.copy(f, root / variant / f.name)
    os.symlink((run / variant / "model").resolve(), root / variant / "model")
    return root


def counters() -> dict[str, int]:
    from refusalkit.direction.forward import STATS as FWD
    from refusalkit.models.generation import STATS as GEN

    return {"new_tokens": GEN["new_tokens"], "completions": GEN["completions"], "forward_tokens": FWD["tokens"]}


def measured(fn) -> tuple[object, float, dict[str, int]]:
    before = counters()
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    after = counters()
    return out, secs, {k: after[k] - before[k] for k in after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--scales", default="1,2,4,8,16,32")
    ap.add_argument("--search-prompts", type=int, default=32)
    ap.add_argument("--confirm", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--skip-before", action="store_true", help="only the screened search")
    ap.add_argument("--skip-after", action="store_true", help="only the generated curves")
    ap.add_argument(
        "--keep", action="store_true", help="keep the scratch run directory (printed), e.g. to inspect a failure"
    )
    args = ap.parse_args()
    import dataclasses

    import torch

    from refusalkit.core.settings import load_config
    from refusalkit.repair.job import run_repair
    from refusalkit.repair.search import choose_scale

    scales = [float(x) for x in args.scales.split(",")]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; run {args.run}, variant {args.variant}; scales {scales}; "
        f"{args.search_prompts} + {args.search_prompts} search prompts; {args.ppl_tokens} perplexity tokens"
    )
    scratch_dir = (
        contextlib.nullcontext(tempfile.mkdtemp(prefix="bench-search-"))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="bench-search-")
    )
    with scratch_dir as tmp:
        if args.keep:
            print(f"scratch run directory (kept): {tmp}")
        root = scratch(args.run, args.variant, Path(tmp))
        cfg = load_config(root / "config.yaml")
        base = dataclasses.replace(
            cfg.repair, scales=scales, search_prompts=args.search_prompts, ppl_tokens=args.ppl_tokens
        )
        after = dataclasses.replace(base, alpha_scale="auto", placement="auto", confirm=args.confirm)
        if not args.skip_after:
            info, secs, cost = measured(
                lambda: run_repair(cfg, root, args.variant, repair=after, name="after", progress=False)
            )
            s = info["search"]
            print(
                f"after : {secs:7.1f} s, {cost['new_tokens']:7d} new tokens, {cost['completions']:5d} completions, "
                f"{cost['forward_tokens']:8d} forward tokens; {len(s['screened'])} candidates screened "
                f"(+{len(s['compared'])} compared), {len(s['passed_screen'])} passed, {s['generated']} generated, "
                f"{s['not_generated']} removed by the screen; chosen "
                f"{s['chosen'] and (s['chosen']['placement'], s['chosen']['scale'])}"
                f" (target reached: {s['chosen'] and s['chosen']['target_reached']})",
                flush=True,
            )
        if args.skip_before:
            return 0
        # before: a generation curve per placement (base and unrepaired measured again: fresh caches)
        shutil.rmtree(root / "repair", ignore_errors=True)
        t_all, c_all, curves = 0.0, {"new_tokens": 0, "completions": 0, "forward_tokens": 0}, {}
        for placement in ("source", "previous"):
            spec = dataclasses.replace(base, alpha_scale="1.0", placement=placement, curve=True)
            try:
                info, secs, cost = measured(
                    lambda spec=spec, p=placement: run_repair(
                        cfg, root, args.variant, repair=spec, name=f"before-{p}", progress=False
                    )
                )
            except Exception as e:  # noqa: BLE001 - a placement without a block
                print(f"before: {placement}: {e}")
                continue
            t_all += secs
            c_all = {k: c_all[k] + cost[k] for k in c_all}
            curves[placement] = info["curve"]
        # the search's rule across placements: the smallest scale that reaches the target, else the
        # lowest ASR within the budgets (comparing scales across placements would pick any ×1)
        picks = []
        for p, c in curves.items():
            ch = choose_scale(c["points"], c["unrepaired"], c["target_asr"], base)
            if ch["scale"] is None:
                continue
            asr = next(q["asr"]["rate"] for q in c["points"] if q["alpha_scale"] == ch["scale"])
            rank = (not ch["target_reached"], ch["scale"] if ch["target_reached"] else asr, ch["scale"])
            picks.append((rank, p, ch))
        best = min(picks, key=lambda t: t[0]) if picks else None
        print(
            f"before: {t_all:7.1f} s, {c_all['new_tokens']:7d} new tokens, {c_all['completions']:5d} completions, "
            f"{c_all['forward_tokens']:8d} forward tokens; {sum(len(c['points']) for c in curves.values())} "
            f"candidates generated; chosen {best and (best[1], best[2]['scale'])} "
            f"(target reached: {best and best[2]['target_reached']})"
        )
        for p, c in curves.items():
            print(
                f"  {p:8s} "
                + "  ".join(f"x{q['alpha_scale']:g} ASR {q['asr']['rate']:.0%}" for q in c["points"])
                + f"  (unrepaired {c['unrepaired']['asr']['rate']:.0%}, target {c['target_asr']:.0%})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
