"""The ``compress`` job: the run's base model -> a named variant under ``DIR/<variant>/``.

``DIR/<variant>/model/`` is a checkpoint that ``transformers`` loads (pruned and fake-quantized
models: dense weights in the model's dtype; LLM.int8: bitsandbytes' 8-bit layout) and
``DIR/<variant>/compression.json`` records the method, its parameters, the calibration data,
the measured sparsity (overall and per layer), bits, size on disk, wall time and peak memory.
``compression.json`` is written last: its presence marks a finished variant.
"""

from __future__ import annotations

import gc
import logging
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusalkit.compress import precision
from refusalkit.compress.awq import VIEW_SCALES
from refusalkit.compress.blockwise import capture_inputs, eager_experts, linear_layers
from refusalkit.compress.calibration import Calibration, build_calibration
from refusalkit.compress.int8 import layer_record
from refusalkit.compress.methods import METHODS, PRESERVING_SPEC_KEYS, BlockStep, Method, parse_method
from refusalkit.core import artifacts
from refusalkit.core.config import CompressConfig, Config
from refusalkit.core.counters import since, snapshot
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout, prepare
from refusalkit.core.manifest import update_manifest
from refusalkit.core.progress import Progress
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.models.session import release_memory
from refusalkit.models.structure import decoder_layers

log = logging.getLogger(__name__)

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
    calibration_dtype: str = "auto"  # wanda / sparsegpt: float64 | model | auto (refusalkit.compress.precision)
    refusal_weight: float = 1.0  # rp-* methods (refusalkit.compress.refusal)
    n_refusal: int = 32

    def __post_init__(self) -> None:
        method, fields_set = parse_method(self.method)
        self.method = method.name
        for key, value in fields_set.items():  # a full name such as wanda-2:4 or awq-w8
            setattr(self, key, int(value) if key == "bits" else value)
        method.configure(self)
        if not 0 < self.damp < 10:
            raise UserError("--damp must be in (0, 10); SparseGPT uses 0.01 of the mean Hessian diagonal")
        if self.blocksize < 1 or self.batch_size < 1:
            raise UserError("--blocksize and --batch-size must be at least 1")
        if method.needs_calibration and self.n_calibration < 1:
            raise UserError(f"too few calibration samples ({self.n_calibration}); use --n-calibration 1 or more")
        if method.preserves and not (self.refusal_weight > 0 and self.n_refusal >= 1):
            raise UserError("--refusal-weight must be above 0 and --n-refusal at least 1")
        if self.name is not None:
            check_name(self.name)

    @property
    def registered(self) -> Method:
        return METHODS[self.method]

    @classmethod
    def from_config(
        cls,
        method: str,
        c: CompressConfig,
        *,
        sparsity: str | None = None,
        bits: int | None = None,
        name: str | None = None,
    ) -> CompressSpec:
        """The spec of ``method`` with the how-to settings of the config's ``compress`` section."""
        return cls(
            method=method,
            sparsity=sparsity,
            bits=bits,
            group_size=c.group_size,
            threshold=c.threshold,
            backend=c.backend,
            damp=c.damp,
            blocksize=c.blocksize,
            calibration=c.calibration,
            n_calibration=c.n_calibration,
            seq_len=c.seq_len,
            calibration_chat=c.calibration_chat,
            seed=c.calibration_seed,
            batch_size=c.calibration_batch_size,
            name=name,
            awq_search_tokens=c.awq_search_tokens,
            calibration_dtype=c.calibration_dtype,
            refusal_weight=c.refusal_weight,
            n_refusal=c.n_refusal,
        )

    @property
    def variant(self) -> str:
        return self.name or self.registered.variant_name(self)

    def parameters(self) -> dict[str, Any]:
        return self.registered.parameters(self)


def check_name(name: str) -> None:
    if name in ("base", "data", "") or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:+-]*", name):
        raise UserError(
            f"variant name {name!r} is not usable; use letters, digits and . _ : + - (not 'base' or 'data')"
        )


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


# ------------------------------------------------------------------------------------------------
# Methods (each edits the model in place and returns per-layer notes)
# ------------------------------------------------------------------------------------------------


def _check_shapes(model: nn.Module, spec: CompressSpec) -> None:
    """Impossible settings fail before any work (N:M groups, quantization groups)."""
    for i, layer in enumerate(decoder_layers(model)):
        for n, lin in linear_layers(layer).items():
            spec.registered.check_linear(spec, lin, f"layer {i} {n}")


@torch.no_grad()
def compress_model(
    lm: LoadedModel,
    spec: CompressSpec,
    cal: Calibration | None,
    progress: Callable[[int], None] | None = None,
    refusal: Any = None,
) -> dict[str, Any]:
    """Compress ``lm.model`` in place, block by block, with the method's ``compress_block``; return
    ``per_layer`` records and method notes. A refusal-preserving method needs ``refusal`` (a
    :class:`~refusalkit.compress.refusal.RefusalTarget`)."""
    method = spec.registered
    if method.compress_block is None:
        raise ValueError(f"{method.name} is not a block-by-block method")
    model = lm.model
    _check_shapes(model, spec)
    per_layer: dict[str, dict[str, float]] = {}
    notes: dict[str, Any] = {}
    dtype = None
    if method.exact_calibration and method.needs_calibration:
        dtype = precision.resolve(spec.calibration_dtype, model.get_input_embeddings().weight.device)
        notes["calibration_dtype"] = str(dtype or model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    with eager_experts(model):
        inputs = capture_inputs(model, cal.samples, spec.batch_size, dtype) if method.needs_calibration else None
        shared: dict[str, Any] = {"model": model}
        if method.preserves:
            from refusalkit.compress.refusal import start_streams

            if refusal is None:
                raise ValueError(f"{method.name} needs the refusal target (refusalkit.compress.refusal.load_target)")
            start_streams(model, refusal, spec.batch_size, dtype)
            shared["refusal"] = refusal
            notes["refusal_preservation"] = {"target": refusal.info, "blocks": {}}
        # The objects alive now (the model, tokenizer, imported modules) are moved out of the collector's
        # reach, so the full collection after each block only walks what that block made: it took 17%
        # of a SmolLM2 sweep's time walking every object of the process (measured with cProfile).
        gc.freeze()
        try:
            layers = decoder_layers(model)
            for i, layer in enumerate(layers):
                lins = linear_layers(layer)
                before = {n: lin.weight.detach().clone() for n, lin in lins.items()}
                step = BlockStep(i, layer, lins, inputs, spec, notes, last=i == len(layers) - 1, shared=shared)
                with precision.calibration_precision(dtype):
                    inputs = method.compress_block(step)
                for n, lin in lins.items():
                    per_layer[f"{i}.{n}"] = layer_record(before[n], lin.weight)
                del before
                release_memory()
                if progress:
                    progress(1)
        finally:
            gc.unfreeze()
    return {"per_layer": per_layer, "notes": notes}


def _save_model(lm: LoadedModel, model_dir: Path) -> None:
    """Save atomically: write a temporary sibling folder, then swap it in."""

    def write(tmp: Path) -> None:
        lm.model.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))

    save_atomically(model_dir, write)


def save_atomically(model_dir: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a temporary sibling folder, which then replaces ``model_dir``."""
    tmp = artifacts.make_temp_dir(model_dir)
    old = None
    try:
        write(tmp)
        if model_dir.exists():
            old = model_dir.with_name(f".{model_dir.name}.old-{int(time.time())}")
            model_dir.rename(old)
        tmp.rename(model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _refuse_uncovered(lm: LoadedModel, spec: CompressSpec) -> None:
    """A method that compresses ``nn.Linear`` layers only (AWQ, LLM.int8) would come back with a
    model's fused expert tensors or ``Conv1D`` layers untouched: one line instead."""
    from refusalkit.compress.blockwise import AliasLinear
    from refusalkit.compress.methods import listed

    if spec.registered.covers_views:
        return
    for i, block in enumerate(decoder_layers(lm.model)):
        views = {n: m for n, m in linear_layers(block).items() if isinstance(m, AliasLinear)}
        if views:
            fused = any(m.fused is not None for m in views.values())
            what = "experts in fused tensors" if fused else "Conv1D layers"
            shown = sorted({n.rsplit(".", 1)[0] if fused else n for n in views})
            raise UserError(
                f"{spec.method} cannot compress this model: block {i} keeps {what} "
                f"({', '.join(shown[:2])}{', …' if len(shown) > 2 else ''}) and {spec.method} acts on nn.Linear "
                f"layers only; use {' or '.join(m.name for m in listed() if m.covers_views)}"
            )


def _compressed_model(
    cfg: Config, spec: CompressSpec, progress: bool, layout: RunLayout
) -> tuple[LoadedModel, dict[str, Any], Calibration | None, str | None]:
    """The base model compressed in memory: (model, per-layer records and notes, calibration, backend)."""
    method = spec.registered

    def load(**kwargs: Any) -> LoadedModel:
        return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, chat_template=cfg.chat_template, **kwargs)

    if method.whole_model is not None:
        lm, result, backend = method.whole_model(spec, load)
        _refuse_uncovered(lm, spec)
        return lm, result, None, backend
    lm = load()
    _refuse_uncovered(lm, spec)
    cal = None
    if method.needs_calibration:
        cal = build_calibration(
            lm.tokenizer,
            spec.calibration,
            spec.n_calibration,
            spec.seq_len,
            spec.seed,
            spec.calibration_chat,
            cfg.system_prompt,
        )
    refusal = None
    if method.preserves:
        from refusalkit.compress.refusal import load_target

        refusal = load_target(layout, cfg, lm, spec)
    bar = Progress(progress).bar(lm.n_layers, f"{spec.variant}: blocks", unit="block")
    try:
        return lm, compress_model(lm, spec, cal, bar.update, refusal), cal, None
    finally:
        bar.close()


def run_compress(
    cfg: Config, root: str | Path, spec: CompressSpec, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Create (or reuse) the variant; return the contents of its ``compression.json``."""
    layout = RunLayout(root)
    name = spec.variant
    check_name(name)
    if layout.compression(name).exists() and layout.has_model(name) and not force:
        return {**artifacts.read_json(layout.compression(name)), "reused": True}
    if spec.registered.preserves:
        from refusalkit.compress.refusal import require_direction

        require_direction(layout, spec.method)
    manifest = prepare(cfg, layout.root, force=False, keep_existing=True)
    t0, before = time.time(), snapshot()
    lm, result, cal, backend = _compressed_model(cfg, spec, progress, layout)
    compress_seconds = time.time() - t0
    _save_model(lm, layout.model(name))
    layout.discard_analyses(name)  # analyses of the replaced model no longer apply
    scales = result["notes"].pop(VIEW_SCALES, None)
    layout.view_scales(name).unlink(missing_ok=True)
    if scales:
        artifacts.save_tensors(layout.view_scales(name), scales)
    info = _record(cfg, spec, lm, result, cal, backend, layout.model(name))
    info.update(wall_seconds=round(time.time() - t0, 2), compress_seconds=round(compress_seconds, 2))
    artifacts.write_json(layout.compression(name), info)
    update_manifest(
        layout.manifest, cfg.seed, f"{name}/compress", info["wall_seconds"], manifest, since(before)["tokens"]
    )
    info["reused"] = False
    return info


def _record(
    cfg: Config,
    spec: CompressSpec,
    lm: LoadedModel,
    result: dict[str, Any],
    cal: Calibration | None,
    backend: str | None,
    model_dir: Path,
) -> dict[str, Any]:
    """``compression.json``: method, parameters, calibration, measured sparsity, size, memory."""
    per_layer = result["per_layer"]
    total = sum(r["numel"] for r in per_layer.values())
    zeros = sum(r["sparsity"] * r["numel"] for r in per_layer.values())
    info: dict[str, Any] = {
        "variant": spec.variant,
        "method": spec.method,
        "parameters": spec.parameters(),
        "backend": backend,
        "bits": spec.bits,
        "calibration": None if cal is None else cal.info,
        "sparsity": zeros / max(total, 1),
        "n_compressed_params": total,
        "base_model": {"spec": cfg.model, "source": lm.source, "dtype": lm.info["dtype"], "device": lm.info["device"]},
        "size_on_disk_bytes": _dir_bytes(model_dir),
        "peak_rss_bytes": _peak_rss(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "per_layer": per_layer,
        **result["notes"],
        "spec": {k: v for k, v in asdict(spec).items() if spec.registered.preserves or k not in PRESERVING_SPEC_KEYS},
    }
    if "group_size" in info["parameters"]:  # group-wise quantization: the size a packed checkpoint would have
        g = spec.group_size
        info["packed_bytes_estimate"] = int(total * spec.bits / 8 + (total / (g if g > 0 else 1)) * 4)
    return info
