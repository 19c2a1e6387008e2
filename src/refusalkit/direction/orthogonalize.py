"""Weight orthogonalization: directional ablation made permanent (Arditi et al. 2024, Eq. 5–6).

Every matrix that writes to the residual stream — the token embedding, and the output
projection of every attention and MLP module — is replaced by ``W ← W − r̂ r̂ᵀ W`` (for the
embedding, whose rows are vectors in the residual space, ``E ← E − E r̂ r̂ᵀ``); biases of those
projections likewise. Afterwards no component along ``r̂`` is ever written, which equals hook
ablation (tested: logits match within 1e-4 on tiny models). A tied output head is untied first
so that the unembedding is left as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from refusalkit.models.structure import attn_out_proj, decoder_layers, mlp_down_proj


def _orth_out(linear: nn.Linear, unit: torch.Tensor) -> None:
    w = linear.weight.data
    u = unit.to(w.device, torch.float32)
    w32 = w.float()
    w.copy_((w32 - torch.outer(u, u @ w32)).to(w.dtype))
    if linear.bias is not None:
        b = linear.bias.data.float()
        linear.bias.data.copy_((b - (b @ u) * u).to(linear.bias.dtype))


@torch.no_grad()
def orthogonalize(model: nn.Module, direction: torch.Tensor) -> nn.Module:
    """Project ``direction`` out of every residual-writing matrix of ``model`` in place."""
    unit = direction.float() / direction.float().norm()
    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is emb.weight:
        out_emb.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    e = emb.weight.data
    u = unit.to(e.device)
    e32 = e.float()
    e.copy_((e32 - torch.outer(e32 @ u, u)).to(e.dtype))
    d_model = e.shape[1]
    for block in decoder_layers(model):
        _orth_out(attn_out_proj(block, d_model), unit)
        _orth_out(mlp_down_proj(block, d_model), unit)
    return model
