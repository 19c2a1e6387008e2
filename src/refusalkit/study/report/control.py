"""Control by behaviour in the report (:mod:`refusalkit.direction.control`): does a direction control
refusal in a model on the held-out test prompts, and has the base direction lost control of a variant?

* :func:`controls`: a direction's two paired exact McNemar tests, each a three-valued decision
  (:func:`refusalkit.evaluation.decide.lowered`): ablation lowers the harmful prompts' refusal,
  addition raises the harmless prompts' refusal. Both hold: the direction controls refusal.
* :func:`kept_in_function`: the base direction's effect on the variant against its effect on the base
  model, prompt by prompt (:func:`refusalkit.evaluation.stats.paired_effect_difference`), decided
  against ``verdict.control_margin`` (:func:`refusalkit.evaluation.decide.not_worse`): holds when the
  upper bound of the loss of each effect is inside the margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refusalkit.evaluation import decide
from refusalkit.evaluation.stats import paired, paired_effect_difference
from refusalkit.study.report.load import Run, Variant


@dataclass
class Control:
    """A direction's control of one model: the two decisions, the verdict of both, and a sentence."""

    ablation: decide.Decision
    addition: decide.Decision
    text: str

    @property
    def verdict(self) -> str | None:
        return decide.combine([self.ablation.verdict, self.addition.verdict])


def _pct(res: dict[str, Any]) -> str:
    return f"{100 * res['first']['rate']:.0f}%→{100 * res['second']['rate']:.0f}%"


def controls(v: Variant, which: str = "own") -> Control | None:
    """The control of ``v``'s own direction (``own``) or of the base direction (``base``) on ``v``; None
    when it was not measured."""
    c = (v.control or {}).get("conditions") or {}
    abl, add = c.get(f"ablated:{which}"), c.get(f"added:{which}")
    if abl is None or add is None:
        return None
    down = paired(c["harmful_baseline"], abl)
    up = paired(add, c["harmless_baseline"])  # "lowered" from added to plain: addition raised refusal
    a = decide.lowered(down, "ablation lowers harmful refusal")
    b = decide.lowered(up, "addition raises harmless refusal")
    from refusalkit.study.report.verdicts import p_text

    text = (
        f"ablation {_pct(down)} on {down['n']} harmful (p = {p_text(down['p'])}, {a.verdict}), "
        f"addition {100 * up['second']['rate']:.0f}%→{100 * up['first']['rate']:.0f}% on {up['n']} harmless "
        f"(p = {p_text(up['p'])}, {b.verdict})"
    )
    return Control(a, b, text)


def kept_in_function(run: Run, v: Variant) -> tuple[str | None, str]:
    """Has the base direction kept its control of ``v``? (verdict holds / fails / undecided, or None when
    not measured; a sentence with the two losses, their intervals and the margin)."""
    base = (run.base.control or {}).get("conditions") or {}
    var = (v.control or {}).get("conditions") or {}
    need_base, need_var = ("ablated:own", "added:own"), ("ablated:base", "added:base")
    if not all(k in base for k in need_base) or not all(k in var for k in need_var):
        return None, "the base direction's control was not measured on both models"
    margin = run.margin("control_margin")
    ablation = paired_effect_difference(
        base["harmful_baseline"], base["ablated:own"], var["harmful_baseline"], var["ablated:base"]
    )
    addition = paired_effect_difference(
        base["added:own"], base["harmless_baseline"], var["added:base"], var["harmless_baseline"]
    )
    parts, verdicts = [], []
    for label, res in (("ablation", ablation), ("addition", addition)):
        if res["difference"] is None:
            return None, "no test prompt was measured on both models"
        d = decide.not_worse(res, margin, f"{label} control kept")
        verdicts.append(d.verdict)
        lo, hi = res["ci95"]
        parts.append(
            f"{label} effect {100 * res['effect_a']:.0f} pt on the base model, {100 * res['effect_b']:.0f} pt here: "
            f"loss {100 * res['difference']:+.0f} pt [{100 * lo:+.0f}, {100 * hi:+.0f}] → {d.text()}"
        )
    return decide.combine(verdicts), "; ".join(parts)


def control_sentences(run: Run) -> list[str]:
    """One sentence per model with a control record: its own direction's control and, for a variant,
    the base direction's control and its loss against the base model."""
    out = []
    for v in run.variants:
        if v.control is None:
            continue
        parts = []
        own = controls(v, "own")
        if own is not None:
            word = {"holds": "controls refusal", "fails": "does not control refusal"}.get(
                own.verdict or "", "undecided"
            )
            parts.append(f"own direction: {own.text} → {word}")
        base = controls(v, "base") if v.kind != "base" else None
        if base is not None:
            state, text = kept_in_function(run, v)
            parts.append(f"base direction: {base.text}; {text}")
        if parts:
            n = v.control.get("n_test", {})
            out.append(
                f"{v.name} ({n.get('harmful', '?')} + {n.get('harmless', '?')} test prompts): " + "; ".join(parts) + "."
            )
    return out
