"""Writing a variant as a GGUF file with the ``gguf`` library.

The base model's own GGUF file is the template when it came as one: its metadata (architecture,
hyper-parameters, tokenizer, chat template) is copied except the file type, and its tensors are
written in its order under its names, each filled from the variant's state dict through the
``gguf`` library's own name mapping (``TensorNameMap``); a tensor the variant does not hold (a
rope frequency table) is copied from the base unchanged. A base that came as a Hugging Face folder
gets its metadata built from its config and tokenizer (:mod:`refusalkit.export.gguf_meta`). Architectures whose GGUF layout differs from Hugging Face's by more
than llama's rotary permutation (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``, which
transformers' GGUF loader reverses) are refused.

Types (lower case): ``f32``, ``f16``, ``bf16`` and the block types the library quantizes in Python,
``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``. One-axis tensors (norms, biases) stay float32, as
llama.cpp keeps them; a matrix whose rows are not a multiple of the type's block is written f16.
``q4_1`` and ``q5_1`` store a per-block minimum: a pruned weight comes back as that block's offset,
not zero (:data:`KEEPS_ZEROS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refusalkit.core.errors import UserError

PYTHON_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
KEEPS_ZEROS = {
    "f32": True,
    "f16": True,
    "bf16": True,
    "q8_0": True,
    "q4_0": True,
    "q5_0": True,
    "q4_1": False,
    "q5_1": False,
    "q6_k": True,  # symmetric blocks; the other k-quants (and their mixes) store a per-block minimum
}
# Architectures whose tensors transformers' GGUF loader changes beyond renaming (it reverses llama's
# rotary permutation only; the others are not handled here).
_CHANGED_BY_LOADER = ("qwen2moe", "qwen3moe", "gpt_oss", "bloom", "t5", "t5encoder", "gpt2", "mamba", "nemotron")
_CHANGED_BY_LOADER += ("gemma", "gemma2", "gemma3", "lfm2", "minimax-m2")


def ggml_type(name: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}.get(
        name, {"q5_0": Q.Q5_0, "q5_1": Q.Q5_1}.get(name)
    )


def file_type(name: str) -> int:
    from gguf import LlamaFileType as F

    table = {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
        "q4_1": F.MOSTLY_Q4_1,
        "q5_0": F.MOSTLY_Q5_0,
        "q5_1": F.MOSTLY_Q5_1,
    }
    return int(table[name])


def quantize(w: np.ndarray, typ: str) -> tuple[np.ndarray, Any]:
    """``w`` (float32, ``[rows, cols]`` or one axis) in ``typ``: (the stored array, its GGML type)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if w.ndim < 2 or typ == "f32":
        return w.astype(np.float32), Q.F32
    qt = ggml_type(typ)
    block = quants.GGML_QUANT_SIZES[qt][0]
    if w.shape[-1] % block:
        qt = Q.F16
    if qt == Q.F16:
        return w.astype(np.float16), Q.F16
    return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qt), qt


def dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """A stored array back to float32 (the reader's view of what ``quantize`` wrote)."""
    from gguf import quants

    return np.asarray(quants.dequantize(data, qtype), dtype=np.float32)


def round_trip(w: torch.Tensor, typ: str) -> torch.Tensor:
    """``w`` as the exported type gives it back (float32): what a runtime reading the file sees."""
    data, qt = quantize(w.detach().float().cpu().numpy(), typ)
    return torch.from_numpy(dequantize(data, qt).reshape(w.shape).copy())


def read_matrices(path: Path, config: Any, keys: list[str]) -> dict[str, torch.Tensor]:
    """The Hugging Face matrices ``keys`` as a GGUF file stores them, dequantized to float32 (any type
    the ``gguf`` library reads, k-quants included). Query and key matrices of llama, stored under the
    rotary permutation, are not read (AIRD edits the attention output and MLP down projections)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _arch(reader)
    names = {v: k for k, v in _hf_to_gguf(arch, int(config.num_hidden_layers), keys).items()}
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for k in keys:
        g = names.get(k)
        if g is None or g not in by_name or (arch == "llama" and (".attn_q." in g or ".attn_k." in g)):
            continue
        t = by_name[g]
        out[k] = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type).copy()).reshape(
            [int(d) for d in reversed(t.shape)]
        )
    return out


def _arch(reader: Any) -> str:
    """A GGUF file's ``general.architecture`` ("" when it names none)."""
    import gguf

    field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    return str(field.contents()) if field is not None else ""


def stored_types(path: Path) -> dict[str, int]:
    """The GGML types of a GGUF file's tensors, counted."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of a query/key matrix (``convert_hf_to_gguf.py``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_to_gguf(arch: str, n_blocks: int, keys: list[str]) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face state-dict key, through the library's name map."""
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise UserError(f"the gguf library does not know the architecture {arch!r}; export --format safetensors")
    tmap = gguf.get_tensor_name_map(by_name[arch], n_blocks)
    out = {}
    for k in keys:
        g = tmap.get_name(k, try_suffixes=(".weight", ".bias"))
        if g is not None:
            out[g] = k
    return out


@dataclass
class Template:
    """What a GGUF export copies: the architecture, the metadata key-values ``(key, value, type,
    sub_type)`` and the tensors in file order, ``(GGUF name, raw data or None, raw type)`` (raw data:
    a tensor the variant does not hold, copied as it is)."""

    arch: str
    fields: list[tuple[str, Any, Any, Any]]
    tensors: list[tuple[str, Any, Any]]
    source: str
    pre_tokenizer: str | None = None


def template_from_gguf(path: Path) -> Template:
    """The base model's own GGUF: its metadata (all but the file type) and its tensor list."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _arch(reader)
    skip = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION}
    fields = []
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in skip:
            continue
        vtype = f.types[0]
        fields.append((f.name, f.contents(), vtype, f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None))
    tensors = [(t.name, np.asarray(t.data), t.tensor_type) for t in reader.tensors]
    return Template(arch, fields, tensors, str(path))


def template_from_hf(model_dir: Path, config: Any, keys: list[str]) -> Template:
    """A Hugging Face base: metadata built from its config and tokenizer
    (:mod:`refusalkit.export.gguf_meta`), one tensor per state-dict matrix the name map knows."""
    from refusalkit.export.gguf_meta import hf_fields

    arch, fields, pre = hf_fields(model_dir, config)
    names = _hf_to_gguf(arch, int(config.num_hidden_layers), keys)
    order = {k: i for i, k in enumerate(keys)}
    tensors = [(g, None, None) for g in sorted(names, key=lambda g: order[names[g]])]
    return Template(arch, fields, tensors, f"{model_dir} (config and tokenizer)", pre)


def write_gguf(
    state: dict[str, torch.Tensor],
    config: Any,
    template: Template,
    out_file: Path,
    typ: str,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write ``state`` (a Hugging Face state dict of the base model's architecture) as ``out_file``
    in ``typ``, with the template's metadata and tensor list; returns the types written, counted."""
    import gguf

    arch = template.arch
    if arch in _CHANGED_BY_LOADER:
        raise UserError(
            f"GGUF export of the {arch} architecture is not supported (its tensors are transformed on load); "
            "export --format safetensors and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    names = _hf_to_gguf(arch, int(config.num_hidden_layers), list(state))
    writer = gguf.GGUFWriter(str(out_file), arch)
    for key, value, vtype, sub in template.fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_file_type(file_type(typ))
    if typ not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    heads, kv_heads = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or 0)
    counts: dict[str, int] = {}
    for name, raw, raw_type in template.tensors:
        key = names.get(name)
        if key is None and name == "output.weight" and "lm_head.weight" not in state:
            key = next((k for k in state if k.endswith("embed_tokens.weight")), None)
        if key is None:  # not in the variant (a rope table): the base's bytes
            writer.add_tensor(name, raw, raw_dtype=raw_type)
            counts[raw_type.name] = counts.get(raw_type.name, 0) + 1
            continue
        w = state[key].detach().float().cpu().numpy()
        if arch == "llama" and ".attn_q." in name:
            w = _permute(w, heads)
        elif arch == "llama" and ".attn_k." in name:
            w = _permute(w, kv_heads or heads)
        data, qt = quantize(w, typ)
        writer.add_tensor(name, data, raw_dtype=qt)
        counts[qt.name] = counts.get(qt.name, 0) + 1
        if progress:
            progress(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
