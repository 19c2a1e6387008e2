"""Weight orthogonalization: directional ablation made permanent (Arditi et al. 2024, Eq. 5–6).

Every matrix that writes to the residual stream — the token embedding (and learned position
embeddings, GPT-2's), and every writer of every
branch of every block (:mod:`refusalkit.models.structure`: attention output projections, MLP down
projections, every expert's down projection and a shared expert's in a mixture of experts, a
state-space block's output projection) — is replaced by ``W ← W − r̂ r̂ᵀ W`` (for the embedding,
whose rows are vectors in the residual space, ``E ← E − E r̂ r̂ᵀ``); biases of those projections
likewise. Afterwards no component along ``r̂`` is ever written, which equals hook ablation (tested:
logits match within 1e-4 on tiny models). A tied output head is untied first so that the
unembedding is left as it was.

A branch whose output passes through an RMS post-norm ``g ⊙ y / rms(y)`` (Gemma 2/3, OLMo 2)
writes ``g ⊙ y`` up to a scalar, whose component along ``r̂`` is ``(g ⊙ r̂)ᵀ y``: its writers are
orthogonalized against ``ĝr = (g ⊙ r̂) / ‖g ⊙ r̂‖`` instead, which removes the component along
``r̂`` exactly. Hook ablation there removes it after the norm, so the two differ by the norm's
rescaling (both write nothing along ``r̂``; the logits are not identical).
"""

from __future__ import annotations

import torch
from torch import nn

from refusalkit.models.structure import Writer, block_writers, branches, decoder_layers, norm_gain, post_norms


def _orth_out(writer: Writer, unit: torch.Tensor) -> None:
    w = writer.weight()
    u = unit.to(w.device, torch.float32)
    w32 = w.float()
    w.copy_((w32 - torch.outer(u, u @ w32)).to(w.dtype))
    b = writer.bias()
    if b is not None:
        b32 = b.float()
        b.copy_((b32 - (b32 @ u) * u).to(b.dtype))


def _residual_embeddings(model: nn.Module, emb: nn.Module, d_model: int) -> list[nn.Module]:
    """The token embedding and every other embedding table outside the decoder blocks whose rows are
    residual vectors (GPT-2's learned position embeddings): each adds its rows to the stream."""
    inside = {id(m) for b in decoder_layers(model) for m in b.modules()}
    out = [emb]
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m is not emb and id(m) not in inside and m.embedding_dim == d_model:
            out.append(m)
    return out


@torch.no_grad()
def orthogonalize(model: nn.Module, direction: torch.Tensor) -> nn.Module:
    """Project ``direction`` out of every residual-writing matrix of ``model`` in place."""
    unit = direction.float() / direction.float().norm()
    norms = post_norms(model)  # before any weight changes (the probe runs the model)
    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is emb.weight:
        out_emb.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    d_model = emb.weight.shape[1]
    for table in _residual_embeddings(model, emb, d_model):
        e = table.weight.data
        u = unit.to(e.device)
        e32 = e.float()
        e.copy_((e32 - torch.outer(e32 @ u, u)).to(e.dtype))
    for block in decoder_layers(model):
        targets = {}
        for kind, br in branches(block):
            norm = norms.get(id(br))
            if norm is None:
                targets[kind] = unit
            else:
                g = norm_gain(norm, d_model).to(unit.device)
                v = g * unit.double()
                targets[kind] = (v / v.norm()).float()
        for w in block_writers(block, d_model):
            _orth_out(w, targets[w.kind])
    return model
