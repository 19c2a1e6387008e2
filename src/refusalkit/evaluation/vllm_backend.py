"""An optional vLLM back end for the decoding attack on GPU machines (``--backend vllm``).

vLLM is imported lazily, only by :func:`sample_vllm`. Each (prompt, configuration) is one
request with its own ``SamplingParams`` and a per-request seed derived from the same stable hash
as the torch engine (:func:`refusalkit.models.sampler.row_seed`), so reruns reproduce
their samples; vLLM's random streams differ from torch's, so the two back ends give different
(equally distributed) samples, and the same greedy output up to numerical precision.

Translation of a :class:`Decoding` (vLLM's top-p/top-k semantics are HF's):

* greedy (``temperature == 0``), and ``top_p == 0`` (which keeps only the argmax; vLLM requires
  ``top_p`` in ``(0, 1]``): ``temperature=0``, ``top_p=1``, ``top_k=-1``;
* otherwise ``temperature``, ``top_p`` and ``top_k`` as they are, ``top_k=-1`` when off.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refusalkit.core.errors import UserError
from refusalkit.models.sampler import Decoding, row_seed

MISSING = "the vLLM back end needs vllm on a GPU machine; run: pip install vllm (or use --backend torch)"


def vllm_available() -> bool:
    """Whether ``vllm`` can be imported (it is not imported here)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def sampling_params_kwargs(d: Decoding, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request under ``d`` (see the module
    docstring); ``seed`` is the request's own seed."""
    argmax_only = d.greedy or d.top_p <= 0
    return {
        "temperature": 0.0 if argmax_only else float(d.temperature),
        "top_p": 1.0 if argmax_only else float(d.top_p),
        "top_k": -1 if argmax_only or d.top_k <= 0 else int(d.top_k),
        "max_tokens": int(max_new_tokens),
        "seed": int(seed),
    }


def _import_vllm():
    if not vllm_available():
        raise UserError(MISSING)
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"{MISSING} (import failed: {e})") from e
    return vllm


_ENGINE: dict[str, Any] = {}  # at most one live engine: {"key": ..., "llm": ...}


def _fingerprint(model_path: str) -> tuple:
    """What the engine was built from: the folder's files with their sizes and times (a variant
    compressed again at the same path is a new model), or the id itself for a hub id."""
    path = Path(model_path)
    if not path.is_dir():
        return (model_path,)
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))


def engine(vllm: Any, model_path: str, **llm_kwargs: Any) -> Any:
    """The vLLM engine of ``model_path`` with ``llm_kwargs``, built once and reused by every later
    call for the same model and settings (an evaluation calls once per chunk, and with Huang's
    decoding grid a chunk is one prompt); another model or setting releases it first."""
    key = (str(model_path), _fingerprint(model_path), tuple(sorted((k, repr(v)) for k, v in llm_kwargs.items())))
    if _ENGINE.get("key") != key:
        release_engine()
        _ENGINE["llm"] = vllm.LLM(model=model_path, **llm_kwargs)
        _ENGINE["key"] = key
    return _ENGINE["llm"]


def release_engine() -> None:
    """Drop the cached engine and its GPU memory (after an evaluation, before other GPU work)."""
    llm = _ENGINE.pop("llm", None)
    _ENGINE.pop("key", None)
    if llm is None:
        return
    del llm
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def sample_vllm(
    model_path: str,
    prompts: Sequence[str | list[int]],
    decodings: list[Decoding],
    *,
    max_new_tokens: int,
    seed: int,
    keys: list[str] | None = None,
    **llm_kwargs: Any,
) -> list[list[str]]:
    """``completions[i][j]`` for chat-formatted prompt ``i`` under ``decodings[j]``, stripped.

    ``prompts`` are formatted texts (tokenized here without adding special tokens, since the
    template already holds any BOS) or token ids. ``keys[i]`` (default ``str(i)``) names prompt
    ``i`` in the per-request seed; ``llm_kwargs`` go to ``vllm.LLM``.
    """
    vllm = _import_vllm()
    if keys is None:
        keys = [str(i) for i in range(len(prompts))]
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    if not prompts or not decodings:
        return [["" for _ in decodings] for _ in prompts]
    llm = engine(vllm, model_path, **llm_kwargs)
    tok = llm.get_tokenizer()
    requests, params = [], []
    for p, key in zip(prompts, keys):
        ids = p if not isinstance(p, str) else tok(p, add_special_tokens=False)["input_ids"]
        for d in decodings:
            requests.append({"prompt_token_ids": list(ids)})
            params.append(vllm.SamplingParams(**sampling_params_kwargs(d, max_new_tokens, row_seed(seed, key, d.name))))
    outs = llm.generate(requests, params, use_tqdm=False)
    texts = [o.outputs[0].text.strip() for o in outs]
    n = len(decodings)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
