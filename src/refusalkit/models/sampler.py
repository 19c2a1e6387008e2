"""Per-row decoding: the parameters of one decoding configuration, the logit filters and an exact
sampler, all pure tensor functions (no model).

* Each step samples all rows at once: temperature, then top-k, then top-p (HF's
  ``TemperatureLogitsWarper`` → ``TopKLogitsWarper`` → ``TopPLogitsWarper``), then inverse-CDF
  sampling. Greedy rows (``temperature == 0``) take the argmax. No step sorts the vocabulary
  (a sort of 64 × 150k logits costs more than a 0.5B model's decode step on a CPU): filtered rows
  work on the ``topk`` candidates when their kept set lies among them (:func:`sample_rows`).
* **Randomness per row.** Row ``(key, name, seed)`` draws its uniforms ``u_1..u_T`` from its own
  ``torch.Generator`` seeded from ``sha256(f"{seed}|{key}|{name}")``; step ``t`` picks the first
  token whose cumulative probability exceeds ``u_t`` (exact categorical sampling; tokens in
  token order for unfiltered rows, by decreasing probability for filtered ones). How a row is
  sampled depends on its own logits only, so samples do not depend on batch size, batch
  composition or order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Decoding:
    """One decoding configuration. ``temperature == 0`` means greedy (top_p/top_k ignored)."""

    name: str  # e.g. "greedy", "temperature=0.7", "top_p=0.9", "top_k=50"
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus; 1.0 = off
    top_k: int = 0  # 0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


GREEDY = Decoding("greedy", temperature=0.0)


# ------------------------------------------------------------------------------------------------
# Pure tensor functions: filters and the sampler
# ------------------------------------------------------------------------------------------------


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``logits / T`` row-wise: ``logits [n, V]``, ``temperature [n]``; rows with ``T <= 0``
    (greedy) are left as they are."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / t.to(logits.dtype).unsqueeze(-1)


def _kth_largest(values_desc: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[n]``: the ``k``-th largest value of each row of ``values_desc [n, K]`` (sorted
    descending), ``-inf`` where ``k == 0`` (off)."""
    kth = values_desc.gather(-1, (k.clamp(min=1, max=values_desc.shape[-1]) - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(k > 0, kth, torch.full_like(kth, -math.inf))


def top_k_filter(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``k`` largest logits, set the rest to ``-inf`` (HF ``TopKLogitsWarper``:
    tokens tied with the k-th value are kept). ``logits [n, V]``, ``k [n]`` ints, ``0`` = off."""
    kk = k.to(device=logits.device, dtype=torch.long).clamp(min=0, max=logits.shape[-1])
    if not bool((kk > 0).any()):
        return logits
    top = logits.topk(int(kk.max()), dim=-1).values  # sorted descending
    return logits.masked_fill(logits < _kth_largest(top, kk).unsqueeze(-1), -math.inf)


def nucleus_keep(probs_desc: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Top-p keep mask ``[n, K]`` over probabilities sorted in descending order: token ``i`` is kept
    iff ``Σ_{j<i} π_j < p`` (the mass before it has not reached ``p``), the first always, and all
    where ``p >= 1``. This is the smallest prefix whose mass is ``>= p`` (HF ``TopPLogitsWarper``)."""
    pp = p.to(device=probs_desc.device, dtype=probs_desc.dtype).unsqueeze(-1)
    keep = (probs_desc.cumsum(dim=-1) - probs_desc < pp) | (pp >= 1)
    keep[:, 0] = True
    return keep


def top_p_filter(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter (HF ``TopPLogitsWarper``): keep the smallest set of most probable tokens
    whose cumulative probability is ``>= p``, always at least the most probable one, so ``p = 0``
    keeps only the argmax; ``p >= 1`` is off. ``logits [n, V]``, ``p [n]``. Sorts the whole
    vocabulary: the reference that :func:`sample_rows` avoids where it can."""
    if not bool((p < 1).any()):
        return logits
    sorted_logits, order = logits.float().sort(dim=-1, descending=True)
    keep_sorted = nucleus_keep(sorted_logits.softmax(dim=-1), p)
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, -math.inf)


def warp(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, then top-p (HF's order): float32 ``[n, V]`` → filtered logits."""
    return top_p_filter(top_k_filter(apply_temperature(logits.float(), temperature), top_k), top_p)


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[n]``: the first index ``i`` with ``cdf[:, i] > target`` (``cdf [n, K]`` nondecreasing)."""
    return torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[n]`` indices: the first ``i`` with ``F_i > u · F_last``, ``F`` the float64 cumulative sum
    of the nonnegative ``weights [n, K]`` (small ``K``); zero-weight entries are never picked."""
    cdf = weights.double().cumsum(dim=-1)
    return _search(cdf, u.to(cdf.device, torch.float64) * cdf[:, -1])


def blocked_inverse_cdf(weights: torch.Tensor, u: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """:func:`_inverse_cdf` over a whole vocabulary (token order) without its full cumulative sum:
    ``weights [n, V]`` (nonnegative, unnormalized) are summed in blocks of ``block`` tokens
    (``S_b``), the block is found by inverse CDF at ``u · ΣS`` over the float64 running sums
    ``F_b``, and the token inside it by inverse CDF at ``r = (u · ΣS − F_{b−1}) / S_b``. Zero-weight
    tokens and blocks are never picked. Returns ``[n]`` token ids."""
    n, vocab = weights.shape
    nb = vocab // block
    if nb < 2:
        return _inverse_cdf(weights, u)
    sums = weights[:, : nb * block].reshape(n, nb, block).sum(dim=-1)
    if vocab > nb * block:
        sums = torch.cat([sums, weights[:, nb * block :].sum(dim=-1, keepdim=True)], dim=-1)
    sums = sums.double()
    cdf = sums.cumsum(dim=-1)
    target = u.to(cdf.device, torch.float64) * cdf[:, -1]
    b = _search(cdf, target)
    before = (cdf - sums).gather(-1, b.unsqueeze(-1)).squeeze(-1)
    r = ((target - before) / sums.gather(-1, b.unsqueeze(-1)).squeeze(-1)).clamp(0.0, 1.0 - 1e-12)
    cols = b.unsqueeze(-1) * block + torch.arange(block, device=weights.device)
    within = weights.gather(-1, cols.clamp(max=vocab - 1)) * (cols < vocab)
    return (b * block + _inverse_cdf(within, r)).clamp(max=vocab - 1)


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from ``softmax(logits)`` over the whole vocabulary in token order: for
    ``logits [n, V]`` and uniforms ``u [n]`` in ``[0, 1)``, the first token whose cumulative
    probability exceeds ``u``; ``-inf`` tokens are never picked. Returns ``[n]`` token ids."""
    x = logits.float()
    return blocked_inverse_cdf((x - x.amax(dim=-1, keepdim=True)).exp_(), u)


def _subset(x: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return x if rows.numel() == n else x[rows]


def sample_rows(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor, n_candidates: int = 1024
) -> torch.Tensor:
    """One exact sample per row from the top-k-then-top-p filtered softmax of (temperature-scaled)
    ``logits [n, V]``, with uniforms ``u [n]``. Returns ``[n]`` token ids.

    Rows with no filter are sampled by :func:`sample_from_logits`. Sorting a 150k vocabulary per
    row and step costs more than the model's forward on a CPU, so filtered rows take only the
    ``C = min(n_candidates, V)`` largest logits (``topk``) and are sampled among them by inverse
    CDF (candidates in descending order) when their kept set lies inside: a top-k row with
    ``k < C`` and no ties past the candidates, or a top-p row whose candidates hold mass ``>= p``
    (after top-k). The other rows are sampled again with 8 times the candidates, up to the whole
    vocabulary. The path a row takes depends on its own logits and parameters only, never on the
    batch.
    """
    n, vocab = logits.shape
    k = top_k.to(logits.device, torch.long).clamp(min=0)
    k = torch.where(k >= vocab, torch.zeros_like(k), k)  # keeps everything: off
    p = top_p.to(logits.device, torch.float32)
    u = u.to(logits.device, torch.float64)
    filtered = (k > 0) | (p < 1)
    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
    plain = (~filtered).nonzero().squeeze(-1)
    if plain.numel():
        tokens[plain] = sample_from_logits(_subset(logits, plain, n), u[plain])
    rows = filtered.nonzero().squeeze(-1)
    if rows.numel():
        tokens[rows] = _sample_candidates(_subset(logits, rows, n), k[rows], p[rows], u[rows], n_candidates)
    return tokens


def _sample_candidates(
    x: torch.Tensor,
    k: torch.Tensor,
    p: torch.Tensor,
    u: torch.Tensor,
    n_candidates: int,
    lse_vocab: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sample_rows` for rows with a filter (``k > 0`` or ``p < 1``): see there.
    ``lse_vocab [n]``: ``logsumexp`` over the whole vocabulary where known (rows without top-k)."""
    vocab = x.shape[-1]
    c = min(vocab, n_candidates)
    vals, idx = x.topk(c, dim=-1)  # [n, C] descending
    has_k = k > 0
    kth = _kth_largest(vals, k)
    keep_k = vals >= kth.unsqueeze(-1)
    lse = vals.masked_fill(~keep_k, -math.inf).logsumexp(dim=-1)  # right for top-k rows
    need = (~has_k).nonzero().squeeze(-1)  # the others are normalized over the whole vocabulary
    if need.numel() and c < vocab:
        if lse_vocab is None:
            top = vals[:, :1]
            lse_vocab = torch.full_like(lse, math.nan)
            lse_vocab[need] = top[need, 0] + (_subset(x, need, len(k)) - top[need]).exp_().sum(dim=-1).log()
        lse[need] = lse_vocab[need]
    probs = (vals - lse.unsqueeze(-1)).exp() * keep_k  # the top-k-filtered distribution
    keep = keep_k & nucleus_keep(probs, p)
    tokens = idx.gather(-1, _inverse_cdf(probs * keep, u).unsqueeze(-1)).squeeze(-1)
    inside = torch.where(has_k, vals[:, -1] < kth, probs.sum(dim=-1) >= p) | (c == vocab)
    again = (~inside).nonzero().squeeze(-1)
    if again.numel():
        tokens[again] = _sample_candidates(
            x[again], k[again], p[again], u[again], n_candidates * 8, None if lse_vocab is None else lse_vocab[again]
        )
    return tokens


def next_tokens(logits: torch.Tensor, params: RowParams, u: torch.Tensor, n_candidates: int = 1024) -> torch.Tensor:
    """One batched step ``[n, V] -> [n]``: argmax for greedy rows; temperature, top-k, top-p and a
    sample (:func:`sample_rows`) for the others."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    rows = (~params.greedy).nonzero().squeeze(-1)
    if rows.numel():
        x = apply_temperature(logits[rows], params.temperature[rows])
        out[rows] = sample_rows(x, params.top_k[rows], params.top_p[rows], u.to(rows.device)[rows], n_candidates)
    return out


# ------------------------------------------------------------------------------------------------
# Per-row parameters and randomness
# ------------------------------------------------------------------------------------------------


def row_seed(seed: int, key: str, name: str) -> int:
    """A stable 63-bit seed for row ``(key, decoding name)``: ``sha256(f"{seed}|{key}|{name}")``."""
    digest = hashlib.sha256(f"{seed}|{key}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_uniforms(seed: int, key: str, name: str, n: int) -> torch.Tensor:
    """The ``n`` float64 uniforms a row uses, one per step, from its own ``torch.Generator``."""
    g = torch.Generator(device="cpu").manual_seed(row_seed(seed, key, name))
    return torch.rand(n, generator=g, dtype=torch.float64)


@dataclass
class RowParams:
    """Decoding parameters of the rows of a decode batch, each ``[rows]`` on the model's device."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor

    @classmethod
    def of(cls, decodings: Sequence[Decoding], device: torch.device) -> RowParams:
        return cls(
            temperature=torch.tensor([d.temperature for d in decodings], dtype=torch.float32, device=device),
            top_k=torch.tensor([d.top_k for d in decodings], dtype=torch.long, device=device),
            top_p=torch.tensor([d.top_p for d in decodings], dtype=torch.float32, device=device),
            greedy=torch.tensor([d.greedy for d in decodings], dtype=torch.bool, device=device),
        )

    def select(self, idx: torch.Tensor) -> RowParams:
        return RowParams(self.temperature[idx], self.top_k[idx], self.top_p[idx], self.greedy[idx])
