"""Three-valued decisions: a claim *holds*, *fails* or is *undecided*, against a stated margin.

"Not significantly worse" is not "not worse": a claim that something did no harm ("over-refusal
not above", "back to the base model's ASR", "degenerate output not above") is decided by the
confidence bound of the paired difference against a margin the configuration states
(``verdict.*_margin``), as in a non-inferiority test:

* **holds** when the interval's bound on the harm is inside the margin
  (``upper 95% bound <= margin``: at one-sided level 2.5%, the harm is at most the margin);
* **fails** when the harm is significant (the interval excludes 0, exact McNemar p < ``ALPHA``)
  and its estimate is beyond the margin;
* **undecided** otherwise, with the number of prompts that would decide it at the observed rates
  (:func:`prompts_needed`).

Claims that something changed ("compression weakened refusal", "the repair lowers the ASR") stay
significance tests (:func:`lowered`): *holds* when the change is significant in the claimed
direction, *fails* when the estimate is not in that direction at all, *undecided* otherwise.

The interval is Newcombe's hybrid score interval of a paired difference and the test the exact
McNemar test (:func:`refusalkit.evaluation.stats.paired`). One function serves the report's
verdicts, the repair search's budgets and the sweep: :func:`not_worse` and :func:`lowered`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from refusalkit.evaluation.stats import mcnemar_exact, paired_difference_interval

ALPHA = 0.05  # two-sided level of every test and interval (95% intervals)
POWER = 0.80  # the power the prompts-needed figure is computed for

HOLDS, FAILS, UNDECIDED = "holds", "fails", "undecided"


@dataclass(frozen=True)
class Decision:
    """One decided claim: ``verdict`` (holds / fails / undecided), the harm's (or change's)
    ``estimate`` and the ``bound`` that decided it, the ``margin``, the McNemar ``p``, and for an
    undecided claim the ``prompts_needed`` to decide it at the observed rates (None: not
    computable, e.g. an estimate exactly at the margin)."""

    claim: str
    verdict: str
    estimate: float
    bound: float
    margin: float | None
    p: float
    n: int
    prompts_needed: int | None = None
    draws: int = 1  # compression draws the result pools (stats.across_pairs); more than one: no prompts figure
    sized: bool = True  # False: a result without a 2x2 table (stats.paired_effect_difference): no prompts figure

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """``holds (bound +4 pt <= margin 5 pt)``, ``undecided (bound +11 pt > margin 5 pt; about 150
        prompts would decide it)``, or for a significance test ``holds`` / ``undecided (…)``."""
        why = []
        if self.margin is not None:
            rel = "<=" if self.bound <= self.margin + 1e-12 else ">"
            why.append(f"bound {100 * self.bound:+.0f} pt {rel} margin {100 * self.margin:.0f} pt")
        if self.verdict == UNDECIDED:
            why.append(
                "more draws or prompts would decide it"
                if self.draws > 1
                else "more prompts would narrow it"
                if not self.sized
                else f"about {self.prompts_needed} prompts would decide it"
                if self.prompts_needed is not None
                else "no sample size decides it at the observed rates"
            )
        return self.verdict + (f" ({'; '.join(why)})" if why else "")


EXACT_UP_TO = 2000  # discordant pairs up to which the power calculation runs the exact McNemar test


def _oriented(difference: float, lo: float, hi: float, worse: int) -> tuple[float, float, float]:
    """(harm, its upper bound, its lower bound) of a difference ``second − first`` with interval
    ``[lo, hi]``, when a rise is harm (``worse`` = +1) or a fall is (−1)."""
    return (difference, hi, lo) if worse > 0 else (-difference, -lo, -hi)


def _margin_verdict(harm: float, bound: float, harm_lo: float, margin: float, significant: Callable[[], bool]) -> str:
    """The rule of :func:`not_worse` (``significant`` is asked only when it decides)."""
    if bound <= margin + 1e-12:
        return HOLDS
    if harm > margin and harm_lo > 0 and significant():
        return FAILS
    return UNDECIDED


def _change_verdict(fall: float, significant: bool) -> str:
    """The rule of :func:`lowered`."""
    if significant and fall > 0:
        return HOLDS
    return FAILS if fall <= 0 else UNDECIDED


def _resolved(a: int, b: int, c: int, d: int, margin: float | None, worse: int, goal: str) -> bool:
    """Would a paired table (a both, b only first, c only second, d neither) reach ``goal``
    (``holds`` or ``fails`` of :func:`not_worse` with ``margin``; ``lowered``: :func:`lowered`
    holds)? The same rules as those functions; above :data:`EXACT_UP_TO` discordant pairs the exact
    McNemar test is left to the interval, which excludes 0 where it rejects at that size."""
    lo, hi = paired_difference_interval(a, b, c, d)
    difference = (c - b) / (a + b + c + d)

    def significant() -> bool:
        return b + c > EXACT_UP_TO or mcnemar_exact(b, c) < ALPHA

    if goal == "lowered":
        return _change_verdict(-difference, significant()) == HOLDS
    return _margin_verdict(*_oriented(difference, lo, hi, worse), margin, significant) == goal


@functools.lru_cache(maxsize=4096)
def prompts_needed(
    table: tuple[int, int, int, int],
    margin: float | None,
    goal: str,
    *,
    worse: int = +1,
    power: float = POWER,
    draws: int = 1000,
    n_max: int = 100_000,
) -> int | None:
    """How many paired prompts would reach ``goal`` with probability ``power`` if the four cells
    of ``table`` (a both, b only first, c only second, d neither) kept their observed rates: the
    smallest such n, found by simulation of the decision rule itself (``draws`` multinomial tables
    per size, a fixed seed, a doubling then a bisection search over n). The rule uses Newcombe's
    interval, whose width depends on every cell (not only the discordant ones, as the normal
    approximation of Connor 1987 does), so a closed form would promise too few prompts on small
    samples. A cell never observed keeps rate 0 except that, without a discordant pair, one
    discordant pair in each direction per ``n`` observed prompts is assumed. None when the rule
    cannot be reached at these rates (the estimate sits on the margin) or needs more than ``n_max``."""
    import numpy as np

    a, b, c, d = table
    n0 = a + b + c + d
    if n0 <= 0:
        return None
    counts = np.array([a, b, c, d], dtype=float)
    if b + c == 0:
        counts[1] = counts[2] = 1.0
    probs = counts / counts.sum()
    seed = zlib.crc32(repr((a, b, c, d, worse, goal, margin)).encode())  # the same figure on every run

    def reached(n: int) -> bool:
        rng = np.random.default_rng(seed)
        tables = rng.multinomial(n, probs, size=draws)
        hits = sum(_resolved(int(t[0]), int(t[1]), int(t[2]), int(t[3]), margin, worse, goal) for t in tables)
        return hits >= power * draws

    hi = max(8, n0 // 4)
    while not reached(hi):
        if hi >= n_max:
            return None
        hi = min(n_max, hi * 2)
    lo = hi // 2 if hi > 8 else 1
    while lo + 1 < hi:  # reached(hi) holds; bisect down to the smallest size that reaches the goal
        mid = (lo + hi) // 2
        if reached(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _table(res: dict[str, Any]) -> tuple[int, int, int, int]:
    """(a both, b only first, c only second, d neither) of a :func:`paired` result."""
    b, c, n = res["only_first"], res["only_second"], res["n"]
    a = res["first"]["k"] - b
    return a, b, c, n - a - b - c


def _p(res: dict[str, Any]) -> float:
    return 1.0 if res.get("p") is None else float(res["p"])


def not_worse(res: dict[str, Any], margin: float, claim: str, *, worse: int = +1) -> Decision:
    """Is the second model of the paired result ``res`` no worse than the first by more than
    ``margin``? ``worse`` = +1 when a rise is harm (ASR, over-refusal, degenerate output), −1 when a
    fall is. See the module docstring for the rule. ``res`` is one pair of models
    (:func:`~refusalkit.evaluation.stats.paired`) or several compression draws
    (:func:`~refusalkit.evaluation.stats.across_pairs`: the two-level bootstrap interval and the
    stratified McNemar p take the places of Newcombe's interval and the exact test)."""
    harm, bound, harm_lo = _oriented(res["difference"], *res["ci95"], worse)
    verdict = _margin_verdict(harm, bound, harm_lo, margin, lambda: _p(res) < ALPHA)
    needed, draws = None, int(res.get("draws", 1))
    if verdict == UNDECIDED and abs(harm - margin) > 1e-12 and draws == 1 and "first" in res:
        # decide towards the side the estimate lies on: inside the margin (holds), or significant harm beyond it
        needed = prompts_needed(_table(res), margin, HOLDS if harm < margin else FAILS, worse=worse)
    return Decision(claim, verdict, harm, bound, margin, _p(res), res["n"], needed, draws, "first" in res)


def lowered(res: dict[str, Any], claim: str) -> Decision:
    """Did the second model lower the rate (a repair lowering the ASR)? A significance test: holds
    when the fall is significant (p < ``ALPHA``; over several draws also the two-level interval
    below 0), fails when the rate did not fall at all, else undecided with the prompts that would
    make the observed fall significant (one draw)."""
    fall, draws = -res["difference"], int(res.get("draws", 1))
    significant = _p(res) < ALPHA and (draws == 1 or res["ci95"][1] < 0)
    verdict = _change_verdict(fall, significant)
    needed = prompts_needed(_table(res), None, "lowered") if verdict == UNDECIDED and draws == 1 else None
    return Decision(claim, verdict, fall, -res["ci95"][1], None, _p(res), res["n"], needed, draws)


def within_ratio(before: float, after: float, margin: float, claim: str) -> Decision:
    """A measured quantity that has no sampling interval here (perplexity on fixed held-out tokens):
    holds when ``after <= before · (1 + margin)``, else fails. ``estimate`` and ``bound`` are the
    relative change."""
    change = after / before - 1
    return Decision(claim, HOLDS if change <= margin + 1e-12 else FAILS, change, change, margin, 1.0, 0)


def combine(verdicts: list[str | None]) -> str | None:
    """All parts together: fails if one fails, else undecided if one is, else None (not measured)
    if one was not measured, else holds."""
    if FAILS in verdicts:
        return FAILS
    if UNDECIDED in verdicts:
        return UNDECIDED
    if None in verdicts:
        return None
    return HOLDS
