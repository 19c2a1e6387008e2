"""The report's tables: one row per variant (:func:`variants_table`) and one per repair (:func:`repairs_table`).

Pure functions of a :class:`~refusalkit.study.report.load.Run`; every cell is a final string,
``DASH`` when not measured.
"""

from __future__ import annotations

from typing import Any

from refusalkit.core.config import ATTACKS
from refusalkit.study.report.blocks import DASH, Table
from refusalkit.study.report.load import Run, Variant

ALWAYS_SHOWN = ("vanilla", "decoding", "suffix")  # other attacks get a column when a variant has them

VARIANT_HEADERS = [
    "variant",
    "method",
    "sparsity / bits",
    "direction source",
    "cos selected",
    "cos at base source",
    "source shifted",
    *(f"ASR {a}" for a in ALWAYS_SHOWN),
    "degenerate",
    "over-refusal",
    "perplexity",
    "mean acc",
    "status",
]
REPAIR_HEADERS = [
    "variant",
    "source",
    "method",
    "placement",
    "r",
    "alpha scale",
    "gains",
    "model sparsity",
    "quantization survival",
    "vanilla ASR",
    "over-refusal",
    "mean acc",
]


# --------------------------------------------------------------------------- cells


def pct_cell(x: float | None, digits: int = 0) -> str:
    """``41%``: a fraction in percent."""
    return DASH if x is None else f"{100 * x:.{digits}f}%"


def rate_cell(r: dict[str, Any] | None, flag: str = "") -> str:
    """``27% [19–36]``: a rate with its 95% interval (``flag`` follows the rate)."""
    if not r or r.get("rate") is None:
        return DASH
    lo, hi = r.get("ci95") or (None, None)
    ci = "" if lo is None else f" [{100 * lo:.0f}–{100 * hi:.0f}]"
    return f"{100 * r['rate']:.0f}%{flag}{ci}"


def num_cell(x: float | None, fmt: str = ".3f") -> str:
    """A number in format ``fmt``."""
    return DASH if x is None else format(x, fmt)


def noise_cosine_cell(x: float | None, noise: dict[str, Any] | None) -> str:
    """A cosine and, when the comparison has a noise floor, whether it lies below it."""
    if x is None or not noise:
        return num_cell(x)
    return f"{x:.3f} ({'moved' if noise['moved'] else 'within noise'}; floor {noise['null_floor']:.3f})"


def ppl_cell(x: float | None) -> str:
    """A perplexity: two decimals below 1000, none above."""
    return DASH if x is None else (f"{x:.2f}" if x < 1000 else f"{x:.0f}")


def yes_no_cell(x: bool | None) -> str:
    """yes, no, or ``DASH``."""
    return DASH if x is None else ("yes" if x else "no")


def before_after_cell(before: str, after: str) -> str:
    """``before → after`` (``DASH`` when neither was measured)."""
    return DASH if before == after == DASH else f"{before} → {after}"


def shift_cell(v: Variant) -> str:
    """yes / no, and "no (within noise)" when the source changed into the base selection's stable set."""
    if v.shifted is False and (v.compare or {}).get("source_shift_within_noise"):
        return "no (within noise)"
    return yes_no_cell(v.shifted)


def source_cell(v: Variant) -> str:
    """``L10 / pos -1``: where the variant's direction was selected."""
    d = v.direction
    return DASH if d is None else f"L{d['layer']} / pos {d['position']}"


def size_cell(run: Run, v: Variant) -> str:
    """Bits of a quantized model, else its fraction of zero weights."""
    comp = v.compression
    if v.repair is not None:
        src = run.source_of(v)
        comp = v.repair.get("compression") or (src.compression if src else None)
        if not (comp or {}).get("bits") and v.repair.get("model_sparsity_after") is not None:
            return f"{v.repair['model_sparsity_after']:.1%} zeros"
    if not comp:
        return DASH
    if comp.get("bits"):
        return f"{comp['bits']} bit"
    return DASH if comp.get("sparsity") is None else f"{comp['sparsity']:.1%} zeros"


def status_cell(v: Variant, why: str | None) -> str:
    """``BROKEN (why)``, ``ok``, or ``DASH`` when neither perplexity nor degeneracy was measured."""
    if why:
        return f"BROKEN ({why})"
    return DASH if v.perplexity is None and v.degenerate_rate is None else "ok"


def over_refusal_cell(v: Variant | None) -> str:
    """The harmless prompts' refusal rate with its interval."""
    return rate_cell((v.over_refusal or {}).get("refusal_rate") if v else None)


def borderline_cell(v: Variant | None) -> str:
    """The borderline prompts' refusal rate with its interval."""
    return rate_cell((v.borderline or {}).get("refusal_rate") if v else None)


def _has_borderline(run: Run) -> bool:
    return any(v.borderline for v in run.variants)


def _extra_attacks(run: Run) -> list[str]:
    return [a for a in ATTACKS if a not in ALWAYS_SHOWN and any(v.attack(a) for v in run.variants)]


# --------------------------------------------------------------------------- tables


def variant_row(run: Run, v: Variant, why: str | None) -> list[str]:
    """One row of :func:`variants_table`; ``why`` (BROKEN) flags the ASR cells with an asterisk."""
    flag = "*" if why else ""
    row = [
        v.name,
        v.method or ("none" if v.kind == "base" else DASH),
        size_cell(run, v),
        source_cell(v),
        num_cell(v.cosine_selected),
        noise_cosine_cell(v.cosine_at_base_source, v.noise_at_base_source),
        shift_cell(v),
        *(rate_cell(v.attack(a), flag) for a in ALWAYS_SHOWN),
        pct_cell(v.degenerate_rate),
        over_refusal_cell(v),
        ppl_cell(v.perplexity),
        pct_cell(v.mean_acc, 1),
        status_cell(v, why),
    ]
    if _has_borderline(run):  # none evaluated (evaluation.borderline none, n_borderline 0; a run of 0.2.0): no column
        row.insert(VARIANT_HEADERS.index("over-refusal") + 1, borderline_cell(v))
    at = VARIANT_HEADERS.index("degenerate")
    for a in reversed(_extra_attacks(run)):
        row.insert(at, rate_cell(v.attack(a), flag))
    return row


def variants_table(run: Run) -> Table:
    """One row per variant: compression, direction, cosines, safety, utility and status (BROKEN rows marked)."""
    rows, marked = [], []
    for v in run.variants:
        why = run.broken(v)
        marked.append(why is not None)
        rows.append(variant_row(run, v, why))
    headers = list(VARIANT_HEADERS)
    if _has_borderline(run):
        headers.insert(headers.index("over-refusal") + 1, "borderline refusal")
    at = headers.index("degenerate")
    headers[at:at] = [f"ASR {a}" for a in _extra_attacks(run)]
    return Table(headers, rows, marked)


def repair_row(run: Run, v: Variant) -> list[str]:
    """One row of :func:`repairs_table`: the edit, then before (its source) → after."""
    r, src = v.repair, run.source_of(v)
    gain = r.get("gain") or {}
    quant = r.get("quantization") or {}
    sp_before, sp_after = r.get("model_sparsity_before"), r.get("model_sparsity_after")
    row = [
        v.name,
        r.get("source_variant") or DASH,
        r.get("method") or DASH,
        r.get("placement") or DASH,
        r.get("direction") or DASH,
        num_cell(r.get("alpha_scale"), "g"),
        ", ".join(f"{k} {g:.3g}" for k, g in gain.items()) or DASH,
        before_after_cell(pct_cell(sp_before, 1), pct_cell(sp_after, 1)),
        pct_cell(quant.get("survival")),
        before_after_cell(rate_cell(src.attack("vanilla") if src else None), rate_cell(v.attack("vanilla"))),
        before_after_cell(over_refusal_cell(src), over_refusal_cell(v)),
        before_after_cell(pct_cell(src.mean_acc if src else None, 1), pct_cell(v.mean_acc, 1)),
    ]
    if _has_borderline(run):
        row.insert(
            REPAIR_HEADERS.index("over-refusal") + 1, before_after_cell(borderline_cell(src), borderline_cell(v))
        )
    return row


def repairs_table(run: Run) -> Table | None:
    """One row per repaired variant, before (its source) → after; ``None`` when nothing was repaired."""
    rows = [repair_row(run, v) for v in run.variants if v.kind == "repaired"]
    headers = list(REPAIR_HEADERS)
    if _has_borderline(run):
        headers.insert(headers.index("over-refusal") + 1, "borderline refusal")
    return Table(headers, rows) if rows else None
