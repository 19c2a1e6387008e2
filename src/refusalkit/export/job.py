"""``refusalkit export``: a variant of a run in the format it is served in, with a model card.

``--out`` is a new folder holding the model file(s), ``README.md`` (the Hub's YAML metadata and a
card a person reads: what was done, the verdicts with their intervals, how to reproduce) and
``reproduce.json`` (refusalkit version, command, configuration, seeds, sha256 of the inputs and
of every output file). The folder is written beside ``--out`` and renamed into place at the end:
an interrupted export leaves nothing half-written.

* ``gguf``: :mod:`refusalkit.export.gguf_file` (the base model's GGUF is the template).
* ``safetensors``: the variant's own checkpoint (dense weights with their zeros; LLM.int8 in
  bitsandbytes' 8-bit layout).
* ``compressed-tensors``: :mod:`refusalkit.export.ct_file` (AWQ / RTN variants, pack-quantized, on the
  variant's own group grid; a repaired one through its source variant's grid).

For a repaired variant every export reports how much of the AIRD edit survives the target type:
per edited matrix, the realized edit (both the repaired and the unrepaired weights through the
type) projected on the intended one, ``<realized, intended> / |intended|^2`` (1: all of it).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from refusalkit import __version__
from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.external import sha256_file
from refusalkit.core.layout import RunLayout
from refusalkit.export import card
from refusalkit.export.gguf_file import (
    K_QUANTS,
    KEEPS_ZEROS,
    PYTHON_TYPES,
    Template,
    read_matrices,
    round_trip,
    stored_types,
    template_from_gguf,
    template_from_hf,
    write_gguf,
)

FORMATS = ("gguf", "safetensors", "compressed-tensors")
HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_request(fmt: str, typ: str | None, out: Path, force: bool, push_to: str | None) -> str:
    """The type to write, after every check that needs no model (one line, exit 2, on bad input)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "gguf" and typ not in (None, "source"):
        raise UserError(f"--type applies to --format gguf; a {fmt} export keeps the variant's own grid and weights")
    typ = (typ or "f16").lower() if fmt == "gguf" else "source"
    if fmt == "gguf" and typ in K_QUANTS:
        from refusalkit.export import llamacpp

        if not llamacpp.available():
            raise UserError(
                f"--type {typ} is a k-quant, written by llama.cpp's quantizer: {llamacpp.MISSING}; "
                "or use one of " + ", ".join(PYTHON_TYPES)
            )
    if fmt == "gguf" and typ not in (*PYTHON_TYPES, *K_QUANTS, "source"):
        raise UserError(f"unknown --type {typ!r} for gguf; use one of {', '.join(PYTHON_TYPES + K_QUANTS)} or source")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not empty; choose another --out or give --force to replace it")
    if push_to is not None and not HUB_REPO.fullmatch(push_to):
        raise UserError(f"--push-to-hub {push_to!r} is not a hub repository name; use owner/name")
    return typ


def base_gguf(cfg: Config) -> Path | None:
    """The run's base model as a GGUF file, when it came as one (a named model, a ``.gguf`` path); None
    for a Hugging Face folder or hub id."""
    from refusalkit.core.named_models import NAMED
    from refusalkit.models.loading import named_gguf

    if cfg.model in NAMED:
        return named_gguf(NAMED[cfg.model])[0]
    path = Path(cfg.model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def export_template(cfg: Config, model_dir: Path) -> Template:
    """What a GGUF export copies: the base model's own GGUF, else metadata built from the base's
    Hugging Face config and tokenizer."""
    path = base_gguf(cfg)
    if path is not None:
        return template_from_gguf(path)
    from transformers import AutoConfig

    from refusalkit.compress.imported import checkpoint_tensors
    from refusalkit.models.loading import resolve_model

    base = Path(resolve_model(cfg.model))
    if not base.is_dir():
        raise UserError("GGUF export builds its metadata from the base model's folder; give the base as a folder")
    return template_from_hf(base, AutoConfig.from_pretrained(str(model_dir)), checkpoint_tensors(str(model_dir))[0])


def source_type(info: dict[str, Any] | None) -> str:
    """``--type source``: the GGUF type an imported variant's block matrices were stored in."""
    types = (info or {}).get("types") or {}
    if (info or {}).get("format") != "gguf" or not types:
        raise UserError("--type source needs a variant imported from a GGUF file; name the type instead")
    return _mix(types)


def _mix(types: dict[str, int]) -> str:
    """The export type of a GGUF file's block matrices: the most frequent type, or the llama.cpp mix
    that stores it (Q4_K matrices beside Q6_K ones: q4_k_m; Q5_K beside Q6_K: q5_k_m)."""
    main = max(types, key=types.get).lower()
    if main in ("q4_k", "q5_k"):
        return main + ("_m" if "Q6_K" in types else "_s")
    if main == "q3_k":
        return "q3_k_m"
    if main in (*PYTHON_TYPES, *K_QUANTS):
        return main
    raise UserError(
        f"the variant was imported from {main} ({', '.join(sorted(types))}), which refusalkit cannot write; "
        f"name one of {', '.join(PYTHON_TYPES + K_QUANTS)} instead"
    )


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    """A saved checkpoint's tensors (float32 where they are floating point)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise UserError(f"{model_dir} holds no safetensors weights; re-create the variant")
    return state


def edit_survival(
    layout: RunLayout, variant: str, typ: str, template: Template | None = None, exported: Path | None = None
) -> dict[str, Any] | None:
    """How much of a repaired variant's edit the type keeps, per edited matrix (None: not repaired).

    The gguf library's types are applied to both matrices in memory; a k-quant is read back from
    ``exported`` and from the unrepaired variant written the same way by llama.cpp (its type mix
    can store a matrix in another type)."""
    if not layout.repair_info(variant).exists():
        return None
    source = artifacts.read_json(layout.repair_info(variant)).get("source_variant")
    if not source or not layout.has_model(source):
        return None
    from refusalkit.compress.imported import checkpoint_tensors

    names, rep = checkpoint_tensors(str(layout.model(variant)))
    src = checkpoint_tensors(str(layout.model(source)))[1]
    edited = []
    for k in names:  # one pair of tensors in memory at a time (a 70B checkpoint is read, not held)
        w, v = rep(k), src(k)
        if v is not None and w.dim() >= 2 and w.is_floating_point() and not torch.equal(w, v):
            edited.append(k)
    through = _k_quant_reader(template, layout, source, edited, exported, typ) if typ in K_QUANTS else None
    out: dict[str, Any] = {}
    for k in edited:
        w, v = rep(k), src(k)
        intended = (w.double() - v.double()).flatten()
        if typ in ("source", "f32"):
            realized = intended
        elif through is not None:
            if k not in through[0]:
                continue
            realized = (through[0][k].double() - through[1][k].double()).flatten()
        else:
            realized = (round_trip(w, typ).double() - round_trip(v, typ).double()).flatten()
        n2 = float(intended @ intended)
        out[k] = {
            "intended_norm": n2**0.5,
            "kept": float(realized @ intended) / n2 if n2 else None,
            "residual": float((realized - intended).norm()) / n2**0.5 if n2 else None,
        }
    return out


def _k_quant_reader(
    template: Template | None, layout: RunLayout, source: str, keys: list[str], exported: Path | None, typ: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The edited matrices as the exported k-quant file stores them, and as the unrepaired variant
    exported the same way stores them."""
    import tempfile

    from transformers import AutoConfig

    if template is None or exported is None:
        raise UserError("the edit's survival in a k-quant needs the exported file")
    config = AutoConfig.from_pretrained(str(layout.model(source)))
    with tempfile.TemporaryDirectory(dir=exported.parent) as d:
        unrepaired = Path(d) / "unrepaired.gguf"
        write_typed(layout.model(source), template, unrepaired, typ)
        return read_matrices(exported, config, keys), read_matrices(unrepaired, config, keys)


def run_export(
    cfg: Config,
    layout: RunLayout,
    variant: str,
    fmt: str,
    out: Path,
    typ: str | None = None,
    force: bool = False,
    push_to: str | None = None,
    check: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the export folder; return what ``reproduce.json`` records. ``check``: re-check the
    exported GGUF in a runtime (:mod:`refusalkit.export.recheck`) before any upload."""
    typ = check_request(fmt, typ, out, force, push_to)
    if check and fmt != "gguf":
        raise UserError("--check re-reads an exported GGUF file; use it with --format gguf")
    from refusalkit.models.int8 import is_int8_checkpoint

    if variant != "base" and not layout.has_model(variant):
        raise UserError(f"{layout.root} has no variant {variant!r}; see its folders, or run refusalkit compress")
    compression = artifacts.read_json(layout.compression(variant)) if layout.compression(variant).exists() else None
    if fmt == "gguf" and typ == "source":
        typ = source_type(compression)
        check_request(fmt, typ, out, True, None)  # a k-quant source needs llama.cpp
    t0 = time.time()
    model_dir = _model_dir(cfg, layout, variant)
    tmp = artifacts.make_temp_dir(out)
    try:
        template = export_template(cfg, model_dir) if fmt == "gguf" and not is_int8_checkpoint(model_dir) else None
        files, detail = _write_model(layout, model_dir, variant, fmt, typ, tmp, template)
        survival = edit_survival(layout, variant, typ if fmt == "gguf" else "f32", template, tmp / files[0])
        record = _record(cfg, layout, model_dir, variant, fmt, typ, tmp, files, detail, survival, compression, t0)
        artifacts.write_json(tmp / "reproduce.json", record)
        artifacts.write_text(tmp / "README.md", card.model_card(cfg, layout, variant, record))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if check:
        from refusalkit.export.recheck import recheck

        record["recheck"] = recheck(cfg, layout, variant, out / next(iter(record["files"])), typ, progress)
        artifacts.write_json(out / "reproduce.json", record)
        artifacts.write_text(out / "README.md", card.model_card(cfg, layout, variant, record))
    if push_to is not None:
        card.push(out, push_to)
        record["pushed_to"] = push_to
    return record


def _write_model(
    layout: RunLayout, model_dir: Path, variant: str, fmt: str, typ: str, tmp: Path, template: Template | None
) -> tuple[list[str], dict[str, Any]]:
    """The model file(s) of the checkpoint ``model_dir`` in ``tmp``: their names and what was written."""
    if fmt == "safetensors":
        names = []
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
                names.append(f.name)
        return names, {}
    if fmt == "compressed-tensors":
        from refusalkit.export.ct_file import scheme_of, write_compressed_tensors

        grid_of = _grid_variant(layout, variant)
        info = artifacts.read_json(layout.compression(grid_of)) if layout.compression(grid_of).exists() else None
        detail = write_compressed_tensors(model_dir, scheme_of(info, layout.view_scales(grid_of).exists()), tmp)
        return sorted(f.name for f in tmp.iterdir() if f.is_file()), detail
    if template is None:  # run_export builds none for an LLM.int8 checkpoint
        raise UserError("an LLM.int8 variant exports as --format safetensors (bitsandbytes' 8-bit layout)")
    name = f"{variant.replace(':', '-').replace('+', '-')}-{typ}.gguf"
    write_typed(model_dir, template, tmp / name, typ)
    detail: dict[str, Any] = {"types_written": stored_types(tmp / name), "template": template.source}
    if template.pre_tokenizer is not None:
        detail["pre_tokenizer"] = (
            template.pre_tokenizer + " (llama.cpp tokenizes the probe texts as the tokenizer does)"
        )
    if typ in K_QUANTS:
        from refusalkit.export import llamacpp

        detail["quantizer"] = f"llama.cpp {llamacpp.version()} (llama_model_quantize from float32)"
    return [name], {**detail, "keeps_zeros": KEEPS_ZEROS.get(typ, False)}


def write_typed(model_dir: Path, template: Template, out: Path, typ: str) -> None:
    """The checkpoint ``model_dir`` as the GGUF ``out`` in ``typ``: the gguf library's types directly;
    a k-quant through a float32 GGUF that llama.cpp's quantizer reads (removed afterwards)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    if typ not in K_QUANTS:
        write_gguf(_state(model_dir), config, template, out, typ)
        return
    from refusalkit.export.llamacpp import quantize_gguf

    float_file = out.with_name(f".{out.name}.f32")
    try:
        write_gguf(_state(model_dir), config, template, float_file, "f32")
        quantize_gguf(float_file, out, typ)
    finally:
        float_file.unlink(missing_ok=True)


def _grid_variant(layout: RunLayout, variant: str) -> str:
    """The variant whose compression put ``variant``'s weights on their grid (a repair's source)."""
    if layout.repair_info(variant).exists():
        return artifacts.read_json(layout.repair_info(variant)).get("source_variant") or variant
    return variant


def _model_dir(cfg: Config, layout: RunLayout, variant: str) -> Path:
    if variant != "base":
        return layout.model(variant)
    from refusalkit.models.loading import resolve_model

    path = Path(resolve_model(cfg.model))
    if not path.is_dir():
        raise UserError("the base model is a hub id; export a variant, or give the base model as a folder")
    return path


def _record(
    cfg: Config,
    layout: RunLayout,
    model_dir: Path,
    variant: str,
    fmt: str,
    typ: str,
    tmp: Path,
    files: list[str],
    detail: dict[str, Any],
    survival: dict[str, Any] | None,
    compression: dict[str, Any] | None,
    t0: float,
) -> dict[str, Any]:
    weights = sorted(model_dir.glob("*.safetensors"))
    written = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
    inputs = {f"{variant}/{f.name}": sha256_file(f) for f in weights}
    src = (compression or {}).get("source") or {}
    if src.get("sha256"):
        inputs["imported from " + str(src.get("given"))] = src["sha256"]
    return {
        "refusalkit_version": __version__,
        "command": " ".join(["refusalkit", *sys.argv[1:]]) if sys.argv and "refusalkit" in sys.argv[0] else None,
        "run": str(layout.root.resolve()),
        "variant": variant,
        "format": fmt,
        "type": typ,
        "files": written,  # in the order written
        "size_bytes": sum(v["bytes"] for v in written.values()),
        "dense_bytes": sum(f.stat().st_size for f in weights),
        "inputs_sha256": inputs,
        "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        "seed": cfg.seed,
        "calibration_seed": ((compression or {}).get("spec") or {}).get("seed"),
        "edit_survival": survival,
        "seconds": round(time.time() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "pid": os.getpid()},
        **detail,
    }
