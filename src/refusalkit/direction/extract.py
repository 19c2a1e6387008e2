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

from refusalkit.direction.forward import forward_last, longest_first
from refusalkit.direction.hooks import add_hooks
from refusalkit.models.loading import LoadedModel
from refusalkit.models.structure import decoder_layers


def capture_streams(
    lm: LoadedModel,
    ids: list[list[int]],
    select: Callable[[torch.Tensor], torch.Tensor],
    consume: Callable[[list[torch.Tensor], int], None],
    *,
    batch_size: int,
    keep_suffix: int,
) -> None:
    """Run every prompt (in :func:`~refusalkit.direction.forward.forward_last`'s order) and, after each
    batch, call ``consume(streams, n_rows)``: ``streams[l]`` is ``select`` of the residual stream at the
    input of block ``l`` for ``l < L``, and of the last block's output for ``l = L``."""
    blocks = decoder_layers(lm.model)
    L = len(blocks)
    last: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            last[layer] = select(x)

        return pre

    def grab_out(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        last[L] = select(x)

    pre_hooks = [(b, grab(i)) for i, b in enumerate(blocks)]
    with add_hooks(pre_hooks=pre_hooks, fwd_hooks=[(blocks[-1], grab_out)]):
        forward_last(
            lm.model,
            ids,
            pad_id=lm.tokenizer.pad_token_id,
            batch_size=batch_size,
            on_batch=lambda n_rows: consume([last[layer] for layer in range(L + 1)], n_rows),
            keep_suffix=keep_suffix,
            want_logits=False,
        )


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
    total = torch.zeros((n_pos, lm.n_layers + 1, lm.d_model), dtype=torch.float64)

    def consume(streams: list[torch.Tensor], n_rows: int) -> None:
        for layer, x in enumerate(streams):
            total[:, layer, :] += x.double().sum(0).cpu()
        if progress is not None:
            progress(n_rows)

    capture_streams(lm, ids, lambda x: x[:, -n_pos:, :], consume, batch_size=batch_size, keep_suffix=n_pos)
    return total / len(ids)


@torch.inference_mode()
def prompt_streams(
    lm: LoadedModel,
    ids: list[list[int]],
    n_pos: int,
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Every prompt's residual stream at the last ``n_pos`` positions, at the input of every block and
    the final stream: ``[n_prompts, n_pos, L + 1, d]`` float32 in input order. Its mean over prompts is
    :func:`mean_activations` (the same forward); the noise floor resamples its rows."""
    out = torch.zeros((len(ids), n_pos, lm.n_layers + 1, lm.d_model), dtype=torch.float32)
    order, done = longest_first(ids), [0]

    def consume(streams: list[torch.Tensor], n_rows: int) -> None:
        rows = torch.tensor(order[done[0] : done[0] + n_rows])
        for layer, x in enumerate(streams):
            out[rows, :, layer] = x.float().cpu()
        done[0] += n_rows
        if progress is not None:
            progress(n_rows)

    capture_streams(lm, ids, lambda x: x[:, -n_pos:, :], consume, batch_size=batch_size, keep_suffix=n_pos)
    return out


def candidate_directions(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """``harmful_mean − harmless_mean`` as float32, shape ``[n_pos, L + 1, d]`` (Eq. 1)."""
    return (harmful_mean - harmless_mean).float()
