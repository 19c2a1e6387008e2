"""The LLM.int8 compression method (Dettmers et al. 2022): every decoder linear becomes row-wise
absmax int8 with 16-bit outlier features (the storage and its matmul: :mod:`refusalkit.models.int8`),
through bitsandbytes when it works, else refusalkit's pure-PyTorch layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refusalkit.compress.blockwise import linear_layers
from refusalkit.compress.methods import Method, register
from refusalkit.core.errors import UserError
from refusalkit.models.int8 import Int8Linear, bnb_available, replace_linears, skip_modules
from refusalkit.models.structure import decoder_layers


def quantization_config(threshold: float, skip: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes for a bitsandbytes 8-bit model."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_8bit": True,
        "load_in_4bit": False,
        "llm_int8_threshold": threshold,
        "llm_int8_skip_modules": skip,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
    }


def layer_record(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Sparsity and relative error of one compressed matrix (``compression.json``'s ``per_layer``)."""
    b, a = before.float(), after.float()
    return {
        "sparsity": (a == 0).float().mean().item(),
        "rel_error": ((a - b).norm() / b.norm().clamp(min=1e-12)).item(),
        "numel": a.numel(),
    }


def int8_backend(spec: Any) -> str:
    if spec.backend == "auto":
        return "bitsandbytes" if bnb_available() else "torch"
    if spec.backend == "bitsandbytes" and not bnb_available():
        raise UserError(
            "the bitsandbytes backend needs bitsandbytes; run: pip install bitsandbytes (or use --backend torch)"
        )
    return spec.backend


@torch.no_grad()
def int8_model(lm: Any, spec: Any) -> dict[str, Any]:
    """Pure-PyTorch LLM.int8: every linear except the head becomes :class:`Int8Linear`."""
    model = lm.model
    skip = skip_modules(model)
    per_layer = {}
    for i, layer in enumerate(decoder_layers(model)):
        for n, lin in linear_layers(layer, aliases=False).items():
            cb_scb = Int8Linear.from_linear(lin, spec.threshold)
            per_layer[f"{i}.{n}"] = layer_record(lin.weight, cb_scb.dequantized().to(lin.weight.dtype))
    replace_linears(model, spec.threshold, skip)
    model.config.quantization_config = quantization_config(spec.threshold, skip)
    return {"per_layer": per_layer, "notes": {"skip_modules": skip}}


def int8_records(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per-layer records of a bitsandbytes-quantized model (weights int8 + SCB)."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for n, m in layer.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dtype == torch.int8:
                out[f"{i}.{n}"] = {"sparsity": (w == 0).float().mean().item(), "numel": w.numel()}
    return out


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def compress_whole_model(spec: Any, load: Any) -> tuple[Any, dict[str, Any], str]:
    """LLM.int8 of the base model: bitsandbytes quantizes it as it loads, or refusalkit's layers replace
    every decoder linear after a float load."""
    backend = int8_backend(spec)
    if backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        lm = load(quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.threshold))
        return lm, {"per_layer": int8_records(lm.model), "notes": {"skip_modules": skip_modules(lm.model)}}, backend
    lm = load()
    return lm, int8_model(lm, spec), backend


def _configure(spec: Any) -> None:
    if spec.bits not in (None, 8):
        raise UserError("llm-int8 is 8-bit; drop --bits or use awq / rtn for other widths")
    spec.bits = 8
    if spec.sparsity is not None:
        raise UserError("--sparsity applies to pruning, not to llm-int8")
    if spec.threshold < 0:
        raise UserError("--threshold must be 0 or more (0 turns the outlier decomposition off)")
    if spec.backend not in ("auto", "bitsandbytes", "torch"):
        raise UserError(f"unknown int8 backend {spec.backend!r}; use auto, bitsandbytes or torch")


register(
    Method(
        "llm-int8",
        "quantization",
        False,
        "LLM.int8: vector-wise int8 with 16-bit outlier features (threshold 6.0)",
        "LLM.int8",
        aliases=("int8",),
        configure=_configure,
        variant_name=lambda spec: "llm-int8",
        parameters=lambda spec: {"threshold": spec.threshold},
        whole_model=compress_whole_model,
        rank=3,
    )
)
