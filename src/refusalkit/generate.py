"""Batched greedy generation with left padding, under optional hooks."""

from __future__ import annotations

from typing import Callable

import torch

from .forward import batches, pad_left
from .hooks import Hook, add_hooks
from .models import LoadedModel


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    ids: list[list[int]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    hooks: tuple[list[Hook], list[Hook]] = ([], []),
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions (special tokens stripped) for tokenized chat prompts, in input order.

    Prompts are sorted by length so each batch pads little; hooks stay active for every step.
    """
    tok = lm.tokenizer
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: dict[int, str] = {}
    with add_hooks(*hooks):
        for sl in batches(len(order), batch_size):
            idx = order[sl]
            x, mask = pad_left([ids[i] for i in idx], tok.pad_token_id, lm.device)
            gen = lm.model.generate(
                input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None,
            )
            for i, row in zip(idx, gen[:, x.shape[1]:]):
                out[i] = tok.decode(row, skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(idx))
    return [out[i] for i in range(len(ids))]
