"""Forward work counted per process: what each stage asked of the model, so that a measurement made
twice shows up in ``run.json`` and ``manifest.json``, and how fast each stage's forwards ran.

Every model :func:`refusalkit.models.loading.load_model` loads carries :func:`count_forward` as a
forward pre-hook and :func:`time_forward` as a forward hook on its top module. Each call adds its rows
times positions (padding included) to ``FORWARD["tokens"]`` and one to ``FORWARD["calls"]``; a call of
one position (a decode step) adds to the ``decode_*`` counters, any other (a prefill, a GCG candidate
batch) to the ``prefill_*`` ones, with its wall seconds (the forward itself, measured between the two
hooks) and, for a prefill, its rows (the output head runs once per row) and its padding (the zeros of
its attention mask). A model's forward inside another model's forward is not counted twice.
Compression's calibration and the repair screen run blocks one by one, not the model's forward, and
are not counted.

:func:`forward_rates` turns a stage's counts into achieved GFLOP/s and memory bandwidth
(``benchmarks/bench_stages.py``).
"""

from __future__ import annotations

import time
from typing import Any

FORWARD: dict[str, float] = {
    "calls": 0,
    "tokens": 0,
    "prefill_tokens": 0,
    "prefill_rows": 0,
    "prefill_padding": 0,
    "prefill_seconds": 0.0,
    "decode_tokens": 0,
    "decode_calls": 0,
    "decode_seconds": 0.0,
}
_OPEN: list[tuple[float, str]] = []  # (start, kind) of the forwards under way, outermost first


def _shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    x = kwargs.get("input_ids")
    if x is None and args:
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None and len(shape) >= 2 else None


def count_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A forward pre-hook (``with_kwargs=True``): count the call's rows x positions."""
    shape = _shape(args, kwargs)
    kind = "decode" if shape is not None and shape[1] == 1 else "prefill"
    _OPEN.append((time.perf_counter(), kind))
    if len(_OPEN) > 1:  # nested in a counted forward
        return
    FORWARD["calls"] += 1
    if shape is None:
        return
    rows, positions = int(shape[0]), int(shape[1])
    FORWARD["tokens"] += rows * positions
    if kind == "decode":
        FORWARD["decode_tokens"] += rows
        FORWARD["decode_calls"] += 1
        return
    FORWARD["prefill_tokens"] += rows * positions
    FORWARD["prefill_rows"] += rows
    mask = kwargs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        FORWARD["prefill_padding"] += int((mask[:, -positions:] == 0).sum())


def time_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    """A forward hook (``with_kwargs=True, always_call=True``: it runs when the forward raises too, so the
    open calls stay paired): add the call's wall seconds to its kind. On a GPU the seconds are the host's
    (kernels run asynchronously)."""
    if not _OPEN:
        return
    start, kind = _OPEN.pop()
    if not _OPEN:
        FORWARD[f"{kind}_seconds"] += time.perf_counter() - start


def snapshot() -> dict[str, float]:
    """The counters now (subtract two snapshots for the work between them)."""
    return dict(FORWARD)


def since(before: dict[str, float]) -> dict[str, float]:
    """The work counted since ``before``."""
    return {k: FORWARD[k] - before.get(k, 0) for k in FORWARD}


def stage_record(work: dict[str, float]) -> dict[str, float]:
    """What ``run.json`` keeps of a stage's work (:func:`since`): counts as integers, seconds rounded."""
    return {k: round(v, 2) if k.endswith("seconds") else int(v) for k, v in work.items()}


def forward_rates(
    work: dict[str, float], *, block_params: int, head_params: int, weight_bytes: int
) -> dict[str, float | None]:
    """Achieved rates of a stage's forwards (``work``: :func:`stage_record`): GFLOP/s of the prefills
    (2 FLOPs per weight of the blocks per token, plus the output head once per row) and of the decode
    steps (blocks and head per token), and the decode steps' weight-read bandwidth in GB/s (every weight
    read once per step: a lower bound on traffic). Attention's own products are left out (a few percent
    at these lengths). None where the stage ran no such forward."""
    pt, ps = work.get("prefill_tokens", 0), work.get("prefill_seconds", 0.0)
    dt, dc, ds = work.get("decode_tokens", 0), work.get("decode_calls", 0), work.get("decode_seconds", 0.0)
    prefill_flops = 2.0 * (block_params * pt + head_params * work.get("prefill_rows", 0))
    decode_flops = 2.0 * (block_params + head_params) * dt
    return {
        "prefill_gflops": prefill_flops / ps / 1e9 if pt and ps > 0 else None,
        "decode_gflops": decode_flops / ds / 1e9 if dt and ds > 0 else None,
        "decode_gbytes_per_s": weight_bytes * dc / ds / 1e9 if dc and ds > 0 else None,
        "padding_share": work.get("prefill_padding", 0) / pt if pt else None,
    }
