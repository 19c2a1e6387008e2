"""orthogonalize.py: weight orthogonalization equals hook ablation; a tied head is left unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from refusalkit.direction.hooks import ablation_hooks, add_hooks
from refusalkit.direction.orthogonalize import orthogonalize
from refusalkit.models.structure import attn_out_proj, decoder_layers, mlp_down_proj

from conftest import make_llama, make_qwen2


def _logits(model, ids_list, hooks=([], [])):
    with torch.no_grad(), add_hooks(*hooks):
        return [model(input_ids=torch.tensor([r])).logits[0].float() for r in ids_list]


def _assert_orth_equals_ablation(model, ids_list, r):
    ref = _logits(model, ids_list, ablation_hooks(model, r))
    base = _logits(model, ids_list)
    ortho = orthogonalize(copy.deepcopy(model), r)
    got = _logits(ortho, ids_list)
    for g, w, b in zip(got, ref, base):
        assert (w - b).abs().max() > 1e-3  # ablation changes the logits: the test can fail
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
    return ortho


def test_orthogonalize_equals_ablation_hooks(tiny_lm, harmful_ids, harmless_ids, rand_dir):
    model = tiny_lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ortho = _assert_orth_equals_ablation(
        model, [harmful_ids[0], harmless_ids[2], harmless_ids[3]], rand_dir(seed=9, scale=3.0)
    )
    # The original model is untouched (orthogonalize worked on the copy).
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # No residual-writing matrix has a component along r̂ any more.
    r = rand_dir(seed=9)
    u = r / r.norm()
    d = model.config.hidden_size
    assert (ortho.get_input_embeddings().weight @ u).abs().max() < 1e-5
    for b in decoder_layers(ortho):
        assert (u @ attn_out_proj(b, d).weight).abs().max() < 1e-5
        assert (u @ mlp_down_proj(b, d).weight).abs().max() < 1e-5
    # Only the residual-writing matrices changed.
    changed = {k for k, v in ortho.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("embed_tokens.weight", "o_proj.weight", "down_proj.weight")) for k in changed)


def test_orthogonalize_with_biases(tokenizer, harmful_ids, harmless_ids, rand_dir, one_thread):
    """o_proj / down_proj biases also write to the residual stream and must be orthogonalized."""
    model = make_llama(tokenizer, seed=3, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for b in decoder_layers(model):
            for p in (b.self_attn.o_proj.bias, b.mlp.down_proj.bias):
                p.normal_(0.0, 0.1)
    with one_thread():
        ortho = _assert_orth_equals_ablation(model, [harmful_ids[1], harmless_ids[0]], rand_dir(seed=2))
    r = rand_dir(seed=2)
    u = r / r.norm()
    for b in decoder_layers(ortho):
        assert abs(b.self_attn.o_proj.bias @ u) < 1e-5
        assert abs(b.mlp.down_proj.bias @ u) < 1e-5


MAKERS = {"llama": make_llama, "qwen2": make_qwen2}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_orthogonalize_tied_head_is_untied_and_unchanged(
    tokenizer, harmful_ids, harmless_ids, rand_dir, one_thread, arch
):
    model = MAKERS[arch](tokenizer, seed=5, tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    head_before = model.get_output_embeddings().weight.detach().clone()
    with one_thread():
        ortho = _assert_orth_equals_ablation(model, [harmful_ids[2], harmless_ids[1]], rand_dir(seed=8, scale=2.0))
    head, emb = ortho.get_output_embeddings().weight, ortho.get_input_embeddings().weight
    assert head is not emb and head.data_ptr() != emb.data_ptr()
    assert torch.equal(head, head_before)
    assert not torch.equal(emb, head_before)
    assert ortho.config.tie_word_embeddings is False
    # The original (tied) model still is tied and unchanged.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_output_embeddings().weight, head_before)


def test_orthogonalize_in_place_and_returns_model(llama_lm, rand_dir):
    m = copy.deepcopy(llama_lm.model)
    assert orthogonalize(m, rand_dir()) is m


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_orthogonalized_tied_model_survives_save_and_reload(
    tokenizer, harmful_ids, rand_dir, tmp_path, one_thread, arch
):
    """The CLI saves the orthogonalized model with save_pretrained; the untied head must survive."""
    from transformers import AutoModelForCausalLM

    model = MAKERS[arch](tokenizer, seed=5, tie_word_embeddings=True)
    r = rand_dir(seed=8, scale=2.0)
    with one_thread():
        ref = _logits(model, [harmful_ids[0]], ablation_hooks(model, r))
        ortho = orthogonalize(copy.deepcopy(model), r)
        ortho.save_pretrained(str(tmp_path))
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
        got = _logits(loaded, [harmful_ids[0]])
    assert loaded.get_output_embeddings().weight is not loaded.get_input_embeddings().weight
    torch.testing.assert_close(
        loaded.get_output_embeddings().weight, model.get_output_embeddings().weight, atol=0, rtol=0
    )
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=0)
