"""Refusal-preserving pruning: ``rp-wanda`` and ``rp-sparsegpt``.

Each block is pruned by the plain method (Wanda's mask, or SparseGPT's mask and OBS update, at the
same sparsity: unstructured or N:M, experts included), then every residual writer's kept weights
move by ``Δ = (r̂ uᵀ) ⊙ M`` (:mod:`refusalkit.compress.refusal`, Eq. 1) so that the block's
output along the base model's refusal direction on the refusal prompts is the dense model's. The
mask is the plain method's: no pruned weight comes back, so the sparsity (and an N:M pattern) is
exactly the plain method's.
"""

from __future__ import annotations

from typing import Any

import torch

from refusalkit.compress.methods import Method, register
from refusalkit.compress.pruning import calibrated_block, check_nm, configure_pruning, pruning_parameters
from refusalkit.compress.refusal import preserving_parameters, preserving_step


@torch.no_grad()
def add_on_support(writer: Any, delta: torch.Tensor, rhat: torch.Tensor, state: dict) -> None:
    """``W += Δ`` where ``W`` is not zero (``Δ`` is zero off the mask already; kept exact here)."""
    w = writer.linear.weight.data
    d = delta.to(w.device, w.dtype)
    w.add_(torch.where(w != 0, d, torch.zeros_like(d)))


for _rank, _plain in enumerate(("wanda", "sparsegpt")):
    register(
        Method(
            f"rp-{_plain}",
            "pruning",
            True,
            f"refusal-preserving {_plain}: {_plain}'s mask, then each residual writer's kept weights "
            "corrected so the block's output along the refusal direction stays the dense model's (needs extract)",
            f"refusal-preserving {_plain} pruning",
            full_name=f"rp-{_plain}-(?P<sparsity>.+)",
            configure=configure_pruning,
            variant_name=lambda spec: f"{spec.method}-{spec.sparse.label()}",
            parameters=lambda spec: {**pruning_parameters(spec), **preserving_parameters(spec)},
            check_linear=lambda spec, lin, where: check_nm(spec.sparse, lin.in_features, where),
            compress_block=preserving_step(calibrated_block, add_on_support, "compressed"),
            covers_views=True,
            exact_calibration=True,
            rank=10 + _rank,
            preserves=_plain,
        )
    )
