"""Refusal-preserving compression (rp-wanda, rp-sparsegpt, rp-rtn, rp-awq): the objective on hand-computed
cases, the balanced rounding, every method on a dense, a mixture-of-experts and a state-space tiny model
(sparsity / bits exactly as asked, the preserved quantity better preserved than by the plain method on the
same calibration data), the command line (reload with identical logits, bad input)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from refusalkit.cli import main
from refusalkit.compress.calibration import Calibration
from refusalkit.compress.job import CompressSpec, compress_model
from refusalkit.compress.quant import quantize_groupwise
from refusalkit.compress.refusal import RefusalTarget, check_direction, common_prefix, loss_rows, solve_update
from refusalkit.compress.refusal_quant import _grid, balanced_round
from refusalkit.core import artifacts
from refusalkit.core.errors import UserError
from refusalkit.models.chat import tokenize_instructions
from refusalkit.models.loading import LoadedModel
from refusalkit.models.structure import decoder_layers

from conftest import HARMFUL, HARMLESS, make_llama, make_tiny_run
from families import make


def test_objective_hand_computed():
    """d_out 2, d_in 1, r = e1, all weights free: (1) is ((u·1 − 1)² + (2u − 2)²)/2 + u²·1 → u = 2.5/3.5."""
    xr = torch.tensor([[1.0], [2.0]])
    e = torch.tensor([1.0, 2.0])
    xc = torch.tensor([[1.0]])
    h = xc.t() @ xc
    delta, info = solve_update(xr, e, h, None, torch.tensor([1.0, 0.0]), 1.0, 1.0)
    assert delta.shape == (2, 1)
    assert delta[0, 0].item() == pytest.approx(5 / 7, rel=1e-6) and delta[1, 0].item() == 0
    assert info["error_rms_before"] == pytest.approx((2.5) ** 0.5)
    assert info["error_rms_fit"] == pytest.approx((((1 - 5 / 7) ** 2 + (2 - 10 / 7) ** 2) / 2) ** 0.5, rel=1e-6)
    # a heavy refusal weight fits the error exactly; a light one barely moves the weights
    delta, info = solve_update(xr, e, h, None, torch.tensor([1.0, 0.0]), 1.0, 1e6)
    assert delta[0, 0].item() == pytest.approx(1.0, rel=1e-5) and info["error_rms_fit"] < 1e-5
    delta, _ = solve_update(xr, e, h, None, torch.tensor([1.0, 0.0]), 1.0, 1e-6)
    assert abs(delta[0, 0].item()) < 1e-5


def test_penalty_is_the_calibration_outputs_change_and_the_mask_is_kept():
    """uᵀ(H ⊙ K)u = Σ_t ||Δ x_t||² for Δ = (r̂ uᵀ) ⊙ M; Δ is zero off the mask; rᵀΔ = s ⊙ u."""
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 6, 5
    keep = torch.rand(d_out, d_in, generator=g) > 0.4
    rhat = torch.randn(d_out, generator=g, dtype=torch.float64)
    rhat /= rhat.norm()
    xr, xc = torch.randn(9, d_in, generator=g), torch.randn(7, d_in, generator=g)
    e = torch.randn(9, generator=g)
    h = xc.double().t() @ xc.double() / len(xc)
    delta, info = solve_update(xr, e, h, keep, rhat, 1.0, 3.0)
    assert (delta[~keep] == 0).all()
    s = rhat.pow(2) @ keep.double()
    u = (rhat @ delta) / s
    assert torch.allclose(delta, rhat.unsqueeze(1) * u.unsqueeze(0) * keep.double(), atol=1e-12)
    m = keep.double()
    k = m.t() @ (rhat.pow(2).unsqueeze(1) * m)
    change = float((xc.double() @ delta.t()).pow(2).sum(1).mean())
    assert float(u @ (h * k) @ u) == pytest.approx(change, rel=1e-6)
    assert info["calibration_change_rms"] == pytest.approx(change**0.5, rel=1e-6)


@pytest.mark.parametrize("masked", [True, False])
def test_solve_in_slabs_is_the_dense_minimizer(masked):
    """d_in above one slab (H ⊙ K formed SLAB rows at a time, the normal matrix factored in place):
    the update equals the dense normal equations' solution of (1), and the solve stays on the CPU
    for a CPU block."""
    from refusalkit.compress.refusal import SLAB, solve_device

    g = torch.Generator().manual_seed(1)
    d_out, d_in, n = 24, SLAB + 76, 80
    keep = torch.rand(d_out, d_in, generator=g) > 0.5 if masked else None
    rhat = torch.randn(d_out, generator=g, dtype=torch.float64)
    rhat /= rhat.norm()
    xr, e = torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    xc = torch.randn(3 * d_in, d_in, generator=g, dtype=torch.float64)
    h = xc.t() @ xc / len(xc)
    delta, info = solve_update(xr, e, h, keep, rhat, 0.8, 2.0)
    m = keep.double() if masked else torch.ones(d_out, d_in, dtype=torch.float64)
    s = rhat.pow(2) @ m
    a = 0.8 * xr * s
    hk = h * (m.t() @ (rhat.pow(2).unsqueeze(1) * m))
    u = torch.linalg.solve(a.t() @ a / n + hk / 2.0, a.t() @ e / n)
    assert torch.allclose(delta, rhat.unsqueeze(1) * u * m, rtol=1e-6, atol=1e-9)
    assert info["calibration_change_rms"] == pytest.approx(float(u @ hk @ u) ** 0.5, rel=1e-6)
    assert solve_device(torch.device("cpu"), d_in) == torch.device("cpu")


@pytest.mark.parametrize("bits, group, rows", [(4, 16, 96), (3, 32, 96), (8, -1, 96), (2, 8, 3)])
def test_balanced_round_on_a_grid_with_column_sums_kept(bits, group, rows):
    """3 rows: most columns cannot be balanced; the moves that would not help are never made."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(rows, 64, generator=g, dtype=torch.float64)
    r = torch.randn(rows, generator=g, dtype=torch.float64)
    r /= r.norm()
    out, info = balanced_round(w, r, bits, group)
    gs = 64 if group <= 0 else group
    # on a group grid of 2^bits levels that plain rounding reads back
    assert torch.allclose(quantize_groupwise(out, bits, group), out, atol=1e-9)
    assert max(len(torch.unique(row)) for row in out.reshape(-1, gs)) <= 2**bits
    # every weight at one of its two neighbouring grid points
    scale = (w.reshape(-1, gs).amax(1) - w.reshape(-1, gs).amin(1)) / (2**bits - 1)
    assert ((out - w).abs().reshape(-1, gs) <= scale.unsqueeze(1) * (1 + 1e-9)).all()
    scale_, zero, qmax = _grid(w, bits, gs)  # round-to-nearest in float64 (quantize_groupwise works in float32)
    nearest = r @ ((torch.round(w / scale_ + zero).clamp(0, qmax) - zero) * scale_ - w)
    balanced = r @ (out - w)
    assert info["column_residual_rms_nearest"] == pytest.approx(float(nearest.pow(2).mean().sqrt()), rel=1e-5)
    assert (balanced.abs() <= nearest.abs() + 1e-12).all()  # no column gets worse
    if rows > 50:  # 96 rows: steps of about a tenth of the residual
        assert float(balanced.pow(2).mean().sqrt()) < 0.25 * float(nearest.pow(2).mean().sqrt())
        assert 0 < info["moved_fraction"] < 0.1


def test_common_prefix_and_loss_rows():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2], [1, 2]]) == 1  # at most the shortest minus one
    x = [torch.arange(2 * 4 * 1.0).reshape(2, 4, 1), torch.arange(3.0).reshape(1, 3, 1) + 100]
    assert loss_rows(x, 2).flatten().tolist() == [0, 1, 2, 3, 6, 7, 102]  # the prefix once, then the rest


def _target(model, tokenizer) -> RefusalTarget:
    d = model.get_input_embeddings().weight.shape[1]
    r = check_direction(torch.randn(d, generator=torch.Generator().manual_seed(3)), d)
    samples = tokenize_instructions(tokenizer, HARMFUL + HARMLESS)
    return RefusalTarget(r, 1, samples, common_prefix(samples))


@torch.no_grad()
def _r_error(model, base, target) -> float:
    """RMS over the decoder blocks' outputs of ``rᵀ(h_base − h)`` on the refusal prompts (the preserved quantity)."""
    errs = []
    n = len(decoder_layers(model))
    for s in target.samples:
        ids = torch.tensor([s])
        hb = base(ids, output_hidden_states=True).hidden_states[1:n]
        hm = model(ids, output_hidden_states=True).hidden_states[1:n]
        errs += [((a - b)[0].double() @ target.direction).pow(2).mean() for a, b in zip(hb, hm)]
    return float(torch.stack(errs).mean().sqrt())


FAMILY_CASES = [
    ("llama", "rp-wanda-0.5"),
    ("llama", "rp-sparsegpt-2:4"),
    ("llama", "rp-rtn-w4"),
    ("llama", "rp-awq-w3"),
    ("qwen2_moe", "rp-wanda-2:4"),
    ("qwen2_moe", "rp-sparsegpt-0.5"),
    ("qwen2_moe", "rp-awq-w4"),
    ("mamba", "rp-wanda-0.5"),
    ("mamba", "rp-rtn-w4"),
    ("gemma2", "rp-wanda-0.5"),  # post-norms: the correction goes through the norm's first-order factor
]


@pytest.mark.parametrize("family, method", FAMILY_CASES)
def test_each_method_keeps_the_setting_and_preserves_refusal_better(family, method, tokenizer, tmp_path, one_thread):
    base = make_llama(tokenizer) if family == "llama" else make(family, tokenizer)
    cal = Calibration([tokenizer(t)["input_ids"] for t in HARMFUL + HARMLESS])
    group = -1 if family == "mamba" else 16
    models, records = {}, {}
    with one_thread():
        for m in (method.removeprefix("rp-"), method):
            model = copy.deepcopy(base)
            lm = LoadedModel(model=model, tokenizer=tokenizer, spec="tiny", source="memory")
            target = _target(model, tokenizer)
            res = compress_model(
                lm, CompressSpec(method=m, group_size=group), cal, refusal=target if m.startswith("rp-") else None
            )
            models[m], records[m] = model, res
        plain, rp = models[method.removeprefix("rp-")], models[method]
        target = _target(base, tokenizer)
        assert _r_error(rp, base, target) < 0.8 * _r_error(plain, base, target)
        rp.save_pretrained(str(tmp_path / "m"))
        import transformers

        again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
        ids = torch.tensor([target.samples[0]])
        with torch.no_grad():
            assert torch.equal(rp(ids).logits, again(ids).logits)
    notes = records[method]["notes"]["refusal_preservation"]
    assert set(notes["blocks"]) == {str(i) for i in range(len(decoder_layers(base)))}
    per_layer = records[method]["per_layer"]
    if (
        "wanda" in method or "sparsegpt" in method
    ):  # block 0: the plain method's mask exactly; every layer: its sparsity
        for (n, p), (_, q) in zip(plain.named_parameters(), rp.named_parameters()):
            if ".layers.0." in n:
                assert torch.equal(p == 0, q == 0), n
        plain_layers = records[method.removeprefix("rp-")]["per_layer"]
        assert {k: v["sparsity"] for k, v in per_layer.items()} == {k: v["sparsity"] for k, v in plain_layers.items()}
    else:  # every decoder matrix on a group grid of 2^bits levels
        bits = int(method.rsplit("w", 1)[1])
        for n, p in rp.named_parameters():
            if p.ndim == 2 and ".layers." in n and not n.endswith("A_log"):
                gs = p.shape[1] if group <= 0 else group
                levels = max(len(torch.unique(row)) for row in p.detach().reshape(-1, gs))
                assert levels <= 2**bits, n


def test_without_a_direction_and_impossible_settings_one_line_exit_2(tmp_path, tokenizer, capsys):
    root, cfg = make_tiny_run(tmp_path, tokenizer)
    capsys.readouterr()
    model = str(cfg.model)
    (root / "base").rename(tmp_path / "moved")  # the run has no direction now
    for args, needle in (
        (["--method", "rp-wanda-0.5"], "refusalkit extract --run"),
        (["--method", "rp-wanda-1.5"], "outside [0, 1)"),
        (["--method", "rp-rtn-w9"], "2 to 8 bits"),
        (["--method", "rp-wanda-2:5"], "refusalkit extract --run"),
        ("restore", None),
        (["--method", "rp-wanda-0.5", "--n-refusal", "7"], "more than the run's 6 training prompts"),
        (["--method", "rp-wanda-2:5", "--n-refusal", "3"], "not a multiple of 5"),
    ):
        if args == "restore":
            (tmp_path / "moved").rename(root / "base")
            _write_splits(root)
            continue
        code = main(["-q", "compress", "--run", str(root), "--model", model, "--n-calibration", "2", *args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, err
        assert not any((root / d).exists() for d in ("rp-wanda-0.5", "rp-rtn-w9", "rp-wanda-2:5"))
    with pytest.raises(UserError, match="--refusal-weight"):
        CompressSpec(method="rp-wanda-0.5", refusal_weight=0)


def _write_splits(root) -> None:
    artifacts.write_json(
        root / "data" / "splits.json",
        {
            k: {"source": k, "train": p, "val": [], "test": []}
            for k, p in (("harmful", HARMFUL), ("harmless", HARMLESS))
        },
    )


def test_compress_command_records_the_method(tmp_path, tokenizer, capsys, one_thread):
    root, cfg = make_tiny_run(tmp_path, tokenizer)
    _write_splits(root)
    with one_thread():
        code = main(
            ["-q", "compress", "--run", str(root), "--model", str(cfg.model), "--method", "rp-wanda-2:4",
             "--n-calibration", "4", "--seq-len", "32", "--n-refusal", "3", "--refusal-weight", "4"]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        info = json.loads((root / "rp-wanda-2:4" / "compression.json").read_text())
        assert info["method"] == "rp-wanda" and info["sparsity"] == pytest.approx(0.5)
        assert info["parameters"]["plain_method"] == "wanda" and info["parameters"]["refusal_weight"] == 4
        target = info["refusal_preservation"]["target"]
        assert target["prompts"] == {"harmful": 3, "harmless": 3} and target["direction_layer"] == 2
        blocks = info["refusal_preservation"]["blocks"]
        assert all(
            b["error_rms_after"] <= max(w["error_rms_before"] for w in b["writers"].values()) for b in blocks.values()
        )
