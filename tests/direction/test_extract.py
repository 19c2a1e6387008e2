"""extract.py: mean activations and difference-in-means candidates against a direct computation."""

from __future__ import annotations

import pytest
import torch

from refusalkit.direction.extract import candidate_directions, mean_activations
from refusalkit.models.structure import decoder_layers


def _direct_means(model, ids: list[list[int]], n_pos: int) -> torch.Tensor:
    """Per prompt, unpadded: HF ``hidden_states[l]`` (input of block l) for l < L, and the output
    of the last block (before the final norm) from a forward hook for l = L."""
    blocks = decoder_layers(model)
    L = len(blocks)
    final: list[torch.Tensor] = []
    h = blocks[-1].register_forward_hook(
        lambda m, a, o: final.append((o[0] if isinstance(o, tuple) else o).detach().clone())
    )
    total = torch.zeros((n_pos, L + 1, model.config.hidden_size), dtype=torch.float64)
    try:
        with torch.no_grad():
            for r in ids:
                final.clear()
                out = model(input_ids=torch.tensor([r]), output_hidden_states=True)
                hs = out.hidden_states
                assert len(hs) == L + 1
                for layer in range(L):
                    total[:, layer] += hs[layer][0, -n_pos:].double()
                total[:, L] += final[-1][0, -n_pos:].double()
    finally:
        h.remove()
    return total / len(ids)


@pytest.fixture(scope="module")
def means(tiny_lm, harmful_ids, harmless_ids, n_pos, one_thread):
    with one_thread():
        return (
            mean_activations(tiny_lm, harmful_ids, n_pos, batch_size=4),
            mean_activations(tiny_lm, harmless_ids, n_pos, batch_size=4),
        )


def test_mean_activations_shape_dtype(tiny_lm, means, n_pos):
    for m in means:
        assert m.shape == (n_pos, tiny_lm.n_layers + 1, tiny_lm.d_model)
        assert m.dtype == torch.float64
        assert torch.isfinite(m).all()


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_mean_activations_equals_direct(tiny_lm, harmful_ids, n_pos, batch_size):
    got = mean_activations(tiny_lm, harmful_ids, n_pos, batch_size=batch_size)
    want = _direct_means(tiny_lm.model, harmful_ids, n_pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Position matters: the streams at different positions differ (no broadcast bug).
    assert (want[0] - want[-1]).abs().max() > 1e-3
    # The final stream is the raw block output, not the normed HF last hidden state.
    assert (want[:, -1] - want[:, -2]).abs().max() > 1e-3


def test_mean_activations_more_positions_than_post_instruction(tiny_lm, harmless_ids, n_pos):
    k = n_pos + 3
    got = mean_activations(tiny_lm, harmless_ids, k, batch_size=2)
    want = _direct_means(tiny_lm.model, harmless_ids, k)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_progress_counts_prompts(llama_lm, harmful_ids, n_pos):
    seen: list[int] = []
    mean_activations(llama_lm, harmful_ids, n_pos, batch_size=4, progress=seen.append)
    # one call per batch of at most 4 prompts (batches are cut by length), every prompt counted once
    assert sum(seen) == len(harmful_ids) and all(1 <= n <= 4 for n in seen) and len(seen) >= 2


def test_candidate_directions(tiny_lm, means, n_pos):
    harmful, harmless = means
    cand = candidate_directions(harmful, harmless)
    assert cand.shape == (n_pos, tiny_lm.n_layers + 1, tiny_lm.d_model)
    assert cand.dtype == torch.float32
    torch.testing.assert_close(cand, (harmful - harmless).float(), atol=0, rtol=0)
    # Block 0's input at post-instruction positions is the same token embedding for every prompt.
    assert torch.count_nonzero(cand[:, 0]) == 0
    assert (cand[:, 1:].norm(dim=-1) > 1e-4).all()
