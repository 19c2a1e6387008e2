"""Difference-in-means candidate directions (Arditi et al. 2024, §2.3, Eq. 1).

For every post-instruction position ``i`` and every layer ``l``:

    r_i^(l) = μ_i^(l) − ν_i^(l),   μ = mean over harmful prompts,  ν = mean over harmless prompts,

where the activation is the residual stream at the *input* of decoder block ``l``
(``l = 0 … L−1``) plus the final stream (the output of the last block, before the final norm)
as ``l = L``. Candidates are stored as one tensor ``[positions, L + 1, d_model]``, position
index ``0`` being offset ``−n_pos`` from the end of the prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from refusalkit.direction.forward import forward_last
from refusalkit.direction.hooks import add_hooks
from refusalkit.models.loading import LoadedModel
from refusalkit.models.structure import decoder_layers


@torch.inference_mode()
def mean_activations(
    lm: LoadedModel,
    ids: list[list[int]],
    n_pos: int,
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Mean residual stream over prompts at the last ``n_pos`` positions: ``[n_pos, L + 1, d]`` float64."""
    blocks = decoder_layers(lm.model)
    L = len(blocks)
    last: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            last[layer] = x[:, -n_pos:, :]

        return pre

    def grab_out(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        last[L] = x[:, -n_pos:, :]

    total = torch.zeros((n_pos, L + 1, lm.d_model), dtype=torch.float64)

    def on_batch(n_rows: int) -> None:
        for layer in range(L + 1):
            total[:, layer, :] += last[layer].double().sum(0).cpu()
        if progress is not None:
            progress(n_rows)

    pre_hooks = [(b, grab(i)) for i, b in enumerate(blocks)]
    with add_hooks(pre_hooks=pre_hooks, fwd_hooks=[(blocks[-1], grab_out)]):
        forward_last(
            lm.model,
            ids,
            pad_id=lm.tokenizer.pad_token_id,
            batch_size=batch_size,
            on_batch=on_batch,
            keep_suffix=n_pos,
            want_logits=False,
        )
    return total / len(ids)


def candidate_directions(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """``harmful_mean − harmless_mean`` as float32, shape ``[n_pos, L + 1, d]`` (Eq. 1)."""
    return (harmful_mean - harmless_mean).float()
