"""``refusalkit export --check``: the exported file read back by a runtime and judged again.

The exported GGUF is read by transformers' GGUF loader (the ``gguf`` library dequantizes it) and
registered as the variant ``<variant>.<type>`` of the run (``compress --from``); the vanilla attack
and the over-refusal sets are generated on it with the same prompts and judge, and each is compared
*pairwise* with refusalkit's evaluation of the variant itself. The export keeps the verdict when
the paired difference's 95 % interval lies inside ``±margin`` (``verdict.asr_margin`` for the
attack, ``verdict.over_refusal_margin`` for the harmless and borderline sets): an equivalence
test, both one-sided bounds inside the margin (:func:`refusalkit.evaluation.decide.not_worse` in
both directions). A significant difference beyond the margin fails; anything else is undecided,
with the prompts that would decide it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusalkit.core.config import Config
from refusalkit.core.layout import RunLayout
from refusalkit.evaluation.decide import FAILS, HOLDS, UNDECIDED, not_worse

# record -> (margin setting, the outcome label, what it measures)
RECORDS = {
    "vanilla": ("asr_margin", "compliance", "vanilla ASR"),
    "over_refusal": ("over_refusal_margin", "refusal", "over-refusal"),
    "borderline": ("over_refusal_margin", "refusal", "borderline refusal"),
}


def equivalent(res: dict[str, Any], margin: float, claim: str) -> dict[str, Any]:
    """Both one-sided claims ("not above", "not below" by more than ``margin``) on one paired result."""
    up, down = not_worse(res, margin, claim, worse=+1), not_worse(res, margin, claim, worse=-1)
    verdicts = {up.verdict, down.verdict}
    verdict = HOLDS if verdicts == {HOLDS} else FAILS if FAILS in verdicts else UNDECIDED
    return {
        "claim": claim,
        "verdict": verdict,
        "difference": res["difference"],
        "ci95": res["ci95"],
        "margin": margin,
        "p": res.get("p"),
        "n": res["n"],
        "discordant": [res["only_first"], res["only_second"]],
        "prompts_needed": next((d.prompts_needed for d in (up, down) if d.verdict == UNDECIDED), None),
    }


def _outcomes(layout: RunLayout, name: str, record: str, label: str) -> dict[str, bool] | None:
    from refusalkit.evaluation.records import read_records
    from refusalkit.evaluation.stats import outcomes

    rows = read_records(layout.eval(name, f"{record}.jsonl"))
    if not rows:
        return None
    judge = next(iter(rows[0]["verdicts"]))
    return outcomes(rows, judge, label)


def recheck(
    cfg: Config, layout: RunLayout, variant: str, exported: Path, typ: str, progress: bool = True
) -> dict[str, Any]:
    """Import ``exported`` as ``<variant>.<type>``, evaluate both, and compare them pairwise."""
    from refusalkit.compress.imported import run_import
    from refusalkit.evaluation.job import run_evaluate

    name = f"{variant}.{typ}"
    run_import(cfg, layout.root, str(exported), name, force=True)
    run_evaluate(cfg, layout.root, variant, progress=progress)  # finished parts are reused
    run_evaluate(cfg, layout.root, name, progress=progress)
    out: dict[str, Any] = {"runtime": "transformers GGUF loader (gguf library dequantization)", "variant": name}
    parts = {}
    for record, (margin_key, label, claim) in RECORDS.items():
        a, b = _outcomes(layout, variant, record, label), _outcomes(layout, name, record, label)
        if a is None or b is None:
            continue
        from refusalkit.evaluation.stats import paired

        parts[record] = equivalent(
            paired(a, b), float(getattr(cfg.verdict, margin_key)), f"{claim} unchanged by export"
        )
    out["parts"] = parts
    verdicts = {p["verdict"] for p in parts.values()}
    out["verdict"] = FAILS if FAILS in verdicts else HOLDS if verdicts == {HOLDS} else UNDECIDED
    return out


def text(result: dict[str, Any]) -> list[str]:
    """One line per compared set: the paired difference, its interval and the verdict."""
    lines = []
    for rec in result["parts"].values():
        lo, hi = rec["ci95"]
        lines.append(
            f"{rec['claim']}: {100 * rec['difference']:+.0f} pt [{100 * lo:+.0f}, {100 * hi:+.0f}], "
            f"+{rec['discordant'][1]}/-{rec['discordant'][0]} prompts, margin ±{100 * rec['margin']:.0f} pt -> {rec['verdict']}"
            + (f" (about {rec['prompts_needed']} prompts would decide it)" if rec["prompts_needed"] else "")
        )
    return lines
