"""``refusalkit export``: a variant of a run in the format it is served in, with a model card.

``--out`` is a new folder holding the model file(s), ``README.md`` (the Hub's YAML metadata and a
card a person reads: what was done, the verdicts with their intervals, how to reproduce) and
``reproduce.json`` (refusalkit version, command, configuration, seeds, sha256 of the inputs and
of every output file). The folder is written beside ``--out`` and renamed into place at the end:
an interrupted export leaves nothing half-written.

* ``gguf``: :mod:`refusalkit.export.gguf_file` (the base model's GGUF is the template).
* ``safetensors``: the variant's own checkpoint (dense weights with their zeros; LLM.int8 in
  bitsandbytes' 8-bit layout).

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
from refusalkit.export.gguf_file import K_QUANTS, KEEPS_ZEROS, PYTHON_TYPES, round_trip, write_gguf

FORMATS = ("gguf", "safetensors", "compressed-tensors")
HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_request(fmt: str, typ: str | None, out: Path, force: bool, push_to: str | None) -> str:
    """The type to write, after every check that needs no model (one line, exit 2, on bad input)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "compressed-tensors":
        raise UserError("--format compressed-tensors is not available yet; export --format safetensors (dense) or gguf")
    if fmt == "safetensors" and typ not in (None, "source"):
        raise UserError("--type applies to --format gguf; a safetensors export keeps the variant's own weights")
    typ = (typ or "f16").lower() if fmt == "gguf" else "source"
    if fmt == "gguf" and typ in K_QUANTS:
        raise UserError(
            f"--type {typ} is a k-quant, written by llama.cpp's quantizer; install it with "
            "pip install 'refusalkit[llama]' (not supported yet), or use one of " + ", ".join(PYTHON_TYPES)
        )
    if fmt == "gguf" and typ not in (*PYTHON_TYPES, "source"):
        raise UserError(f"unknown --type {typ!r} for gguf; use one of {', '.join(PYTHON_TYPES)} or source")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not empty; choose another --out or give --force to replace it")
    if push_to is not None and not HUB_REPO.fullmatch(push_to):
        raise UserError(f"--push-to-hub {push_to!r} is not a hub repository name; use owner/name")
    return typ


def base_gguf(cfg: Config) -> Path | None:
    """The run's base model as a GGUF file, when it came as one (the default model, smollm2-135m, a
    ``.gguf`` path); None for a Hugging Face folder or hub id."""
    from refusalkit.core.external import artifact_file, cache_dir
    from refusalkit.models.loading import DEFAULT_GGUF_NAME, assemble_default_gguf

    if cfg.model == "default":
        path = cache_dir() / "gguf" / DEFAULT_GGUF_NAME
        return path if path.exists() else assemble_default_gguf(path)
    if cfg.model == "smollm2-135m":
        return artifact_file("smollm2-135m")
    path = Path(cfg.model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def source_type(info: dict[str, Any] | None) -> str:
    """``--type source``: the GGUF type an imported variant's block matrices were stored in."""
    types = (info or {}).get("types") or {}
    if (info or {}).get("format") != "gguf" or not types:
        raise UserError("--type source needs a variant imported from a GGUF file; name the type instead")
    main = max(types, key=types.get).lower()
    if main not in PYTHON_TYPES:
        raise UserError(
            f"the variant was imported from {main} ({', '.join(sorted(types))}), a type written by llama.cpp's "
            f"quantizer; name one of {', '.join(PYTHON_TYPES)} instead"
        )
    return main


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    """A saved checkpoint's tensors (float32 where they are floating point)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise UserError(f"{model_dir} holds no safetensors weights; re-create the variant")
    return state


def edit_survival(layout: RunLayout, variant: str, typ: str) -> dict[str, Any] | None:
    """How much of a repaired variant's edit the type keeps, per edited matrix (None: not repaired)."""
    if not layout.repair_info(variant).exists():
        return None
    source = artifacts.read_json(layout.repair_info(variant)).get("source_variant")
    if not source or not layout.has_model(source):
        return None
    from refusalkit.compress.imported import checkpoint_tensors

    names, rep = checkpoint_tensors(str(layout.model(variant)))
    src = checkpoint_tensors(str(layout.model(source)))[1]
    out: dict[str, Any] = {}
    for k in names:  # one pair of tensors in memory at a time (a 70B checkpoint is read, not held)
        w, v = rep(k), src(k)
        if v is None or w.dim() < 2 or not w.is_floating_point() or torch.equal(w, v):
            continue
        intended = (w.double() - v.double()).flatten()
        if typ in ("source", "f32"):
            realized = intended
        else:
            realized = (round_trip(w, typ).double() - round_trip(v, typ).double()).flatten()
        n2 = float(intended @ intended)
        out[k] = {
            "intended_norm": n2**0.5,
            "kept": float(realized @ intended) / n2 if n2 else None,
            "residual": float((realized - intended).norm()) / n2**0.5 if n2 else None,
        }
    return out


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
    if variant != "base" and not layout.has_model(variant):
        raise UserError(f"{layout.root} has no variant {variant!r}; see its folders, or run refusalkit compress")
    compression = artifacts.read_json(layout.compression(variant)) if layout.compression(variant).exists() else None
    if fmt == "gguf" and typ == "source":
        typ = source_type(compression)
    t0 = time.time()
    model_dir = _model_dir(cfg, layout, variant)
    tmp = artifacts.make_temp_dir(out)
    try:
        files, detail = _write_model(cfg, model_dir, variant, fmt, typ, tmp)
        survival = edit_survival(layout, variant, typ if fmt == "gguf" else "f32")
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
    cfg: Config, model_dir: Path, variant: str, fmt: str, typ: str, tmp: Path
) -> tuple[list[str], dict[str, Any]]:
    """The model file(s) of the checkpoint ``model_dir`` in ``tmp``: their names and what was written."""
    from transformers import AutoConfig

    from refusalkit.models.int8 import is_int8_checkpoint

    if fmt == "safetensors":
        names = []
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
                names.append(f.name)
        return names, {}
    if is_int8_checkpoint(model_dir):
        raise UserError("an LLM.int8 variant exports as --format safetensors (bitsandbytes' 8-bit layout)")
    template = base_gguf(cfg)
    if template is None:
        raise UserError(
            "GGUF export copies the tokenizer and metadata from the base model's own GGUF file, and this run's base "
            "came as a Hugging Face model; export --format safetensors and convert it with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    name = f"{variant.replace(':', '-').replace('+', '-')}-{typ}.gguf"
    counts = write_gguf(_state(model_dir), AutoConfig.from_pretrained(str(model_dir)), template, tmp / name, typ)
    return [name], {"types_written": counts, "template": str(template), "keeps_zeros": KEEPS_ZEROS.get(typ, True)}


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
