"""noise.py: per-prompt activations, the bootstrap null, and the `moved` verdict validated on
synthetic activations whose truth is known (issue 15: an unchanged variant reads "not moved" in
at least 95% of seeds; a known rotation reads "moved")."""

from __future__ import annotations

import math

import pytest
import torch

from refusalkit.direction.compare import compare_directions
from refusalkit.direction.extract import mean_activations
from refusalkit.direction.noise import bootstrap_null, noise_floor_record, prompt_activations, summarize_null, verdict

# Synthetic activations: D dims, N prompts a kind, L + 1 = 3 layers; the refusal direction u
# (first axis) has length SIGNAL in the harmful mean; prompt-to-prompt spread SPREAD per dim.
D, N, SIGNAL, SPREAD = 64, 64, 4.0, 1.0


def _acts(seed: int, signal_dir: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(D)
    u[0] = 1.0
    v = u if signal_dir is None else signal_dir
    harmful = SPREAD * torch.randn(N, 3, D, generator=g) + SIGNAL * v
    harmless = SPREAD * torch.randn(N, 3, D, generator=g)
    return harmful, harmless


def _diff(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return h.double().mean(0) - s.double().mean(0)  # [3, D]


def _cands(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return _diff(h, s).unsqueeze(0).float()  # [n_pos = 1, L + 1, D]


def _floor(h, s, seed):
    return noise_floor_record(h, s, layer=1, position=-1, resamples=200, seed=seed)


def _moved(base, variant, floor) -> bool:
    info = {"layer": 1, "position": -1, "token": "x"}
    return compare_directions(_cands(*base), _cands(*variant), info, info, floor)["moved"]


def test_null_shape_range_and_seed():
    h, s = _acts(0)
    null = bootstrap_null(h, s, resamples=50, seed=3)
    assert null.shape == (50, 3) and null.dtype == torch.float64
    assert (null <= 1 + 1e-12).all() and (null > 0.5).all()
    assert torch.equal(null, bootstrap_null(h, s, resamples=50, seed=3))
    assert not torch.equal(null, bootstrap_null(h, s, resamples=50, seed=4))
    summ = summarize_null(null)
    assert all(f <= m <= 1 for f, m in zip(summ["floor"], summ["mean"]))
    with pytest.raises(ValueError):
        bootstrap_null(h[:1], s, resamples=5)
    with pytest.raises(ValueError):
        bootstrap_null(h, s, resamples=0)


def test_null_matches_its_expected_size():
    """cos(r, r_b) ≈ 1 - (d - 1) var(r_b - r) / (2 |r|^2) for isotropic noise: the resampled
    difference in means has variance about 2 SPREAD^2 / N per dimension."""
    h, s = _acts(1)
    got = bootstrap_null(h, s, resamples=400, seed=0).mean(0)[1].item()
    r2 = _diff(h, s)[1].norm().item() ** 2
    expect = 1 - (D - 1) * (2 * SPREAD**2 / N) / (2 * r2)
    assert got == pytest.approx(expect, abs=0.01)


def test_unchanged_variant_reads_not_moved_in_95_percent_of_seeds():
    """The variant's activations are the base's plus small per-prompt noise (a quantization-like
    perturbation, an eighth of the prompt-to-prompt spread): its direction has not moved."""
    moved = 0
    for seed in range(40):
        h, s = _acts(seed)
        g = torch.Generator().manual_seed(1000 + seed)
        var = (h + 0.125 * torch.randn(h.shape, generator=g), s + 0.125 * torch.randn(s.shape, generator=g))
        moved += _moved((h, s), var, _floor(h, s, seed))
        assert not _moved((h, s), (h.clone(), s.clone()), _floor(h, s, seed))  # equal weights: never
    assert moved <= 2  # at most 5% of 40


def test_known_rotation_reads_moved():
    """The variant's harmful mean points 25 degrees away (cos 0.906), well below the floor (about
    0.97 here): moved in every seed. A 3-degree rotation (cos 0.9986) stays within noise."""
    for seed in range(20):
        h, s = _acts(seed)
        floor = _floor(h, s, seed)
        assert 0.9 < floor["by_layer"]["floor"][1] < 0.995
        for degrees, expect in ((25.0, True), (3.0, False)):
            t = math.radians(degrees)
            turned = torch.zeros(D)
            turned[0], turned[1] = math.cos(t), math.sin(t)
            # the same prompts' noise, the signal turned: h - SIGNAL u + SIGNAL u'
            u = torch.zeros(D)
            u[0] = 1.0
            var = (h - SIGNAL * u + SIGNAL * turned, s)
            assert _moved((h, s), var, floor) is expect, (seed, degrees)


def test_verdict_fields_and_compare_without_floor():
    h, s = _acts(0)
    floor = _floor(h, s, 0)
    v = verdict(0.5, floor, 1)
    assert v["moved"] and v["null_floor"] == floor["by_layer"]["floor"][1]
    info = {"layer": 1, "position": -1, "token": "x"}
    res = compare_directions(_cands(h, s), _cands(h, s), info, info, floor)
    assert res["moved"] is False and res["noise"]["method"] == "bootstrap" and res["noise"]["resamples"] == 200
    assert res["cosine_by_layer_noise"]["moved"] == [False, False, False]
    assert res["cosine_selected_noise"]["null_floor"] == floor["by_layer"]["floor"][1]
    bare = compare_directions(_cands(h, s), _cands(h, s), info, info, None)
    assert bare["moved"] is None and "noise_resamples" in bare["noise"]["why"]
    other = compare_directions(_cands(h, s), _cands(h, s), info, info, {**floor, "position": -2})
    assert other["moved"] is None


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_prompt_activations_average_to_the_candidates(tiny_lm, harmful_ids, n_pos, batch_size):
    """Per-prompt rows in input order: their mean is mean_activations' at the same position."""
    means = mean_activations(tiny_lm, harmful_ids, n_pos, batch_size=4)
    for offset in (-1, -n_pos):
        acts = prompt_activations(tiny_lm, harmful_ids, offset, batch_size=batch_size)
        assert acts.shape == (len(harmful_ids), tiny_lm.n_layers + 1, tiny_lm.d_model)
        torch.testing.assert_close(acts.double().mean(0), means[offset + n_pos], atol=1e-5, rtol=0)
        # input order: each prompt's row equals the prompt run alone
        for i in (0, len(harmful_ids) - 1):
            alone = prompt_activations(tiny_lm, harmful_ids[i : i + 1], offset, batch_size=1)
            torch.testing.assert_close(acts[i : i + 1], alone, atol=1e-5, rtol=0)


def test_floors_by_position_equal_the_floor_of_each_position():
    """The extraction's floors of every position are the ones noise_floor_record makes there."""
    from refusalkit.direction.noise import floors_by_position

    h, s = (torch.stack([a, b], dim=1) for a, b in zip(_acts(1), _acts(2)))  # [N, 2 positions, 3, D]
    made = floors_by_position(h, s, [-2, -1], resamples=200, seed=5)
    assert made["n_prompts"] == {"harmful": N, "harmless": N} and set(made["by_position"]) == {"-2", "-1"}
    for i, p in enumerate((-2, -1)):
        rec = noise_floor_record(h[:, i], s[:, i], layer=1, position=p, resamples=200, seed=5)
        assert made["by_position"][str(p)] == rec["by_layer"]
    assert made["by_position"]["-2"] != made["by_position"]["-1"]  # the positions' activations differ


def test_noise_stage_reuses_the_extraction_forward(tmp_path, tokenizer):
    """The base noise floor costs no forward after the extraction (the forward counter does not move)
    and equals the floor of a separate pass; other resamples or another seed recompute it (the key
    covers both) by running the prompts again."""
    from refusalkit.core.counters import since, snapshot
    from refusalkit.core.layout import RunLayout
    from refusalkit.core.settings import load_config
    from refusalkit.direction.job import _train_ids, stage_data, stage_extract, stage_noise
    from refusalkit.models.session import Session

    from conftest import HARMFUL, HARMLESS, make_llama

    model_dir = tmp_path / "tiny"
    make_llama(tokenizer).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    files = {}
    for kind, rows in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        files[kind] = tmp_path / f"{kind}.txt"
        files[kind].write_text("\n".join(rows) + "\n")
    overrides = {"model": str(model_dir), "dtype": "float32", "device": "cpu", "n_train": 5, "n_val": 1,
                 "validation.enabled": False, "noise_resamples": 50, "batch_size": 2, **files}  # fmt: skip
    cfg = load_config(overrides={k: str(v) if k in files else v for k, v in overrides.items()})
    s = Session(cfg=cfg, layout=RunLayout(tmp_path / "run"), variant="base")
    s.layout.direction_dir("base").mkdir(parents=True)
    data = stage_data(s)
    stage_extract(s, data)
    info = {"layer": 2, "position": -2}
    before = snapshot()
    rec = stage_noise(s, data, info)
    assert since(before)["tokens"] == 0
    ids, _ = _train_ids(s, data)
    acts = {k: prompt_activations(s.lm, ids[k], -2, batch_size=3) for k in ids}
    ref = noise_floor_record(acts["harmful"], acts["harmless"], layer=2, position=-2, resamples=50, seed=cfg.seed)
    assert rec["n_prompts"] == ref["n_prompts"] == {"harmful": 5, "harmless": 5}
    assert {k: v for k, v in rec.items() if k != "by_layer"} == {k: v for k, v in ref.items() if k != "by_layer"}
    for key in ("mean", "sd", "floor"):
        assert rec["by_layer"][key] == pytest.approx(ref["by_layer"][key], abs=1e-6)
    for change in ({"noise_resamples": 30}, {"seed": 3}):
        for k, v in change.items():
            setattr(s.cfg, k, v)
        before = snapshot()
        again = stage_noise(s, data, info)
        assert since(before)["tokens"] > 0 and (again["resamples"], again["seed"]) == (
            s.cfg.noise_resamples,
            s.cfg.seed,
        )
