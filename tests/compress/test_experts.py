"""Compression of weights that are not ``nn.Linear`` layers (issue 16): each expert of a fused
``[experts, out, in]`` tensor, calibrated on the tokens its router sent it; a state-space block's
time-step projection applied as ``W @ X``; GPT-2's ``Conv1D``. Methods that act on ``nn.Linear``
layers only refuse such models in one line."""

from __future__ import annotations

import pytest
import torch

from refusalkit.compress.blockwise import AliasLinear, linear_layers
from refusalkit.compress.calibration import Calibration
from refusalkit.compress.job import CompressSpec, compress_model
from refusalkit.compress.pruning import Sparsity, wanda_mask
from refusalkit.compress.quant import quantize_groupwise
from refusalkit.models.loading import LoadedModel
from refusalkit.models.structure import decoder_layers

from conftest import HARMFUL, HARMLESS, make_llama
from families import FAMILIES, E, make


@pytest.fixture(scope="module")
def cal(tokenizer) -> Calibration:
    return Calibration([tokenizer(t)["input_ids"] for t in HARMFUL + HARMLESS])


def _lm(model, tokenizer) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=tokenizer, spec="tiny", source="memory")


def _routed_reference(model, cal: Calibration, block: int = 0):
    """Per expert of ``block``: the sum of squared inputs of its gate/up and of its down projection
    over the tokens routed to it, computed from the router's choice and the expert's weights (the
    eager experts loop, written out here for Mixtral's layout)."""
    experts = decoder_layers(model)[block].mlp.experts
    gu, dn = experts.gate_up_proj.data, experts.down_proj.data
    sq_in = torch.zeros(E, gu.shape[2])
    sq_mid = torch.zeros(E, dn.shape[2])
    counts = [0] * E

    def grab(_m, args):
        x, idx = args[0], args[1]
        for e in range(E):
            rows = (idx == e).any(-1)
            xe = x[rows].float()
            counts[e] += int(rows.sum())
            sq_in[e] += (xe * xe).sum(0)
            g, u = (xe @ gu[e].t().float()).chunk(2, dim=-1)
            mid = experts.act_fn(g) * u
            sq_mid[e] += (mid * mid).sum(0)

    h = experts.register_forward_pre_hook(grab)
    try:
        model.set_experts_implementation("eager")
        with torch.no_grad():
            for s in cal.samples:
                model(torch.tensor([s]))
    finally:
        h.remove()
    return sq_in, sq_mid, counts


def test_wanda_calibrates_each_expert_on_the_tokens_routed_to_it(tokenizer, cal, one_thread):
    with one_thread():
        ref = make("mixtral", tokenizer)
        sq_in, sq_mid, counts = _routed_reference(ref, cal)
        model = make("mixtral", tokenizer)
        res = compress_model(_lm(model, tokenizer), CompressSpec(method="wanda-0.5"), cal)
    assert model.get_experts_implementation() == make("mixtral", tokenizer).get_experts_implementation()  # restored
    rec = res["notes"]["experts"]["tensors"]
    assert rec["0.mlp.experts.gate_up_proj"] == {"tokens": counts, "uncalibrated": []}
    assert sum(counts) == 2 * sum(len(s) for s in cal.samples)  # every token reached its top-2 experts
    orig = make("mixtral", tokenizer)
    ex, ex0 = decoder_layers(model)[0].mlp.experts, decoder_layers(orig)[0].mlp.experts
    sp = Sparsity(0.5)
    for e in range(E):
        for got, w, sq in ((ex.gate_up_proj, ex0.gate_up_proj, sq_in), (ex.down_proj, ex0.down_proj, sq_mid)):
            want = wanda_mask(w.data[e], sq[e], sp)
            assert torch.equal(got.data[e] == 0, want), e
            assert ((got.data[e] == 0).sum(1) == w.shape[2] // 2).all()  # exact per-row sparsity
        assert res["per_layer"][f"0.mlp.experts.down_proj.{e}"]["sparsity"] == pytest.approx(0.5)
    # the scores used the routed tokens, not every token: another expert's statistic gives another mask
    assert not torch.equal(ex.down_proj.data[0] == 0, wanda_mask(ex0.down_proj.data[0], sq_mid[1], sp))


def test_an_expert_no_calibration_token_reaches_is_pruned_by_magnitude_and_reported(tokenizer, cal, one_thread):
    with one_thread():
        model = make("mixtral", tokenizer)
        orig = make("mixtral", tokenizer)
        experts = decoder_layers(model)[0].mlp.experts

        def never_three(_m, args):  # the router of block 0 never picks expert 3
            idx = args[1].clone()
            idx[idx == E - 1] = 0
            return (args[0], idx, *args[2:])

        h = experts.register_forward_pre_hook(never_three)
        try:
            res = compress_model(_lm(model, tokenizer), CompressSpec(method="sparsegpt-0.5"), cal)
        finally:
            h.remove()
    rec = res["notes"]["experts"]
    assert rec["tensors"]["0.mlp.experts.down_proj"]["tokens"][E - 1] == 0
    assert rec["tensors"]["0.mlp.experts.down_proj"]["uncalibrated"] == [E - 1]
    assert rec["tensors"]["1.mlp.experts.down_proj"]["uncalibrated"] == []
    assert "|W| within each output row" in rec["uncalibrated_rule"]
    w0 = decoder_layers(orig)[0].mlp.experts.down_proj.data[E - 1]
    got = experts.down_proj.data[E - 1]
    want = wanda_mask(w0, torch.ones(w0.shape[1]), Sparsity(0.5))
    assert torch.equal(got == 0, want)
    assert torch.equal(got[~want], w0[~want])  # no weight update without a Hessian


@pytest.mark.parametrize("method", ["rtn-w4", "magnitude-2:4", "sparsegpt-0.5"])
def test_every_expert_is_compressed(method, tokenizer, cal, one_thread):
    with one_thread():
        model = make("qwen2_moe", tokenizer)
        orig = make("qwen2_moe", tokenizer)
        res = compress_model(_lm(model, tokenizer), CompressSpec(method=method, group_size=16), cal)
    for i, (b, b0) in enumerate(zip(decoder_layers(model), decoder_layers(orig))):
        for name in ("gate_up_proj", "down_proj"):
            p, p0 = getattr(b.mlp.experts, name).data, getattr(b0.mlp.experts, name).data
            for e in range(E):
                assert not torch.equal(p[e], p0[e]), (i, name, e)
                if method.startswith("rtn"):  # on the 4-bit grid: quantizing again changes nothing
                    torch.testing.assert_close(quantize_groupwise(p[e], 4, 16), p[e], atol=1e-6, rtol=0)
                elif method.startswith("magnitude"):
                    assert ((p[e] != 0).reshape(p.shape[1], -1, 4).sum(-1) <= 2).all()
                assert f"{i}.mlp.experts.{name}.{e}" in res["per_layer"]
        assert not torch.equal(b.mlp.shared_expert.down_proj.weight, b0.mlp.shared_expert.down_proj.weight)


def test_state_space_and_conv1d_weights_get_their_inputs(tokenizer, cal, one_thread):
    """Mamba applies its time-step projection as ``W @ X`` (never calling the module) and GPT-2 keeps
    ``Conv1D`` layers: Wanda still sees their inputs and prunes each row exactly."""
    with one_thread():
        for family in ("mamba", "gpt2"):
            model = make(family, tokenizer)
            lins = linear_layers(decoder_layers(model)[0])
            if family == "gpt2":
                assert all(isinstance(m, AliasLinear) and m.source is not None for m in lins.values())
            res = compress_model(_lm(model, tokenizer), CompressSpec(method="wanda-0.5"), cal)
            for layer in decoder_layers(model):
                for n, lin in linear_layers(layer).items():
                    w = lin.weight.data
                    assert ((w == 0).sum(1) == w.shape[1] // 2).all(), (family, n)
            assert len(res["per_layer"]) == 3 * len(lins)


@pytest.mark.parametrize("family", ["mixtral", "gpt2"])
def test_llm_int8_refuses_fused_experts_and_conv1d_in_one_line(family, tokenizer, tmp_path, capsys):
    from refusalkit.cli import main

    from conftest import CHATML_TEMPLATE

    model_dir = tmp_path / "model"
    make(family, tokenizer).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    template = tmp_path / "chat.jinja"
    template.write_text(CHATML_TEMPLATE)
    root = tmp_path / "run"
    capsys.readouterr()  # the save's own progress bar
    code = main(["-q", "compress", "--run", str(root), "--model", str(model_dir), "--chat-template", str(template),
                 "--method", "llm-int8", "--backend", "torch"])  # fmt: skip
    err = capsys.readouterr().err
    what = (
        "experts in fused tensors (mlp.experts.down_proj, mlp.experts.gate_up_proj)"
        if family == "mixtral"
        else "Conv1D"
    )
    assert code == 2 and what in err and "use magnitude or wanda or sparsegpt or awq or rtn" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not any(p.is_dir() and p.name not in ("data",) for p in root.iterdir()) if root.exists() else True


@pytest.mark.integration
def test_a_pruned_mixture_of_experts_reloads_with_identical_logits(tokenizer, tmp_path, capsys):
    """`refusalkit compress` on a saved Mixtral: the checkpoint (saved per expert by transformers)
    reloads into the same fused tensors, with the per-expert sparsity it recorded."""
    from refusalkit.cli import main
    from refusalkit.core import artifacts
    from refusalkit.models.loading import load_model

    from conftest import CHATML_TEMPLATE

    model_dir = tmp_path / "model"
    make("mixtral", tokenizer).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    template = tmp_path / "chat.jinja"
    template.write_text(CHATML_TEMPLATE)
    root = tmp_path / "run"
    code = main(["-q", "compress", "--run", str(root), "--model", str(model_dir), "--chat-template", str(template),
                 "--method", "magnitude-0.5"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    info = artifacts.read_json(root / "magnitude-0.5" / "compression.json")
    assert {f"0.mlp.experts.down_proj.{e}" for e in range(E)} <= set(info["per_layer"])
    reloaded = load_model(str(root / "magnitude-0.5" / "model"), chat_template=str(template)).model
    mem = load_model(str(model_dir), chat_template=str(template))
    compress_model(mem, CompressSpec(method="magnitude-0.5"), None)
    ids = torch.tensor([tokenizer("Tell me how to poison someone.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, mem.model(ids).logits)
    down = decoder_layers(reloaded)[0].mlp.experts.down_proj.data
    assert (down == 0).float().mean().item() == pytest.approx(
        info["per_layer"]["0.mlp.experts.down_proj.0"]["sparsity"], abs=0.05
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_every_linear_map_exactly_and_reloads_with_identical_logits(
    family, tokenizer, cal, tmp_path, one_thread
):
    """Wanda 50% on each tiny family: every linear map of every block (experts, Conv1D, SSM
    projections included) has exactly half of each row zero; saved and reloaded by transformers,
    the variant gives the same logits."""
    from transformers import AutoModelForCausalLM

    with one_thread():
        model = make(family, tokenizer)
        compress_model(_lm(model, tokenizer), CompressSpec(method="wanda-0.5"), cal)
        for i, layer in enumerate(decoder_layers(model)):
            for n, lin in linear_layers(layer).items():
                w = lin.weight.data
                assert ((w == 0).sum(1) == w.shape[1] // 2).all(), (i, n)
        model.save_pretrained(str(tmp_path))
        again = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
        ids = torch.tensor([tokenizer("Tell me how to poison someone.")["input_ids"]])
        with torch.no_grad():
            assert torch.equal(again(ids).logits, model(ids).logits)


def test_awq_quantizes_each_expert_on_its_routed_tokens_better_than_rtn(tokenizer, cal, one_thread):
    """AWQ on a fused expert tensor: each expert's scale is searched on the tokens routed to it and
    kept inside the stored weight (``Q(W s) / s``); on those tokens every expert's down projection
    is at least as close to full precision as round-to-nearest's, in sum over the experts."""
    with one_thread():
        ref = make("mixtral", tokenizer)
        _, sq_mid, counts = _routed_reference(ref, cal)  # only for the token counts
        awq = make("mixtral", tokenizer)
        res = compress_model(_lm(awq, tokenizer), CompressSpec(method="awq-w4", group_size=16), cal)
        rtn = make("mixtral", tokenizer)
        compress_model(_lm(rtn, tokenizer), CompressSpec(method="rtn-w4", group_size=16), cal)
        # the routed inputs of block 0's down projections, from the full-precision model
        experts = decoder_layers(ref)[0].mlp.experts
        mids: dict[int, list[torch.Tensor]] = {e: [] for e in range(E)}

        def grab(_m, args):
            x, idx = args[0], args[1]
            for e in range(E):
                g, u = (x[(idx == e).any(-1)] @ experts.gate_up_proj.data[e].t()).chunk(2, dim=-1)
                mids[e].append(experts.act_fn(g) * u)

        h = experts.register_forward_pre_hook(grab)
        ref.set_experts_implementation("eager")
        with torch.no_grad():
            for s in cal.samples:
                ref(torch.tensor([s]))
        h.remove()
    views = res["notes"]["awq_views"]["0"]
    assert {f"mlp.experts.down_proj.{e}" for e in range(E)} <= set(views)
    assert [views[f"mlp.experts.down_proj.{e}"]["tokens"] for e in range(E)] == counts
    assert res["notes"]["experts"]["tensors"]["0.mlp.experts.down_proj"]["tokens"] == counts
    err = {"awq": 0.0, "rtn": 0.0}
    w0 = experts.down_proj.data
    for e in range(E):
        x = torch.cat(mids[e])
        for name, model in (("awq", awq), ("rtn", rtn)):
            w = decoder_layers(model)[0].mlp.experts.down_proj.data[e]
            assert not torch.equal(w, w0[e])
            err[name] += float((x @ w.t() - x @ w0[e].t()).pow(2).sum())
    assert err["awq"] < err["rtn"], err


@pytest.mark.parametrize("family", ["qwen2_moe", "gemma2", "llama"])
def test_awq_never_folds_a_scale_into_a_norm_that_others_read(family, tokenizer, cal, one_thread):
    """Folding 1/s into the norm before a shared expert would also rescale what the router and the
    routed experts read (Qwen2-MoE); Gemma's norm multiplies by 1 + w, so dividing w does not divide
    its output. Such groups are tried on one batch and dropped; a dense Llama keeps both of its."""
    from refusalkit.compress.awq import ScaleGroup, _folding_preserves_the_block, find_scale_groups
    from refusalkit.compress.blockwise import BlockInputs, capture_inputs, run_block

    with one_thread():
        model = make_llama(tokenizer) if family == "llama" else make(family, tokenizer)
        inputs = capture_inputs(model, cal.samples[:4])
        block = decoder_layers(model)[0]
        groups, probe = find_scale_groups(block, inputs)
        shared = ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"]
        norms = {
            "qwen2_moe": {"post_attention_layernorm": shared},  # the router and every expert read it too
            "gemma2": {n: [r for r, p in probe.producer.items() if p == n] for n in ("input_layernorm", "pre_feedforward_layernorm")},
            "llama": {},
        }[family]  # fmt: skip
        folded = {g.prev for g in groups}
        assert not folded & set(norms), folded
        first = BlockInputs(inputs.hidden[:1], inputs.kwargs[:1])
        for norm, readers in norms.items():  # folding there would change the block: never kept
            assert readers and not _folding_preserves_the_block(
                block, first, run_block(block, first)[0], ScaleGroup(readers, norm, readers[0]), probe.modules
            )
        if family == "llama":
            assert {"input_layernorm", "post_attention_layernorm"} <= folded


def test_aird_on_an_awq_expert_returns_it_to_its_own_grid(tokenizer, cal, one_thread):
    """An AWQ expert stores Q(W s) / s: AIRD requantizes the edited expert with the same s (saved
    beside the variant), so it stays on that grid; the plain group grid would re-round the whole
    matrix, and the realized edit would stray further from the intended one."""
    from refusalkit.compress.awq import VIEW_SCALES
    from refusalkit.repair.aird import Requantize, apply_aird

    with one_thread():
        model = make("mixtral", tokenizer)
        res = compress_model(_lm(model, tokenizer), CompressSpec(method="awq-w4", group_size=16), cal)
    scales = res["notes"][VIEW_SCALES]
    assert set(scales) >= {f"1.mlp.experts.down_proj.{e}" for e in range(E)}
    info = {"method": "awq", "bits": 4, "parameters": {"group_size": 16}}
    r = torch.randn(64, generator=torch.Generator().manual_seed(4)) * 3
    down = decoder_layers(model)[1].mlp.experts.down_proj.data
    survival = {}
    for name, rq in (("own", Requantize.from_compression(info, scales)), ("plain", Requantize.from_compression(info))):
        edit = apply_aird(model, r, 1, alphas={"attn_out": 0.02, "mlp_down": 0.3}, unit=True, requantize=rq)
        s = scales["1.mlp.experts.down_proj.0"]
        if name == "own":  # on its grid: W'' s is a group-wise 4-bit matrix
            torch.testing.assert_close(quantize_groupwise(down[0] * s, 4, 16), down[0] * s, atol=1e-5, rtol=0)
        survival[name] = edit.records["mlp_down:mlp.experts.down_proj[0]"]["quantization"]
        edit.remove()
    # measured: residual 0.86 on its own grid, 1.48 on the plain one (the whole expert re-rounded)
    assert survival["own"]["residual"] < 0.75 * survival["plain"]["residual"], survival
