"""Estimated seconds of a plan's stages on this machine (``refusalkit run --dry-run``).

Each stage's work (:mod:`refusalkit.study.plan`) is counted in prefill and decode tokens, each at
its own rate. The two rates were fitted on a measured run (:data:`REFERENCE`: the default model's
study at the cpu profile, refusalkit 0.7.8, 2 cores of an AMD EPYC with AVX2 kernels) and scale with the
model's size (weights multiplied per token) and with this machine's float32 matrix-product speed,
measured in half a second (:func:`machine_gflops`). A stage kind the reference measured is scaled
from its measured time (per kind, the measured seconds over what the rates give for the reference's
own work); the others (attacks beyond vanilla, methods it did not run, utility) come from the rates
alone, which the plan says. Where this run directory holds stages this machine has done, their
measured times are used instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from refusalkit.core import artifacts
from refusalkit.core.layout import RunLayout
from refusalkit.study.plan import Plan, Stage, build_plan

# The measured run the estimates are scaled from: refusalkit 0.7.8, `refusalkit run` (cpu profile) on
# the default model, 2 cores of an AMD EPYC restricted to AVX2 kernels (docs/results.md, 0.7.8), float32;
# seconds per stage kind from its manifest (control, compare and evaluate: the mean over the models).
REFERENCE: dict[str, Any] = {
    "version": "0.7.8",
    "machine": "2 cores of an AMD EPYC (AVX2 kernels)",
    "gflops": 191.0,  # machine_gflops() there (best of blocks; five 1-s measurements 190-192)
    "matmul_params": 494_032_768,
    "stages": {  # kind -> measured seconds
        "activations": 19.2,
        "select": 76.9,
        "noise": 0.0,  # the floor comes from the extraction's own forward
        "validate": 43.6,
        "compress:wanda": 95.5,
        "compress:llm-int8": 5.9,
        "control": 83.3,  # wanda-0.5 72.3, llm-int8 94.3
        "compare": 12.9,
        "evaluate": 157.8,  # base 136.1, wanda-0.5 144.6, llm-int8 192.7
        "repair:search": 219.5,
        "repair:fixed": 23.3,
        "report": 0.6,
    },
}
# tokens a second on the reference machine at its model size (fitted on 0.7.6's run at 160 GFLOP/s as
# the mean-based measurement read it; scaled to the best-of-blocks figure of the same CPU)
PREFILL_RATE, DECODE_RATE = 700.0 * 191 / 160, 80.0 * 191 / 160


def machine_gflops(seconds: float = 0.5) -> float:
    """This machine's float32 matrix-product speed (GFLOP/s) with torch's threads, in about ``seconds``:
    the best of blocks of a few products (a busy moment of the machine lowers one block, not the figure)."""
    import torch

    n, reps = 1024, 4
    a, b = torch.randn(256, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * 256 * n * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


_SCALED_REF = ("noise", "compare")  # given as a multiple of the reference stage, scaled with size and speed
_ESTIMATED_FROM = {  # a compression method the reference did not measure: the measured one it is sized from
    "magnitude": "compress:llm-int8",  # weight-only work, as llm-int8's
    "rtn": "compress:llm-int8",
    "sparsegpt": "compress:wanda",
    "awq": "compress:wanda",
}


def _token_seconds(w: dict[str, float]) -> float:
    return w["prefill"] / PREFILL_RATE + w["decode"] / DECODE_RATE


def _calibration() -> dict[str, float]:
    """Per measured kind: the reference's measured seconds over what the token rates give for the
    reference's own work (so that the reference configuration is estimated at its measured time);
    per measured compression method, its per-weight seconds (measured minus its calibration tokens)."""
    from refusalkit.core.profiles import CPU
    from refusalkit.core.settings import load_config

    ref_cfg = load_config(None, profile=CPU)
    ref_plan = build_plan(ref_cfg, gpu=False, n_layers=24)
    found: dict[str, float] = {}
    for st in ref_plan.stages:
        # a measured stage's time includes its unmeasured parts (the evaluation's perplexity): rated from
        # their tokens, they are taken out of the measured kinds' time rather than counted twice
        timed = [k for k, w in st.work.items() if "prefill" in w and k in REFERENCE["stages"]]
        rest = sum(_token_seconds(w) for k, w in st.work.items() if "prefill" in w and k not in REFERENCE["stages"])
        for kind, w in st.work.items():
            measured = REFERENCE["stages"].get(kind)
            if measured is None or "prefill" not in w or kind in found:
                continue
            measured -= rest / len(timed)
            if kind.startswith("compress:"):
                found[kind] = measured - _token_seconds(w)
            else:
                found[kind] = measured / max(_token_seconds(w), 1e-9)
    return found


def stage_seconds(stage: Stage, scale: float, calibration: dict[str, float]) -> float:
    """The stage's seconds on this machine (``scale``: model size and machine speed against the reference)."""
    total = 0.0
    for kind, w in stage.work.items():
        if "ref" in w:
            total += REFERENCE["stages"][kind] * w["ref"] * (scale if kind in _SCALED_REF else 1.0)
        elif kind.startswith("compress:"):
            method = kind.split(":", 1)[1]
            fixed = calibration.get(kind, calibration[_ESTIMATED_FROM.get(method, "compress:wanda")])
            total += (fixed * w["fixed"] + _token_seconds(w)) * scale
        else:
            total += _token_seconds(w) * calibration.get(kind, 1.0) * scale
    return total


def estimate(plan: Plan, matmul_params: int, gflops: float, root: Path) -> None:
    """Fill in every stage's ``seconds`` (and ``done`` / ``measured`` from ``root/run.json``)."""
    scale = matmul_params / REFERENCE["matmul_params"] * REFERENCE["gflops"] / gflops
    calibration = _calibration()
    state = artifacts.read_json(RunLayout(root).run_state) if RunLayout(root).run_state.is_file() else {}
    recorded = state.get("stages", {})
    by_kind: dict[str, list[float]] = {}
    for key, rec in recorded.items():
        if rec.get("status") == "done" and rec.get("seconds"):
            by_kind.setdefault(_kind(key), []).append(float(rec["seconds"]))
    for st in plan.stages:
        if recorded.get(st.key.split(":")[0], {}).get("status") == "done":  # a part is done with its stage
            st.done, st.seconds = True, 0.0
        elif by_kind.get(_kind(st.key)):
            times = by_kind[_kind(st.key)]
            st.seconds, st.measured = sum(times) / len(times), True
        else:
            st.seconds = stage_seconds(st, scale, calibration)


def _kind(key: str) -> str:
    """A stage's kind, whose measured times estimate the others of the kind: ``wanda-0.5_seed1/evaluate`` ->
    ``evaluate``; compress stages by method, repairs by what they do, extractions by whose."""
    name, _, stage = key.rpartition("/")
    if stage == "compress":
        return f"compress:{name.split('_seed')[0]}"
    if stage == "repair":  # a further draw's repair applies the first draw's edit: no search
        return "repair:" + ("paper" if name.endswith("-paper") else "transferred" if "_seed" in name else "search")
    if stage == "extract":  # the base model's is selected and validated; a repaired variant's is not selected
        return "extract:" + ("base" if name == "base" else "repaired" if "+" in name else "variant")
    return stage or key
