"""hooks.py: hook registration/removal, projection, directional ablation and activation addition."""

from __future__ import annotations

import pytest
import torch

from refusalkit.direction.hooks import ablation_hooks, add_hooks, addition_hooks, merge, project_out
from refusalkit.models.structure import attn_module, decoder_layers, mlp_module

from conftest import hook_ids


def _run_capturing(model, ids, hooks=([], []), capture_first=False):
    """Inputs of every block and the output of the last block, ``[L + 1]`` tensors ``[seq, d]``.

    ``capture_first=False``: the capturing pre-hooks are registered after ``hooks`` (they see what
    the block really receives). ``capture_first=True``: registered before (they see the raw
    residual stream arriving at the block, before the intervention's own pre-hook).
    """
    blocks = decoder_layers(model)
    got: dict[int, torch.Tensor] = {}

    def pre(i):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            got[i] = x[0].detach().clone()

        return fn

    def out(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        got[len(blocks)] = x[0].detach().clone()

    def register():
        hs = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
        hs.append(blocks[-1].register_forward_hook(out))
        return hs

    handles = []
    try:
        if capture_first:
            handles = register()
        with add_hooks(*hooks):
            if not capture_first:
                handles = register()
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in range(len(blocks) + 1)]


# ----------------------------------------------------------------------------------------------
# add_hooks
# ----------------------------------------------------------------------------------------------


def _n_hooks(module) -> tuple[int, int]:
    return len(module._forward_pre_hooks), len(module._forward_hooks)


def test_add_hooks_removes_hooks_after_block(llama_lm, rand_dir):
    model = llama_lm.model
    before = hook_ids(model)
    blocks = decoder_layers(model)
    counts = [(_n_hooks(b), _n_hooks(attn_module(b)), _n_hooks(mlp_module(b))) for b in blocks]
    pre, fwd = ablation_hooks(model, rand_dir())
    assert len(pre) == 4 and len(fwd) == 8
    with add_hooks(pre, fwd):
        for b, (nb, na, nm) in zip(blocks, counts):
            assert _n_hooks(b) == (nb[0] + 1, nb[1])
            assert _n_hooks(attn_module(b)) == (na[0], na[1] + 1)
            assert _n_hooks(mlp_module(b)) == (nm[0], nm[1] + 1)
        assert hook_ids(model) != before
    assert hook_ids(model) == before


def test_add_hooks_removes_hooks_when_body_raises(llama_lm, rand_dir):
    model = llama_lm.model
    before = hook_ids(model)
    hooks = merge(ablation_hooks(model, rand_dir()), addition_hooks(model, rand_dir(seed=5), layer=2))
    with pytest.raises(RuntimeError, match="boom"):
        with add_hooks(*hooks):
            assert hook_ids(model) != before
            raise RuntimeError("boom")
    assert hook_ids(model) == before


def test_add_hooks_removes_already_registered_when_registration_fails(llama_lm, rand_dir):
    model = llama_lm.model
    before = hook_ids(model)
    pre, fwd = ablation_hooks(model, rand_dir())
    bad = [(object(), lambda *a: None)]  # has no register_forward_hook
    with pytest.raises(AttributeError):
        with add_hooks(pre, bad):
            pass
    assert hook_ids(model) == before


# ----------------------------------------------------------------------------------------------
# project_out
# ----------------------------------------------------------------------------------------------


def test_project_out_zero_projection_and_idempotent(rand_dir):
    r = rand_dir(scale=3.0)
    unit = r / r.norm()
    x = torch.randn(2, 7, r.shape[0]) * 5
    assert (x @ unit).abs().max() > 1e-2  # the test would notice a no-op
    y = project_out(x, unit)
    assert (y @ unit).abs().max() < 1e-5
    assert torch.allclose(project_out(y, unit), y, atol=1e-6)
    # Only the component along r̂ is removed.
    assert torch.allclose(x - y, (x @ unit).unsqueeze(-1) * unit, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Directional ablation
# ----------------------------------------------------------------------------------------------


def _prompt(harmful_ids):
    return harmful_ids[0]


def test_ablation_removes_direction_at_every_block_input(tiny_lm, harmful_ids, rand_dir):
    model = tiny_lm.model
    r = rand_dir(scale=4.0)
    unit = r / r.norm()
    base = _run_capturing(model, _prompt(harmful_ids))
    # Without hooks the direction is clearly present (so the assertions below can fail).
    assert max((x @ unit).abs().max().item() for x in base) > 1e-3

    before = hook_ids(model)
    seen = _run_capturing(model, _prompt(harmful_ids), ablation_hooks(model, r))
    for layer, x in enumerate(seen):
        assert (x @ unit).abs().max().item() < 1e-4, f"stream {layer} has a component along r̂"
    assert hook_ids(model) == before


def test_ablation_nothing_written_along_direction(tiny_lm, harmful_ids, rand_dir):
    """The raw stream arriving at blocks 1..L-1 and leaving the last block has no r̂ component:
    attention and MLP outputs are ablated too, not only the block inputs."""
    model = tiny_lm.model
    r = rand_dir(seed=7)
    unit = r / r.norm()
    raw = _run_capturing(model, _prompt(harmful_ids), ablation_hooks(model, r), capture_first=True)
    assert (raw[0] @ unit).abs().max().item() > 1e-3  # block 0 sees the embedding unchanged
    for layer, x in enumerate(raw[1:], start=1):
        assert (x @ unit).abs().max().item() < 1e-4, f"stream {layer} has a component along r̂"


def test_ablation_is_scale_invariant(llama_lm, harmful_ids, rand_dir):
    model = llama_lm.model
    ids = torch.tensor([_prompt(harmful_ids)])
    r = rand_dir(seed=3)
    with torch.no_grad(), add_hooks(*ablation_hooks(model, r)):
        a = model(input_ids=ids).logits
    with torch.no_grad(), add_hooks(*ablation_hooks(model, -25.0 * r)):
        b = model(input_ids=ids).logits
    with torch.no_grad():
        c = model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Activation addition
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 2, 3])
@pytest.mark.parametrize("coeff", [1.0, -2.5])
def test_addition_changes_only_block_input_of_layer(tiny_lm, harmless_ids, rand_dir, layer, coeff):
    model = tiny_lm.model
    v = rand_dir(seed=11, scale=0.5)
    base = _run_capturing(model, harmless_ids[1])
    added = _run_capturing(model, harmless_ids[1], addition_hooks(model, v, layer=layer, coeff=coeff))
    for i in range(layer):
        assert torch.equal(added[i], base[i]), f"block {i} < {layer} changed"
    diff = added[layer] - base[layer]
    assert torch.allclose(diff, (coeff * v).expand_as(diff), atol=1e-5)
    # Later blocks do see a changed stream.
    assert not torch.allclose(added[-1], base[-1], atol=1e-4)


def test_addition_rejects_bad_layer(llama_lm, rand_dir):
    with pytest.raises(ValueError):
        addition_hooks(llama_lm.model, rand_dir(), layer=4)
    with pytest.raises(ValueError):
        addition_hooks(llama_lm.model, rand_dir(), layer=-1)
