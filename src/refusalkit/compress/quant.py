"""Weight quantization: round-to-nearest (RTN) and AWQ (Lin et al. 2023), group-wise.

Both are *simulated* (fake) quantization: every weight is replaced by its dequantized value on
the quantization grid and stored in the model's dtype, so any ``transformers`` runtime loads the
variant and every analysis sees exactly the quantized weights. ``compression.json`` records the
bits, the group size and the size the packed integer format would take.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refusalkit.compress.methods import BlockStep, Method, register
from refusalkit.core.errors import UserError


def check_group(in_features: int, group_size: int, name: str) -> int:
    g = in_features if group_size <= 0 else group_size
    if in_features % g:
        raise UserError(
            f"group size {group_size} does not divide the {in_features} input features of {name}; "
            "use a divisor (e.g. --group-size 64) or -1 for one group per row"
        )
    return g


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """Dequantized weights after group-wise round-to-nearest quantization along the input dimension.

    Asymmetric (``zero_point=True``, AWQ's default): per group of ``group_size`` inputs of each
    row, ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``,
    ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, ``w' = (q - zero) * scale``; the error of
    every weight is at most ``scale / 2``. Symmetric: ``scale = absmax / (2^(b-1) - 1)``.
    ``group_size <= 0`` means one group per output row.
    """
    shape, dtype = w.shape, w.dtype
    g = shape[-1] if group_size <= 0 else group_size
    wg = w.float().reshape(-1, g)
    if zero_point:
        qmax = 2**bits - 1
        mx, mn = wg.amax(dim=1, keepdim=True), wg.amin(dim=1, keepdim=True)
        scale = (mx - mn).clamp(min=1e-5) / qmax
        zero = (-torch.round(mn / scale)).clamp(0, qmax)
        q = (torch.round(wg / scale) + zero).clamp(0, qmax)
        out = (q - zero) * scale
    else:
        qmax = 2 ** (bits - 1) - 1
        scale = wg.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / qmax
        out = torch.round(wg / scale).clamp(-qmax - 1, qmax) * scale
    return out.reshape(shape).to(dtype)


@torch.no_grad()
def rtn_linear(linear: nn.Linear, bits: int, group_size: int, name: str = "layer") -> None:
    check_group(linear.in_features, group_size, name)
    linear.weight.data.copy_(quantize_groupwise(linear.weight.data, bits, group_size))


# ------------------------------------------------------------------------------------------------
# The group-wise quantization methods, registered (see refusalkit.compress.methods)
# ------------------------------------------------------------------------------------------------


def configure_group_quant(spec: Any) -> None:
    spec.bits = 4 if spec.bits is None else int(spec.bits)
    if not 2 <= spec.bits <= 8:
        raise UserError(f"{spec.method} supports 2 to 8 bits, not {spec.bits}")
    if spec.sparsity is not None:
        raise UserError(f"--sparsity applies to pruning, not to {spec.method}")


def group_quant_parameters(spec: Any) -> dict[str, Any]:
    p = {"bits": spec.bits, "group_size": spec.group_size, "zero_point": True, "storage": "dequantized (simulated)"}
    if spec.registered.plain == "awq":
        p.update(n_grid=20, max_shrink=0.5, clip=True, clip_tokens=512, search_tokens=spec.awq_search_tokens)
    return p


def group_quant_method(
    name: str,
    needs_calibration: bool,
    block: Any,
    description: str,
    title: str,
    rank: int = 100,
    covers_views: bool = False,
) -> Method:
    """A group-wise quantization method: ``<name>-w<bits>`` full names, 2-8 bits, group size checked."""
    return Method(
        name,
        "quantization",
        needs_calibration,
        description,
        title,
        full_name=f"{name}-w(?P<bits>\\d+)",
        configure=configure_group_quant,
        parameters=group_quant_parameters,
        variant_name=lambda spec: (
            f"{spec.method}-w{spec.bits}" + ("" if spec.group_size == 128 else f"-g{spec.group_size}")
        ),
        check_linear=lambda spec, lin, where: check_group(lin.in_features, spec.group_size, where),
        compress_block=block,
        covers_views=covers_views,
        rank=rank,
    )


def _rtn_block(step: BlockStep) -> Any:
    for n, lin in step.linears.items():
        rtn_linear(lin, step.spec.bits, step.spec.group_size, f"layer {step.index} {n}")
    return step.inputs


register(
    group_quant_method(
        "rtn",
        False,
        _rtn_block,
        "round-to-nearest group-wise asymmetric quantization (the AWQ paper's baseline)",
        "round-to-nearest quantization",
        rank=5,
        covers_views=True,
    )
)
