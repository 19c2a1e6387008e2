"""The search over edits (beyond the paper): where, in what form, and how much.

A candidate edit is a placement (``source``: block ``l`` of the direction, the paper's index;
``previous``: block ``l − 1``), a form (every weight, or the non-zeros only: ``keep_zeros``, which
keeps a pruned variant's exact sparsity) and an α scale (a multiple of the paper's alphas). Raw and
unit ``r`` are not searched separately: AIRD with raw ``r`` and scale ``s`` is the same edit as unit
``r`` with scale ``s‖r‖²`` (Eq. 4 scales the component along ``r̂`` by ``1 + α‖r‖²``).

1. **Targets.** The base model and the unrepaired variant are measured once on the held-out search
   prompts, by generation (:func:`~refusalkit.repair.search.measure`) and by the screen.
2. **Screen.** Every candidate is applied, screened with the first-token refusal score
   (:mod:`refusalkit.repair.screen`) and removed bit for bit. The screen is calibrated on the two
   references (:class:`ScreenRule`): a candidate's ASR is predicted from its mean refusal score by
   the line through the references' (score, ASR); it passes when the prediction is within
   ``screen_slack`` of the target and its share of harmless prompts predicted refused stays within
   the over-refusal budget.
3. **Confirmation.** Passing candidates, smallest α first (then ``source`` before ``previous``),
   then the rest by predicted ASR, are measured until one reaches the target ASR within every
   budget, at most ``confirm`` of them by generation. Perplexity comes first: it is exact, and a
   candidate over its budget is recorded and not generated from.
4. **Choice.** The first confirmed candidate that reaches the target within budgets; else the
   confirmed one within budgets with the lowest ASR (``target_reached`` false); else none. The
   over-refusal budget is paired (:func:`~refusalkit.repair.search.over_refusal_excess`).

Every screened and confirmed point is stored in ``repair/<name>.search.json`` (``name``: the repaired
variant) as it is measured, so an
interrupted search resumes from the measured points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refusalkit.core import artifacts
from refusalkit.core.migrate import search_screens_made_on
from refusalkit.repair.screen import BlockInputs, refusal_screen
from refusalkit.repair.search import (
    CURVE_MEASURES,
    CurveContext,
    _cached_point,
    _store_point,
    _unrepaired,
    search_perplexity,
    within_budgets,
)


@dataclass(frozen=True)
class Candidate:
    """One edit of the search."""

    placement: str
    keep_zeros: bool
    scale: float

    @property
    def key(self) -> str:
        return f"{self.placement}/{'nonzeros' if self.keep_zeros else 'every-weight'}/x{self.scale!r}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def candidates(placements: list[str], forms: list[bool], scales: list[float]) -> list[Candidate]:
    """Every combination, smallest α first, then in the order of ``placements`` and ``forms``."""
    return [Candidate(p, f, float(s)) for s in sorted(scales) for p in placements for f in forms]


def _counters() -> dict[str, float]:
    """What the search spends: wall seconds, new tokens generated, completions, prompt tokens run forward
    (summed over the calls that measured the points of a search state: ``cost`` in its record)."""
    import time

    from refusalkit.direction.forward import STATS as FORWARD
    from refusalkit.models.generation import STATS as GENERATION

    return {
        "seconds": time.perf_counter(),
        "new_tokens": GENERATION["new_tokens"],
        "completions": GENERATION["completions"],
        "forward_tokens": FORWARD["tokens"],
    }


# the parts of a search state that only the screen measured
SCREENS = ("screen", "base_screen", "unrepaired_screen")


def _screen(ctx: CurveContext) -> dict[str, Any]:
    return refusal_screen(ctx.session.lm, ctx.cfg, ctx.data.harmful, ctx.data.harmless)


def _references(ctx: CurveContext, state: dict[str, Any], path: Path) -> None:
    """The base model (generation and screen; the owner swaps to it and back, one model in memory) and
    the unrepaired variant, measured once and cached."""
    settings = ctx.settings()
    generate_base = "base" not in state and ctx.spec.target_asr is None
    if generate_base or "base_screen" not in state:
        base = _cached_point(ctx.layout, "base", settings)
        if (base is None and ctx.spec.target_asr is None) or "base_screen" not in state:
            owner = ctx.session.owner
            owner.use("base")
            try:
                if base is None and ctx.spec.target_asr is None:
                    base = ctx.measure()
                    _store_point(ctx.layout, "base", settings, base)
                if "base_screen" not in state:
                    state["base_screen"] = _screen(ctx)
            finally:
                owner.use(ctx.variant)
        state["base"] = base
    state["unrepaired"] = _unrepaired(ctx, state)
    if "unrepaired_screen" not in state:
        state["unrepaired_screen"] = _screen(ctx)
    artifacts.write_json(path, state)


@dataclass(frozen=True)
class ScreenRule:
    """What the screen asks of a candidate.

    With both references measured by generation (the base model and the unrepaired variant), the
    screen is *calibrated*: a candidate's ASR is predicted from its mean refusal score on the harmful
    search prompts by the line through the two references' (mean score, ASR), and it passes when
    the prediction is at most the target + ``asr_tolerance`` + ``screen_slack``. Without them (a given
    target ASR, or references whose scores coincide), it passes when its share of harmful prompts
    predicted refused is at least ``1 − target − screen_slack``. Either way its share of harmless
    prompts predicted refused must stay within the unrepaired variant's + the over-refusal budget."""

    calibration: tuple[tuple[float, float], tuple[float, float]] | None  # (score, ASR): unrepaired, base
    max_predicted_asr: float
    need: float
    harmless_limit: float | None

    def predicted_asr(self, screen: dict[str, Any]) -> float | None:
        if self.calibration is None:
            return None
        (s0, a0), (s1, a1) = self.calibration
        t = (screen["harmful"]["mean_score"] - s0) / (s1 - s0)
        return min(1.0, max(0.0, a0 + t * (a1 - a0)))

    def passes(self, screen: dict[str, Any]) -> bool:
        pred = self.predicted_asr(screen)
        ok = (
            pred <= self.max_predicted_asr + 1e-12
            if pred is not None
            else screen["harmful"]["refusing"] >= self.need - 1e-12
        )
        if self.harmless_limit is not None and "harmless" in screen:
            ok = ok and screen["harmless"]["refusing"] <= self.harmless_limit + 1e-12
        return ok

    def rank(self, screen: dict[str, Any]) -> tuple[float, float]:
        """Lower is better: the predicted ASR, or minus the share of harmful prompts predicted refused
        (ties: minus the mean harmful score)."""
        pred = self.predicted_asr(screen)
        if pred is not None:
            return pred, -screen["harmful"]["mean_score"]
        return -screen["harmful"]["refusing"], -screen["harmful"]["mean_score"]


def screen_rule(state: dict[str, Any], target: float, spec: Any) -> ScreenRule:
    base, unrep = state.get("base"), state["unrepaired"]
    s0, s1 = state["unrepaired_screen"]["harmful"]["mean_score"], state["base_screen"]["harmful"]["mean_score"]
    calibration = None
    if base is not None and spec.target_asr is None and abs(s1 - s0) > 1e-6:
        calibration = ((s0, unrep["asr"]["rate"]), (s1, base["asr"]["rate"]))
    unrep_harmless = state["unrepaired_screen"].get("harmless", {}).get("refusing")
    return ScreenRule(
        calibration,
        target + spec.asr_tolerance + spec.screen_slack,
        1 - target - spec.screen_slack
        if spec.target_asr is not None
        else state["base_screen"]["harmful"]["refusing"] - spec.screen_slack,
        None if unrep_harmless is None else unrep_harmless + spec.max_over_refusal_increase,
    )


def _screen_all(
    ctx: CurveContext,
    state: dict[str, Any],
    path: Any,
    edit_for: Callable[[Candidate], Any],
    cands: list[Candidate],
    first_block: int,
) -> None:
    """Screen every candidate not screened yet; the blocks before ``first_block`` (which no candidate
    edits) run once for all of them (:class:`~refusalkit.repair.screen.BlockInputs`)."""
    bar = ctx.session.progress.bar(len(cands), f"{ctx.variant}: edit screen", unit="edit")
    inputs = None
    try:
        for c in cands:
            if c.key not in state["screen"]:
                if inputs is None:
                    inputs = BlockInputs(ctx.session.lm, ctx.cfg, ctx.data.harmful, ctx.data.harmless, first_block)
                edit = edit_for(c)
                try:
                    sc = refusal_screen(ctx.session.lm, ctx.cfg, ctx.data.harmful, ctx.data.harmless, inputs)
                finally:
                    edit.remove()
                state["screen"][c.key] = {**sc, **c.to_json(), "gain": edit.per_role("gain")}
                artifacts.write_json(path, state)
            bar.update(1)
    finally:
        bar.close()


def _reaches(point: dict[str, Any], target: float, ctx: CurveContext) -> bool:
    return not point["over_budget"] and point["asr"]["rate"] <= target + ctx.spec.asr_tolerance + 1e-12


def _ppl_limit(ctx: CurveContext, state: dict[str, Any]) -> float | None:
    ref = state["unrepaired"].get("perplexity")
    return None if ref is None or not ctx.spec.ppl_tokens else ref * (1 + ctx.spec.max_ppl_increase)


def _confirm(
    ctx: CurveContext,
    state: dict[str, Any],
    path: Path,
    edit_for: Callable[[Candidate], Any],
    order: list[Candidate],
    target: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Measure ``order`` by generation until one reaches ``target`` within budgets (at most ``confirm``
    generated). Each candidate's perplexity is measured first: it is exact, not a prediction, and a
    candidate over the perplexity budget is not generated from (returned second, not counted)."""
    confirmed, rejected = [], []
    limit = _ppl_limit(ctx, state)
    for c in order:
        if len(confirmed) >= ctx.spec.confirm:
            break
        point = state["points"].get(c.key)
        if point is None:
            edit = edit_for(c)
            try:
                ppl = search_perplexity(ctx.session.lm, ctx.spec) if limit is not None else None
                if ppl is not None and ppl > limit:
                    point = {"perplexity": ppl, "generated": False}
                else:
                    point = ctx.measure(perplexity=ppl)
            finally:
                edit.remove()
            point.update(c.to_json(), alphas=edit.per_role("alpha"))
            state["points"][c.key] = point
            artifacts.write_json(path, state)
        if point.get("generated", True) is False:
            rejected.append({**point, "over_budget": [f"perplexity {point['perplexity']:.1f} > {limit:.1f}"]})
            continue
        point = {**point, "over_budget": within_budgets(point, state["unrepaired"], ctx.spec)}
        confirmed.append(point)
        if _reaches(point, target, ctx):
            break
    return confirmed, rejected


def asr_vs_base(point: dict[str, Any], base: dict[str, Any] | None, margin: float) -> dict[str, Any] | None:
    """The report's claim "ASR back to base" (:func:`refusalkit.evaluation.decide.not_worse`) decided on the
    search prompts: the point's and the base model's per-prompt verdicts, paired; None without them."""
    from refusalkit.data.refusal import COMPLIANCE
    from refusalkit.evaluation.decide import not_worse
    from refusalkit.evaluation.stats import paired

    a = (point.get("labels") or {}).get("harmful")
    b = ((base or {}).get("labels") or {}).get("harmful")
    if a is None or b is None or len(a) != len(b):
        return None
    res = paired({i: y == COMPLIANCE for i, y in enumerate(b)}, {i: x == COMPLIANCE for i, x in enumerate(a)})
    return not_worse(res, margin, "ASR back to base").to_json()


_ORDER = {"holds": 0, "undecided": 1, "fails": 2}


def _choose(
    confirmed: list[dict[str, Any]], target: float, ctx: CurveContext, base: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The confirmed candidate within budgets whose "ASR back to base" is best decided on the search
    prompts: holds before undecided before fails, then the lowest upper bound of its paired ASR rise
    over the base model, then the smaller α. On 32 prompts most candidates are undecided, so the bound
    ranks them; the evaluation's prompts then decide the chosen edit. Without per-prompt verdicts
    (older searches): the first that reached the target, else the lowest ASR."""
    feasible = [p for p in confirmed if not p["over_budget"]]
    if not feasible:
        return None
    margin = ctx.cfg.verdict.asr_margin
    decided = [(p, asr_vs_base(p, base, margin)) for p in feasible]
    if all(d is not None for _, d in decided):
        p, d = min(decided, key=lambda pd: (_ORDER[pd[1]["verdict"]], pd[1]["bound"], pd[0]["scale"]))
        return {**p, "target_reached": _reaches(p, target, ctx), "asr_vs_base": d}
    reached = [p for p in confirmed if _reaches(p, target, ctx)]
    if reached:
        return {**reached[0], "target_reached": True}
    return {**min(feasible, key=lambda p: (p["asr"]["rate"], p["scale"])), "target_reached": False}


def _load_state(path: Path, settings: dict[str, Any], screen_settings: dict[str, Any]) -> dict[str, Any]:
    """The search's saved state at ``path`` when it was made with ``settings``; else a fresh one that keeps
    the saved screens when they were made on the same prompts (``screen_settings``)."""
    state = artifacts.read_json(path) if path.exists() else {}
    if state.get("settings") != settings:
        made_on = search_screens_made_on(state, screen_settings["score"])  # an older release's state too
        kept = {k: state[k] for k in SCREENS if k in state} if made_on == screen_settings else {}
        state = {"settings": settings, "screen_settings": screen_settings, "screen": {}, "points": {}, **kept}
    return state


def _summary(
    ctx: CurveContext,
    state: dict[str, Any],
    rule: ScreenRule,
    target: float,
    chosen_from: list[Candidate],
    compared: list[Candidate],
    passing: list[Candidate],
    confirmed: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
) -> dict[str, Any]:
    """What :func:`search_edits` returns: the references, the screen and its rule, the confirmations,
    the chosen edit, the cost, the budgets and the prompts."""
    s, base = ctx.spec, state.get("base")

    def screened(c: Candidate) -> dict[str, Any]:
        return {**state["screen"][c.key], "predicted_asr": rule.predicted_asr(state["screen"][c.key])}

    return {
        "measures": CURVE_MEASURES,
        "target_asr": target,
        "target_from": "given" if s.target_asr is not None else "base model on the search prompts",
        "base": base,
        "base_screen": state["base_screen"],
        "unrepaired": state["unrepaired"],
        "unrepaired_screen": state["unrepaired_screen"],
        "screen_rule": {
            "calibration": None if rule.calibration is None else [list(p) for p in rule.calibration],
            "max_predicted_asr": rule.max_predicted_asr,
            "need": rule.need,
            "harmless_limit": rule.harmless_limit,
        },
        "screened": [screened(c) for c in chosen_from],
        "compared": [screened(c) for c in compared],
        "passed_screen": [c.key for c in passing],
        "generated": len(confirmed),
        "perplexity_rejected": rejected,
        "not_generated": len(chosen_from) - len(confirmed),
        "confirmed": confirmed,
        "chosen": _choose(confirmed, target, ctx, base),
        "cost": state["cost"],
        "budgets": {
            k: getattr(s, k)
            for k in (
                "max_over_refusal_increase",
                "max_degenerate_increase",
                "max_ppl_increase",
                "max_utility_drop",
                "asr_tolerance",
            )
        },  # fmt: skip
        "prompts": ctx.data.info,
        "max_new_tokens": ctx.max_new_tokens,
    }


def search_edits(
    ctx: CurveContext,
    edit_for: Callable[[Candidate], Any],
    chosen_from: list[Candidate],
    compared: list[Candidate],
    path: Path,
    first_block: int = 0,
) -> dict[str, Any]:
    """Run the search of this module, resumable from ``path``; ``compared`` are screened for the record
    but never chosen (the plain edit of a pruned variant whose zeros are kept). ``edit_for(c)`` edits
    the owner's model; no candidate edits a block before ``first_block``."""
    s = ctx.spec
    settings = {
        **ctx.settings(),
        "measures": CURVE_MEASURES,
        "candidates": [c.key for c in chosen_from],
        "compared": [c.key for c in compared],
        "screen": {"score": "first-token refusal log-odds", "rule": "calibrated", "slack": s.screen_slack},
        "confirm": s.confirm,
    }
    # the screen depends on fewer settings than generation: screens stay valid when only those change
    screen_settings = {
        "prompts": ctx.data.info,
        "system_prompt": ctx.cfg.system_prompt,
        "score": "first-token refusal log-odds",
    }
    state = _load_state(path, settings, screen_settings)
    start = _counters()
    _references(ctx, state, path)
    base = state.get("base")
    target = float(s.target_asr) if s.target_asr is not None else base["asr"]["rate"]
    rule = screen_rule(state, target, s)
    _screen_all(ctx, state, path, edit_for, chosen_from + compared, first_block)
    passing = [c for c in chosen_from if rule.passes(state["screen"][c.key])]
    # passing candidates smallest first; then, should none of them reach the target, the best-rated rest
    rest = sorted(
        (c for c in chosen_from if c not in passing), key=lambda c: (rule.rank(state["screen"][c.key]), c.scale)
    )
    confirmed, rejected = _confirm(ctx, state, path, edit_for, passing + rest, target)
    spent = _counters()
    cost = state.setdefault("cost", {})
    for k, v in spent.items():
        cost[k] = round(cost.get(k, 0) + v - start[k], 1)
    cost["calls"] = cost.get("calls", 0) + 1
    artifacts.write_json(path, state)
    return _summary(ctx, state, rule, target, chosen_from, compared, passing, confirmed, rejected)
