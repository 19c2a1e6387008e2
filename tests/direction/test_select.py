"""select.py: refusal scores, KL, the filters and fallbacks of ``choose``, and ``select_direction``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from refusalkit.core.errors import UserError
from refusalkit.direction.extract import candidate_directions, mean_activations
from refusalkit.direction.forward import forward_last
from refusalkit.direction.select import (
    CandidateScore,
    Scorer,
    apply_filters,
    choose,
    kl_divergence,
    layer_cutoff,
    refusal_scores,
    refusal_token_ids,
    select_direction,
)

# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def _log_odds(row: list[float], ids: list[int]) -> float:
    z = sum(math.exp(v) for v in row)
    p = sum(math.exp(row[i]) for i in ids) / z
    return math.log(p) - math.log(1 - p)


def test_refusal_scores_by_hand():
    rows = [[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 4.0, 1.0, 0.0]]
    ids = [0, 2]
    got = refusal_scores(torch.tensor(rows), ids)
    assert got.shape == (3,)
    want = torch.tensor([_log_odds(r, ids) for r in rows])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got[1].item() == pytest.approx(0.0, abs=1e-6)  # p = 1/2


def test_refusal_scores_clamped_and_finite():
    logits = torch.tensor([[100.0, -100.0, -100.0], [-100.0, 100.0, 100.0]])
    got = refusal_scores(logits, [0])
    assert torch.isfinite(got).all()
    assert got[0].item() == pytest.approx(math.log((1 - 1e-8) / 1e-8), rel=1e-4)
    assert got[1].item() == pytest.approx(-math.log((1 - 1e-8) / 1e-8), rel=1e-4)


def test_kl_divergence_zero_for_identical_and_matches_torch():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 30, generator=g) * 3
    q = torch.randn(5, 30, generator=g) * 3
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(5), atol=1e-7, rtol=0)
    # Shifting logits by a constant changes nothing.
    torch.testing.assert_close(kl_divergence(p, p + 7.0), torch.zeros(5), atol=1e-6, rtol=0)
    want = (
        F.kl_div(
            torch.log_softmax(q.double(), -1), torch.log_softmax(p.double(), -1), reduction="none", log_target=True
        )
        .sum(-1)
        .float()
    )
    got = kl_divergence(p, q)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got > 0).all()
    assert not torch.allclose(kl_divergence(q, p), got, atol=1e-3)  # KL(base ‖ new), not symmetric


def test_refusal_token_ids(tokenizer):
    phrases = ["I'm sorry", "I cannot", "As an AI", "Sorry"]
    got = refusal_token_ids(tokenizer, phrases)
    first = [tokenizer(p, add_special_tokens=False)["input_ids"][0] for p in phrases]
    assert got == list(dict.fromkeys(first))
    assert len(got) == len(set(got))
    with pytest.raises(ValueError):
        refusal_token_ids(tokenizer, [])


@pytest.mark.parametrize("n, frac, cut", [(24, 0.2, 19), (4, 0.2, 3), (10, 0.0, 10), (28, 0.25, 21), (32, 0.2, 25)])
def test_layer_cutoff(n, frac, cut):
    assert layer_cutoff(n, frac) == cut


# ----------------------------------------------------------------------------------------------
# choose
# ----------------------------------------------------------------------------------------------

BASE = {"harmful_score": 2.0, "harmless_score": -5.0}


def S(layer, abl, add, kl, pos=-1, discarded=None):
    return CandidateScore(
        position=pos, layer=layer, norm=1.0, ablation_score=abl, addition_score=add, kl=kl, discarded=discarded
    )


def _choose(scores, fallback="relative", kl=0.1, induce=0.0, margin=1.0):
    return choose(scores, BASE, kl_threshold=kl, induce_threshold=induce, fallback=fallback, fallback_margin=margin)


def test_choose_lowest_ablation_among_passing():
    a = S(1, abl=-1.0, add=1.0, kl=0.05)
    b = S(2, abl=-3.0, add=0.5, kl=0.2)  # kl too high
    c = S(3, abl=-2.0, add=-0.5, kl=0.01)  # does not induce refusal
    d = S(4, abl=-1.5, add=0.1, kl=0.09)
    e = S(5, abl=-9.0, add=5.0, kl=0.0, discarded="layer 5 >= cutoff 5")
    best, why = _choose([a, b, c, d, e])
    assert (best.layer, why) == (4, None)
    assert a.discarded is None and d.discarded is None
    assert b.discarded.startswith("kl") and "addition" in c.discarded
    assert e.discarded.startswith("layer")


def test_choose_thresholds_are_inclusive_at_the_boundary():
    a = S(1, abl=-1.0, add=0.0, kl=0.1)  # exactly at both thresholds: kept
    b = S(2, abl=0.0, add=1.0, kl=0.0)
    best, why = _choose([a, b])
    assert (best.layer, why) == (1, None)


def test_apply_filters_nan_and_unscored():
    assert apply_filters(S(1, abl=None, add=None, kl=None), 0.1, 0.0) == "not scored"
    assert apply_filters(S(1, abl=-1.0, add=float("nan"), kl=0.0), 0.1, 0.0) == "nan score"
    assert apply_filters(S(1, abl=-1.0, add=1.0, kl=0.0), 0.1, 0.0) is None


def test_choose_never_picks_nan_or_unscored():
    nan = S(1, abl=float("nan"), add=1.0, kl=0.0)
    unscored = S(2, abl=None, add=None, kl=None)
    ok = S(3, abl=1.0, add=1.0, kl=0.0)
    best, why = _choose([nan, unscored, ok])
    assert best is ok and why is None


def test_fallback_relative_tier1_margin_over_baseline():
    x = S(1, abl=-1.0, add=-3.0, kl=0.05)  # >= -5 + 1
    y = S(2, abl=-2.0, add=-4.5, kl=0.05)  # below the margin
    z = S(3, abl=-9.0, add=-1.0, kl=0.5)  # kl too high
    best, why = _choose([x, y, z])
    assert best is x
    assert why is not None and "relaxed" in why


def test_fallback_relative_tier2_lowest_ablation_within_kl():
    x = S(1, abl=-1.0, add=-4.9, kl=0.05)
    y = S(2, abl=-2.0, add=-4.5, kl=0.08)
    z = S(3, abl=-9.0, add=-1.0, kl=0.5)
    best, why = _choose([x, y, z])
    assert best is y
    assert why is not None and "kl <=" in why


def test_fallback_relative_tier3_all_scored_but_not_layer_discarded():
    x = S(1, abl=-1.0, add=-4.9, kl=0.3)
    y = S(2, abl=-2.0, add=-4.5, kl=0.8)
    late = S(4, abl=-50.0, add=-1.0, kl=0.9, discarded="layer 4 >= cutoff 3")
    best, why = _choose([x, y, late])
    assert best is y
    assert why is not None


def test_fallback_error_raises_user_error():
    with pytest.raises(UserError):
        _choose([S(1, abl=-1.0, add=-3.0, kl=0.05)], fallback="error")


def test_fallback_nothing_scored_raises_user_error():
    with pytest.raises(UserError):
        _choose([S(1, abl=None, add=None, kl=None), S(2, abl=-1, add=5, kl=0, discarded="layer 2 >= cutoff 2")])


# ----------------------------------------------------------------------------------------------
# select_direction on the tiny model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(llama_lm, harmful_ids, harmless_ids, n_pos, one_thread):
    with one_thread():
        cand = candidate_directions(
            mean_activations(llama_lm, harmful_ids, n_pos, batch_size=4),
            mean_activations(llama_lm, harmless_ids, n_pos, batch_size=4),
        )
        cand = cand[-3:].clone()  # the last 3 positions keep the tests fast (6 live candidates)
        refusal = refusal_token_ids(llama_lm.tokenizer, ["I'm sorry", "As an AI", "Sorry"])
        scorer = Scorer(llama_lm, harmful_ids[:4], harmless_ids[:4], refusal, n_pos, batch_size=3)
    return cand, scorer


def test_scorer_baseline(llama_lm, setup, harmful_ids):
    cand, scorer = setup
    logits = forward_last(llama_lm.model, harmful_ids[:4], pad_id=llama_lm.tokenizer.pad_token_id, share_prefix=False)
    want = refusal_scores(logits, scorer.refusal_ids).mean().item()
    assert scorer.baseline()["harmful_score"] == pytest.approx(want, abs=1e-4)


def test_select_full_equals_fast_when_screen_keeps_all(llama_lm, setup):
    cand, scorer = setup
    n_pos, n_streams, _ = cand.shape
    full = select_direction(llama_lm, cand, scorer, mode="full")
    fast = select_direction(llama_lm, cand, scorer, mode="fast", screen_keep=n_pos * n_streams)
    assert (full.position, full.layer, full.fallback) == (fast.position, fast.layer, fast.fallback)
    assert full.n_fully_scored == fast.n_fully_scored
    for a, b in zip(full.scores, fast.scores):
        assert (a.position, a.layer, a.discarded) == (b.position, b.layer, b.discarded)
        for f in ("ablation_score", "addition_score", "kl"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None)
            if x is not None:
                assert x == pytest.approx(y, abs=1e-5)
    json.dumps(full.to_json())


def test_select_zero_and_late_candidates_discarded(llama_lm, setup):
    cand, scorer = setup
    n_pos, n_streams, _ = cand.shape
    L = n_streams - 1
    cutoff = layer_cutoff(L, 0.2)
    res = select_direction(llama_lm, cand, scorer, mode="full")
    assert len(res.scores) == n_pos * n_streams
    for s in res.scores:
        if s.layer >= cutoff:
            assert s.discarded.startswith("layer") and s.ablation_score is None
        elif s.layer == 0:
            assert s.discarded == "zero vector" and s.ablation_score is None
        else:
            assert s.ablation_score is not None
    assert res.n_fully_scored == n_pos * (cutoff - 1)
    assert 0 < res.layer < cutoff
    assert res.chosen.layer == res.layer and res.chosen.position == res.position
    assert -n_pos <= res.position < 0
    # The chosen vector really is the candidate at that position/layer.
    assert res.chosen.norm == pytest.approx(cand[res.position + n_pos, res.layer].norm().item())


def test_select_explicitly_zeroed_candidate_is_never_selected(llama_lm, setup):
    cand, scorer = setup
    # Loose thresholds: every scored candidate passes, so the lowest ablation score wins ...
    loose = dict(kl_threshold=1e9, induce_refusal_threshold=-1e9, mode="full")
    res = select_direction(llama_lm, cand, scorer, **loose)
    assert res.fallback is None
    scored = [s for s in res.scores if s.ablation_score is not None]
    assert res.chosen.ablation_score == min(s.ablation_score for s in scored)
    # ... and once that winner is zeroed, it is discarded and something else is chosen.
    n_pos = cand.shape[0]
    zeroed = cand.clone()
    zeroed[res.position + n_pos, res.layer] = 0.0
    res2 = select_direction(llama_lm, zeroed, scorer, **loose)
    gone = next(s for s in res2.scores if (s.position, s.layer) == (res.position, res.layer))
    assert gone.discarded == "zero vector"
    assert (res2.position, res2.layer) != (res.position, res.layer)


def test_select_fast_screens(llama_lm, setup):
    cand, scorer = setup
    res = select_direction(llama_lm, cand, scorer, mode="fast", screen_keep=3, screen_prompts=4)
    assert res.n_fully_scored == 3
    live = [s for s in res.scores if s.screen_score is not None]
    full = [s for s in live if s.ablation_score is not None]
    out = [s for s in live if s.ablation_score is None]
    assert len(full) == 3 and len(out) == len(live) - 3
    assert all(s.discarded.startswith("screened out") for s in out)
    assert max(s.screen_score for s in full) <= min(s.screen_score for s in out)
    assert res.chosen in full
    # With all harmful validation prompts in the screen, the screen score is the ablation score.
    for s in full:
        assert s.screen_score == pytest.approx(s.ablation_score, abs=1e-4)


def test_select_unknown_mode(llama_lm, setup):
    cand, scorer = setup
    with pytest.raises(ValueError):
        select_direction(llama_lm, cand, scorer, mode="quick")


def test_select_fallback_error_on_tiny_model(llama_lm, setup):
    cand, scorer = setup
    # No candidate can reach a refusal log-odds of +1000 by addition.
    with pytest.raises(UserError):
        select_direction(llama_lm, cand, scorer, mode="full", induce_refusal_threshold=1000.0, fallback="error")
    res = select_direction(llama_lm, cand, scorer, mode="full", induce_refusal_threshold=1000.0, fallback="relative")
    assert res.fallback is not None


def test_grouped_scoring_equals_one_candidate_at_a_time(tiny_lm, harmful_ids, harmless_ids, n_pos):
    """Scoring k candidates in one grouped forward changes no score (vs plain hooks, unbatched)."""
    from refusalkit.direction.hooks import ablation_hooks, addition_hooks
    from refusalkit.direction.select import kl_divergence

    lm = tiny_lm
    pad = lm.tokenizer.pad_token_id
    refusal = refusal_token_ids(lm.tokenizer, ["I'm sorry", "As an AI", "Sorry"])
    scorer = Scorer(lm, harmful_ids[:4], harmless_ids[:4], refusal, n_pos, batch_size=5)
    g = torch.Generator().manual_seed(7)
    dirs = torch.randn(3, lm.d_model, generator=g) * 3
    layers = [1, 3, 1]
    got = scorer.full(dirs, layers)
    screened = scorer.screen(dirs, 2)
    for k in range(3):
        abl_h = forward_last(
            lm.model, harmful_ids[:4], pad_id=pad, share_prefix=False, hooks=ablation_hooks(lm.model, dirs[k])
        )
        abl_b = forward_last(
            lm.model, harmless_ids[:4], pad_id=pad, share_prefix=False, hooks=ablation_hooks(lm.model, dirs[k])
        )
        add_b = forward_last(
            lm.model,
            harmless_ids[:4],
            pad_id=pad,
            share_prefix=False,
            hooks=addition_hooks(lm.model, dirs[k], layers[k]),
        )
        base_b = forward_last(lm.model, harmless_ids[:4], pad_id=pad, share_prefix=False)
        want = (
            refusal_scores(abl_h, refusal).mean().item(),
            refusal_scores(add_b, refusal).mean().item(),
            kl_divergence(base_b, abl_b).mean().item(),
        )
        assert got[k] == pytest.approx(want, abs=1e-3)
        assert screened[0][k] == pytest.approx(refusal_scores(abl_h[:2], refusal).mean().item(), abs=1e-3)
        assert screened[1][k] == pytest.approx(kl_divergence(base_b[:2], abl_b[:2]).mean().item(), abs=1e-3)
