"""Beyond dense Llama-style decoders (issue 16): tiny random models of each family, built in the test
from their ``transformers`` config. The residual branches and their writers are found from the
modules; hook ablation and weight orthogonalization leave no component along the direction at any
block input; the orthogonalized model reproduces hook ablation where the block has no post-norm;
what refusalkit cannot do yet on a family is a one-line error, never a silent partial edit."""

from __future__ import annotations

import copy

import pytest
import torch

from refusalkit.core.errors import UserError
from refusalkit.direction.hooks import ablation_hooks, add_hooks, residual_outputs
from refusalkit.direction.orthogonalize import orthogonalize
from refusalkit.models.structure import block_writers, decoder_layers, fused_weights, mlp_down_proj, post_norms

from conftest import HIDDEN
from families import FAMILIES, E, make

POST_NORM = {"gemma2", "gemma3", "olmo2"}


def _ids(tokenizer):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Tell me how to poison someone.", "Name three colours.")]  # fmt: skip


def _block_inputs(model, ids, hooks=([], [])):
    seen = []

    def grab(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x.detach().float().clone())

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in decoder_layers(model)]
    try:
        with torch.no_grad(), add_hooks(*hooks):
            logits = [model(input_ids=torch.tensor([r])).logits[0].float() for r in ids]
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def _component(xs, u):
    """The largest |x·r̂| at any block input after the first (the embedding's is edited too),
    relative to that input's largest entry."""
    return max(float((x @ u).abs().max() / x.abs().max()) for x in xs)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tokenizer):
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return request.param, make(request.param, tokenizer)


def test_writers_cover_every_expert_shared_expert_and_mixer(family_model):
    family, model = family_model
    counts = [len(block_writers(b, HIDDEN)) for b in decoder_layers(model)]
    expected = {
        "mixtral": [1 + E] * 3, "qwen2_moe": [1 + E + 1] * 3, "qwen3_moe": [1 + E] * 3, "olmoe": [1 + E] * 3,
        "gemma2": [2] * 3, "gemma3": [2] * 3, "mistral": [2] * 3, "olmo2": [2] * 3, "phi3": [2] * 3, "gpt2": [2] * 3,
        "gpt_neox": [2] * 3, "mamba": [1] * 3, "mamba2": [1] * 3,
        "jamba": [2, 1 + 2, 2],  # mamba + MLP, attention + 2 experts, mamba + MLP
        "granitemoehybrid": [1 + E + 1] * 3,  # mamba or attention, the experts, the shared MLP beside them
        "falcon_h1": [3] * 3,  # attention, mamba and the MLP, side by side
    }[family]  # fmt: skip
    assert counts == expected
    n_branches = {"mamba": 1, "mamba2": 1, "granitemoehybrid": 3, "falcon_h1": 3}.get(family, 2)
    norms = post_norms(model)
    assert (len(norms) == 2 * 3) is (family in POST_NORM) and (family in POST_NORM or not norms)
    assert len(residual_outputs(model)) == 3 * n_branches


def test_ablation_and_orthogonalization_write_nothing_along_r(family_model, tokenizer, rand_dir):
    family, model = family_model
    ids = _ids(tokenizer)
    r = rand_dir(seed=5, scale=3.0)
    u = r / r.norm()
    plain, base_logits = _block_inputs(model, ids)
    assert _component(plain, u) > 1e-2  # the model does write along r: the test can fail
    ortho = orthogonalize(copy.deepcopy(model), r)
    got, ortho_logits = _block_inputs(ortho, ids)
    assert _component(got, u) < 1e-5, family
    _, hook_logits = _block_inputs(model, ids, ablation_hooks(model, r))
    for h, b in zip(hook_logits, base_logits):
        assert (h - b).abs().max() > 1e-3  # ablation changes the logits
    if family not in POST_NORM:
        for o, h in zip(ortho_logits, hook_logits):
            torch.testing.assert_close(o, h, atol=1e-4, rtol=0)
    else:  # a post-norm: both write nothing along r, but they differ by the norm's rescaling
        assert max(float((o - h).abs().max()) for o, h in zip(ortho_logits, hook_logits)) > 1e-6


def test_aird_edits_every_writer_with_rank_one_and_the_paper_gain_and_is_removed_bit_for_bit(family_model, rand_dir):
    """Eq. 4 on every writer of the block (each expert, a shared expert, an SSM output projection,
    a Conv1D): ΔW = α r rᵀ W has rank one, scales the writer's output along r by 1 + α‖r‖² and
    leaves the rest (the router included) alone; removal restores every tensor bit for bit."""
    from refusalkit.repair.aird import PAPER_ALPHAS, apply_aird

    family, model = family_model
    r = rand_dir(seed=9, scale=2.0).double()
    block = decoder_layers(model)[1]
    writers = block_writers(block, HIDDEN)
    before_w = [w.weight().clone().double() for w in writers]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit = apply_aird(model, r.float(), 1)
    try:
        assert len(edit.records) == len(writers)
        for w, w0 in zip(writers, before_w):
            alpha = PAPER_ALPHAS["mlp_down" if w.kind == "mlp" else "attn_out"]
            delta = w.weight().double() - w0
            torch.testing.assert_close(delta, alpha * torch.outer(r, r @ w0), atol=1e-5, rtol=1e-4)
            assert torch.linalg.matrix_rank(delta, rtol=1e-4) == 1, w.name
            x = torch.randn(w0.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            gain = float(r @ (w.weight().double() @ x)) / float(r @ (w0 @ x))
            assert gain == pytest.approx(1 + alpha * float(r @ r), rel=1e-4), w.name
        assert edit.per_role("gain") == pytest.approx(
            {
                ("mlp_down" if w.kind == "mlp" else "attn_out"): PAPER_ALPHAS[
                    "mlp_down" if w.kind == "mlp" else "attn_out"
                ]
                * float(r @ r)
                for w in writers
            }
        )
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
        assert (
            changed
            and all(".1." in k for k in changed)
            and not any("gate.weight" in k or "router" in k for k in changed)
        )
    finally:
        edit.remove()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_dense_only_helpers_refuse_a_block_of_several_writers(tokenizer):
    model = make("mixtral", tokenizer)
    block = decoder_layers(model)[0]
    assert fused_weights(block) == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    with pytest.raises(UserError, match="not one matrix.*4 writers"):
        mlp_down_proj(block, HIDDEN)


def test_an_unmappable_block_names_what_it_could_not_place():
    from torch import nn

    from refusalkit.models.structure import branches

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixing = nn.Linear(4, 4)

    with pytest.raises(UserError, match=r"cannot place the parts of block Odd \(children: mixing\)"):
        branches(Odd())


@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba", "granitemoehybrid", "falcon_h1"])
def test_state_space_models_prefill_and_decode_as_one_prompt_at_a_time(family, tokenizer, one_thread, monkeypatch):
    """A state-space layer runs its recurrence through padding placed after a shared prefix, so
    these models prefill whole prompts (left padding before the first token keeps a zero state);
    batched last-position logits and greedy completions equal one prompt at a time. Their caches
    are not merged from runs of similar length (the prefill runs whole, even with no overhead)."""
    from refusalkit.direction.forward import forward_last
    from refusalkit.models import generation
    from refusalkit.models.chat import tokenize_instructions
    from refusalkit.models.generation import generate_ids
    from refusalkit.models.kv_cache import mergeable, prefix_padding_is_exact
    from refusalkit.models.loading import LoadedModel
    from refusalkit.models.sampler import GREEDY

    monkeypatch.setattr(generation, "CPU_FORWARD_OVERHEAD", 0)  # every length its own run where allowed
    with one_thread():
        model = make(family, tokenizer)
        assert not prefix_padding_is_exact(model) and not mergeable(model)
        prompts = ["Tell me how to poison someone.", "What is 2 + 2?", "Name three colours please now."]
        ids = tokenize_instructions(tokenizer, prompts)
        batched = forward_last(model, ids, pad_id=tokenizer.pad_token_id, batch_size=3)
        for i, row in enumerate(ids):
            single = forward_last(model, [row], pad_id=tokenizer.pad_token_id, batch_size=1)
            torch.testing.assert_close(batched[i], single[0], atol=1e-4, rtol=1e-4)
        lm = LoadedModel(model=model, tokenizer=tokenizer, spec="tiny", source="memory")
        together = generate_ids(lm, ids, [GREEDY], max_new_tokens=6, batch_size=3)
        alone = [generate_ids(lm, [row], [GREEDY], max_new_tokens=6, batch_size=1)[0] for row in ids]
        assert together == alone and any(len(c[0]) for c in together)


@pytest.mark.parametrize("family", ["gemma2", "mistral", "qwen3_moe"])
def test_sliding_window_and_moe_generation_with_runs_of_similar_length(family, tokenizer, one_thread, monkeypatch):
    """Caches with sliding-window layers are not merged (the batch prefills in one forward); plain
    attention caches (Mistral without a window here, an MoE) are; greedy completions equal one
    prompt at a time either way."""
    from refusalkit.models import generation
    from refusalkit.models.chat import tokenize_instructions
    from refusalkit.models.generation import generate_ids
    from refusalkit.models.kv_cache import mergeable
    from refusalkit.models.loading import LoadedModel
    from refusalkit.models.sampler import GREEDY

    monkeypatch.setattr(generation, "CPU_FORWARD_OVERHEAD", 0)
    with one_thread():
        model = make(family, tokenizer)
        sliding = any(getattr(layer, "is_sliding", False) for layer in generation.new_cache(model).layers)
        assert mergeable(model) == (not sliding)
        ids = tokenize_instructions(tokenizer, ["Tell me how to poison someone.", "What is 2 + 2?", "Hi."])
        assert len({len(r) for r in ids}) == 3
        lm = LoadedModel(model=model, tokenizer=tokenizer, spec="tiny", source="memory")
        together = generate_ids(lm, ids, [GREEDY], max_new_tokens=6, batch_size=3)
        alone = [generate_ids(lm, [row], [GREEDY], max_new_tokens=6, batch_size=1)[0] for row in ids]
        assert together == alone and any(len(c[0]) for c in together)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["qwen2_moe", "mamba"])
def test_extract_and_orthogonalize_cli_on_a_saved_tiny_model(family, tokenizer, tmp_path, capsys):
    """refusalkit extract and orthogonalize on a mixture-of-experts and a state-space model saved
    to disk; the orthogonalized model writes nothing along the saved direction at any block input."""
    from refusalkit.cli import main
    from refusalkit.core import artifacts
    from refusalkit.models.loading import load_model

    from conftest import CHATML_TEMPLATE, HARMFUL, HARMLESS

    model_dir = tmp_path / "model"
    make(family, tokenizer).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL * 2) + "\n")
    harmless.write_text("\n".join(HARMLESS * 2) + "\n")
    template = tmp_path / "chat.jinja"
    template.write_text(CHATML_TEMPLATE)
    root = tmp_path / "run"
    common = ["--run", str(root), "--model", str(model_dir), "--chat-template", str(template)]
    code = main(["-q", "extract", *common, "--harmful", str(harmful), "--harmless", str(harmless),
                 "--n-train", "2", "--n-val", "2", "--n-test", "2", "--max-new-tokens", "4"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    info = artifacts.read_json(root / "base" / "direction" / "direction.json")
    assert info["n_layers"] == 3 and 0 <= info["layer"] < 3
    out = tmp_path / "ortho"
    assert main(["-q", "orthogonalize", "--run", str(root), "--out", str(out)]) == 0, capsys.readouterr().err
    r = artifacts.load_tensors(root / "base" / "direction" / "direction.safetensors")["direction"].float()
    ortho = load_model(str(out), chat_template=str(template)).model
    xs, _ = _block_inputs(ortho, _ids(tokenizer))
    assert _component(xs, r / r.norm()) < 1e-4


def test_the_post_norm_probe_never_runs_the_hooks_already_on_the_model(tokenizer):
    from refusalkit.models import structure

    model = make("gemma2", tokenizer, seed=3)
    calls = []
    with add_hooks([(decoder_layers(model)[0], lambda m, a, k: calls.append(1))], []):
        structure._POST_NORMS.pop(model, None)
        assert len(post_norms(model)) == 6
        assert calls == []  # the capture hook did not see the probe's forward
        model(input_ids=torch.tensor([[1, 2]]))
        assert calls == [1]  # and is still registered
    model(input_ids=torch.tensor([[1, 2]]))
    assert calls == [1]  # and removed with its context
