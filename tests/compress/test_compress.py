"""Compression invariants on small random layers and tiny random models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refusalkit.compress.awq import find_scale_groups
from refusalkit.compress.blockwise import capture_inputs, linear_layers
from refusalkit.compress.calibration import Calibration
from refusalkit.compress.int8 import int8_model
from refusalkit.compress.job import CompressSpec, compress_model
from refusalkit.compress.pruning import (
    Sparsity,
    layer_mask,
    magnitude_mask,
    nm_mask,
    parse_sparsity,
    row_mask,
    sparsegpt_prune,
    wanda_mask,
)
from refusalkit.compress.quant import quantize_groupwise
from refusalkit.core.errors import UserError
from refusalkit.models.int8 import Int8Linear
from refusalkit.models.loading import LoadedModel
from refusalkit.models.structure import decoder_layers

from conftest import HARMFUL, HARMLESS, make_llama, make_qwen2


@pytest.fixture(scope="module")
def cal(tokenizer) -> Calibration:
    return Calibration([tokenizer(t)["input_ids"] for t in HARMFUL + HARMLESS])


def _lm(make, tokenizer, **kw) -> LoadedModel:
    return LoadedModel(model=make(tokenizer, **kw), tokenizer=tokenizer, spec="tiny", source="memory")


# ------------------------------------------------------------------------------------------------
# Sparsity specs and masks
# ------------------------------------------------------------------------------------------------


def test_parse_sparsity():
    assert parse_sparsity("0.5") == Sparsity(0.5)
    assert parse_sparsity(0) == Sparsity(0.0)
    sp = parse_sparsity("2:4")
    assert (sp.n, sp.m, sp.ratio, sp.label()) == (2, 4, 0.5, "2:4")
    assert parse_sparsity("4:8").label() == "4:8"
    for bad in ("1", "1.5", "-0.1", "nan", "4:4", "0:4", "5:4", "1:1", "half"):
        with pytest.raises(UserError):
            parse_sparsity(bad)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_row_mask_exact_per_row(ratio):
    score = torch.rand(7, 40)
    mask = row_mask(score, ratio)
    assert (mask.sum(1) == int(40 * ratio)).all()
    # the pruned ones are the lowest of their row
    for r in range(7):
        if mask[r].any() and (~mask[r]).any():
            assert score[r][mask[r]].max() <= score[r][~mask[r]].min()


def test_layer_mask_exact_count():
    score = torch.rand(9, 16)
    mask = layer_mask(score, 0.37)
    assert mask.sum().item() == int(9 * 16 * 0.37)
    assert score[mask].max() <= score[~mask].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_groups(n, m):
    score = torch.rand(6, 32)
    mask = nm_mask(score, n, m)
    kept = (~mask).reshape(6, 32 // m, m).sum(-1)
    assert (kept == n).all()
    groups = score.reshape(6, -1, m)
    gm = mask.reshape(6, -1, m)
    assert (torch.where(gm, groups, -1.0).amax(-1) <= torch.where(~gm, groups, 2.0).amin(-1)).all()


def test_wanda_equals_magnitude_per_row_when_input_norms_are_equal():
    w = torch.randn(12, 48)
    sp = Sparsity(0.5)
    assert torch.equal(wanda_mask(w, torch.full((48,), 3.0), sp), row_mask(w.abs(), 0.5))
    sp24 = parse_sparsity("2:4")
    assert torch.equal(wanda_mask(w, torch.ones(48), sp24), magnitude_mask(w, sp24))


def test_wanda_uses_input_norms():
    w = torch.ones(4, 8)
    norms = torch.arange(1.0, 9.0)  # columns with small inputs go first
    mask = wanda_mask(w, norms, Sparsity(0.5))
    assert mask[:, :4].all() and not mask[:, 4:].any()


# ------------------------------------------------------------------------------------------------
# SparseGPT
# ------------------------------------------------------------------------------------------------


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.logspace(-1, 1, d)
    return (torch.randn(n, d, generator=g) @ mix) * scale


@pytest.mark.parametrize("spec", ["0.5", "0.7", "2:4", "4:8"])
def test_sparsegpt_reconstruction_beats_magnitude(spec):
    torch.manual_seed(0)
    sp = parse_sparsity(spec)
    w = torch.randn(24, 64)
    x = _correlated_inputs(512, 64)
    H = x.t() @ x
    ref = x @ w.t()

    def err(wp: torch.Tensor) -> float:
        return (x @ wp.t() - ref).pow(2).sum().item()

    sg = sparsegpt_prune(w, H, sp, blocksize=32)
    mag = w.masked_fill(magnitude_mask(w, sp), 0)
    assert err(sg) <= err(mag)
    if sp.structured:
        assert ((sg != 0).reshape(24, -1, sp.m).sum(-1) <= sp.n).all()
    else:
        assert (sg == 0).float().mean().item() == pytest.approx(sp.ratio, abs=0.01)


def test_sparsegpt_zero_sparsity_keeps_weights():
    w = torch.randn(8, 16)
    x = _correlated_inputs(128, 16)
    out = sparsegpt_prune(w, x.t() @ x, Sparsity(0.0), blocksize=8)
    assert torch.allclose(out, w, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Quantization
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group", [(4, 16), (8, 32), (3, -1), (2, 8)])
def test_groupwise_quantization_error_within_half_step(bits, group):
    torch.manual_seed(1)
    w = torch.randn(10, 64) * torch.logspace(-2, 0, 64)
    q = quantize_groupwise(w, bits, group)
    g = 64 if group <= 0 else group
    wg, qg = w.reshape(-1, g), q.reshape(-1, g)
    step = (wg.amax(1) - wg.amin(1)) / (2**bits - 1)
    assert ((wg - qg).abs() <= step.unsqueeze(1) / 2 + 1e-6).all()
    assert max(len(torch.unique(row)) for row in qg) <= 2**bits


def test_symmetric_quantization_bound():
    w = torch.randn(6, 32)
    q = quantize_groupwise(w, 4, 8, zero_point=False)
    step = w.reshape(-1, 8).abs().amax(1) / 7
    assert ((w.reshape(-1, 8) - q.reshape(-1, 8)).abs() <= step.unsqueeze(1) / 2 + 1e-6).all()


def test_awq_scale_groups_found_by_tracing(tokenizer, cal, one_thread):
    with one_thread():
        gqa = _lm(make_llama, tokenizer).model
        mha = _lm(make_llama, tokenizer, num_key_value_heads=4).model
        for model, expect_vo in ((gqa, False), (mha, True)):
            inputs = capture_inputs(model, cal.samples[:2])
            groups, _ = find_scale_groups(decoder_layers(model)[0], inputs)
            got = {(tuple(g.linears), g.prev, g.inspect) for g in groups}
            assert (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn") in got
            assert (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp") in got
            assert (("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj") in got
            assert ((("self_attn.o_proj",), "self_attn.v_proj", "self_attn.o_proj") in got) == expect_vo


def _logit_err(model: nn.Module, ref: nn.Module, samples: list[list[int]]) -> float:
    errs = []
    with torch.no_grad():
        for s in samples:
            x = torch.tensor([s])
            errs.append((model(x).logits - ref(x).logits).pow(2).mean().item())
    return sum(errs) / len(errs)


def _with_outliers(model: nn.Module) -> nn.Module:
    """Give the normalized activations a few large channels (as real LLMs have)."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:4] = 15.0
    return model


def test_awq_beats_rtn_with_activation_outliers(tokenizer, cal, one_thread):
    with one_thread():
        ref = _with_outliers(make_qwen2(tokenizer))
        errs = {}
        for method in ("rtn-w3", "awq-w3"):
            lm = LoadedModel(model=_with_outliers(make_qwen2(tokenizer)), tokenizer=tokenizer, spec="t", source="m")
            compress_model(lm, CompressSpec(method=method, group_size=16), cal)
            errs[method] = _logit_err(lm.model, ref, cal.samples)
    assert errs["awq-w3"] < errs["rtn-w3"]


def test_awq_scaling_is_function_preserving_before_rounding(tokenizer, cal, one_thread):
    """With 8 bits the grid is fine: the scaled-and-quantized model stays close to full precision."""
    with one_thread():
        ref = make_llama(tokenizer)
        lm = _lm(make_llama, tokenizer)
        compress_model(lm, CompressSpec(method="awq-w8", group_size=16), cal)
        assert _logit_err(lm.model, ref, cal.samples) < 1e-4


# ------------------------------------------------------------------------------------------------
# Whole-model pruning, block by block
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_llama, make_qwen2])
def test_wanda_block_by_block_matches_sequential_reference(make, tokenizer, cal, one_thread):
    """Each block's statistics come from inputs produced by the already-pruned earlier blocks."""
    with one_thread():
        lm = _lm(make, tokenizer)
        compress_model(lm, CompressSpec(method="wanda-0.5"), cal)
        ref = make(tokenizer)
        sp = Sparsity(0.5)
        for layer in decoder_layers(ref):  # slow reference: a full forward per block
            lins = linear_layers(layer)
            sq = {n: torch.zeros(m.in_features) for n, m in lins.items()}

            def record(mod, inp, out, n, sq=sq):
                sq[n].add_(inp[0].reshape(-1, inp[0].shape[-1]).pow(2).sum(0))

            hooks = [m.register_forward_hook(lambda mod, i, o, n=n: record(mod, i, o, n)) for n, m in lins.items()]
            with torch.no_grad():
                for s in cal.samples:
                    ref(torch.tensor([s]))
            for h in hooks:
                h.remove()
            for n, m in lins.items():
                m.weight.data.masked_fill_(wanda_mask(m.weight, sq[n], sp), 0)
        for (n1, p1), (_, p2) in zip(lm.model.named_parameters(), ref.named_parameters()):
            assert torch.equal(p1 == 0, p2 == 0), n1


@pytest.mark.parametrize(
    "method", ["magnitude-0.5", "wanda-0.5", "sparsegpt-0.5", "wanda-2:4", "sparsegpt-4:8", "magnitude-2:4"]
)
def test_pruning_touches_only_decoder_linears(method, tokenizer, cal, one_thread):
    with one_thread():
        ref = make_llama(tokenizer)
        lm = _lm(make_llama, tokenizer)
        res = compress_model(lm, CompressSpec(method=method), cal)
    sp = parse_sparsity(method.split("-", 1)[1])
    pruned = {f"model.layers.{k.split('.', 1)[0]}.{k.split('.', 1)[1]}.weight" for k in res["per_layer"]}
    for (name, p), (_, q) in zip(lm.model.named_parameters(), ref.named_parameters()):
        if name in pruned:
            w = p.detach()
            if sp.structured:
                assert ((w != 0).reshape(w.shape[0], -1, sp.m).sum(-1) <= sp.n).all(), name
            elif method.startswith("wanda"):
                assert ((w == 0).sum(1) == int(w.shape[1] * 0.5)).all(), name
            else:
                assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), name
        elif "sparsegpt" not in method or "weight" not in name or "layers" not in name:
            assert torch.equal(p, q), name  # embeddings, norms, head untouched
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in res["per_layer"].values())


def test_impossible_group_shapes_fail_before_work(tokenizer, cal):
    lm = _lm(make_llama, tokenizer)
    with pytest.raises(UserError, match="not a multiple of 5"):
        compress_model(lm, CompressSpec(method="wanda-2:5"), cal)
    with pytest.raises(UserError, match="group size 48"):
        compress_model(lm, CompressSpec(method="rtn-w4", group_size=48), cal)
    ref = make_llama(tokenizer)
    assert all(torch.equal(p, q) for p, q in zip(lm.model.parameters(), ref.parameters()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "prune"}, "unknown compression method"),
        ({"method": "wanda", "sparsity": "1.0"}, "outside"),
        ({"method": "wanda-4:4"}, "impossible N:M"),
        ({"method": "awq", "bits": 1}, "2 to 8 bits"),
        ({"method": "llm-int8", "bits": 4}, "8-bit"),
        ({"method": "wanda", "bits": 4}, "--bits"),
        ({"method": "rtn", "sparsity": "0.5"}, "--sparsity"),
        ({"method": "wanda", "n_calibration": 0}, "too few calibration samples"),
        ({"method": "wanda", "name": "base"}, "not usable"),
        ({"method": "wanda", "name": "../x"}, "not usable"),
    ],
)
def test_spec_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        CompressSpec(**kwargs)


def test_spec_names():
    assert CompressSpec(method="wanda").variant == "wanda-0.5"
    assert CompressSpec(method="wanda", sparsity="2:4").variant == "wanda-2:4"
    assert CompressSpec(method="sparsegpt-0.3").variant == "sparsegpt-0.3"
    assert CompressSpec(method="awq-w8").variant == "awq-w8"
    assert CompressSpec(method="rtn", bits=4, group_size=64).variant == "rtn-w4-g64"
    assert CompressSpec(method="int8").variant == "llm-int8"
    assert CompressSpec(method="magnitude", name="mine").variant == "mine"


# ------------------------------------------------------------------------------------------------
# LLM.int8
# ------------------------------------------------------------------------------------------------


def test_int8_outlier_columns_are_exact():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    q = Int8Linear.from_linear(lin, threshold=6.0)
    x = torch.zeros(5, 32)
    x[:, [3, 17]] = torch.randn(5, 2) * 10 + 8  # every value of these columns is an outlier
    expect = x[:, [3, 17]] @ q.dequantized()[:, [3, 17]].t() + lin.bias
    assert torch.allclose(q(x), expect, atol=1e-5)
    # outlier features are not quantized: scaling one barely changes the int8 part
    x2 = torch.randn(5, 32) * 0.5
    x2[0, 5] = 40.0
    y = q(x2)
    exact_outlier = x2[:, [5]] @ q.dequantized()[:, [5]].t()
    rest = x2.clone()
    rest[:, 5] = 0
    assert torch.allclose(y - exact_outlier, q(rest), atol=1e-5)


def test_int8_error_bound_without_outliers():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    q = Int8Linear.from_linear(lin, threshold=6.0)
    x = torch.randn(20, 64)
    err = (q(x) - lin(x)).abs()
    # |x_i| <= cx, |w_ij| <= cw: rounding errors of at most cx/254 and cw/254 per product term
    bound = 64 * (x.abs().amax(1, keepdim=True) * lin.weight.abs().amax(1) / 127)
    assert (err <= bound).all()
    assert err.max().item() < 0.05


@pytest.mark.parametrize("k", [64, 1536, 4864])  # one float32 slice, two, five (Qwen's MLP down)
def test_int8_matmul_paths_agree_bit_for_bit(k):
    from refusalkit.models.int8 import int8_matmul

    g = torch.Generator().manual_seed(k)
    cb = torch.randint(-127, 128, (48, k), generator=g, dtype=torch.int8)
    for m in (1, 5, 33):  # decode-sized and batch-sized inputs
        qa = torch.randint(-127, 128, (m, k), generator=g).float()
        fast, plain = int8_matmul(qa, cb, use_int_mm=True), int8_matmul(qa, cb, use_int_mm=False)
        exact = (qa.double() @ cb.double().t()).float()  # the exact integer sum, rounded once
        assert torch.equal(fast, exact) and torch.equal(plain, exact)
        assert torch.equal(int8_matmul(qa, cb), exact)  # the path chosen for this CPU
    # an extreme row: every product at 127 * 127 (the largest sum of the layer)
    qa = torch.full((2, k), 127.0)
    assert torch.equal(
        int8_matmul(qa, torch.full((3, k), 127, dtype=torch.int8)), torch.full((2, 3), float(k * 127 * 127))
    )


def test_int8_matmul_one_product_only_where_every_partial_sum_is_exact():
    """Above 1040 inputs the float path runs one product when 127 x (a row's sum of |codes|) < 2^24
    (every partial sum, in any order, an exact float32 integer), and slices otherwise: both exact."""
    from refusalkit.models import int8

    g = torch.Generator().manual_seed(1)
    k = 4864
    cb = torch.randint(-127, 128, (40, k), generator=g, dtype=torch.int8)
    small = torch.randint(-12, 13, (9, k), generator=g).float()  # activations' typical codes
    assert int8._one_product_is_exact(small)
    big = small.clone()
    big[4] = 127.0  # one row whose sums can pass 2^24: the whole batch takes the slices
    assert not int8._one_product_is_exact(big)
    for qa in (small, big):
        exact = (qa.double() @ cb.double().t()).float()
        assert torch.equal(int8.int8_matmul(qa, cb, use_int_mm=False), exact)
    # at the bound itself: the largest sum that one product may hold, same sign everywhere
    edge = torch.zeros(1, k)
    edge[0, : 2**24 // (127 * 127)] = 127.0
    assert int8._one_product_is_exact(edge)  # 1040 x 127 x 127 < 2^24
    w = torch.full((2, k), 127, dtype=torch.int8)
    assert torch.equal(int8.int8_matmul(edge, w, use_int_mm=False), (edge.double() @ w.double().t()).float())
    edge[0, -1] = 127.0  # one term more can pass 2^24
    assert not int8._one_product_is_exact(edge)


def test_int8_layers_sharing_an_input_quantize_it_once_and_see_changes():
    """q/k/v and gate/up read one tensor: its quantization is made once (the cached input is the
    tensor itself), an in-place change of the input is quantized again, and a model's forward leaves
    nothing cached behind it."""
    from refusalkit.models import int8

    torch.manual_seed(0)
    a_lin, b_lin = nn.Linear(64, 32), nn.Linear(64, 16)
    a_q, b_q = Int8Linear.from_linear(a_lin), Int8Linear.from_linear(b_lin)
    x = torch.randn(5, 64)
    x[:, 3] *= 10
    int8.forget_last_input()
    ya = a_q(x)
    cached = int8._LastInput.value
    yb = b_q(x)
    assert int8._LastInput.value is cached  # the second layer reused the first one's quantization
    int8.forget_last_input()
    assert torch.equal(b_q(x), yb) and torch.equal(a_q(x.clone()), ya)  # same values made afresh
    x[0, :8] = 0.5  # an in-place change between two sibling layers
    fresh = Int8Linear.from_linear(b_lin)(x.clone())
    assert torch.equal(b_q(x), fresh) and not torch.equal(fresh, yb)
    with torch.inference_mode():  # inference tensors have no version: identity only
        xi = torch.randn(5, 64)
        assert torch.equal(a_q(xi), a_q(xi.clone()))
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    assert int8.replace_linears(model, 6.0, []) == 2
    model(x)
    assert int8._LastInput.key is None and int8._LastInput.value is None


def test_int8_layer_float_codes_are_made_once_and_follow_edits(monkeypatch):
    """On a CPU without fast int8 products the layer keeps its codes as float32 (made once): the same
    outputs as converting them on every call, and an in-place edit or a new weight is seen."""
    from refusalkit.models import int8

    monkeypatch.setattr(int8, "_int_mm_is_fast", lambda: False)
    lin = torch.nn.Linear(1536, 40)
    q = int8.Int8Linear.from_linear(lin, threshold=6.0)
    x = torch.randn(7, 1536)
    first = q(x)
    codes = q._codes_f32
    assert torch.equal(q(x), first) and q._codes_f32 is codes  # reused, not remade
    plain = int8.int8_matmul(torch.ones(1, 1536), q.weight, use_int_mm=False)
    assert torch.equal(int8.int8_matmul(torch.ones(1, 1536), q.weight, cb_float=codes), plain)
    q.weight[0, :10] = 0  # an in-place edit of the codes
    assert q._float_codes() is not codes and torch.equal(q._float_codes(), q.weight.float())
    q.weight = torch.zeros_like(q.weight)
    assert torch.equal(q(x), torch.zeros(7, 40) + q.bias)  # a new weight: its codes are used
    assert "_codes_f32" not in q.state_dict()


def test_int8_torch_agrees_with_bitsandbytes():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(96, 48)
    ref = bnb.nn.Linear8bitLt(96, 48, bias=True, has_fp16_weights=False, threshold=6.0)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")
    ours = Int8Linear.from_linear(lin, threshold=6.0)
    # bitsandbytes quantizes the float16-rounded weight: codes agree within one step
    assert (ours.weight.int() - ref.weight.data.int()).abs().max().item() <= 1
    assert torch.allclose(ours.SCB, ref.weight.SCB, rtol=1e-3)
    x = torch.randn(10, 96)
    x[:, [7, 50]] *= 12  # outlier features
    a, b = ours(x), ref(x)
    # bitsandbytes rounds the input to float16 before quantizing and takes the per-token absmax
    # over all non-outlier values; agreement within 1% of the output scale
    assert (a - b).abs().max().item() <= 0.01 * lin(x).abs().max().item()
    assert (a - lin(x)).abs().max().item() < 0.05 * lin(x).abs().max().item()


def test_int8_model_replaces_decoder_and_keeps_head(tokenizer, cal, one_thread):
    with one_thread():
        ref = make_llama(tokenizer)
        lm = _lm(make_llama, tokenizer)
        res = int8_model(lm, CompressSpec(method="llm-int8"))
        assert isinstance(lm.model.lm_head, nn.Linear)
        assert all(
            isinstance(m, Int8Linear) for n, m in lm.model.named_modules() if "layers." in n and n.endswith("_proj")
        )
        assert _logit_err(lm.model, ref, cal.samples) < 1e-3
        assert lm.model.config.quantization_config["llm_int8_threshold"] == 6.0
        assert len(res["per_layer"]) == 4 * 7


def test_perplexity_matches_manual_cross_entropy(llama_lm):
    import math

    from refusalkit.evaluation.perplexity import perplexity

    ids = list(range(3, 3 + 50))
    res = perplexity(llama_lm, ids, seq_len=16, batch_size=2)
    assert res["n_windows"] == 3 and res["n_tokens"] == 3 * 15
    with torch.no_grad():
        nll = []
        for w in range(3):
            x = torch.tensor([ids[w * 16 : (w + 1) * 16]])
            logp = torch.log_softmax(llama_lm.model(x).logits[0, :-1].float(), -1)
            nll += [-logp[i, x[0, i + 1]].item() for i in range(15)]
    assert res["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Calibration passes that stop at the block's last linear
# ------------------------------------------------------------------------------------------------


def _stats(layer, inputs, plans):
    """Wanda's squared norms and SparseGPT's X^T X of every linear of ``layer``, and how often each
    linear's module ran its forward."""
    from refusalkit.compress.blockwise import InputStats, gather

    sq, hess, ran = {}, {}, {}

    def update(n, x):
        sq[n] = sq.get(n, 0) + (x * x).sum(0)
        hess[n] = hess.get(n, 0) + x.t() @ x

    lins = linear_layers(layer)
    handles = [m.register_forward_hook(lambda *_, n=n: ran.__setitem__(n, ran.get(n, 0) + 1)) for n, m in lins.items()]
    stats = InputStats(lins, update)
    try:
        gather(layer, inputs, stats, plans=plans)
    finally:
        for h in handles:
            h.remove()
    return sq, hess, ran, dict(stats.tokens)


def test_gather_stops_at_the_last_linear_with_the_same_statistics(tokenizer, cal, one_thread):
    with one_thread():
        model = make_llama(tokenizer)
        inputs = capture_inputs(model, cal.samples, batch_size=2)
        assert len(inputs.hidden) >= 3
        plans: dict = {}
        for i, layer in enumerate(decoder_layers(model)[:2]):
            whole = _stats(layer, inputs, None)
            stopped = _stats(layer, inputs, plans)
            for n in whole[0]:
                assert torch.equal(whole[0][n], stopped[0][n]), n  # bit for bit
                assert torch.equal(whole[1][n], stopped[1][n]), n
            assert whole[3] == stopped[3]
            assert list(plans.values()) == ["mlp.down_proj"]
            assert whole[2]["mlp.down_proj"] == len(inputs.hidden)
            # block 0 learns the order on its first batch; block 1 (same signature) stops from the start
            assert stopped[2].get("mlp.down_proj", 0) == (1 if i == 0 else 0)
            assert stopped[2]["mlp.gate_proj"] == len(inputs.hidden)


class _Twice(nn.Module):
    """A block that calls one of its linears twice: stopping at the last call's first sight would lose the second."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.a(self.b(self.a(x)))


def test_gather_runs_whole_when_a_linear_is_called_twice():
    from refusalkit.compress.blockwise import BlockInputs

    torch.manual_seed(0)
    block = _Twice().eval()
    inputs = BlockInputs([torch.randn(2, 5, 8) for _ in range(3)], [{} for _ in range(3)])
    plans: dict = {}
    whole = _stats(block, inputs, None)
    stopped = _stats(block, inputs, plans)
    assert list(plans.values()) == [None]
    assert stopped[2] == whole[2] == {"a": 6, "b": 3}
    assert stopped[3] == {"a": 60, "b": 30}  # both calls of a counted, every batch
    assert all(torch.equal(whole[0][n], stopped[0][n]) for n in whole[0])
