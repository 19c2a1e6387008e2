"""Batched forward passes over chat-formatted prompts.

Two exact speed-ups, both tested against a plain unbatched forward:

* **Shared prefix.** Chat templates put the same tokens before every instruction (Qwen's
  default system prompt is about 20 of them). The prefix is run once (under the active hooks,
  since an intervention changes its keys and values too) and its KV cache is repeated over
  the batch; only the suffixes are run per prompt.
* **Last-position logits only** (``logits_to_keep=1``): the output head is applied to one
  position instead of all, which saves about a quarter of the FLOPs on a 0.5B model (on a
  contiguous copy of those positions: :func:`refusalkit.models.generation.contiguous_head`).
* **Batches by length** (CPU): prompts run longest first, cut into the batches of at most
  ``batch_size`` rows that minimize padded tokens plus a per-forward overhead
  (:func:`refusalkit.models.generation.length_batches`); on other devices, batches of
  ``batch_size``.

Suffixes are left-padded (padding sits between the prefix and the suffix, masked out, with
explicit position ids), so the last ``k`` columns of every row are the same template tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from refusalkit.direction.hooks import Hook, RowGroups, add_hooks
from refusalkit.models.generation import common_prefix_len, contiguous_head, forward_overhead, length_batches, pad_left
from refusalkit.models.kv_cache import (
    cache_keyword,
    cache_kwargs,
    new_cache,
    prefix_padding_is_exact,
    repeat_rows,
    select_rows,
)

# Tokens actually run through the model by forward_last (prefix once per call + suffixes,
# padding included); the benchmark reads it to compute achieved FLOP/s.
STATS = {"tokens": 0, "padded_tokens": 0}


def longest_first(ids: list[list[int]]) -> list[int]:
    """The order :func:`forward_last` runs prompts in: longest first (stable), so similar lengths
    share a batch (little padding). ``on_batch(n)`` callers read their rows from it."""
    return sorted(range(len(ids)), key=lambda i: -len(ids[i]))


@torch.inference_mode()
def forward_last(
    model,
    ids: list[list[int]],
    *,
    pad_id: int,
    batch_size: int = 32,
    hooks: tuple[list[Hook], list[Hook]] = ([], []),
    on_batch: Callable[[int], None] | None = None,
    share_prefix: bool = True,
    keep_suffix: int = 8,
    want_logits: bool = True,
    groups: list[int] | None = None,
    rows: RowGroups | None = None,
    around_batches: Callable[[], AbstractContextManager[Any]] | None = None,
) -> torch.Tensor | None:
    """Run every prompt; return float32 last-position logits ``[n, vocab]`` (or None).

    Prompts are run longest first in batches of similar length (at most ``batch_size`` rows). ``on_batch(n_rows)`` is called
    after each batch inside the hook context, so capture hooks can collect that batch's
    activations. ``keep_suffix`` is the number of trailing tokens that must stay outside the
    shared prefix (at least the post-instruction tokens). Cached forwards pass the KV cache under
    the keyword the installed transformers expects (:mod:`refusalkit.models.kv_cache`).
    ``around_batches()``: a context entered after the shared prefix has run, around the batches.
    """
    device = model.get_input_embeddings().weight.device
    P = common_prefix_len(ids, keep_suffix) if share_prefix and prefix_padding_is_exact(model) else 0
    if P < 4:
        P = 0
    order = longest_first(ids)  # results are unsorted below
    logits: torch.Tensor | None = None  # filled batch by batch: no second copy at the end
    keyword = cache_keyword(model)
    runs = length_batches([len(ids[i]) - P for i in order], batch_size, forward_overhead(device))
    with add_hooks(*hooks), contiguous_head(model):
        prefix_cache = _prefix_cache(model, ids[0][:P], groups, rows, device) if P else None
        with around_batches() if around_batches is not None else nullcontext():
            for sl in runs:
                suffixes = [ids[i][P:] for i in order[sl]]
                x, mask = pad_left(suffixes, pad_id, device)
                pos = (P + mask.cumsum(-1) - 1).clamp(min=P)
                STATS["tokens"] += int(mask.sum())
                STATS["padded_tokens"] += x.numel()
                kwargs = {}
                group_index = torch.tensor([groups[i] for i in order[sl]]) if groups is not None else None
                if rows is not None:
                    rows.index = group_index
                if prefix_cache is not None:
                    kwargs = cache_kwargs(_batch_cache(prefix_cache, group_index, x.shape[0]), keyword)
                    mask = torch.cat([torch.ones((x.shape[0], P), dtype=mask.dtype, device=device), mask], dim=1)
                res = model(input_ids=x, attention_mask=mask, position_ids=pos, logits_to_keep=1, **kwargs)
                if want_logits:
                    last = res.logits[:, -1, :]
                    if logits is None:
                        logits = torch.empty((len(ids), last.shape[-1]), dtype=torch.float32)
                    logits[torch.tensor(order[sl])] = last.float().cpu()
                del res
                if on_batch is not None:
                    on_batch(len(suffixes))
    return logits


def _prefix_cache(
    model, prefix: list[int], groups: list[int] | None, rows: RowGroups | None, device: torch.device
) -> Any:
    """The KV cache of the shared prefix, one row per row group (hooks see group ``g`` at row ``g``)."""
    cache = new_cache(model)
    n_groups = max(groups) + 1 if groups is not None else 1
    if rows is not None:
        rows.index = torch.arange(n_groups)
    model(input_ids=torch.tensor([prefix] * n_groups, device=device), logits_to_keep=1,
          **cache_kwargs(cache, cache_keyword(model)))  # fmt: skip
    STATS["tokens"] += len(prefix) * n_groups
    STATS["padded_tokens"] += len(prefix) * n_groups
    return cache


def _batch_cache(prefix_cache: Any, group_index: torch.Tensor | None, n_rows: int) -> Any:
    """A copy of the prefix cache with one row per batch row (its group's, or the one prefix repeated)."""
    cache = copy.deepcopy(prefix_cache)
    if group_index is not None:
        select_rows(cache, group_index)  # a CPU index works for caches on any device
    else:
        repeat_rows(cache, n_rows)
    return cache
