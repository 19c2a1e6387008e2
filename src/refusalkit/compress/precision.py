"""Calibration that gives the same pruning mask on any CPU: the calibration forward in float64.

A float32 forward pass depends on the order in which the kernels sum: an AVX-512 and an AVX2
machine (or MKL's SSE4.2 path) give matrix products, ``exp`` and ``rsqrt`` that differ in the last
bits. A mask is a ranking of scores, so a score that sits within those bits of the row's
threshold flips, the flipped weight changes the pruned block's outputs by far more than the
rounding did, and the change cascades into every later block's calibration inputs: the same
seed pruned 0.18 % of the default model's weights differently on two machines. In float64 the
kernels still differ in their last bits, but those are 2^-29 times smaller; a score would have to
sit within 1e-16 of its row's threshold to flip.

:class:`Float64` is a ``TorchFunctionMode`` that keeps a float64 computation float64 through model
code written for float32: once a float64 tensor enters an operation, its other floating arguments
are upcast (the float32 weights, the rotary tables; exact), and casts of a float64 tensor to a
lower precision (``.to(torch.float32)`` in an RMSNorm, ``softmax(dtype=torch.float32)``) keep
float64. In-place operations write into their target's own dtype, as they would anyway.
The hidden states entering block 0 are cast to float64 when captured (exact); everything before
block 0 (the embedding lookup, the rotary tables) is elementwise and correctly rounded, hence the
same on every kernel set (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from refusalkit.core.errors import UserError

CALIBRATION_DTYPES = ("auto", "float64", "model")

_LOWER = (torch.float32, torch.float16, torch.bfloat16)
_CASTS = {torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16}
_INPLACE_DUNDER = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ipow__"}


def _is64(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float64


def _up(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in _LOWER:
        return x.to(torch.float64)
    if isinstance(x, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in x):
        return type(x)(_up(v) for v in x)
    return x


def _any64(args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if _is64(a) or (isinstance(a, (list, tuple)) and any(_is64(v) for v in a)):
            return True
    return False


def _inplace(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or name in _INPLACE_DUNDER


class Float64(TorchFunctionMode):
    """Keeps float64 computations float64 (see the module's docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if not _any64(args, kwargs):
            return func(*args, **kwargs)
        if func in _CASTS and _is64(args[0]):
            return args[0]
        if func is torch.Tensor.type_as and _is64(args[0]):
            return args[0]
        if func is torch.Tensor.to and _is64(args[0]):
            rest = tuple(torch.float64 if a in _LOWER else a for a in args[1:] if not isinstance(a, torch.Tensor))
            other = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)
            if other is not None:  # .to(tensor): its device, our precision
                return args[0].to(other.device)
            if kwargs.get("dtype") in _LOWER:
                kwargs["dtype"] = torch.float64
            return func(args[0], *rest, **kwargs)
        if kwargs.get("dtype") in _LOWER:
            kwargs["dtype"] = torch.float64
        if "out" in kwargs:  # written in the buffer's own dtype
            return func(*args, **kwargs)
        if _inplace(func):  # the target keeps its dtype; what is written into it is upcast first
            return func(args[0], *(_up(a) for a in args[1:]), **{k: _up(v) for k, v in kwargs.items()})
        return func(*(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})


def resolve(setting: str, device: torch.device | str) -> torch.dtype | None:
    """``compress.calibration_dtype`` as the dtype of the calibration forward (None: the model's own).

    ``auto``: float64 on a CPU (the same mask on any CPU, at the cost measured in
    ``benchmarks/bench_mask_determinism.py``), the model's dtype on an accelerator (a 70B model's
    calibration activations in float64 would need four times the memory of bfloat16)."""
    if setting not in CALIBRATION_DTYPES:
        raise UserError(f"compress.calibration_dtype {setting!r} is not one of {', '.join(CALIBRATION_DTYPES)}")
    if setting == "float64" or (setting == "auto" and torch.device(device).type == "cpu"):
        return torch.float64
    return None


@contextlib.contextmanager
def calibration_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside: the calibration forward runs in ``dtype`` (float64) or as the model is (None)."""
    if dtype is None:
        yield
        return
    if dtype != torch.float64:
        raise ValueError(f"calibration in {dtype} is not supported (float64 or the model's dtype)")
    with Float64():
        yield
