"""Perplexity on held-out text (non-overlapping windows, as WikiText perplexity in Wanda / SparseGPT).

:func:`perplexity` is the one implementation (token ids in, figures out); :func:`perplexity_on_corpus`
feeds it the held-out part of the bundled Wikipedia corpus.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from refusalkit.core.errors import UserError
from refusalkit.data.corpus import corpus_ids
from refusalkit.models.loading import LoadedModel

CORPUS = "wikipedia (held-out: every tenth article)"


@torch.inference_mode()
def perplexity(
    lm: LoadedModel, ids: list[int], seq_len: int = 512, max_tokens: int | None = None, batch_size: int = 1
) -> dict[str, float]:
    """exp(mean next-token negative log-likelihood) over non-overlapping windows of ``seq_len`` tokens.

    Every window predicts its tokens 2..seq_len from the preceding ones in the window; a last
    partial window is dropped. Returns ``{"perplexity", "nll", "n_tokens", "n_windows"}``.
    Memory: the logits of ``batch_size`` windows (``seq_len x vocab`` floats each, 311 MB for a
    151,936-token vocabulary) and one window's log-probabilities; one window at a time by default.
    """
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"need at least {seq_len} tokens for one window, got {len(ids)}")
    windows = torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i : i + batch_size].to(lm.device)
        logits = lm.model(input_ids=x, use_cache=False).logits
        for row, tokens in zip(logits, x):  # [seq_len, V] each: no copy of the whole batch's logits
            nll = torch.nn.functional.cross_entropy(row[:-1].float(), tokens[1:], reduction="sum")
            total += nll.item()
            count += tokens.numel() - 1
        del logits
    return {"perplexity": math.exp(total / count), "nll": total / count, "n_tokens": count, "n_windows": n}


def corpus_windows(tokenizer: Any, n_tokens: int, seq_len: int = 512, *, screen: bool = False) -> list[int]:
    """The token ids :func:`perplexity_on_corpus` scores: the first ``n_tokens`` of the held-out part
    of the bundled Wikipedia corpus (every tenth article, never used for calibration), or with
    ``screen`` the last ``n_tokens``, cut at a window boundary from the end. The repair search
    screens its candidates on the last tokens and the evaluation judges on the first, so the edit
    that is chosen is never judged on the tokens it was chosen on (the held-out part has about
    100k tokens; the two ranges would meet only if both together asked for more)."""
    if seq_len < 2:
        raise UserError(f"perplexity sequence length must be 2 or more, got {seq_len}")
    if n_tokens < seq_len:
        raise UserError(f"perplexity needs at least one window: n_tokens ({n_tokens}) < seq_len ({seq_len})")
    ids = corpus_ids(tokenizer, "wikipedia", held_out=True)
    if len(ids) < seq_len:
        raise UserError(f"the held-out Wikipedia text has only {len(ids)} tokens, fewer than seq_len {seq_len}")
    if not screen:
        return ids[:n_tokens]
    n = min(n_tokens, len(ids)) // seq_len * seq_len
    return ids[len(ids) - n :]


def perplexity_on_corpus(
    lm: LoadedModel, n_tokens: int = 4096, seq_len: int = 512, *, screen: bool = False
) -> dict[str, Any]:
    """:func:`perplexity` on :func:`corpus_windows` (``screen``: the repair search's tokens).

    Returns its dict plus ``"corpus"``; raises :class:`UserError` when not even one window fits.
    """
    ids = corpus_windows(lm.tokenizer, n_tokens, seq_len, screen=screen)
    out: dict[str, Any] = dict(perplexity(lm, ids, seq_len=seq_len, max_tokens=n_tokens))
    out["corpus"] = CORPUS + (", its last tokens (the repair search's)" if screen else "")
    return out
