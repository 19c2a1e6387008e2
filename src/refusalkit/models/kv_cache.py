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
