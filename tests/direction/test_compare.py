"""compare.py on hand-made directions: cosines, source shift, layer-by-layer and matrix."""

from __future__ import annotations

import math

import pytest
import torch

from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.direction.compare import compare_directions, cosine, cosine_matrix, run_compare, single_direction

N_POS, L, D = 3, 4, 8  # candidates [positions, L + 1, d]


def _info(layer, position, **kw):
    return {
        "layer": layer,
        "position": position,
        "token": "x",
        "ablation_score": -3.0,
        "addition_score": 2.0,
        "kl": 0.05,
        "baseline": {"harmful_score": 1.0, "harmless_score": -4.0},
        **kw,
    }


def _cands(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_POS, L + 1, D, generator=g)


def test_cosine_basics():
    a = torch.tensor([1.0, 0.0])
    assert cosine(a, torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(a, torch.tensor([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine(a, torch.tensor([-1.0, 1.0])) == pytest.approx(-1 / math.sqrt(2))
    assert cosine(a, torch.zeros(2)) == 0.0
    m = cosine_matrix(torch.eye(3), torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 5.0]]))
    assert m.shape == (3, 2)
    torch.testing.assert_close(
        m, torch.tensor([[1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 0.0], [0.0, 1.0]], dtype=torch.float64)
    )


def test_identical_directions_scaled():
    base = _cands()
    res = compare_directions(base, base * 0.5, _info(2, -1), _info(2, -1))
    assert not res["source_shifted"]
    assert res["cosine_selected"] == pytest.approx(1.0) and res["cosine_at_base_source"] == pytest.approx(1.0)
    assert res["cosine_by_layer"] == pytest.approx([1.0] * (L + 1))
    assert res["norm_ratio_selected"] == pytest.approx(0.5)
    assert len(res["cosine_matrix"]) == L + 1 and len(res["cosine_matrix"][0]) == L + 1
    assert res["n_layers"] == L


def test_rotated_and_shifted_source():
    base = _cands()
    var = base.clone()
    # at the base source (pos -1, layer 2) the variant's candidate is rotated by 60 degrees in a plane
    r = base[2, 2]
    u = r / r.norm()
    w = torch.randn(D, generator=torch.Generator().manual_seed(7))
    w = w - (w @ u) * u
    w = w / w.norm()
    var[2, 2] = r.norm() * (0.5 * u + math.sqrt(3) / 2 * w)
    # the variant selects another source: position -2, layer 3, a vector orthogonal to r
    var[1, 3] = w * 4
    res = compare_directions(base, var, _info(2, -1), _info(3, -2))
    assert res["source_shifted"] and res["layer_shift"] == 1 and res["position_shift"] == -1
    assert res["cosine_at_base_source"] == pytest.approx(0.5, abs=1e-6)
    assert res["cosine_selected"] == pytest.approx(0.0, abs=1e-6)
    assert res["cosine_by_layer"][2] == pytest.approx(0.5, abs=1e-6)
    assert res["cosine_by_layer"][0] == pytest.approx(1.0)  # other layers untouched
    assert res["cosine_matrix"][2][2] == pytest.approx(0.5, abs=1e-6)
    assert res["cosine_by_position"]["-1"] == pytest.approx(0.5, abs=1e-6)


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="same model"):
        compare_directions(_cands(), torch.zeros(N_POS, L, D), _info(1, -1), _info(1, -1))


def test_single_direction_by_validation_and_scores():
    ok = single_direction(
        _info(1, -1),
        {
            "harmful_refusal_rate": 0.8,
            "harmful_refusal_rate_ablated": 0.1,
            "harmless_refusal_rate": 0.0,
            "harmless_refusal_rate_added": 0.9,
        },
    )
    assert ok["holds"] and ok["ablation_lowers_refusal_by"] == pytest.approx(0.7)
    bad = single_direction(
        _info(1, -1),
        {
            "harmful_refusal_rate": 0.8,
            "harmful_refusal_rate_ablated": 0.8,
            "harmless_refusal_rate": 0.0,
            "harmless_refusal_rate_added": 0.9,
        },
    )
    assert not bad["holds"]
    by_scores = single_direction(_info(1, -1), None)
    assert by_scores["holds"] and by_scores["ablation_lowers_refusal_by"] == pytest.approx(4.0)
    assert not single_direction(_info(1, -1, addition_score=-5.0), None)["holds"]


def _write_direction(root, variant, cands, info):
    d = root / variant / "direction"
    artifacts.save_tensors(d / "candidates.safetensors", {"candidates": cands})
    artifacts.write_json(d / "direction.json", info)


def test_run_compare_writes_json_without_model(tmp_path):
    base = _cands()
    _write_direction(tmp_path, "base", base, _info(2, -1))
    _write_direction(tmp_path, "v", base + 0.01 * _cands(3), _info(2, -1))
    res = run_compare(Config(), tmp_path, "v", quality=False)
    on_disk = artifacts.read_json(tmp_path / "compare" / "v.json")
    assert on_disk["cosine_selected"] == pytest.approx(res["cosine_selected"]) and res["cosine_selected"] > 0.99
    assert on_disk["base_source"] == {"layer": 2, "position": -1, "token": "x"}
    assert on_disk["quality"]["variant_direction"]["ablation_score"] == -3.0
    assert on_disk["single_direction"] is True
    # the comparison is a stage of the run's manifest, so its work is not counted under another stage
    stages = artifacts.read_json(tmp_path / "manifest.json")["stages"]
    assert set(stages) == {"v/compare"} and stages["v/compare"]["forward_tokens"] == 0
    run_compare(Config(), tmp_path, "v", quality=False)  # reused: no second record
    assert artifacts.read_json(tmp_path / "manifest.json")["stages"] == stages
    with pytest.raises(UserError, match="extract"):
        run_compare(Config(), tmp_path, "missing", quality=False)
    with pytest.raises(UserError, match="not base"):
        run_compare(Config(), tmp_path, "base", quality=False)


def test_run_compare_is_recomputed_when_a_direction_changes(tmp_path):
    base = _cands()
    _write_direction(tmp_path, "base", base, _info(2, -1, norm=1.0))
    _write_direction(tmp_path, "v", base, _info(2, -1, norm=1.0))
    assert run_compare(Config(), tmp_path, "v", quality=False)["cosine_selected"] == pytest.approx(1.0)
    # re-extracted variant direction (another source): the old comparison is not reused
    _write_direction(tmp_path, "v", base, _info(3, -2, norm=2.0))
    res = run_compare(Config(), tmp_path, "v", quality=False)
    assert res["source_shifted"] and res["variant_source"]["layer"] == 3
