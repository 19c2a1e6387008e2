"""GCG's pure tensor steps (Zou et al. Alg. 1): top-k substitutions from the one-hot gradient,
candidate sampling, deduplication, and the target loss (Eq. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refusalkit.core.errors import UserError


def top_k_substitutions(grad: torch.Tensor, k: int, allowed: torch.Tensor) -> torch.Tensor:
    """``X_i = Top-k(−∇_{e_{x_i}} L)`` for every suffix position (Alg. 1, line 3).

    ``grad`` is ``[S, V]``, ``allowed`` a bool mask ``[V]`` or ``[S, V]``. Returns ``[S, k']`` token
    ids, ``k' = min(k, allowed tokens of the most restricted position)``, so no disallowed token
    is ever proposed.
    """
    allowed = allowed.to(grad.device).expand_as(grad)
    k = min(k, int(allowed.sum(-1).min()))
    if k < 1:
        raise UserError("no token is allowed at some suffix position; set allow_non_ascii or check the tokenizer")
    scores = (-grad.float()).masked_fill(~allowed, float("-inf"))
    return scores.topk(k, dim=-1).indices


def sample_candidates(
    ids: torch.Tensor, topk_ids: torch.Tensor, n: int, n_replace: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` copies of ``ids [S]``, each with ``n_replace`` distinct uniformly random positions ``i``
    set to a uniformly random token of ``topk_ids[i]`` (Alg. 1, lines 4-6). CPU, seeded."""
    ids, topk_ids = ids.cpu(), topk_ids.cpu()
    S, k = topk_ids.shape
    n_replace = max(1, min(n_replace, S))
    pos = torch.rand(n, S, generator=generator).argsort(dim=-1)[:, :n_replace]
    pick = torch.randint(0, k, (n, n_replace), generator=generator)
    out = ids.unsqueeze(0).repeat(n, 1)
    out.scatter_(1, pos, topk_ids[pos, pick])
    return out


def unique_candidates(cands: torch.Tensor, current: torch.Tensor | None = None) -> torch.Tensor:
    """Drop repeated rows (first kept, order preserved) and rows equal to ``current``: every
    candidate costs a forward pass."""
    seen = {tuple(current.tolist())} if current is not None else set()
    keep = []
    for i, row in enumerate(cands.tolist()):
        t = tuple(row)
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return cands[torch.tensor(keep, dtype=torch.long)] if keep else cands[:0]


def target_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``target [T]`` under teacher forcing (Eq. 2) and whether every target
    token is the argmax (the target is the greedy continuation). ``logits [B, T, V]`` predict
    the target tokens. Returns float32 ``loss [B]`` and bool ``success [B]``."""
    B, T, V = logits.shape
    tgt = target.to(logits.device).unsqueeze(0).expand(B, T)
    ce = F.cross_entropy(logits.float().reshape(B * T, V), tgt.reshape(-1), reduction="none").view(B, T)
    return ce.mean(-1), (logits.argmax(-1) == tgt).all(-1)
