"""The repaired checkpoint: the variant's files with the edited matrices replaced (the rest hard-linked),
and the measured sparsity of a model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from refusalkit.core import artifacts
from refusalkit.core.errors import UserError
from refusalkit.repair.aird import AirdEdit


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_edited_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint folder ``src`` to ``dst`` with the state-dict entries ``tensors``
    replaced (same names, dtypes and shapes), atomically. Unchanged files are hard-linked."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = src.resolve()
    index = src / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    elif (src / "model.safetensors").exists():
        with safe_open(str(src / "model.safetensors"), "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise UserError(f"{src} has no safetensors checkpoint; re-create the variant with refusalkit compress --force")
    missing = [k for k in tensors if k not in weight_map]
    if missing:
        raise UserError(f"the checkpoint in {src} has no tensor {missing[0]}; re-create the variant with --force")
    by_file: dict[str, list[str]] = {}
    for k in tensors:
        by_file.setdefault(weight_map[k], []).append(k)
    tmp = artifacts.make_temp_dir(dst)
    try:
        for f in src.iterdir():
            if f.is_file() and f.name not in by_file:
                _link_or_copy(f, tmp / f.name)
        for fname, keys in by_file.items():
            with safe_open(str(src / fname), "pt") as f:
                meta = f.metadata() or {"format": "pt"}
                state = {k: f.get_tensor(k) for k in f.keys()}
            for k in keys:
                old, new = state[k], tensors[k]
                if old.shape != new.shape or old.dtype != new.dtype:
                    raise UserError(
                        f"edited tensor {k} does not match the checkpoint ({list(new.shape)} {new.dtype} vs "
                        f"{list(old.shape)} {old.dtype}); re-create the variant with --force"
                    )
                state[k] = new.contiguous()
            save_file(state, str(tmp / fname), metadata=meta)
            del state
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_tensors(edit: AirdEdit) -> dict[str, torch.Tensor]:
    """State-dict entries of an edit: ``<module>.weight`` (and ``<module>.SCB`` for int8)."""
    return {f"{mod}.{k}": t for mod, parts in edit.tensors.items() for k, t in parts.items()}


def model_sparsity(model: torch.nn.Module) -> float:
    """Share of zeros among the stored weights of every decoder-block linear layer."""
    from refusalkit.models.int8 import Int8Linear
    from refusalkit.models.structure import decoder_layers

    zeros = total = 0
    for layer in decoder_layers(model):
        for mod in layer.modules():
            if not isinstance(mod, (torch.nn.Linear, Int8Linear)):
                continue
            w = mod.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)
