"""Importing a checkpoint compressed elsewhere as a variant of a run (``refusalkit compress --from``).

A GGUF file (any type the ``gguf`` library dequantizes, k-quants included, read through
transformers' GGUF loader), a compressed-tensors folder (decompressed by the ``compressed-tensors``
library), an LLM.int8 folder in bitsandbytes' 8-bit layout (refusalkit's own int8 layers run it), or
a dense safetensors folder (a model pruned by another tool) becomes ``DIR/<name>/model``: the layout
every stage reads. Checkpoints whose CPU loader does not exist here (GPTQ, AWQ, bitsandbytes 4-bit,
FP8) are refused with the back end they need.

The variant must be the base model with other weights: the same architecture and tensor shapes,
the same token ids on a fixed text, the same rendered chat template. ``compression.json`` records
the source (path or hub id, sha256), the format and the stored tensor types, and under ``measured``
what the weights themselves show: the fraction of exact zeros over the block matrices and the
stored bits per weight (tensor bytes over elements, scales included), never a name's claim.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.counters import since, snapshot
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout, prepare
from refusalkit.core.manifest import update_manifest

log = logging.getLogger(__name__)

FORMATS = ("gguf", "compressed-tensors", "bitsandbytes-8bit", "safetensors")
# quantization_config.quant_method -> the back end a CPU loader would need
NO_CPU_LOADER = {
    "gptq": "gptqmodel (GPTQ kernels; a GPU in practice)",
    "awq": "autoawq (AWQ kernels; a GPU in practice)",
    "fp8": "an FP8-capable GPU",
    "hqq": "hqq",
    "aqlm": "aqlm",
    "eetq": "eetq (a GPU)",
    "torchao": "torchao",
}
# A fixed text for the tokenizer check: words, code, digits, whitespace runs and non-ASCII text.
TOKENIZER_PROBE = "Refusal check: def f(x):\n    return x**2  # 12345 café naïve 日本語 🙂\t tabs  and  spaces!"
CHAT_PROBE = [{"role": "user", "content": "How do I bake bread?"}]


@dataclass
class Source:
    """What ``--from`` names, found on disk: ``path`` a file (GGUF) or a folder."""

    given: str
    path: Path
    format: str
    hub_id: str | None = None
    quant: dict[str, Any] = field(default_factory=dict)


def locate(given: str) -> Source:
    """A local GGUF file or model folder, or a hub id (``owner/name``, or ``owner/name:FILE.gguf`` for
    one GGUF file of a repository), downloaded through ``huggingface_hub``."""
    path = Path(given).expanduser()
    hub_id = None
    if not path.exists():
        if given.startswith((".", "/", "~")) or given.count("/") != 1 or not given.split(":")[0].strip("/"):
            raise UserError(f"--from {given}: no such file or folder; give a .gguf file, a model folder or a hub id")
        hub_id, path = given, _download(given)
    if path.is_file():
        if not _is_gguf(path):
            raise UserError(
                f"--from {given} is not a GGUF file (no GGUF magic); give a .gguf file or a Hugging Face model folder"
            )
        return Source(given, path, "gguf", hub_id)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: give that file)" if ggufs else ""
        raise UserError(f"--from {given} is not a model folder (no config.json){hint}")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"--from {given}: config.json cannot be read ({e}); the folder is not a complete model"
        ) from None
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method") or "").lower()
    if not method:
        fmt = "safetensors"
    elif method == "compressed-tensors":
        fmt = "compressed-tensors"
    elif method == "bitsandbytes" and quant.get("load_in_8bit"):
        fmt = "bitsandbytes-8bit"
    elif method == "bitsandbytes":
        raise UserError(f"--from {given} is a bitsandbytes 4-bit checkpoint: it needs bitsandbytes' 4-bit kernels")
    elif method in NO_CPU_LOADER:
        raise UserError(
            f"--from {given} is a {method} checkpoint: it needs {NO_CPU_LOADER[method]}, not available here"
        )
    else:
        raise UserError(
            f"--from {given}: unknown quantization method {method!r}; refusalkit imports {', '.join(FORMATS)}"
        )
    if not any(path.glob("*.safetensors")):
        raise UserError(f"--from {given} has no .safetensors weights; refusalkit imports safetensors checkpoints")
    return Source(given, path, fmt, hub_id, quant)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _download(hub_id: str) -> Path:
    """The hub repository (or one GGUF file of it) in the local hub cache."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise UserError("importing from the hub needs huggingface_hub; run: pip install huggingface_hub") from None
    repo, _, file = hub_id.partition(":")
    try:
        if file:
            return Path(hf_hub_download(repo, file))
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - network, authentication or a wrong name
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"--from {hub_id}: cannot download it ({first}); check the id, your network and HF_TOKEN"
        ) from None


def sha256_of(path: Path) -> str:
    """A file's sha256; for a folder, the artifact digest of its files (:func:`refusalkit.core.external.digest`:
    the sha256 of their sorted ``sha256sum`` lines; a download cache's ``.cache`` is left out)."""
    from refusalkit.core.external import digest

    if path.is_file():
        return digest(path.parent, [path])
    return digest(path, sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts))


# ------------------------------------------------------------------------------------------------
# Stored types and bits, read from the checkpoint's own tensors
# ------------------------------------------------------------------------------------------------


def stored_bits(src: Source, matrices: dict[str, int]) -> dict[str, Any]:
    """Bits the checkpoint stores per weight of the block matrices, from its tensors' bytes (codes,
    scales and zero points together) over the matrices' elements, and the stored types counted.

    ``matrices``: the dense model's block matrices, ``module name -> elements``. A GGUF file stores
    each matrix as one tensor (``blk.N.*``, two or more axes) with its scales inside its blocks; a
    safetensors checkpoint stores a module's tensors under the module's name."""
    types: dict[str, int] = {}
    nbytes = elements = 0
    if src.format == "gguf":
        from gguf import GGUFReader

        for t in GGUFReader(str(src.path)).tensors:
            if t.name.startswith("blk.") and len(t.shape) >= 2:
                nbytes, elements = nbytes + int(t.n_bytes), elements + int(t.n_elements)
                types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    else:
        from safetensors import safe_open

        seen: set[str] = set()
        for f in sorted(src.path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as r:
                for k in r.keys():
                    module = k.rsplit(".", 1)[0]
                    if module not in matrices or k.endswith("bias"):
                        continue
                    seen.add(module)
                    sl = r.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= int(d)
                    nbytes += n * _st_itemsize(sl.get_dtype())
                    types[sl.get_dtype()] = types.get(sl.get_dtype(), 0) + 1
        elements = sum(matrices[m] for m in seen)  # matrices stored under their module's name
    return {"bits_per_weight": round(8 * nbytes / elements, 3) if elements else None, "types": types}


def _st_itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name (F32, BF16, I8, U8, F8_E4M3, ...)."""
    digits = "".join(c for c in name.split("_")[0] if c.isdigit())
    return max(int(digits) // 8, 1) if digits else 1


# ------------------------------------------------------------------------------------------------
# Dense copy in the run's layout
# ------------------------------------------------------------------------------------------------


def _load_dense(src: Source, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) of the source with dense weights in ``dtype`` (on the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refusalkit.models.loading import detach_quantizer

    try:
        if src.format == "gguf":
            folder, name = str(src.path.parent), src.path.name
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        elif src.format == "compressed-tensors":
            try:
                import compressed_tensors  # noqa: F401
            except ImportError:
                raise UserError(
                    f"--from {src.given} is a compressed-tensors checkpoint; run: pip install compressed-tensors"
                ) from None
            import inspect
            import warnings

            from transformers import CompressedTensorsConfig as Ct

            new = "dequantize" in inspect.signature(Ct).parameters  # else run_compressed (before 5.25)
            tok = AutoTokenizer.from_pretrained(str(src.path))
            with warnings.catch_warnings():  # "the model's own quantization_config is used": the one read above
                warnings.filterwarnings("ignore", message=".*quantization_config.*")
                qc = Ct(dequantize=True) if new else Ct(run_compressed=False)
                model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=dtype, quantization_config=qc)
        else:
            tok = AutoTokenizer.from_pretrained(str(src.path))
            model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=dtype)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the loaders reject is the user's file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--from {src.given} cannot be loaded as a {src.format} model ({first})") from None
    return detach_quantizer(model).eval(), tok


def _load_int8(src: Source, dtype: torch.dtype) -> tuple[Any, Any]:
    """An LLM.int8 folder through refusalkit's own int8 layers (no bitsandbytes needed)."""
    from transformers import AutoTokenizer

    from refusalkit.models.int8 import load_int8_torch

    return load_int8_torch(src.path, dtype, "cpu").eval(), AutoTokenizer.from_pretrained(str(src.path))


# ------------------------------------------------------------------------------------------------
# The same model as the base: architecture, shapes, tokenizer, chat template
# ------------------------------------------------------------------------------------------------


def check_same_model(model: Any, tok: Any, base_source: str, base_tok: Any, own_template: bool) -> None:
    """One line naming the part that differs from the run's base model, else nothing.

    ``own_template``: the run sets its chat template (``chat_template``), which every variant is
    loaded with; otherwise the imported tokenizer's template must render a fixed conversation as
    the base's does."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    base_cfg = AutoConfig.from_pretrained(base_source)
    base_arch = (getattr(base_cfg, "architectures", None) or [type(None).__name__])[0]
    arch = type(model).__name__
    if arch != base_arch:
        raise UserError(f"the imported model is a {arch}, the run's base model a {base_arch}; import the same model")
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(base_cfg)
    state = model.state_dict()
    for name, p in skeleton.named_parameters():
        if name not in state:
            raise UserError(f"the imported model has no tensor {name} that the base model has; import the same model")
        if tuple(state[name].shape) != tuple(p.shape):
            raise UserError(
                f"the imported model's {name} is {tuple(state[name].shape)}, the base model's {tuple(p.shape)}; "
                "import the same model"
            )
    a = base_tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    b = tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        raise UserError(
            f"the imported model's tokenizer differs from the base model's (token {at} of a fixed text: "
            f"{b[at] if at < len(b) else 'none'} vs {a[at] if at < len(a) else 'none'}); import the same model"
        )
    if own_template:
        return
    if not getattr(tok, "chat_template", None):
        raise UserError(
            "the imported model has no chat template; set the run's chat_template (--chat-template) or import "
            "a checkpoint that carries the base model's"
        )
    render = {"tokenize": False, "add_generation_prompt": True}
    if tok.apply_chat_template(CHAT_PROBE, **render) != base_tok.apply_chat_template(CHAT_PROBE, **render):
        raise UserError(
            "the imported model's chat template renders a conversation differently from the base model's; "
            "set the run's chat_template to use one template for both"
        )


def measure(model: Any, base_weight: Any) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Per block matrix: the fraction of exact zeros and the relative distance to the base model's
    weight (None when the base's weights cannot be read without loading it); and every block
    matrix's module name with its elements."""
    from refusalkit.compress.blockwise import linear_layers
    from refusalkit.models.int8 import Int8Linear
    from refusalkit.models.structure import decoder_layers

    per_layer: dict[str, dict[str, float]] = {}
    matrices: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}
    for i, layer in enumerate(decoder_layers(model)):
        found: dict[str, Any] = dict(linear_layers(layer))  # nn.Linear, Conv1D and fused experts' views
        found.update({n: m for n, m in layer.named_modules() if isinstance(m, Int8Linear)})
        for n, lin in found.items():
            w = lin.dequantized() if isinstance(lin, Int8Linear) else lin.weight.detach()
            module = f"{names[layer]}.{n}"
            base = base_weight(module + ".weight")
            rel = None
            if base is not None and base.shape == w.shape:
                b = base.float()
                rel = ((w.float() - b).norm() / b.norm().clamp(min=1e-12)).item()
            per_layer[f"{i}.{n}"] = {"sparsity": (w == 0).float().mean().item(), "rel_error": rel, "numel": w.numel()}
            matrices[module] = w.numel()
    return per_layer, matrices


def checkpoint_tensors(source: str) -> tuple[list[str], Any]:
    """``(names, read)``: a local safetensors checkpoint's tensor names and ``read(name) -> tensor or
    None``, one tensor at a time (no names for a hub id)."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    folder = Path(source)
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as r:
                index.update(dict.fromkeys(r.keys(), f))

    def read(name: str) -> torch.Tensor | None:
        if name not in index:
            return None
        with safe_open(str(index[name]), "pt") as r:
            return r.get_tensor(name)

    return list(index), read


def imported_kind(info: dict[str, Any]) -> str:
    """pruned / quantized / compressed, from what an imported variant's weights showed."""
    m = info.get("measured") or {}
    bits = m.get("bits_per_weight")
    if bits is not None and bits < 15.5:
        return "quantized"
    return "pruned" if (m.get("sparsity") or 0) >= 0.01 else "compressed"


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def run_import(
    cfg: Config, root: str | Path, given: str, name: str | None, force: bool = False, recheck_of: str | None = None
) -> dict[str, Any]:
    """Register ``given`` as variant ``name``; its ``compression.json`` (``recheck_of``: an export's read-back)."""
    from refusalkit.compress.job import _dir_bytes, _peak_rss, check_name
    from refusalkit.core.extras import needed, require
    from refusalkit.models.loading import load_tokenizer, resolve_device, resolve_dtype, resolve_model

    layout = RunLayout(root)
    src = locate(given)
    require(needed(cfg, evaluates=False, formats=[src.format]))
    name = name or _default_name(src)
    check_name(name)
    if layout.compression(name).exists() and layout.has_model(name) and not force:
        return {**artifacts.read_json(layout.compression(name)), "reused": True}
    if layout.variant(name).exists() and not force:
        raise UserError(f"{layout.variant(name)} exists and is not a finished variant; use --force to replace it")
    t0, before = time.time(), snapshot()
    base_source = resolve_model(cfg.model)
    base_tok = load_tokenizer(cfg.model, base_source, cfg.chat_template)
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    model, tok = (_load_int8 if src.format == "bitsandbytes-8bit" else _load_dense)(src, dtype)
    check_same_model(model, tok, base_source, base_tok, own_template=bool(cfg.chat_template))
    per_layer, matrices = measure(model, checkpoint_tensors(base_source)[1])
    bits = stored_bits(src, matrices)
    manifest = prepare(cfg, layout.root, force=False, keep_existing=True)  # after the checks: a refusal writes nothing
    _save(model, tok, src, layout.model(name))
    layout.discard_analyses(name)
    del model
    total = sum(r["numel"] for r in per_layer.values())
    sparsity = sum(r["sparsity"] * r["numel"] for r in per_layer.values()) / max(total, 1)
    measured = {"sparsity": sparsity, "bits_per_weight": bits["bits_per_weight"]}
    source = {"given": given, "hub_id": src.hub_id, "path": str(src.path), "sha256": sha256_of(src.path)}
    bpw = bits["bits_per_weight"]
    info: dict[str, Any] = {
        "variant": name,
        "method": "import",
        "parameters": {"format": src.format, "source": given},
        "backend": "torch" if src.format == "bitsandbytes-8bit" else None,
        "bits": round(bpw, 2) if bpw is not None and bpw < 15.5 else None,
        "calibration": None,
        "sparsity": sparsity,
        "n_compressed_params": total,
        "source": source,
        "format": src.format,
        "types": bits["types"],
        "quantization_config": src.quant or None,
        "measured": measured,
        "base_model": {
            "spec": cfg.model,
            "source": base_source,
            "dtype": str(dtype).removeprefix("torch."),
            "device": "cpu",
        },
        "size_on_disk_bytes": _dir_bytes(layout.model(name)),
        "source_bytes": src.path.stat().st_size if src.path.is_file() else _dir_bytes(src.path),
        "peak_rss_bytes": _peak_rss(),
        "peak_gpu_bytes": None,
        "per_layer": per_layer,
        "spec": {"method": "import", "format": src.format, "source": given, "seed": None, "name": name},
        "recheck_of": recheck_of,
        "wall_seconds": round(time.time() - t0, 2),
    }
    artifacts.write_json(layout.compression(name), info)
    update_manifest(
        layout.manifest, cfg.seed, f"{name}/compress", info["wall_seconds"], manifest, since(before)["tokens"]
    )
    info["reused"] = False
    return info


def _default_name(src: Source) -> str:
    """The variant's default name: the file's or folder's name, made a valid variant name."""
    import re

    stem = src.path.stem if src.path.is_file() else (src.hub_id or src.path.name).split("/")[-1]
    clean = re.sub(r"[^A-Za-z0-9._:+-]", "-", stem).strip("-.") or "imported"
    return clean if clean[0].isalnum() else "imported-" + clean


def _save(model: Any, tok: Any, src: Source, model_dir: Path) -> None:
    """The dense copy (an LLM.int8 folder: its own files) in the run's layout, written atomically."""
    from refusalkit.compress.job import save_atomically

    def write(tmp: Path) -> None:
        if src.format == "bitsandbytes-8bit":
            for f in src.path.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        else:
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))

    save_atomically(model_dir, write)
