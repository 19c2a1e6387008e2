"""stability.py: where the selection lands when the validation prompts are redrawn, from the
per-prompt scores that selection keeps (no forward pass), and how compare reads it."""

from __future__ import annotations

import json

import pytest
import torch

from refusalkit.direction.compare import compare_directions
from refusalkit.direction.select import select_direction
from refusalkit.direction.stability import in_stable_set, source_stability

N = 16  # validation prompts of each kind
TH = {"kl_threshold": 0.1, "induce_refusal_threshold": 0.0, "fallback": "relative", "fallback_margin": 1.0}


def _cand(layer, position, ablation, addition=2.0, kl=0.02, spread=0.0, seed=0, discarded=None):
    g = torch.Generator().manual_seed(seed)
    noise = spread * torch.randn(3, N, generator=g)
    noise -= noise.mean(-1, keepdim=True)  # the per-prompt terms average exactly to the means
    pp = {
        "ablation": (ablation + noise[0]).tolist(),
        "addition": (addition + noise[1]).tolist(),
        "kl": (kl + 0.01 * spread * noise[2]).clamp(min=0).tolist(),
    }
    return {
        "layer": layer,
        "position": position,
        "norm": 1.0,
        "ablation_score": ablation,
        "addition_score": addition,
        "kl": kl,
        "discarded": discarded,
        "per_prompt": None if discarded else pp,
    }


def _scores(cands, chosen):
    return {
        "layer": chosen[0],
        "position": chosen[1],
        "thresholds": TH,
        "baseline_per_prompt": {"harmful_score": [3.0] * N, "harmless_score": [-4.0] * N},
        "candidates": cands,
    }


def test_clear_winner_is_stable():
    cands = [_cand(5, -1, -6.0, spread=0.5), _cand(6, -1, -1.0, spread=0.5, seed=1)]
    cands.append({**_cand(4, -2, -20.0), "discarded": "screened out (top 2 kept)", "per_prompt": None})
    st = source_stability(_scores(cands, (5, -1)), resamples=100, seed=0)
    assert st["shares"] == [{"layer": 5, "position": -1, "share": 1.0}]
    assert st["stable_set"] == [{"layer": 5, "position": -1}] and st["selected_share"] == 1.0
    assert st["n_candidates"] == 2 and st["n_prompts"] == {"harmful": N, "harmless": N}
    # the screened-out candidate never wins, however low its (unresampled) score
    assert in_stable_set(st, 4, -2) is False and in_stable_set(None, 4, -2) is None
    json.dumps(st)


def test_close_candidates_share_the_resamples():
    cands = [_cand(5, -1, -3.0, spread=2.0), _cand(6, -2, -3.05, spread=2.0, seed=1)]
    st = source_stability(_scores(cands, (6, -2)), resamples=200, seed=0)
    shares = {(s["layer"], s["position"]): s["share"] for s in st["shares"]}
    assert set(shares) == {(5, -1), (6, -2)} and sum(shares.values()) == pytest.approx(1.0)
    assert all(0.1 < v < 0.9 for v in shares.values())
    assert {(s["layer"], s["position"]) for s in st["stable_set"]} == {(5, -1), (6, -2)}
    assert st == source_stability(_scores(cands, (6, -2)), resamples=200, seed=0)  # seeded
    assert st != source_stability(_scores(cands, (6, -2)), resamples=200, seed=1)


def test_filters_are_reapplied_to_resampled_means():
    """The lowest-ablation candidate sits at the KL limit: resamples that push its KL over it pick
    the other one."""
    edge = _cand(5, -1, -6.0, kl=0.1, spread=0.0)
    edge["per_prompt"]["kl"] = [0.0] * (N // 2) + [0.2] * (N // 2)  # mean 0.1: passes, inclusive
    cands = [edge, _cand(6, -1, -2.0)]
    st = source_stability(_scores(cands, (5, -1)), resamples=300, seed=0)
    shares = {(s["layer"], s["position"]): s["share"] for s in st["shares"]}
    assert 0.3 < shares[(5, -1)] < 0.7 and shares[(5, -1)] + shares[(6, -1)] == pytest.approx(1.0)


def test_no_per_prompt_scores_no_record():
    old = _scores([{k: v for k, v in _cand(5, -1, -3.0).items() if k != "per_prompt"}], (5, -1))
    assert source_stability(old) is None
    assert source_stability(_scores([_cand(5, -1, -3.0)], (5, -1)), resamples=0) is None


def test_compare_counts_a_shift_into_the_stable_set_as_within_noise():
    g = torch.Generator().manual_seed(0)
    cands = torch.randn(3, 8, 16, generator=g)
    stab = {"stable_set": [{"layer": 5, "position": -1}, {"layer": 6, "position": -2}]}
    base = {"layer": 5, "position": -1, "token": "x", "source_stability": stab}
    inside = compare_directions(cands, cands, base, {"layer": 6, "position": -2, "token": "y"})
    assert inside["source_changed"] and inside["source_shift_within_noise"] and not inside["source_shifted"]
    outside = compare_directions(cands, cands, base, {"layer": 3, "position": -3, "token": "z"})
    assert outside["source_changed"] and outside["source_shifted"] and outside["source_shift_within_noise"] is False
    same = compare_directions(cands, cands, base, {"layer": 5, "position": -1, "token": "x"})
    assert not same["source_changed"] and not same["source_shifted"] and same["source_shift_within_noise"] is None
    bare = {k: v for k, v in base.items() if k != "source_stability"}
    literal = compare_directions(cands, cands, bare, {"layer": 6, "position": -2, "token": "y"})
    assert literal["source_shifted"] and literal["source_shift_within_noise"] is None  # no record: literal


def test_selection_keeps_per_prompt_terms_of_its_means(llama_lm, harmful_ids, harmless_ids, n_pos):
    """On a tiny model: every fully scored candidate's per-prompt terms average to its scores, and
    the stability of the real selection puts its own source in the stable set."""
    from refusalkit.direction.extract import candidate_directions, mean_activations
    from refusalkit.direction.select import Scorer, refusal_token_ids

    cand = candidate_directions(
        mean_activations(llama_lm, harmful_ids, n_pos, batch_size=4),
        mean_activations(llama_lm, harmless_ids, n_pos, batch_size=4),
    )[-3:]
    refusal = refusal_token_ids(llama_lm.tokenizer, ["I'm sorry", "As an AI", "Sorry"])
    scorer = Scorer(llama_lm, harmful_ids[:4], harmless_ids[:4], refusal, n_pos, batch_size=3)
    res = select_direction(llama_lm, cand, scorer, mode="fast", screen_keep=3, screen_prompts=2)
    full = [s for s in res.scores if s.per_prompt]
    assert len(full) == 3
    for s in full:
        assert len(s.per_prompt["ablation"]) == 4 and len(s.per_prompt["addition"]) == 4
        assert sum(s.per_prompt["ablation"]) / 4 == pytest.approx(s.ablation_score, abs=1e-5)
        assert sum(s.per_prompt["addition"]) / 4 == pytest.approx(s.addition_score, abs=1e-5)
        assert sum(s.per_prompt["kl"]) / 4 == pytest.approx(s.kl, abs=1e-5)
    base = res.baseline_per_prompt
    assert sum(base["harmful_score"]) / 4 == pytest.approx(res.baseline["harmful_score"], abs=1e-5)
    st = source_stability(res.to_json(), resamples=50, seed=0)
    assert sum(s["share"] for s in st["shares"]) + st["no_selection_share"] == pytest.approx(1.0)
    assert {(s["layer"], s["position"]) for s in st["shares"]} <= {(s.layer, s.position) for s in full}
    assert st["selected_share"] > 0
