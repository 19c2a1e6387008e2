"""Perplexity on held-out text (non-overlapping windows, as WikiText perplexity in Wanda / SparseGPT)."""

from __future__ import annotations

import math

import torch

from .models import LoadedModel


@torch.inference_mode()
def perplexity(lm: LoadedModel, ids: list[int], seq_len: int = 512, max_tokens: int | None = None,
               batch_size: int = 4) -> dict[str, float]:
    """exp(mean next-token negative log-likelihood) over non-overlapping windows of ``seq_len`` tokens.

    Every window predicts its tokens 2..seq_len from the preceding ones in the window; a last
    partial window is dropped. Returns ``{"perplexity", "nll", "n_tokens", "n_windows"}``.
    """
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"need at least {seq_len} tokens for one window, got {len(ids)}")
    windows = torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i:i + batch_size].to(lm.device)
        logits = lm.model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return {"perplexity": math.exp(total / count), "nll": total / count, "n_tokens": count, "n_windows": n}
