"""The repaired checkpoint: the variant's files with the edited matrices replaced (the rest hard-linked),
and the measured sparsity of a model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from refusalkit.core import artifacts
from refusalkit.core.errors import UserError
from refusalkit.repair.aird import AirdEdit, FusedSlice


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_edited_checkpoint(
    src: Path, dst: Path, tensors: dict[str, torch.Tensor], slices: list[FusedSlice] = ()
) -> None:
    """Copy the checkpoint folder ``src`` to ``dst`` with the state-dict entries ``tensors``
    replaced (same names, dtypes and shapes), atomically. Unchanged files are hard-linked.

    A fused expert tensor that the checkpoint stores one expert per tensor (transformers 5 saves a
    model's ``[experts, out, in]`` parameters under their original per-expert names, which may
    differ from the module path: Mixtral's ``mlp.experts.down_proj[e]`` is
    ``block_sparse_moe.experts.<e>.w2.weight``) is written through ``slices``: see
    :func:`_expert_keys`."""
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
    tensors = dict(tensors)
    for q in {s.tensor for s in slices}:
        if q not in weight_map:
            tensors.pop(q, None)
            tensors.update(_expert_keys(src, weight_map, [s for s in slices if s.tensor == q]))
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


def _expert_keys(src: Path, weight_map: dict[str, str], slices: list[FusedSlice]) -> dict[str, torch.Tensor]:
    """The checkpoint entries holding the edited experts, with their new values: for each slice, the
    tensor of its decoder block (``block_prefix``) whose values equal the slice before the edit, or
    its transpose (compared first on one row, read without loading the tensor, then in full); among
    several equal ones, the one naming the expert's index. No match, or several, is an error."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    handles: dict[str, Any] = {}

    def handle(k: str) -> Any:
        fname = weight_map[k]
        if fname not in handles:
            handles[fname] = safe_open(str(src / fname), "pt")
        return handles[fname]

    try:
        for sl in slices:
            keys = [k for k in weight_map if k.startswith(sl.block_prefix) and k not in out]
            hits = []
            for transposed in (False, True):
                ref = sl.before.t() if transposed else sl.before
                for k in keys:
                    part = handle(k).get_slice(k)
                    if tuple(part.get_shape()) != tuple(ref.shape):
                        continue
                    if not torch.equal(part[0:1].to(ref.dtype), ref[0:1]):
                        continue
                    if torch.equal(handle(k).get_tensor(k).to(ref.dtype), ref):
                        hits.append((k, transposed))
                if hits:
                    break
            named = [h for h in hits if f".{sl.expert}." in h[0]]
            if len(hits) > 1 and len(named) == 1:
                hits = named
            if len(hits) != 1:
                raise UserError(
                    f"cannot tell which tensor of the checkpoint in {src} holds expert {sl.expert} of {sl.tensor} "
                    f"({'none' if not hits else 'several'} match its weights); re-create the variant with --force"
                )
            k, transposed = hits[0]
            dtype = handle(k).get_slice(k).get_dtype()
            new = sl.after.t() if transposed else sl.after
            out[k] = new.to(_DTYPES.get(dtype, new.dtype)).contiguous()
    finally:
        handles.clear()
    return out


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


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
