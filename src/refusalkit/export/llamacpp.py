"""llama.cpp, through ``llama-cpp-python`` (the optional ``llama`` extra): the k-quant GGUF types
(its quantizer) and a second runtime for ``export --check``.

* :func:`quantize_gguf`: ``llama_model_quantize`` from a float GGUF that refusalkit wrote, to a type
  llama.cpp names (``q4_k_m``, ``q6_k``, ...). llama.cpp chooses each tensor's type within the mix
  (Q4_K_M keeps some ``attn_v`` / ``ffn_down`` matrices and the output in Q6_K) as it does for every
  user's file.
* :class:`Runtime`: a GGUF file loaded by llama.cpp, generating greedily from token ids. The re-check
  re-runs the variant's own evaluation records (the same user messages, system prompt setting and
  token budget, tokenized by refusalkit's tokenizer, so only the runtime's arithmetic differs), stops
  on the same end-of-sequence ids and, as refusalkit's sampler does, once the substring judge's
  verdict is settled, and judges the completions with the run's judges.

``llama_cpp`` is imported only by these functions; without it they raise a one-line error that says
how to install it (pip compiles llama.cpp from source).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusalkit.core.errors import UserError

MISSING = (
    "this needs llama.cpp through llama-cpp-python; run: pip install 'refusalkit[llama]' "
    "(pip compiles llama.cpp from source: cmake and a C++ compiler, a few minutes)"
)


def available() -> bool:
    """Whether ``llama_cpp`` can be imported (it is not imported here)."""
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


_QUIET: list[Any] = []  # the log callback installed (kept alive while llama.cpp may call it)


def _lib() -> Any:
    """``llama_cpp``, with llama.cpp's own log (every tensor of a quantization, every load) routed to
    refusalkit's debug log instead of stderr."""
    if not available():
        raise UserError(MISSING)
    import llama_cpp

    if not _QUIET:
        import logging

        log = logging.getLogger("refusalkit.llama.cpp")

        @llama_cpp.llama_log_callback
        def _to_debug(level: int, text: bytes, user_data: Any) -> None:
            log.debug("%s", text.decode("utf-8", "replace").rstrip())

        llama_cpp.llama_log_set(_to_debug, ctypes.c_void_p(0))
        _QUIET.append(_to_debug)
    return llama_cpp


def _threads() -> int:
    import torch

    return max(1, int(torch.get_num_threads()) or (os.cpu_count() or 1))


def quantize_gguf(src: Path, out: Path, typ: str) -> None:
    """``src`` (a float GGUF) quantized by llama.cpp to ``typ`` (``q4_k_m``, ...) as ``out``."""
    lib = _lib()
    ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{typ.upper()}", None)
    if ftype is None:
        raise UserError(f"llama.cpp {lib.__version__} has no type {typ!r}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = _threads()
    rc = lib.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise UserError(f"llama.cpp could not quantize {src.name} to {typ} (code {rc})")


def version() -> str:
    return str(getattr(_lib(), "__version__", "?"))


def tokenize_with(vocab: Path, pre: str, texts: list[str]) -> list[list[int]] | None:
    """Token ids of ``texts`` by llama.cpp from the vocabulary in ``vocab`` (a GGUF file, tensors not
    needed) under the pre-tokenizer ``pre``; None when this llama.cpp does not know ``pre``."""
    lib = _lib()
    try:
        llm = lib.Llama(model_path=str(vocab), vocab_only=True, verbose=False, kv_overrides={"tokenizer.ggml.pre": pre})
    except Exception:  # noqa: BLE001 - an unknown pre-tokenizer name fails the load
        return None
    try:
        return [list(llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)) for t in texts]
    finally:
        llm.close()


class Runtime:
    """A GGUF file in llama.cpp (CPU), generating greedily from token ids."""

    def __init__(self, path: Path, n_ctx: int = 2048):
        lib = _lib()
        try:
            self.llm = lib.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=_threads(), n_gpu_layers=0, seed=0, verbose=False
            )
        except Exception as e:  # noqa: BLE001 - a file llama.cpp cannot read
            raise UserError(f"llama.cpp cannot load {path} ({str(e).splitlines()[0] if str(e) else e})") from None

    def greedy(
        self, ids: list[int], max_new_tokens: int, stop_ids: set[int], settled: Callable[[list[int]], bool] | None
    ) -> list[int]:
        """New token ids after ``ids``: argmax each step, until a stop id (not kept), ``max_new_tokens``
        or ``settled(new ids)``. A prompt sharing a prefix with the previous one reuses its cache."""
        new: list[int] = []
        if max_new_tokens <= 0:
            return new
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if int(tok) in stop_ids:
                break
            new.append(int(tok))
            if len(new) >= max_new_tokens or (settled is not None and settled(new)):
                break
        return new

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
