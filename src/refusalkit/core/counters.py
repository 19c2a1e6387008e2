"""Forward tokens counted per process: what each stage asked of the model, so that a measurement made
twice shows up in ``run.json`` and ``manifest.json``.

Every model :func:`refusalkit.models.loading.load_model` loads carries :func:`count_forward` as a
forward pre-hook on its top module: each call adds its rows times positions (padding included) to
``FORWARD["tokens"]`` and one to ``FORWARD["calls"]``. A decode step counts its rows, a prefill its
padded prompt tokens, a GCG candidate batch its rows times length. Compression's calibration runs
the blocks one by one, not the model's forward, and is not counted.
"""

from __future__ import annotations

from typing import Any

FORWARD: dict[str, int] = {"calls": 0, "tokens": 0}


def count_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A forward pre-hook (``with_kwargs=True``): count the call's rows x positions."""
    x = kwargs.get("input_ids")
    if x is None and args:
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) >= 2:
        FORWARD["tokens"] += int(shape[0]) * int(shape[1])
    FORWARD["calls"] += 1


def snapshot() -> dict[str, int]:
    """The counters now (subtract two snapshots for the work between them)."""
    return dict(FORWARD)


def since(before: dict[str, int]) -> dict[str, int]:
    """The work counted since ``before``."""
    return {k: FORWARD[k] - before.get(k, 0) for k in FORWARD}
