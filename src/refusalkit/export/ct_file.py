"""A group-quantized variant as a compressed-tensors checkpoint (the ``pack-quantized`` format vLLM serves).

refusalkit's AWQ and RTN variants are stored dequantized: every block matrix holds ``(q - z)·s`` on
its group grid (:func:`refusalkit.compress.quant.quantize_groupwise`; AWQ's activation scales are
already folded into the preceding norm or linear, so the stored matrix is on a plain group grid).
The export recovers each group's grid from the stored values, checks that every weight lies on it,
and hands the integer codes, scales and zero points to the ``compressed-tensors`` library, which
packs and writes them (``ModelCompressor.compress_model``, ``save_pretrained``, ``update_config``).

Recovering the grid of a group (asymmetric, ``2^b - 1 = Q``): min-max quantization puts the group's
minimum on code 0 and its maximum on code ``Q`` unless the zero point was clamped, so the scale is
``(max - min) / Q``; float32 rounding at a .5 boundary can leave the maximum one code short (about
one group in 10^4 of the default model's RTN: scale ``(max - min) / (Q - 1)``); a group of one sign,
whose zero point was clamped to 0 (or ``Q``), has its maximum on ``Q·s`` (minimum on ``-Q·s``). The
first of these candidate scales on which every weight of the group is an integer multiple (within
1e-3 of a step) with codes and zero point in ``[0, Q]`` is the group's grid: it reproduces every
stored weight, which is all the export needs. Symmetric grids: the largest ``|w|`` on code ``2^(b-1) - 1`` (refusalkit's grid) or on
``-2^(b-1)`` (compressed-tensors' own, ``s = absmax / (Q / 2)``). A matrix off its grid (a repair that did
not requantize, weights edited after compression) is refused with the count of groups that miss.

compressed-tensors stores signed codes: an unsigned code ``c`` and zero point ``z`` in ``[0, Q]``
are written as ``c - 2^(b-1)`` and ``z - 2^(b-1)``, which dequantize to the same ``(c - z)·s``.
Scales and the unquantized tensors keep the variant's dtype (float32): the export is the variant's
weights to within the last bit of a recovered scale (``max_abs_error`` in ``reproduce.json``).
compressed-tensors no longer has sparse formats: pruned variants export as ``safetensors`` (dense,
with their zeros).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusalkit.core.errors import UserError

TOLERANCE = 1e-3  # a weight is on its grid when w / s is within this of an integer


@dataclass(frozen=True)
class Scheme:
    """An integer weight-only grid: bits, the group size along the inputs (<= 0: one per row) and
    whether it has a zero point."""

    bits: int
    group_size: int
    symmetric: bool = False

    def describe(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


def scheme_of(compression: dict[str, Any] | None, has_view_scales: bool) -> Scheme:
    """The grid a variant's block matrices are on, from its ``compression.json`` (refusalkit's AWQ /
    RTN, or a compressed-tensors checkpoint imported with one integer group or channel scheme)."""
    from refusalkit.compress.methods import plain_method

    info = compression or {}
    method = plain_method(info.get("method"))
    if method in ("awq", "rtn"):
        if has_view_scales:
            raise UserError(
                "this AWQ variant keeps per-view activation scales inside fused expert or Conv1D weights, which "
                "compressed-tensors' Linear format cannot hold; export --format safetensors or gguf"
            )
        p = info.get("parameters") or {}
        return Scheme(int(info["bits"]), int(p.get("group_size", 128)), not p.get("zero_point", True))
    if method == "import" and info.get("format") == "compressed-tensors":
        groups = list(((info.get("quantization_config") or {}).get("config_groups") or {}).values())
        w = (groups[0].get("weights") or {}) if len(groups) == 1 else {}
        if w.get("type") == "int" and w.get("strategy") in ("group", "channel") and not w.get("actorder"):
            g = int(w["group_size"]) if w.get("strategy") == "group" else -1
            return Scheme(int(w["num_bits"]), g, bool(w.get("symmetric", True)))
        raise UserError(
            "this variant was imported from a compressed-tensors scheme other than one integer group or channel "
            "grid; export --format safetensors or gguf"
        )
    what = "an LLM.int8" if method == "llm-int8" else f"a {method or 'dense'}"
    raise UserError(
        f"compressed-tensors export writes group-quantized weights (AWQ or RTN variants); this is {what} variant: "
        "export --format safetensors (pruned variants ship dense with their zeros) or gguf"
    )


def recover_grid(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """``(codes, scale, zero, misses)`` of a matrix stored dequantized on ``scheme``'s group grid.

    codes: unsigned (asymmetric, ``[0, 2^b - 1]``) or signed (symmetric), shape of ``w``; scale and
    zero: ``(rows, groups)``; misses: groups on none of the candidate grids (0: every weight is on)."""
    rows, cols = w.shape
    g = cols if scheme.group_size <= 0 else scheme.group_size
    if cols % g:
        raise UserError(f"group size {g} does not divide a matrix's {cols} inputs; the variant is not on this grid")
    wg = w.double().reshape(rows, cols // g, g)
    if scheme.symmetric:  # the largest |w| on code Q (refusalkit) or on -(Q + 1) (compressed-tensors' own)
        qmax = 2 ** (scheme.bits - 1) - 1
        absmax = wg.abs().amax(-1)
        scale, found = torch.zeros_like(absmax), torch.zeros_like(absmax, dtype=torch.bool)
        for s in ((absmax / qmax).clamp(min=1e-5 / qmax), (absmax / (qmax + 1)).clamp(min=1e-5 / qmax)):
            k = wg / s.unsqueeze(-1)
            c = torch.round(k)
            ok = ((k - c).abs() <= TOLERANCE).all(-1) & (c >= -qmax - 1).all(-1) & (c <= qmax).all(-1) & ~found
            scale, found = torch.where(ok, s, scale), found | ok
        scale = torch.where(found, scale, (absmax / qmax).clamp(min=1e-5 / qmax))
        codes = torch.round(wg / scale.unsqueeze(-1)).clamp(-qmax - 1, qmax)
        return codes.reshape(rows, cols).to(torch.int8), scale.float(), None, int((~found).sum())
    qmax = 2**scheme.bits - 1
    mx, mn = wg.amax(-1), wg.amin(-1)
    candidates = (
        ((mx - mn).clamp(min=1e-5) / qmax, None),  # both ends used (the zero point was not clamped)
        ((mx - mn).clamp(min=1e-5) / (qmax - 1), None),  # the maximum one code short (w / s rounded down at .5)
        (mx.clamp(min=1e-12) / qmax, 0.0),  # one sign, zero point clamped to 0
        ((-mn).clamp(min=1e-12) / qmax, float(qmax)),  # one sign, zero point clamped to Q
    )
    scale = torch.zeros_like(mx)
    zero = torch.zeros_like(mx)
    found = torch.zeros_like(mx, dtype=torch.bool)
    for s, z_fixed in candidates:
        z = (-torch.round(mn / s)).clamp(0, qmax) if z_fixed is None else torch.full_like(s, z_fixed)
        k = wg / s.unsqueeze(-1)
        c = torch.round(k) + z.unsqueeze(-1)
        ok = ((k - torch.round(k)).abs() <= TOLERANCE).all(-1) & (c >= 0).all(-1) & (c <= qmax).all(-1) & ~found
        scale, zero, found = torch.where(ok, s, scale), torch.where(ok, z, zero), found | ok
    scale = torch.where(found, scale, (mx - mn).clamp(min=1e-5) / qmax)
    codes = (torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, qmax)
    return codes.reshape(rows, cols).to(torch.uint8), scale.float(), zero.to(torch.int32), int((~found).sum())


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``(c - z)·s`` per group, float32 (the weights a compressed-tensors loader gives back)."""
    rows, cols = codes.shape
    g = cols if group_size <= 0 else group_size
    c = codes.float().reshape(rows, cols // g, g)
    if zero is not None:
        c = c - zero.float().unsqueeze(-1)
    return (c * scale.unsqueeze(-1)).reshape(rows, cols)


def _targets(model: Any) -> tuple[dict[str, torch.nn.Linear], list[str]]:
    """The decoder blocks' linear layers (quantized) and every other linear (left dense)."""
    from refusalkit.compress.blockwise import linear_layers
    from refusalkit.models.structure import decoder_layers

    names = {m: n for n, m in model.named_modules()}
    targets: dict[str, torch.nn.Linear] = {}
    for layer in decoder_layers(model):
        for n, lin in linear_layers(layer).items():
            if not isinstance(lin, torch.nn.Linear):
                raise UserError(
                    f"block matrix {n} is not a Linear layer (a fused expert or Conv1D weight); compressed-tensors' "
                    "Linear format cannot hold it: export --format safetensors or gguf"
                )
            targets[f"{names[layer]}.{n}"] = lin
    others = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in targets]
    return targets, others


@contextlib.contextmanager
def _quiet_tqdm() -> Iterator[None]:
    """The library's ``tqdm`` bars off while it compresses (the export prints one summary)."""
    from compressed_tensors.compressors.model_compressors import model_compressor as mc

    before = getattr(mc, "tqdm", None)
    if before is not None:
        mc.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        if before is not None:
            mc.tqdm = before


def write_compressed_tensors(model_dir: Path, scheme: Scheme, out: Path) -> dict[str, Any]:
    """The checkpoint ``model_dir`` as a pack-quantized compressed-tensors folder in ``out`` (model
    weights, config.json with its ``quantization_config``, tokenizer and generation files)."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            apply_quantization_config,
        )
    except ImportError:
        raise UserError(
            "--format compressed-tensors needs the compressed-tensors library; run: pip install 'refusalkit[formats]'"
        ) from None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    targets, others = _targets(model)
    grids, worst, misses = {}, 0.0, {}
    with torch.no_grad():
        for name, lin in targets.items():
            codes, scale, zero, miss = recover_grid(lin.weight.data, scheme)
            if miss:
                misses[name] = miss
            grids[name] = (scale, zero)
            on_grid = dequantize(codes, scale, zero, scheme.group_size)
            worst = max(worst, float((on_grid - lin.weight.data.float()).abs().max()))
            lin.weight.copy_(on_grid)  # exactly (c - z)·s: the library re-derives the same codes from it
    if misses:
        first = next(iter(misses))
        raise UserError(
            f"{len(misses)} matrices are off their {scheme.bits}-bit group grid ({first}: {misses[first]} groups); "
            "the variant was edited without requantizing: export --format safetensors or gguf"
        )
    args = QuantizationArgs(
        num_bits=scheme.bits,
        type="int",
        symmetric=scheme.symmetric,
        strategy="group" if scheme.group_size > 0 else "channel",
        group_size=scheme.group_size if scheme.group_size > 0 else None,
    )
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=others,
        quantization_status="frozen",
    )
    apply_quantization_config(model, config, show_progress=False)
    shift = 0 if scheme.symmetric else 2 ** (scheme.bits - 1)
    with torch.no_grad():
        for name, lin in targets.items():
            scale, zero = grids[name]
            lin.weight_scale.copy_(scale.to(lin.weight_scale.dtype))
            if zero is not None:
                lin.weight_zero_point.copy_((zero - shift).to(lin.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    with _quiet_tqdm():  # the library's own bar; the export prints its summary
        compressor.compress_model(model)
    model.save_pretrained(str(out))
    compressor.update_config(str(out))
    for f in model_dir.iterdir():  # tokenizer, chat template: as the variant has them (weights and configs written)
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and "index" not in f.name
            and not (out / f.name).exists()
        ):
            shutil.copy2(f, out / f.name)
    return {
        "scheme": {**scheme.describe(), "format": "pack-quantized"},
        "matrices_quantized": len(targets),
        "left_dense": others,
        "max_abs_error": worst,
        "compressed_tensors_version": compressed_tensors.__version__,
    }
