"""Three-valued decisions against margins (refusalkit.evaluation.decide) on hand-made paired tables."""

from __future__ import annotations

import numpy as np
import pytest

from refusalkit.evaluation import decide as D
from refusalkit.evaluation.stats import mcnemar_exact, paired


def table(a: int, b: int, c: int, d: int) -> dict:
    """:func:`paired` of two models over a + b + c + d prompts: ``a`` positive on both, ``b`` only on
    the first, ``c`` only on the second, ``d`` on neither."""
    first, second, i = {}, {}, 0
    for count, (x, y) in ((a, (1, 1)), (b, (1, 0)), (c, (0, 1)), (d, (0, 0))):
        for _ in range(count):
            first[i], second[i] = bool(x), bool(y)
            i += 1
    return paired(first, second)


def test_a_rise_whose_interval_excludes_zero_is_not_no_harm():
    """+5/−0 over-refusal on 100 prompts: interval [+0.1, +11] — not significant (p = 0.0625), yet
    far from shown harmless: undecided, not holds."""
    res = table(2, 0, 5, 93)
    assert res["p"] == pytest.approx(0.0625) and 0 < res["ci95"][0] < 0.01 and 0.10 < res["ci95"][1] < 0.12
    d = D.not_worse(res, 0.05, "over-refusal not above")
    assert d.verdict == D.UNDECIDED and d.bound == pytest.approx(res["ci95"][1])
    # the estimate sits exactly on the margin: no sample size decides it either way
    assert d.prompts_needed is None and "no sample size decides it" in d.text()


def test_holds_fails_and_undecided():
    holds = D.not_worse(table(10, 0, 1, 189), 0.05, "x")
    assert holds.verdict == D.HOLDS and holds.bound <= 0.05 and holds.prompts_needed is None
    assert holds.text().startswith("holds (bound +3 pt <= margin 5 pt")
    fails = D.not_worse(table(2, 0, 15, 83), 0.05, "x")
    assert fails.verdict == D.FAILS and fails.estimate == pytest.approx(0.15) and fails.p < 0.05
    # significant, but within the margin: the claim of no more harm than the margin holds
    small = D.not_worse(table(0, 0, 8, 992), 0.05, "x")
    assert small.p < 0.05 and small.verdict == D.HOLDS
    # beyond the margin but not significant: undecided, and the figure points at more prompts
    und = D.not_worse(table(20, 10, 20, 50), 0.05, "ASR back to base")
    assert und.verdict == D.UNDECIDED and und.prompts_needed > 100
    assert "prompts would decide it" in und.text()
    # a fall is harm when worse = -1 (e.g. accuracy): mirrored
    mirrored = D.not_worse(table(2, 15, 0, 83), 0.05, "x", worse=-1)
    assert mirrored.verdict == D.FAILS and mirrored.estimate == pytest.approx(0.15)


def test_lowered_is_a_significance_test():
    assert D.lowered(table(0, 9, 0, 91), "ASR lowered").verdict == D.HOLDS  # p = 2 / 2^9
    assert D.lowered(table(5, 0, 3, 92), "ASR lowered").verdict == D.FAILS  # it rose
    und = D.lowered(table(20, 20, 10, 50), "ASR lowered")
    assert (
        und.verdict == D.UNDECIDED and und.prompts_needed is not None and und.p == pytest.approx(mcnemar_exact(20, 10))
    )


def test_combine():
    assert D.combine([D.HOLDS, D.HOLDS]) == D.HOLDS
    assert D.combine([D.HOLDS, D.UNDECIDED, None]) == D.UNDECIDED
    assert D.combine([D.UNDECIDED, D.FAILS]) == D.FAILS
    assert D.combine([D.HOLDS, None]) is None


def _power(table4, margin, goal, n, reps=3000, seed=12345):
    """An independent Monte Carlo estimate of the rule's power at size n: its own generator and seed,
    and the rule written out here from the published primitives (Newcombe's interval, the exact
    McNemar test), not through decide.py."""
    from refusalkit.evaluation.stats import paired_difference_interval

    rng = np.random.default_rng(seed)
    probs = np.array(table4, dtype=float) / sum(table4)
    hits = 0
    for a, b, c, d in rng.multinomial(n, probs, size=reps):
        lo, hi = paired_difference_interval(int(a), int(b), int(c), int(d))
        significant = mcnemar_exact(int(b), int(c)) < 0.05
        if goal == D.HOLDS:
            hits += hi <= margin
        elif goal == D.FAILS:
            hits += (c - b) / n > margin and lo > 0 and significant
        else:  # lowered
            hits += c < b and significant
    return hits / reps


@pytest.mark.parametrize(
    "table4, margin, goal",
    [
        ((10, 3, 1, 86), 0.05, D.HOLDS),  # a small fall: how many prompts show it is within 5 points
        ((20, 2, 12, 66), 0.05, D.FAILS),  # a 10-point rise: how many show it is harm beyond 5 points
        ((20, 10, 4, 66), None, "lowered"),  # a 6-point fall: how many make it significant
    ],
)
def test_prompts_needed_gives_the_stated_power(table4, margin, goal):
    """At the returned size the rule reaches its goal with about 80% probability (at least, up to
    the simulations' noise; the power of a discrete test jumps between sizes), and at half the size
    clearly less often: an independent simulation of the full rule, with another seed."""
    n = D.prompts_needed(table4, margin, goal)
    assert n is not None and 20 < n < 5000
    assert 0.75 <= _power(table4, margin, goal, n) <= 0.92
    assert _power(table4, margin, goal, n // 2) < 0.70


def test_prompts_needed_against_connor_at_large_n():
    """Where the normal approximation is good (many discordant pairs), the simulated size agrees
    with Connor's (1987) closed form for McNemar's test: n = [z_{a/2} sqrt(psi) + z_b sqrt(psi - delta^2)]^2 / delta^2."""
    from statistics import NormalDist

    p10, p01 = 0.20, 0.28
    z = NormalDist().inv_cdf
    psi, delta = p10 + p01, p01 - p10
    connor = (z(0.975) * psi**0.5 + z(0.80) * (psi - delta**2) ** 0.5) ** 2 / delta**2
    n = D.prompts_needed((26, 20, 28, 26), 0.0, D.FAILS)
    assert n == pytest.approx(connor, rel=0.15)


def test_prompts_needed_is_reproducible_and_none_where_nothing_decides():
    t = (10, 3, 1, 86)
    assert D.prompts_needed(t, 0.05, D.HOLDS) == D.prompts_needed(t, 0.05, D.HOLDS)
    # a true harm above the margin never shows as inside it
    assert D.prompts_needed((20, 2, 12, 66), 0.05, D.HOLDS, n_max=4000) is None


def test_decisions_over_draws_use_the_two_level_interval_and_size_nothing():
    """A result pooled over compression draws (stats.across_pairs): no prompts-needed figure (draws and
    prompts both vary), and "lowered" needs the interval below 0 as well as the stratified p."""
    from refusalkit.evaluation import decide

    res = {"draws": 3, "n": 100, "difference": 0.03, "ci95": [-0.04, 0.12], "p": 0.2}
    d = decide.not_worse(res, 0.05, "ASR back to base")
    assert d.verdict == "undecided" and d.prompts_needed is None and d.draws == 3
    assert d.text() == "undecided (bound +12 pt > margin 5 pt; more draws or prompts would decide it)"
    wide = {"draws": 3, "n": 100, "difference": -0.2, "ci95": [-0.45, 0.02], "p": 1e-6}
    assert decide.lowered(wide, "ASR lowered").verdict == "undecided"  # the draws disagree too much
    assert decide.lowered({**wide, "ci95": [-0.45, -0.01]}, "ASR lowered").verdict == "holds"
    effect = {"n": 32, "difference": 0.06, "ci95": [0.0, 0.16], "p": 0.25}  # no 2x2 table: not sized
    d = decide.not_worse(effect, 0.10, "ablation control kept")
    assert d.verdict == "undecided" and d.prompts_needed is None and "more prompts would narrow it" in d.text()
