"""Pruning: magnitude, Wanda (Sun et al. 2023) and SparseGPT (Frantar & Alistarh 2023).

A *sparsity* is either a ratio ``p`` in [0, 1) (unstructured: a fraction ``p`` of the weights of
every pruned matrix is zeroed) or N:M structure (at most ``N`` non-zeros in every group of ``M``
consecutive weights along the input dimension, e.g. 2:4). Only the ``nn.Linear`` layers inside
decoder blocks are pruned; embeddings and the output head are not.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from refusalkit.compress.methods import BlockStep, Method, register
from refusalkit.core.errors import UserError


@dataclass(frozen=True)
class Sparsity:
    ratio: float  # target fraction of zeros
    n: int = 0  # N:M: keep at most n of every m (0: unstructured)
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.ratio:g}"

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "n": self.n, "m": self.m} if self.structured else {"ratio": self.ratio}


def parse_sparsity(spec: str | float) -> Sparsity:
    """``0.5`` -> unstructured 50%; ``2:4`` -> keep 2 of every 4 (50%)."""
    s = str(spec).strip()
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if mm < 2 or not 1 <= n < mm:
            raise UserError(f"impossible N:M sparsity {s}; N must be in [1, M) and M at least 2 (e.g. 2:4, 4:8)")
        return Sparsity(1 - n / mm, n, mm)
    try:
        r = float(s)
    except ValueError:
        raise UserError(f"sparsity {s!r} is neither a ratio in [0, 1) nor N:M (e.g. 0.5 or 2:4)") from None
    if not 0.0 <= r < 1.0 or math.isnan(r):
        raise UserError(f"sparsity ratio {r:g} is outside [0, 1); use e.g. 0.5")
    return Sparsity(r)


def check_nm(sp: Sparsity, in_features: int, name: str) -> None:
    if sp.structured and in_features % sp.m:
        raise UserError(
            f"impossible N:M sparsity {sp.label()} for {name}: its {in_features} input features "
            f"are not a multiple of {sp.m}"
        )


def _lowest_k_mask(score: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """True at the ``k`` lowest scores along ``dim`` (exactly k, ties broken by index)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(score, k, dim=dim, largest=False, sorted=False).indices
        mask.scatter_(dim, idx, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pruning mask (True = zero) keeping the ``n`` highest scores of every ``m`` consecutive columns."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    return _lowest_k_mask(groups, m - n, dim=-1).reshape(rows, cols)


def row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per-output comparison group: exactly ``int(in * ratio)`` weights of every row are pruned."""
    return _lowest_k_mask(score, int(score.shape[1] * ratio), dim=1)


def layer_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Layer-wise comparison group: the lowest ``int(numel * ratio)`` scores of the whole matrix."""
    flat = score.reshape(-1)
    return _lowest_k_mask(flat, int(flat.numel() * ratio), dim=0).reshape(score.shape)


def magnitude_mask(weight: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    """Magnitude pruning as the Wanda paper's baseline: score |W|, compared layer-wise (N:M per group)."""
    score = weight.detach().abs().float()
    return nm_mask(score, sp.n, sp.m) if sp.structured else layer_mask(score, sp.ratio)


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    """Wanda (Sun et al. 2023, Eq. 1): S_ij = |W_ij| * ||X_j||_2, compared within each output row.

    ``input_sq_norm[j]`` is ``||X_j||_2^2`` summed over every calibration token; the score is
    computed in its precision (float64 from :mod:`~refusalkit.compress.precision`) or float32.
    """
    dtype = torch.float64 if input_sq_norm.dtype == torch.float64 else torch.float32
    score = weight.detach().abs().to(dtype) * input_sq_norm.to(weight.device, dtype).sqrt().unsqueeze(0)
    return nm_mask(score, sp.n, sp.m) if sp.structured else row_mask(score, sp.ratio)


@torch.no_grad()
def apply_mask(linear: torch.nn.Linear, mask: torch.Tensor) -> None:
    linear.weight.data.masked_fill_(mask.to(linear.weight.device), 0)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sp: Sparsity,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "layer",
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): the pruned and updated weight.

    ``hessian`` is ``X X^T`` over the calibration tokens ([in, in]); the update runs in float64 when
    the Hessian is float64 (:mod:`~refusalkit.compress.precision`), else in float32. It is dampened by
    ``percdamp`` times its mean diagonal. Columns are processed left to right in blocks of
    ``blocksize``; the mask of each block is chosen adaptively by the OBS saliency
    ``w^2 / [H^-1]_cc^2`` (unstructured: the lowest ``ratio`` of the block; N:M: within every
    group of M columns), and every pruned weight's error is compensated on the columns to its
    right through the upper Cholesky factor of ``H^-1`` (Eq. 3-4).
    """
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    W = weight.detach().clone().to(dtype)
    rows, cols = W.shape
    if sp.structured:  # N:M groups must not straddle two column blocks
        blocksize = max(sp.m, blocksize - blocksize % sp.m)
    H = hessian.to(W.device, dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, device=W.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise UserError(
            f"SparseGPT: the Hessian of {name} is not positive definite even after dampening; "
            "raise --damp (e.g. 0.1) or use more calibration data"
        ) from None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if sp.structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            sal = W1**2 / d1.reshape(1, -1) ** 2
            mask1 = layer_mask(sal, sp.ratio)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if sp.structured and i % sp.m == 0:
                sal = W1[:, i : i + sp.m] ** 2 / d1[i : i + sp.m].reshape(1, -1) ** 2
                mask1[:, i : i + sp.m] = _lowest_k_mask(sal, sp.m - sp.n, dim=1)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)


# ------------------------------------------------------------------------------------------------
# The pruning methods, registered (see refusalkit.compress.methods)
# ------------------------------------------------------------------------------------------------

COMPARISON = {"magnitude": "layer", "wanda": "row", "sparsegpt": "block (adaptive)"}


def configure_pruning(spec: Any) -> None:
    spec.sparsity = "0.5" if spec.sparsity is None else str(spec.sparsity)
    spec.sparse = parse_sparsity(spec.sparsity)
    if spec.bits is not None:
        raise UserError(f"--bits applies to quantization, not to {spec.method}")


def pruning_parameters(spec: Any) -> dict[str, Any]:
    plain = spec.registered.plain
    p: dict[str, Any] = {
        "sparsity": spec.sparse.to_json(),
        "comparison": COMPARISON[plain] if not spec.sparse.structured else f"{spec.sparse.n}:{spec.sparse.m} groups",
    }
    if plain == "sparsegpt":
        p.update(damp=spec.damp, blocksize=spec.blocksize)
    return p


def _magnitude_block(step: BlockStep) -> Any:
    for lin in step.linears.values():
        apply_mask(lin, magnitude_mask(lin.weight, step.spec.sparse))
    return step.inputs


def calibrated_block(step: BlockStep) -> Any:
    """Wanda (Eq. 1 of Sun et al.: |W| * ||X||, per output row) or SparseGPT (the OBS update on the
    Hessian X^T X), from the block's calibration inputs; returns the pruned block's outputs (the
    next block's inputs; the last block's are not computed). The statistics pass stops at the
    block's last linear (:func:`~refusalkit.compress.blockwise.gather`), as its outputs are not used.

    An expert of a mixture of experts is calibrated on the tokens the router sent to it. An expert
    that received none has no statistic: it is pruned by ``|W|`` within each output row (Wanda's
    score with equal input norms; for SparseGPT, without a weight update) and listed in
    ``compression.json`` under ``experts``."""
    from refusalkit.compress.blockwise import InputStats, advance, expert_tokens, gather, run_block

    spec, acc = step.spec, {}
    wanda = spec.registered.plain == "wanda"

    def update(n: str, x: torch.Tensor) -> None:
        if n not in acc:
            acc[n] = (
                torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
                if wanda
                else torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=x.dtype)
            )
        if wanda:
            acc[n].add_((x * x).sum(0))
        else:
            acc[n].addmm_(x.t(), x)

    stats = InputStats(step.linears, update)
    gather(step.block, step.inputs, stats, plans=step.shared.setdefault("gather_plans", {}))
    expert_tokens(step, stats.tokens, UNCALIBRATED_RULE)
    for n, lin in step.linears.items():
        a = acc.get(stats.owner.get(n, n))
        if a is None:  # an expert no calibration token reached (checked above: nothing else can be)
            apply_mask(lin, wanda_mask(lin.weight, torch.ones(lin.in_features), spec.sparse))
        elif wanda:
            apply_mask(lin, wanda_mask(lin.weight, a, spec.sparse))
        else:  # in place: a loaded checkpoint's weights may be memory-mapped; rebinding would keep them resident
            lin.weight.data.copy_(
                sparsegpt_prune(lin.weight.data, a, spec.sparse, spec.blocksize, spec.damp, f"layer {step.index} {n}")
            )
    acc.clear()
    if step.last:  # no block after it: its outputs would be thrown away
        return step.inputs
    return advance(step.inputs, run_block(step.block, step.inputs))


UNCALIBRATED_RULE = (
    "no calibration token was routed to these experts: pruned by |W| within each output row "
    "(Wanda's score with equal input norms), without a weight update"
)


for _rank, (_name, _calibrated, _description, _title) in enumerate(
    (
        (
            "magnitude",
            False,
            "magnitude pruning (|W|, layer-wise comparison; N:M per group); no calibration",
            "magnitude pruning",
        ),
        (
            "wanda",
            True,
            "Wanda pruning (|W| * ||X||, per output row), block by block on calibration data",
            "Wanda pruning",
        ),
        (
            "sparsegpt",
            True,
            "SparseGPT pruning (OBS with weight updates), block by block on calibration data",
            "SparseGPT pruning",
        ),
    )
):
    register(
        Method(
            _name,
            "pruning",
            _calibrated,
            _description,
            _title,
            full_name=f"{_name}-(?P<sparsity>.+)",
            configure=configure_pruning,
            variant_name=lambda spec: f"{spec.method}-{spec.sparse.label()}",
            parameters=pruning_parameters,
            check_linear=lambda spec, lin, where: check_nm(spec.sparse, lin.in_features, where),
            compress_block=calibrated_block if _calibrated else _magnitude_block,
            covers_views=True,
            exact_calibration=_calibrated,
            rank=_rank,
        )
    )
