"""The search over edits (beyond the paper): where, in what form, and how much.

A candidate edit is a placement (``source``: block ``l`` of the direction, the paper's index;
``previous``: block ``l − 1``), a form (every weight, or the non-zeros only: ``keep_zeros``, which
keeps a pruned variant's exact sparsity) and an α scale (a multiple of the paper's alphas). Raw and
unit ``r`` are not searched separately: AIRD with raw ``r`` and scale ``s`` is the same edit as unit
``r`` with scale ``s‖r‖²`` (Eq. 4 scales the component along ``r̂`` by ``1 + α‖r‖²``).

1. **Targets.** The base model and the unrepaired variant are measured once on the held-out search
   prompts, by generation (:func:`~refusalkit.repair.search.measure`) and by the screen.
2. **Screen.** Every candidate is applied, screened with the first-token refusal score
   (:mod:`refusalkit.repair.screen`) and removed bit for bit. A candidate passes when the share of
   harmful search prompts it is predicted to refuse reaches the base model's (minus
   ``screen_slack``) and the share of harmless ones stays within the over-refusal budget.
3. **Confirmation.** Passing candidates, smallest α first (then ``source`` before ``previous``), are
   measured by generation until one reaches the target ASR within every budget, at most
   ``confirm`` of them; when none passes, the ``confirm`` candidates the screen rates best are.
4. **Choice.** The first confirmed candidate that reaches the target within budgets; else the
   confirmed one within budgets with the lowest ASR (``target_reached`` false); else none.

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
from refusalkit.repair.screen import refusal_screen
from refusalkit.repair.search import (
    CURVE_MEASURES,
    CurveContext,
    _cached_point,
    _store_point,
    _unrepaired,
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


def _screen(ctx: CurveContext) -> dict[str, Any]:
    return refusal_screen(ctx.session.lm, ctx.cfg, ctx.data.harmful, ctx.data.harmless)


def _references(ctx: CurveContext, state: dict[str, Any], path: Path) -> None:
    """The base model (generation and screen; the owner swaps to it and back, one model in memory) and
    the unrepaired variant, measured once and cached."""
    settings = ctx.settings()
    if "base" not in state and ctx.spec.target_asr is None or "base_screen" not in state:
        base = _cached_point(ctx.layout, "base", settings)
        owner = ctx.session.owner
        owner.use("base")
        try:
            if base is None and ctx.spec.target_asr is None:
                base = ctx.measure()
                _store_point(ctx.layout, "base", settings, base)
            state["base_screen"] = _screen(ctx)
        finally:
            owner.use(ctx.variant)
        state["base"] = base
    state["unrepaired"] = _unrepaired(ctx, state)
    if "unrepaired_screen" not in state:
        state["unrepaired_screen"] = _screen(ctx)
    artifacts.write_json(path, state)


def _passes(screen: dict[str, Any], need: float, harmless_limit: float | None) -> bool:
    ok = screen["harmful"]["refusing"] >= need - 1e-12
    if harmless_limit is not None and "harmless" in screen:
        ok = ok and screen["harmless"]["refusing"] <= harmless_limit + 1e-12
    return ok


def _screen_all(
    ctx: CurveContext, state: dict[str, Any], path: Any, edit_for: Callable[[Candidate], Any], cands: list[Candidate]
) -> None:
    bar = ctx.session.progress.bar(len(cands), f"{ctx.variant}: edit screen", unit="edit")
    try:
        for c in cands:
            if c.key not in state["screen"]:
                edit = edit_for(c)
                try:
                    sc = _screen(ctx)
                finally:
                    edit.remove()
                state["screen"][c.key] = {**sc, **c.to_json(), "gain": {k: r["gain"] for k, r in edit.records.items()}}
                artifacts.write_json(path, state)
            bar.update(1)
    finally:
        bar.close()


def _reaches(point: dict[str, Any], target: float, ctx: CurveContext) -> bool:
    return not point["over_budget"] and point["asr"]["rate"] <= target + ctx.spec.asr_tolerance + 1e-12


def _confirm(
    ctx: CurveContext,
    state: dict[str, Any],
    path: Path,
    edit_for: Callable[[Candidate], Any],
    order: list[Candidate],
    target: float,
) -> list[dict[str, Any]]:
    """Measure ``order`` by generation until one reaches ``target`` within budgets (at most ``confirm``)."""
    confirmed = []
    for c in order[: ctx.spec.confirm]:
        point = state["points"].get(c.key)
        if point is None:
            edit = edit_for(c)
            try:
                point = ctx.measure()
            finally:
                edit.remove()
            point.update(c.to_json(), alphas={k: r["alpha"] for k, r in edit.records.items()})
            state["points"][c.key] = point
            artifacts.write_json(path, state)
        point = {**point, "over_budget": within_budgets(point, state["unrepaired"], ctx.spec)}
        confirmed.append(point)
        if _reaches(point, target, ctx):
            break
    return confirmed


def _choose(confirmed: list[dict[str, Any]], target: float, ctx: CurveContext) -> dict[str, Any] | None:
    reached = [p for p in confirmed if _reaches(p, target, ctx)]
    if reached:
        return {**reached[0], "target_reached": True}
    feasible = [p for p in confirmed if not p["over_budget"]]
    if feasible:
        return {**min(feasible, key=lambda p: (p["asr"]["rate"], p["scale"])), "target_reached": False}
    return None


def search_edits(
    ctx: CurveContext,
    edit_for: Callable[[Candidate], Any],
    chosen_from: list[Candidate],
    compared: list[Candidate],
    path: Path,
) -> dict[str, Any]:
    """Run the search of this module, resumable from ``path``; ``compared`` are screened for the record
    but never chosen (the plain edit of a pruned variant whose zeros are kept). ``edit_for(c)`` edits
    the owner's model."""
    s = ctx.spec
    settings = {
        **ctx.settings(),
        "measures": CURVE_MEASURES,
        "candidates": [c.key for c in chosen_from],
        "compared": [c.key for c in compared],
        "screen": {"score": "first-token refusal log-odds > 0", "slack": s.screen_slack},
        "confirm": s.confirm,
    }
    state = artifacts.read_json(path) if path.exists() else {}
    if state.get("settings") != settings:
        state = {"settings": settings, "screen": {}, "points": {}}
    _references(ctx, state, path)
    base = state.get("base")
    target = float(s.target_asr) if s.target_asr is not None else base["asr"]["rate"]
    # what the screen asks of the harmful prompts: the base model's predicted refusals (or 1 - a given target)
    need = (1 - target if s.target_asr is not None else state["base_screen"]["harmful"]["refusing"]) - s.screen_slack
    unrep_harmless = state["unrepaired_screen"].get("harmless", {}).get("refusing")
    limit = None if unrep_harmless is None else unrep_harmless + s.max_over_refusal_increase
    _screen_all(ctx, state, path, edit_for, chosen_from + compared)
    passing = [c for c in chosen_from if _passes(state["screen"][c.key], need, limit)]
    order = passing or sorted(chosen_from, key=lambda c: (-state["screen"][c.key]["harmful"]["refusing"], c.scale))
    confirmed = _confirm(ctx, state, path, edit_for, order, target)
    return {
        "measures": CURVE_MEASURES,
        "target_asr": target,
        "target_from": "given" if s.target_asr is not None else "base model on the search prompts",
        "base": base,
        "base_screen": state["base_screen"],
        "unrepaired": state["unrepaired"],
        "unrepaired_screen": state["unrepaired_screen"],
        "screen_need": need,
        "screen_harmless_limit": limit,
        "screened": [state["screen"][c.key] for c in chosen_from],
        "compared": [state["screen"][c.key] for c in compared],
        "passed_screen": [c.key for c in passing],
        "generated": len(confirmed),
        "not_generated": len(chosen_from) - len(confirmed),
        "confirmed": confirmed,
        "chosen": _choose(confirmed, target, ctx),
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
