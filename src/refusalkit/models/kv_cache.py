"""Passing a key-value cache to a transformers model, whichever name the installed version expects.

transformers 5.x renamed the ``forward`` keyword ``past_key_values`` to ``cache``: the old name
still works but warns ("`past_key_values` is deprecated and will be removed in version 5.40.0
for `LlamaForCausalLM.forward`. Use `cache` instead.") and goes away in 5.40. Versions before the
rename only know ``past_key_values``. The keyword is read from the model's own ``forward``
signature (feature detection, never a version string; the decorators keep the signature through
``functools.wraps``), so a remote-code model that still takes ``past_key_values`` gets that name.

Callers pass the cache object in and keep using it: a ``Cache`` is updated in place, so nobody
reads it back from the output (whose attribute was renamed too, and warns under the old name).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NEW_KEYWORD = "cache"
OLD_KEYWORD = "past_key_values"


@functools.cache
def library_keyword() -> str:
    """The keyword of the installed transformers: ``cache`` when its model outputs have a
    ``cache`` field (the rename), else ``past_key_values``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return NEW_KEYWORD if NEW_KEYWORD in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else OLD_KEYWORD


def cache_keyword(model: Any) -> str:
    """``"cache"`` or ``"past_key_values"``: the name under which ``model(...)`` takes its KV cache.

    Named parameters of ``model.forward`` decide; a ``forward(**kwargs)`` (or any callable without
    either name) gets :func:`library_keyword`.
    """
    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        params = {}
    for name in (NEW_KEYWORD, OLD_KEYWORD):
        if name in params and params[name].kind is not inspect.Parameter.VAR_KEYWORD:
            return name
    return library_keyword()


def cache_kwargs(cache: Any, keyword: str) -> dict[str, Any]:
    """Keyword arguments of a cached forward: ``{keyword: cache, "use_cache": True}``; ``keyword``
    from :func:`cache_keyword` (looked up once per batch, not per step)."""
    return {keyword: cache, "use_cache": True}


def new_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` for ``model`` (one per layer, filled by the first cached forward)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _rows(cache: Any) -> int:
    """The batch size of a filled cache (attention keys, or a state-space layer's states)."""
    import torch

    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            return keys.shape[0]
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            for s in states.values() if isinstance(states, dict) else states or []:
                if isinstance(s, torch.Tensor) and s.numel():
                    return s.shape[0]
    raise ValueError("the cache holds no rows yet")


def _every_layer_has(cache: Any, method: str) -> bool:
    return all(hasattr(layer, method) for layer in getattr(cache, "layers", []))


def repeat_rows(cache: Any, n: int) -> None:
    """Repeat every row of ``cache`` ``n`` times in place (row ``i`` becomes rows ``i·n … i·n+n−1``).
    Attention layers use ``batch_repeat_interleave``; layers without it (a state-space model's
    conv and recurrent states) are re-indexed through ``reorder_cache``, which every layer has."""
    if n == 1:
        return
    if _every_layer_has(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(n)
        return
    import torch

    cache.reorder_cache(torch.arange(_rows(cache)).repeat_interleave(n))


def select_rows(cache: Any, index: Any) -> None:
    """Keep rows ``index`` (a CPU LongTensor, repeats allowed) of ``cache`` in place."""
    if _every_layer_has(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
    else:
        cache.reorder_cache(index)


def _cache_layers(model: Any) -> tuple[int, int, int]:
    """(layers holding a state-space layer's conv and recurrent states, layers holding attention
    keys and values, all layers) of the model's cache; a layer may hold both (Falcon-H1 runs
    attention and a state-space mixer side by side)."""
    layers = getattr(new_cache(model), "layers", [])
    return (
        sum(hasattr(layer, "conv_states") for layer in layers),
        sum(hasattr(layer, "keys") for layer in layers),
        len(layers),
    )


def prefix_padding_is_exact(model: Any) -> bool:
    """Whether a shared prefix may be followed by left padding: true when no layer of the model's
    cache holds a state-space layer's states (attention masks the padding out). A state-space layer
    (conv and recurrent states) runs its recurrence through padding placed after a prefix — its
    state decays over the pad steps — so such models prefill whole prompts, whose padding sits
    before the first token, where a zero state stays zero."""
    return _cache_layers(model)[0] == 0


def has_attention_layers(model: Any) -> bool:
    """Whether any layer of the model's cache holds attention keys and values. A decode step of a
    model without one takes no attention mask: its mixers multiply their input by the mask, which
    must then cover the new token only (transformers' own generation passes none). A model with
    attention needs the mask at every step, or its padded rows attend to their padding."""
    _, n_attn, n = _cache_layers(model)
    return n == 0 or n_attn > 0


def _plain_layer_type() -> type | None:
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # a transformers without per-layer caches
        return None
    return DynamicLayer


def mergeable(model: Any) -> bool:
    """Whether caches of ``model`` can be merged by :func:`merge_padded`: every layer of its
    cache is a plain ``DynamicLayer`` (full-attention keys and values; no sliding window, no
    state-space states)."""
    plain = _plain_layer_type()
    layers = getattr(new_cache(model), "layers", None)
    return plain is not None and bool(layers) and all(type(layer) is plain for layer in layers)


def merge_padded(caches: list[Any], n_prefix: int) -> Any:
    """One cache holding the rows of ``caches`` (filled, plain ``DynamicLayer`` caches of the
    same model over a shared ``n_prefix``-token prefix followed by left-padded suffixes of
    different widths), in order. Each cache's keys and values get zeros between the prefix and
    its suffix up to the widest; the caller's attention mask must mask them (0 there). Returns
    the first cache, filled with the merged tensors."""
    import torch

    first = caches[0]
    for i, layer in enumerate(first.layers):
        parts = [c.layers[i] for c in caches]
        width = max(p.keys.shape[-2] for p in parts)
        for name in ("keys", "values"):
            merged = []
            for p in parts:
                t = getattr(p, name)
                gap = width - t.shape[-2]
                if gap:
                    zeros = t.new_zeros((*t.shape[:-2], gap, t.shape[-1]))
                    t = torch.cat([t[..., :n_prefix, :], zeros, t[..., n_prefix:, :]], dim=-2)
                merged.append(t)
            setattr(layer, name, torch.cat(merged, dim=0))
    return first
