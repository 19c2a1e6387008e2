"""aird.py / repair.py: the AIRD algebra, sparsity preservation, exact removal, quantized edits,
the edited checkpoint, and the automatic choice of alpha."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from refusalkit.compress.pruning import Sparsity, apply_mask, magnitude_mask
from refusalkit.compress.quant import quantize_groupwise
from refusalkit.core.config import RepairConfig
from refusalkit.core.errors import UserError
from refusalkit.core.settings import load_config
from refusalkit.models.int8 import Int8Linear, replace_linears
from refusalkit.models.structure import attn_out_proj, decoder_layers, mlp_down_proj
from refusalkit.repair.aird import PAPER_ALPHAS, Requantize, aird_delta, apply_aird, edit_block_index, survival
from refusalkit.repair.checkpoint import checkpoint_tensors, write_edited_checkpoint
from refusalkit.repair.search import choose_scale, within_budgets

from conftest import make_llama, make_qwen2


def _w(seed=0, shape=(16, 24)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_delta_is_rank_one_along_r():
    w, r = _w(), torch.randn(16, generator=torch.Generator().manual_seed(1)) * 3
    d = aird_delta(w, r, 0.02)
    s = torch.linalg.svdvals(d)
    assert s[0] > 1e-3 and (s[1:] < 1e-9 * s[0]).all()  # rank one
    # every column of the update is a multiple of r (it writes only along r)
    r_hat = r.double() / r.double().norm()
    assert torch.allclose(d - torch.outer(r_hat, r_hat @ d), torch.zeros_like(d), atol=1e-12)
    # the block output's component along r is scaled by 1 + alpha ||r||^2, the rest is unchanged
    x = torch.randn(24, dtype=torch.float64)
    y, y2 = w.double() @ x, (w.double() + d) @ x
    assert torch.allclose(r_hat @ y2, (1 + 0.02 * r.double().norm() ** 2) * (r_hat @ y))
    assert torch.allclose(y2 - torch.outer(r_hat, r_hat) @ y2, y - torch.outer(r_hat, r_hat) @ y)


def test_keep_zeros_changes_no_zero():
    w = _w()
    apply_lin = nn.Linear(24, 16, bias=False)
    apply_lin.weight.data.copy_(w)
    apply_mask(apply_lin, magnitude_mask(apply_lin.weight, Sparsity(ratio=0.5)))
    w = apply_lin.weight.data
    r = torch.randn(16) * 4
    d = aird_delta(w, r, 0.05, keep_zeros=True)
    assert (d[w == 0] == 0).all() and (d[w != 0] != 0).float().mean() > 0.99
    plain = aird_delta(w, r, 0.05)
    assert (plain[w == 0] != 0).float().mean() > 0.99  # plain AIRD fills the pruned zeros


@pytest.mark.parametrize("make", [make_llama, make_qwen2])
@pytest.mark.parametrize("keep_zeros", [False, True])
def test_apply_then_remove_restores_bit_for_bit(tokenizer, make, keep_zeros):
    model = make(tokenizer)
    for layer in decoder_layers(model):  # prune so that keep_zeros has zeros to keep
        for lin in (attn_out_proj(layer, 64), mlp_down_proj(layer, 64)):
            apply_mask(lin, magnitude_mask(lin.weight, Sparsity(ratio=0.5)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 5
    edit = apply_aird(model, r, 1, keep_zeros=keep_zeros)
    blk = decoder_layers(model)[1]
    o, dn = attn_out_proj(blk, 64).weight, mlp_down_proj(blk, 64).weight
    expect_o = (
        before["model.layers.1.self_attn.o_proj.weight"].double()
        + aird_delta(before["model.layers.1.self_attn.o_proj.weight"], r, 0.02, keep_zeros)
    ).float()
    torch.testing.assert_close(o, expect_o, atol=1e-6, rtol=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    if keep_zeros:
        assert ((o == 0) == (before["model.layers.1.self_attn.o_proj.weight"] == 0)).all()
        assert ((dn == 0) == (before["model.layers.1.mlp.down_proj.weight"] == 0)).all()
        assert edit.records["attn_out"]["sparsity_after"] == edit.records["attn_out"]["sparsity_before"]
    else:
        assert edit.records["attn_out"]["sparsity_after"] < 0.01
    assert edit.records["attn_out"]["gain"] == pytest.approx(0.02 * float(r.double() @ r.double()))
    realized = (o.double() - before["model.layers.1.self_attn.o_proj.weight"].double()).norm()
    assert edit.records["attn_out"]["delta_norm"] == pytest.approx(float(realized), rel=1e-6) and realized > 0
    edit.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    edit.remove()  # idempotent


def test_unit_direction_gain_is_alpha(tokenizer):
    model = make_llama(tokenizer)
    r = torch.randn(64) * 7
    edit = apply_aird(model, r, 0, unit=True)
    assert edit.records["attn_out"]["gain"] == pytest.approx(PAPER_ALPHAS["attn_out"])
    assert edit.records["mlp_down"]["gain"] == pytest.approx(PAPER_ALPHAS["mlp_down"])
    edit.remove()


def test_placement():
    assert edit_block_index(5, "source", 24) == 5
    assert edit_block_index(5, "previous", 24) == 4
    with pytest.raises(UserError, match="embedding"):
        edit_block_index(0, "previous", 24)
    with pytest.raises(UserError, match="placement"):
        edit_block_index(3, "middle", 24)


def test_int8_edit_requantizes_and_restores(tokenizer):
    model = make_llama(tokenizer)
    replace_linears(model, 6.0, ["lm_head"])
    blk = decoder_layers(model)[2]
    orig_o = attn_out_proj(blk, 64)
    assert isinstance(orig_o, Int8Linear)
    w0 = orig_o.dequantized().clone()
    r = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 8
    edit = apply_aird(model, r, 2, alphas={"attn_out": 0.2, "mlp_down": 0.1})
    new_o = attn_out_proj(decoder_layers(model)[2], 64)
    assert isinstance(new_o, Int8Linear) and new_o is not orig_o
    q = edit.records["attn_out"]["quantization"]
    assert 0.9 < q["survival"] < 1.1  # a large edit survives int8 rounding
    # the stored matrix is the row-wise int8 quantization of W + delta: error within half a step per row
    target = w0.double() + aird_delta(w0, r, 0.2)
    step = target.abs().amax(1, keepdim=True) / 127
    assert ((new_o.dequantized().double() - target).abs() <= step / 2 + 1e-6).all()
    assert set(checkpoint_tensors(edit)) == {
        "model.layers.2.self_attn.o_proj.weight",
        "model.layers.2.self_attn.o_proj.SCB",
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.SCB",
    }
    edit.remove()
    assert attn_out_proj(decoder_layers(model)[2], 64) is orig_o
    assert torch.equal(orig_o.dequantized(), w0)


def test_fake_quant_requantize_and_survival(tokenizer):
    model = make_llama(tokenizer)
    for layer in decoder_layers(model):
        for lin in (attn_out_proj(layer, 64), mlp_down_proj(layer, 64)):
            lin.weight.data.copy_(quantize_groupwise(lin.weight.data, 4, 32))
    rq = Requantize("rtn", 4, 32)
    o = attn_out_proj(decoder_layers(model)[1], 64)
    w0 = o.weight.detach().clone()
    r = torch.randn(64, generator=torch.Generator().manual_seed(2))
    tiny = apply_aird(model, r * 0.1, 1, requantize=rq)  # gain ~ 0.02 * 0.64: mostly rounded away
    # back on a 4-bit grid: re-quantizing moves nothing (up to float rounding of the grid itself)
    torch.testing.assert_close(quantize_groupwise(o.weight.data, 4, 32), o.weight.data, atol=1e-6, rtol=0)
    assert o.weight.data.reshape(-1, 32).unique(dim=None).numel() <= 16 * o.weight.numel() // 32
    s_tiny = tiny.records["attn_out"]["quantization"]["survival"]
    tiny.remove()
    assert torch.equal(o.weight, w0)
    big = apply_aird(model, r * 10, 1, requantize=rq)
    s_big = big.records["attn_out"]["quantization"]["survival"]
    big.remove()
    assert s_big > 0.8 and s_tiny < s_big


def test_survival_arithmetic():
    before = torch.zeros(4, 4)
    intended = torch.ones(4, 4)
    assert survival(before, before + intended, intended)["survival"] == pytest.approx(1.0)
    assert survival(before, before, intended) == {"survival": 0.0, "residual": pytest.approx(1.0), "changed": 0.0}
    half = before.clone()
    half[:2] = 1
    assert survival(before, half, intended)["survival"] == pytest.approx(0.5)


def test_edited_checkpoint_replaces_only_the_edit(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model = make_qwen2(tokenizer)
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    r = torch.randn(64) * 3
    edit = apply_aird(model, r, 1)
    dst = tmp_path / "dst"
    write_edited_checkpoint(src, dst, checkpoint_tensors(edit))
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    diff = {k for k in a if not torch.equal(a[k], b[k])}
    assert diff == {"model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert torch.equal(b["model.layers.1.self_attn.o_proj.weight"], attn_out_proj(decoder_layers(model)[1], 64).weight)
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in dst.iterdir())
    with pytest.raises(UserError, match="no tensor"):
        write_edited_checkpoint(src, tmp_path / "bad", {"nope.weight": torch.zeros(1)})
    assert not (tmp_path / "bad").exists()
    edit.remove()


def _pt(scale, asr, orr=0.05, deg=0.0, ppl=20.0):
    return {
        "alpha_scale": scale,
        "asr": {"rate": asr},
        "over_refusal": {"rate": orr},
        "degenerate_rate": deg,
        "perplexity": ppl,
    }


def test_choose_scale_smallest_within_budgets():
    spec = RepairConfig()
    ref = _pt(0, 0.5)
    curve = [_pt(0.5, 0.45), _pt(1, 0.3), _pt(2, 0.2), _pt(4, 0.1, orr=0.5), _pt(8, 0.0, deg=0.9)]
    for p in curve:
        p["over_budget"] = within_budgets(p, ref, spec)
    assert [bool(p["over_budget"]) for p in curve] == [False, False, False, True, True]
    assert choose_scale(curve, ref, 0.3, spec) == {"scale": 1, "target_reached": True}
    assert choose_scale(curve, ref, 0.05, spec) == {"scale": 2, "target_reached": False}  # best feasible
    assert choose_scale(curve[3:], ref, 0.05, spec) == {"scale": None, "target_reached": False}
    assert "perplexity" in within_budgets(_pt(1, 0.1, ppl=30.0), ref, spec)[0]


def test_repair_settings_errors():
    with pytest.raises(UserError, match="repair.scales"):
        load_config(None, {"repair.scales": "0,1"})
    with pytest.raises(UserError, match="repair.ppl_tokens"):
        load_config(None, {"repair.ppl_tokens": 100})
    with pytest.raises(UserError, match="repair.alpha_scale"):
        load_config(None, {"repair.alpha_scale": "-2"})
    with pytest.raises(UserError, match="repair.placement"):
        load_config(None, {"repair.placement": "middle"})
    assert load_config(None, {"repair.scales": "4,1,1"}).repair.scales == [1.0, 4.0]


def test_apply_error_leaves_model_unchanged(tokenizer):
    model = make_llama(tokenizer)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(KeyError):
        apply_aird(model, torch.randn(64), 1, alphas={"attn_out": 0.02})  # mlp_down missing: fails midway
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_block_writes_scale_by_one_plus_gain(tokenizer):
    """AIRD multiplies what an edited projection writes along r by 1 + alpha ||r||^2 (the placement diagnostic).

    Exact for one projection at a time: editing the attention output also changes the MLP's input."""
    from refusalkit.core.config import Config
    from refusalkit.models.loading import LoadedModel
    from refusalkit.repair.job import _predicted_gap_change
    from refusalkit.repair.search import SearchData, block_writes

    from conftest import HARMFUL, HARMLESS

    lm = LoadedModel(model=make_qwen2(tokenizer), tokenizer=tokenizer, spec="tiny", source="memory")
    cfg, data = Config(), SearchData(HARMFUL[:3], HARMLESS[:3], {})
    r = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 2
    before = block_writes(lm, cfg, r, 2, data)
    assert set(before) == {"attn_out", "mlp_down"} and all(set(v) == {"harmful", "harmless"} for v in before.values())
    for key in before:
        edit = apply_aird(lm.model, r, 2, alphas={k: (PAPER_ALPHAS[k] if k == key else 0.0) for k in PAPER_ALPHAS})
        after = block_writes(lm, cfg, r, 2, data)
        g = edit.records[key]["gain"]
        assert g > 1  # a visible change
        for kind in ("harmful", "harmless"):
            assert after[key][kind] == pytest.approx((1 + g) * before[key][kind], rel=1e-4, abs=1e-6), kind
        gap = lambda w, key=key: w[key]["harmful"] - w[key]["harmless"]  # the other gain is 0
        assert gap(after) - gap(before) == pytest.approx(
            _predicted_gap_change(before, edit.records), rel=1e-3, abs=1e-6
        )
        edit.remove()


def test_search_chooses_by_the_bound_of_asr_back_to_base():
    """Among confirmed candidates within budgets, the one whose paired ASR rise over the base model (on
    the search prompts) has the lowest upper bound, whatever the order they were confirmed in; one over
    budget is never chosen; without per-prompt verdicts, the first that reached the target."""
    from types import SimpleNamespace

    from refusalkit.core.config import Config
    from refusalkit.repair.edit_search import _choose

    ctx = SimpleNamespace(cfg=Config(), spec=SimpleNamespace(asr_tolerance=0.0))
    base = {"labels": {"harmful": ["compliance"] * 8 + ["refusal"] * 24}}

    def point(k: int, scale: float, over: list[str] | None = None) -> dict:
        return {"labels": {"harmful": ["compliance"] * k + ["refusal"] * (32 - k)}, "asr": {"rate": k / 32},
                "scale": scale, "over_budget": over or []}  # fmt: skip

    small, big, broken = point(12, 2.0), point(8, 4.0), point(2, 8.0, ["over-refusal 30% > 5% + 5%"])
    # on 32 prompts both are undecided against the 5-point margin: the bound ranks them (the same 8 prompts
    # as the base model: Newcombe's bound with no discordant pair; 12 of 32, +4 prompts: a higher one)
    chosen = _choose([small, big, broken], 8 / 32, ctx, base)
    alone = _choose([small], 8 / 32, ctx, base)
    assert chosen["scale"] == 4.0 and chosen["target_reached"] and not alone["target_reached"]
    assert chosen["asr_vs_base"]["verdict"] == alone["asr_vs_base"]["verdict"] == "undecided"
    assert 0.05 < chosen["asr_vs_base"]["bound"] < alone["asr_vs_base"]["bound"]
    assert _choose([broken], 8 / 32, ctx, base) is None
    old = [{**small, "labels": {}}, {**big, "labels": {}}]
    assert _choose(old, 8 / 32, ctx, base)["scale"] == 4.0
