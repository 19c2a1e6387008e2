"""Model resolution and loading.

``--model`` accepts a hub id, a local Hugging Face folder, a local ``.gguf`` file, or a short
name (``default``, ``smollm2-135m``). GGUF files are dequantized to float once and cached as
safetensors (``$REFUSALKIT_CACHE``, default ``~/.cache/refusalkit``); later loads read the cache.

Everything model-specific that the rest of refusalkit needs (the decoder blocks, the matrices
that write to the residual stream) is found from the module structure, never from the name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusalkit.core.artifacts import locked, make_temp_dir
from refusalkit.core.counters import count_forward, time_forward
from refusalkit.core.errors import UserError
from refusalkit.core.external import ARTIFACTS, artifact_file, cache_dir  # noqa: F401 (cache_dir re-exported)
from refusalkit.core.named_models import NAMED, NamedModel
from refusalkit.models.structure import decoder_layers

log = logging.getLogger(__name__)

SHORT_NAMES: dict[str, str] = {name: m.describe() for name, m in NAMED.items()}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    spec: str
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


# --------------------------------------------------------------------------------------------
# Resolution: spec -> a folder that ``from_pretrained`` can read (or a hub id)
# --------------------------------------------------------------------------------------------


def assemble_gguf(named: NamedModel, dest: Path) -> Path:
    """Concatenate a named model's parts (its artifacts in :mod:`refusalkit.core.external`) into one GGUF
    file, checking each part's sha256 and the whole file's while copying (the parts are read once)."""
    parts = [(ARTIFACTS[name], artifact_file(name, verify=False)) for name in named.parts]
    dest.parent.mkdir(parents=True, exist_ok=True)
    whole = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for artifact, path in parts:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        h.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                if h.hexdigest() != artifact.sha256:
                    raise UserError(
                        f"{path} does not match {artifact.requirement} (sha256 {h.hexdigest()[:12]}…); run: {artifact.reinstall}"
                    )
        if whole.hexdigest() != named.sha256:
            raise UserError(
                f"the {named.name} model's parts do not match sha256 {named.sha256[:12]}…; "
                f"reinstall its packages ({named.install} with pip install --force-reinstall)"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def named_gguf(named: NamedModel) -> tuple[Path, bool]:
    """A named model's GGUF file, and whether it was assembled into the cache (a one-part model's is
    its package's file, checked; a several-part model's is assembled once, or found assembled)."""
    if len(named.parts) == 1:
        return artifact_file(named.parts[0]), False
    path = cache_dir() / "gguf" / named.gguf_name
    return (path if path.exists() else assemble_gguf(named, path)), True


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    return f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def detach_quantizer(model: Any) -> Any:
    """A model loaded dequantized (from GGUF, decompressed compressed-tensors) made savable as a
    dense checkpoint: transformers refuses to save one that still names its quantizer."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint to a float32 safetensors folder (atomic: tmp folder + rename).

    transformers refuses to save a GGUF-loaded model ("quantized with gguf and is not
    serializable"); clearing ``hf_quantizer`` and the config's ``quantization_config`` first
    works, and the reloaded copy gives identical logits (tested).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out_dir.exists():
        return out_dir
    log.info("converting %s to float safetensors in %s (once)", gguf_path.name, out_dir)
    tmp = make_temp_dir(out_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        detach_quantizer(model).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not out_dir.is_dir():  # not another process's finished copy (parallel sweep points)
                raise
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the converter is the user's file
        raise UserError(f"cannot convert GGUF file {gguf_path}: {e}; check that it is a complete GGUF model") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def _converting(out: Path) -> Iterator[None]:
    """Hold a lock beside ``out`` while it is built, so that processes that need the same
    cached model at once (test workers, sweep points on a fresh cache) convert it once; a
    finished copy is used without waiting."""
    if out.exists():
        yield
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the cache folder {out.parent} ({e.strerror}); set REFUSALKIT_CACHE to a writable folder"
        ) from None
    with locked(out.parent / f".{out.name}.lock"):
        yield


def resolve_model(spec: str) -> str:
    """Turn ``--model`` into something ``from_pretrained`` reads: a local folder or a hub id."""
    named = NAMED.get(spec)
    if named is not None:
        out = cache_dir() / named.cache_name
        with _converting(out):
            if not out.exists():
                gguf, assembled = named_gguf(named)
                convert_gguf(gguf, out)
                if assembled:
                    gguf.unlink(missing_ok=True)
        return str(out)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {spec} does not exist; give an existing file, a folder, a hub id or 'default'")
        return str(convert_gguf(path, cache_dir() / _gguf_cache_key(path)))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise UserError(
                f"{spec} is not a Hugging Face model folder (no config.json); give a folder, a .gguf file, a hub id or 'default'"
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(
            f"model {spec} does not exist; give a local folder, a .gguf file, a hub id or one of: {', '.join(SHORT_NAMES)}"
        )
    if "/" not in spec:
        raise UserError(
            f"unknown model name {spec!r}; the named models are {', '.join(SHORT_NAMES)} (refusalkit sources lists "
            "them); else give a local folder, a .gguf file or a hub id (owner/name)"
        )
    return spec  # a hub id


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: float32 on CPU (bfloat16 matmuls are far slower on CPUs without AMX), bfloat16 on GPU."""
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype == "auto":
        return torch.bfloat16 if device != "cpu" and torch.cuda.is_available() else torch.float32
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} was asked for but no CUDA GPU is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device


def _template_text(chat_template: str) -> str:
    """A Jinja template given inline, or the text of the file it names."""
    if "{{" in chat_template or "{%" in chat_template or "\n" in chat_template:
        return chat_template
    p = Path(chat_template).expanduser()
    try:
        return p.read_text(encoding="utf-8")
    except OSError:
        raise UserError(
            f"chat template file {chat_template} cannot be read; give a readable .jinja file or the template text"
        ) from None


def load_tokenizer(spec: str, source: str, chat_template: str | None = None) -> Any:
    """The tokenizer of ``source``, with a chat template (given, or its own: required) and a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise UserError(
            f"cannot load the tokenizer of {spec!r} ({str(e).splitlines()[0]}); check the name, the path "
            "or your network"
        ) from e
    if chat_template:
        tok.chat_template = _template_text(chat_template)
    if not getattr(tok, "chat_template", None):
        named = NAMED.get(spec)
        if named is not None and not named.instruct:
            raise UserError(
                f"{spec} is a base model (not instruction-tuned, no chat template): refusalkit studies the refusal of "
                "chat models; pick an instruction-tuned one (refusalkit sources lists them)"
            )
        raise UserError(
            f"the tokenizer of {spec!r} has no chat template; refusalkit needs a chat model. "
            "Give one with --chat-template FILE.jinja if this is a chat model"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_weights(
    spec: str, source: str, dev: str, torch_dtype: torch.dtype, quantization_config: Any
) -> tuple[nn.Module, str | None]:
    """The model (and the int8 back end for an int8 checkpoint: bitsandbytes, or refusalkit's layers)."""
    from transformers import AutoModelForCausalLM

    from refusalkit.models.int8 import bnb_available, is_int8_checkpoint, load_int8_torch

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    int8 = is_int8_checkpoint(source)
    quantized = int8 or quantization_config is not None
    if dev == "auto" or quantized:
        kwargs["device_map"] = "auto" if dev == "auto" else dev
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    backend = None
    if int8:
        backend = (
            "bitsandbytes" if bnb_available() and os.environ.get("REFUSALKIT_INT8_BACKEND") != "torch" else "torch"
        )
    try:
        if backend == "torch":
            model = load_int8_torch(source, torch_dtype, "cpu" if dev == "auto" else dev)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise UserError(
            f"cannot load model {spec!r} ({str(e).splitlines()[0]}); check the name, the path or your network"
        ) from e
    if dev not in ("auto",) and not quantized:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model, backend


def load_model(
    spec: str = "default",
    dtype: str = "auto",
    device: str = "auto",
    chat_template: str | None = None,
    path_override: str | None = None,
    quantization_config: Any = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for analysis (eval mode, no grad).

    ``device='auto'`` spreads a model over every visible GPU with ``device_map='auto'`` (a 70B
    model on several GPUs); on a machine without a GPU it means CPU. ``chat_template`` is a
    Jinja file or string, required when the tokenizer has none. ``path_override`` loads weights
    from another folder (a compressed variant) while keeping ``spec`` as the recorded name.
    """
    t0 = time.time()
    source = path_override or resolve_model(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tok = load_tokenizer(spec, source, chat_template)
    model, backend = _load_weights(spec, source, dev, torch_dtype, quantization_config)
    model.register_forward_pre_hook(count_forward, with_kwargs=True)  # run.json's forward work per stage
    model.register_forward_hook(time_forward, with_kwargs=True, always_call=True)
    info = {
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": dev,
        "n_params": sum(p.numel() for p in model.parameters()),
        "load_seconds": round(time.time() - t0, 2),
        "architecture": type(model).__name__,
    }
    if backend:
        info["int8_backend"] = backend
    lm = LoadedModel(model=model, tokenizer=tok, spec=spec, source=source, info=info)
    info["n_layers"], info["d_model"] = lm.n_layers, lm.d_model
    return lm


# --------------------------------------------------------------------------------------------
# Structure: found from modules, not names of models
# --------------------------------------------------------------------------------------------
