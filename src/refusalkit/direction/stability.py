"""Source stability: how often the selection would land on each (layer, position) had other
validation prompts been drawn (issue 15, part 2).

The selection (Arditi et al. 2024, App. C; :func:`refusalkit.direction.select.choose`) picks the
candidate with the lowest mean ablation refusal score among those within the KL limit whose mean
addition score clears the threshold. Those three means are averages over the validation prompts,
and ``scores.json`` keeps their per-prompt terms for every fully scored candidate. Resampling the
harmful and the harmless validation prompts with replacement (seeded) and re-applying the same
rule, fallback included, to the resampled means gives the share of resamples that land on each
candidate, with no new forward pass.

Only fully scored candidates can win a resample: in the ``fast`` mode those the screen kept (the
screen itself is not resampled), so the shares describe the selection's noise among them.
The **stable set** is the fewest sources that together take at least ``STABLE_MASS`` of the
resamples (most frequent first). A variant whose source lies in the base model's stable set moved
"within noise": the base model's own selection lands there when the prompts are redrawn.
"""

from __future__ import annotations

from typing import Any

import torch

from refusalkit.core.errors import UserError
from refusalkit.direction.select import CandidateScore, choose

METHOD = "bootstrap over validation prompts (fully scored candidates; the screen is not resampled)"
STABLE_MASS = 0.95


def _resample(values: list[float], idx: torch.Tensor) -> float:
    return float(torch.tensor(values, dtype=torch.float64)[idx].mean())


def source_stability(scores: dict[str, Any], *, resamples: int = 200, seed: int = 0) -> dict[str, Any] | None:
    """The stability record of a selection's ``scores.json`` (``None`` when it has no per-prompt
    scores: a selection made before they were kept)."""
    cands = scores.get("candidates") or []
    full = [c for c in cands if c.get("per_prompt")]
    base = scores.get("baseline_per_prompt")
    if not full or not base or resamples < 1:
        return None
    th = scores["thresholds"]
    n_h, n_l = len(full[0]["per_prompt"]["ablation"]), len(full[0]["per_prompt"]["addition"])
    g = torch.Generator().manual_seed(seed)
    counts: dict[tuple[int, int] | None, int] = {}
    for _ in range(resamples):
        ih = torch.randint(0, n_h, (n_h,), generator=g)
        il = torch.randint(0, n_l, (n_l,), generator=g)
        pool = []
        for c in cands:
            s = CandidateScore(position=c["position"], layer=c["layer"], norm=c["norm"])
            pp = c.get("per_prompt")
            if pp:  # fully scored: the filters are re-applied to the resampled means
                s.ablation_score = _resample(pp["ablation"], ih)
                s.addition_score = _resample(pp["addition"], il)
                s.kl = _resample(pp["kl"], il)
            else:  # out for structural reasons (late layer, zero vector, screened out) stays out
                s.discarded = c.get("discarded") or "not scored"
            pool.append(s)
        baseline = {
            "harmful_score": _resample(base["harmful_score"], ih),
            "harmless_score": _resample(base["harmless_score"], il),
        }
        try:
            best, _ = choose(
                pool,
                baseline,
                th["kl_threshold"],
                th["induce_refusal_threshold"],
                th.get("fallback", "relative"),
                th.get("fallback_margin", 1.0),
            )
            key: tuple[int, int] | None = (best.layer, best.position)
        except UserError:  # fallback "error" and nothing passed in this resample
            key = None
        counts[key] = counts.get(key, 0) + 1
    no_selection = counts.pop(None, 0) / resamples
    shares = sorted(
        ({"layer": k[0], "position": k[1], "share": v / resamples} for k, v in counts.items()),
        key=lambda r: (-r["share"], r["layer"], r["position"]),
    )
    stable, mass = [], 0.0
    for r in shares:
        if mass >= STABLE_MASS:
            break
        stable.append({"layer": r["layer"], "position": r["position"]})
        mass += r["share"]
    chosen = next(
        (r["share"] for r in shares if (r["layer"], r["position"]) == (scores["layer"], scores["position"])), 0.0
    )
    return {
        "method": METHOD,
        "resamples": resamples,
        "seed": seed,
        "n_prompts": {"harmful": n_h, "harmless": n_l},
        "n_candidates": len(full),
        "shares": shares,
        "stable_set": stable,
        "stable_mass": STABLE_MASS,
        "selected_share": chosen,
        "no_selection_share": no_selection,
    }


def in_stable_set(stability: dict[str, Any] | None, layer: int, position: int) -> bool | None:
    """Whether ``(layer, position)`` is in the stable set (``None``: no stability record)."""
    if not stability:
        return None
    return any(s["layer"] == layer and s["position"] == position for s in stability["stable_set"])
