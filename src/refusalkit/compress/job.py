"""The ``compress`` job: the run's base model -> a named variant under ``DIR/<variant>/``.

``DIR/<variant>/model/`` is a checkpoint that ``transformers`` loads (pruned and fake-quantized
models: dense weights in the model's dtype; LLM.int8: bitsandbytes' 8-bit layout) and
``DIR/<variant>/compression.json`` records the method, its parameters, the calibration data,
the measured sparsity (overall and per layer), bits, size on disk, wall time and peak memory.
``compression.json`` is written last: its presence marks a finished variant.
"""

from __future__ import annotations

import logging
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import artifacts
from ..config import GROUP_QUANT as QUANT
from ..config import PRUNING, Config
from ..errors import UserError
from ..models import LoadedModel, decoder_layers, load_model
from .blockwise import InputStats, advance, capture_inputs, gather, linear_layers, release_memory, run_block
from .calibration import Calibration, build_calibration
from .int8 import Int8Linear, bnb_available, quantization_config, replace_linears, skip_modules
from .pruning import apply_mask, check_nm, magnitude_mask, parse_sparsity, sparsegpt_prune, wanda_mask
from .quant import awq_block, check_group, rtn_linear

log = logging.getLogger(__name__)

METHODS = {
    "magnitude": "magnitude pruning (|W|, layer-wise comparison; N:M per group); no calibration",
    "wanda": "Wanda pruning (|W| * ||X||, per output row), block by block on calibration data",
    "sparsegpt": "SparseGPT pruning (OBS with weight updates), block by block on calibration data",
    "llm-int8": "LLM.int8: vector-wise int8 with 16-bit outlier features (threshold 6.0)",
    "awq": "AWQ: activation-aware scales + clipping, group-wise asymmetric quantization (default 4 bits, group 128)",
    "rtn": "round-to-nearest group-wise asymmetric quantization (the AWQ paper's baseline)",
}
NEEDS_CALIBRATION = ("wanda", "sparsegpt", "awq")
DEFAULT_CALIBRATION = "wikipedia"


@dataclass
class CompressSpec:
    method: str
    sparsity: str | None = None
    bits: int | None = None
    group_size: int = 128
    threshold: float = 6.0
    backend: str = "auto"  # llm-int8: auto | bitsandbytes | torch
    damp: float = 0.01
    blocksize: int = 128
    calibration: str = DEFAULT_CALIBRATION
    n_calibration: int = 32
    seq_len: int = 256
    calibration_chat: bool | None = None
    seed: int = 0
    batch_size: int = 8
    name: str | None = None
    awq_search_tokens: int = 2048

    def __post_init__(self) -> None:
        m = self.method.strip().lower()
        full = re.fullmatch(r"(magnitude|wanda|sparsegpt)-(.+)", m)
        quant = re.fullmatch(r"(awq|rtn)-w(\d+)", m)
        if full:
            m, self.sparsity = full.group(1), full.group(2)
        elif quant:
            m, self.bits = quant.group(1), int(quant.group(2))
        elif m == "int8":
            m = "llm-int8"
        if m not in METHODS:
            raise UserError(f"unknown compression method {self.method!r}; use one of {', '.join(METHODS)} "
                            "(or a full name such as wanda-0.5, wanda-2:4, awq-w4)")
        self.method = m
        if m in PRUNING:
            self.sparsity = "0.5" if self.sparsity is None else str(self.sparsity)
            self.sparse = parse_sparsity(self.sparsity)
        elif self.sparsity is not None:
            raise UserError(f"--sparsity applies to pruning, not to {m}")
        if m in QUANT:
            self.bits = 4 if self.bits is None else int(self.bits)
            if not 2 <= self.bits <= 8:
                raise UserError(f"{m} supports 2 to 8 bits, not {self.bits}")
        elif m == "llm-int8":
            if self.bits not in (None, 8):
                raise UserError("llm-int8 is 8-bit; drop --bits or use awq / rtn for other widths")
            self.bits = 8
            if self.threshold < 0:
                raise UserError("--threshold must be 0 or more (0 turns the outlier decomposition off)")
            if self.backend not in ("auto", "bitsandbytes", "torch"):
                raise UserError(f"unknown int8 backend {self.backend!r}; use auto, bitsandbytes or torch")
        elif self.bits is not None:
            raise UserError(f"--bits applies to quantization, not to {m}")
        if not 0 < self.damp < 10:
            raise UserError("--damp must be in (0, 10); SparseGPT uses 0.01 of the mean Hessian diagonal")
        if self.blocksize < 1 or self.batch_size < 1:
            raise UserError("--blocksize and --batch-size must be at least 1")
        if m in NEEDS_CALIBRATION and self.n_calibration < 1:
            raise UserError(f"too few calibration samples ({self.n_calibration}); use --n-calibration 1 or more")
        if self.name is not None:
            check_name(self.name)

    @property
    def variant(self) -> str:
        if self.name:
            return self.name
        if self.method in PRUNING:
            return f"{self.method}-{self.sparse.label()}"
        if self.method in QUANT:
            return f"{self.method}-w{self.bits}" + ("" if self.group_size == 128 else f"-g{self.group_size}")
        return "llm-int8"

    def parameters(self) -> dict[str, Any]:
        p: dict[str, Any] = {}
        if self.method in PRUNING:
            p["sparsity"] = self.sparse.to_json()
            p["comparison"] = {"magnitude": "layer", "wanda": "row", "sparsegpt": "block (adaptive)"}[self.method] \
                if not self.sparse.structured else f"{self.sparse.n}:{self.sparse.m} groups"
        if self.method == "sparsegpt":
            p.update(damp=self.damp, blocksize=self.blocksize)
        if self.method in QUANT:
            p.update(bits=self.bits, group_size=self.group_size, zero_point=True, storage="dequantized (simulated)")
        if self.method == "awq":
            p.update(n_grid=20, max_shrink=0.5, clip=True, clip_tokens=512, search_tokens=self.awq_search_tokens)
        if self.method == "llm-int8":
            p.update(threshold=self.threshold)
        return p


def check_name(name: str) -> None:
    if name in ("base", "data", "") or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:+-]*", name):
        raise UserError(f"variant name {name!r} is not usable; use letters, digits and . _ : + - (not 'base' or 'data')")


def _peak_rss() -> int:
    """Peak resident memory of this process image in bytes.

    Linux: ``VmHWM`` of /proc/self/status (ru_maxrss would include the RSS of a parent process
    at fork time, e.g. a benchmark that launched ``refusalkit compress``); elsewhere ru_maxrss.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _int8_backend(spec: CompressSpec) -> str:
    if spec.backend == "auto":
        return "bitsandbytes" if bnb_available() else "torch"
    if spec.backend == "bitsandbytes" and not bnb_available():
        raise UserError("the bitsandbytes backend needs bitsandbytes; run: pip install bitsandbytes (or use --backend torch)")
    return spec.backend


# ------------------------------------------------------------------------------------------------
# Methods (each edits the model in place and returns per-layer notes)
# ------------------------------------------------------------------------------------------------


def _layer_record(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    b, a = before.float(), after.float()
    return {"sparsity": (a == 0).float().mean().item(), "rel_error": ((a - b).norm() / b.norm().clamp(min=1e-12)).item(),
            "numel": a.numel()}


def _check_shapes(model: nn.Module, spec: CompressSpec) -> None:
    """Impossible settings fail before any work (N:M groups, quantization groups)."""
    for i, layer in enumerate(decoder_layers(model)):
        for n, lin in linear_layers(layer).items():
            if spec.method in PRUNING:
                check_nm(spec.sparse, lin.in_features, f"layer {i} {n}")
            if spec.method in QUANT:
                check_group(lin.in_features, spec.group_size, f"layer {i} {n}")


@torch.no_grad()
def compress_model(lm: LoadedModel, spec: CompressSpec, cal: Calibration | None,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Compress ``lm.model`` in place (block by block); return ``per_layer`` records and method notes."""
    model = lm.model
    layers = decoder_layers(model)
    _check_shapes(model, spec)
    per_layer: dict[str, dict[str, float]] = {}
    notes: dict[str, Any] = {}
    inputs = capture_inputs(model, cal.samples, spec.batch_size) if spec.method in NEEDS_CALIBRATION else None
    for i, layer in enumerate(layers):
        lins = linear_layers(layer)
        before = {n: lin.weight.detach().clone() for n, lin in lins.items()}
        if spec.method == "magnitude":
            for lin in lins.values():
                apply_mask(lin, magnitude_mask(lin.weight, spec.sparse))
        elif spec.method in ("wanda", "sparsegpt"):
            acc: dict[str, torch.Tensor] = {}
            if spec.method == "wanda":
                def update(n: str, x: torch.Tensor) -> None:
                    if n not in acc:
                        acc[n] = torch.zeros(x.shape[1], device=x.device)
                    acc[n].add_((x * x).sum(0))
            else:
                def update(n: str, x: torch.Tensor) -> None:
                    if n not in acc:
                        acc[n] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                    acc[n].addmm_(x.t(), x)
            stats = InputStats(lins, update)
            gather(layer, inputs, stats)
            for n, lin in lins.items():
                a = acc[stats.owner[n]]
                if spec.method == "wanda":
                    apply_mask(lin, wanda_mask(lin.weight, a, spec.sparse))
                else:
                    # in place: a loaded checkpoint's weights may be memory-mapped; rebinding would
                    # keep the mapped pages resident beside the new tensor
                    lin.weight.data.copy_(sparsegpt_prune(lin.weight.data, a, spec.sparse, spec.blocksize, spec.damp,
                                                          f"layer {i} {n}"))
            del acc
            inputs = advance(inputs, run_block(layer, inputs))
        elif spec.method == "rtn":
            for n, lin in lins.items():
                rtn_linear(lin, spec.bits, spec.group_size, f"layer {i} {n}")
        elif spec.method == "awq":
            outputs, info = awq_block(layer, inputs, spec.bits, spec.group_size, search_tokens=spec.awq_search_tokens)
            notes.setdefault("awq_groups", {})[str(i)] = info["groups"]
            inputs = advance(inputs, outputs)
        for n, lin in lins.items():
            per_layer[f"{i}.{n}"] = _layer_record(before[n], lin.weight)
        del before
        release_memory()
        if progress:
            progress(1)
    return {"per_layer": per_layer, "notes": notes}


@torch.no_grad()
def int8_model(lm: LoadedModel, spec: CompressSpec) -> dict[str, Any]:
    """Pure-PyTorch LLM.int8: every linear except the head becomes :class:`Int8Linear`."""
    model = lm.model
    skip = skip_modules(model)
    per_layer = {}
    for i, layer in enumerate(decoder_layers(model)):
        for n, lin in linear_layers(layer).items():
            cb_scb = Int8Linear.from_linear(lin, spec.threshold)
            per_layer[f"{i}.{n}"] = _layer_record(lin.weight, cb_scb.dequantized().to(lin.weight.dtype))
    replace_linears(model, spec.threshold, skip)
    model.config.quantization_config = quantization_config(spec.threshold, skip)
    return {"per_layer": per_layer, "notes": {"skip_modules": skip}}


def _int8_records(model: nn.Module) -> dict[str, dict[str, float]]:
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


def _save_model(lm: LoadedModel, model_dir: Path) -> None:
    """Save atomically: write a temporary sibling folder, then swap it in."""
    tmp = artifacts.make_temp_dir(model_dir)
    old = None
    try:
        lm.model.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        if model_dir.exists():
            old = model_dir.with_name(f".{model_dir.name}.old-{int(time.time())}")
            model_dir.rename(old)
        tmp.rename(model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def run_compress(cfg: Config, root: str | Path, spec: CompressSpec, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Create (or reuse) the variant; return the contents of its ``compression.json``."""
    from ..pipeline import Progress, prepare
    from ..manifest import update_manifest

    root = Path(root)
    name = spec.variant
    check_name(name)
    vdir = root / name
    cpath, mdir = vdir / "compression.json", vdir / "model"
    if cpath.exists() and (mdir / "config.json").exists() and not force:
        out = artifacts.read_json(cpath)
        out["reused"] = True
        return out
    manifest = prepare(cfg, root, force=False)
    t0 = time.time()
    cal = None
    backend = None
    if spec.method == "llm-int8":
        backend = _int8_backend(spec)
    if backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.threshold)
        lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, chat_template=cfg.chat_template,
                        quantization_config=qc)
        result = {"per_layer": _int8_records(lm.model), "notes": {"skip_modules": skip_modules(lm.model)}}
    else:
        lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, chat_template=cfg.chat_template)
        if spec.method in NEEDS_CALIBRATION:
            cal = build_calibration(lm.tokenizer, spec.calibration, spec.n_calibration, spec.seq_len, spec.seed,
                                    spec.calibration_chat, cfg.system_prompt)
        if spec.method == "llm-int8":
            result = int8_model(lm, spec)
        else:
            bar = Progress(progress).bar(lm.n_layers, f"{name}: blocks", unit="block")
            try:
                result = compress_model(lm, spec, cal, bar.update)
            finally:
                bar.close()
    compress_seconds = time.time() - t0
    _save_model(lm, mdir)
    from ..repair import discard_analyses

    discard_analyses(root, name)  # analyses of the replaced model no longer apply
    per_layer = result["per_layer"]
    total = sum(r["numel"] for r in per_layer.values())
    zeros = sum(r["sparsity"] * r["numel"] for r in per_layer.values())
    info: dict[str, Any] = {
        "variant": name, "method": spec.method, "parameters": spec.parameters(),
        "backend": backend, "bits": spec.bits,
        "calibration": None if cal is None else cal.info,
        "sparsity": zeros / max(total, 1), "n_compressed_params": total,
        "base_model": {"spec": cfg.model, "source": lm.source, "dtype": lm.info["dtype"], "device": lm.info["device"]},
        "size_on_disk_bytes": _dir_bytes(mdir),
        "wall_seconds": round(time.time() - t0, 2), "compress_seconds": round(compress_seconds, 2),
        "peak_rss_bytes": _peak_rss(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "per_layer": per_layer, **result["notes"],
        "spec": {k: v for k, v in asdict(spec).items()},
    }
    if spec.method in QUANT:
        g = spec.group_size
        info["packed_bytes_estimate"] = int(total * spec.bits / 8 + (total / (g if g > 0 else 1)) * 4)
    artifacts.write_json(cpath, info)
    update_manifest(root / "manifest.json", cfg.seed, f"{name}/compress", info["wall_seconds"], manifest)
    info["reused"] = False
    return info
