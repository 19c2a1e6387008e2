"""What a model is, read without loading its weights: parameter count, blocks, width, vocabulary.

Used by ``refusalkit run --dry-run`` to size the plan. The facts come from the model itself: a
Hugging Face ``config.json`` (a local folder, the converted cache, or the hub's local cache; the
network is never asked) instantiated on the ``meta`` device, or a GGUF file's header (its metadata
and tensor shapes, read in a stream, so the six parts of the embedded default model need not be
assembled). A model whose description cannot be read here gives a reason instead of facts.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class Facts:
    """``params``: distinct parameters; ``matmul_params``: weights multiplied per token (every linear
    layer and the output head, not the input embedding); ``source``: where the facts were read."""

    params: int
    matmul_params: int
    n_layers: int
    d_model: int
    vocab: int
    source: str


# GGUF value types (the GGUF specification, ggml/docs/gguf.md): struct codes of the scalar ones
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Chain:
    """The concatenation of several files, read forward only (the default model's six parts)."""

    def __init__(self, paths: list[Path]):
        self._files: Iterator[Path] = iter(paths)
        self._f: IO[bytes] | None = None

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            if self._f is None:
                nxt = next(self._files, None)
                if nxt is None:
                    raise ValueError("the file ends inside its GGUF header")
                self._f = open(nxt, "rb")  # noqa: SIM115 - closed when exhausted
            chunk = self._f.read(n - len(out))
            if not chunk:
                self._f.close()
                self._f = None
            out += chunk
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _unpack(r: _Chain, code: str) -> Any:
    return struct.unpack("<" + code, r.read(struct.calcsize(code)))[0]


def _string(r: _Chain) -> str:
    return r.read(_unpack(r, "Q")).decode("utf-8", errors="replace")


def _value(r: _Chain, t: int) -> Any:
    if t in _SCALARS:
        return _unpack(r, _SCALARS[t])
    if t == _STRING:
        return _string(r)
    if t == _ARRAY:
        inner, n = _unpack(r, "I"), _unpack(r, "Q")
        if inner in _SCALARS and inner != 7:  # a long numeric array (token scores, types): skipped, counted
            r.read(n * struct.calcsize(_SCALARS[inner]))
            return n
        if inner == _STRING:  # the vocabulary, the merges: skipped, counted
            for _ in range(n):
                r.read(_unpack(r, "Q"))
            return n
        return [_value(r, inner) for _ in range(n)]
    raise ValueError(f"unknown GGUF value type {t}")


def gguf_header(paths: list[Path]) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The metadata (arrays of strings and numbers as their length) and every tensor's shape of the
    GGUF file made of ``paths`` in order."""
    r = _Chain(paths)
    try:
        if r.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = _unpack(r, "I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = _unpack(r, "Q"), _unpack(r, "Q")
        meta = {}
        for _ in range(n_kv):
            key = _string(r)
            meta[key] = _value(r, _unpack(r, "I"))
        shapes = {}
        for _ in range(n_tensors):
            name = _string(r)
            dims = tuple(_unpack(r, "Q") for _ in range(_unpack(r, "I")))
            _unpack(r, "I"), _unpack(r, "Q")  # type, offset
            shapes[name] = dims
        return meta, shapes
    finally:
        r.close()


def gguf_facts(paths: list[Path], source: str) -> Facts:
    meta, shapes = gguf_header(paths)
    arch = meta.get("general.architecture", "llama")
    d = int(meta[f"{arch}.embedding_length"])
    embed = shapes.get("token_embd.weight", (d, 0))
    vocab = int(embed[1]) if len(embed) > 1 else int(meta.get("tokenizer.ggml.tokens", 0))
    params = sum(_prod(s) for s in shapes.values())
    # the output head multiplies every token; when it is tied to the embedding the file stores it once
    matmul = params - d * vocab + (0 if "output.weight" in shapes else d * vocab)
    return Facts(params, matmul, int(meta[f"{arch}.block_count"]), d, vocab, source)


def _prod(dims: tuple[int, ...]) -> int:
    out = 1
    for x in dims:
        out *= int(x)
    return out


def hf_facts(config: Any, source: str) -> Facts:
    """The facts of a transformers config, counted on a model built on the ``meta`` device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    matmul = params if tied else params - emb.numel()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Facts(params, matmul, int(text.num_hidden_layers), int(text.hidden_size), int(emb.shape[0]), source)


def model_facts(spec: str) -> Facts | str:
    """The facts of ``--model spec``, or one sentence saying why they cannot be read on this machine."""
    from refusalkit.core.errors import UserError
    from refusalkit.core.named_models import NAMED

    try:
        named = NAMED.get(spec)
        if named is not None:
            cached = named.converted()
            if cached is not None:
                return _folder_facts(cached, f"the converted {spec} model in the cache")
            from refusalkit.core.external import artifact_file

            parts = [artifact_file(p, verify=False) for p in named.parts]
            return gguf_facts(parts, f"the {spec} model's GGUF header (not converted yet)")
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                return f"{spec} does not exist"
            return gguf_facts([path], "its GGUF header")
        if path.is_dir():
            if not (path / "config.json").is_file():
                return f"{spec} has no config.json"
            return _folder_facts(path, "its config.json")
        return _hub_facts(spec)
    except UserError as e:
        return str(e)
    except (OSError, ValueError, KeyError) as e:
        return f"its description cannot be read ({e})"


def _folder_facts(path: Path, source: str) -> Facts:
    from transformers import AutoConfig

    return hf_facts(AutoConfig.from_pretrained(str(path)), source)


def _hub_facts(spec: str) -> Facts | str:
    """A hub id's facts from the hub's local cache only (no network)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not in the local cache
        return f"the hub model {spec} is not in this machine's hub cache and the dry run does not go online"
    return hf_facts(config, "its config.json in the hub cache")
