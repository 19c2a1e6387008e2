"""The sweep's table (``DIR/sweep/<name>.md``) and its seed groups: which points are one compression
setting at several calibration seeds, and do their draws give one ASR (Cochran's Q)."""

from __future__ import annotations

from typing import Any

from refusalkit.core.layout import RunLayout
from refusalkit.study.report.load import point_broken


def seed_groups(layout: RunLayout, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The compression's own noise: for every set of finished points that differ only in their
    calibration seed, their seeds, cosines at the base source and vanilla ASRs, and Cochran's Q
    (:func:`~refusalkit.evaluation.stats.cochran_q`) on their vanilla outcomes, prompt by prompt:
    a small p says the seeds give models with different ASRs, so one seed's ASR is one draw."""
    from refusalkit.evaluation.stats import cochran_q
    from refusalkit.study.report.load import Variant

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in points:
        if r.get("seed") is not None:
            key = (r["method"], r.get("sparsity_setting"), r.get("bits"), r.get("calibration"))
            groups.setdefault(key, []).append(r)
    out = []
    for (method, sparsity, bits, cal), recs in groups.items():
        if len(recs) < 2:
            continue
        asr = [(r.get("asr") or {}).get("rate") for r in recs]
        cos = [r["cosine_at_base_source"] for r in recs]
        vanilla = [Variant.load(layout, r["variant"]).outcomes("vanilla") for r in recs]
        test = cochran_q(vanilla) if all(v for v in vanilla) else None
        known = [a for a in asr if a is not None]
        out.append({
            "method": method, "sparsity_setting": sparsity, "bits": bits, "calibration": cal,
            "variants": [r["variant"] for r in recs], "seeds": [r["seed"] for r in recs],
            "asr": asr, "asr_range": [min(known), max(known)] if known else None,
            "cosine_at_base_source": cos, "cosine_range": [min(cos), max(cos)],
            "moved": [r.get("moved") for r in recs], "cochran_q": test,
        })  # fmt: skip
    return out


def _seed_lines(groups: list[dict[str, Any]]) -> list[str]:
    """One line per seed group of the table (:func:`seed_groups`)."""
    lines = []
    for g in groups:
        q = g.get("cochran_q") or {}
        lo, hi = g["asr_range"] or (None, None)
        asr = f"ASR {100 * lo:.0f}–{100 * hi:.0f}%" if lo is not None else "ASR –"
        test = f"Cochran's Q = {q['q']:.1f}, df = {q['df']}, p = {_p(q['p'])}" if q.get("q") is not None else "no test"
        moved = sum(bool(m) for m in g["moved"])
        lines.append(
            f"* {g['variants'][0]} over calibration seeds {', '.join(str(s) for s in g['seeds'])}: {asr} ({test}; "
            f"{q.get('discordant', '–')} prompts not judged alike by every seed), cosine at the base source "
            f"{g['cosine_range'][0]:.3f}–{g['cosine_range'][1]:.3f}, moved at {moved} of {len(g['seeds'])} seeds."
        )
    return lines


def _pct(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}]"


def _p(x: float) -> str:
    return f"{x:.2g}" if x >= 1e-3 else f"{x:.1e}"


def _vs(res: dict[str, Any] | None) -> str:
    if not res:
        return "–"
    return f"{100 * res['difference']:+.0f} pt (+{res['only_second']}/−{res['only_first']}, p = {_p(res['p'])})"


def _source(r: dict[str, Any]) -> str:
    """The point's own source (with ``--select``), and whether it left the base's stable set."""
    src = r.get("source")
    if not src:
        return "–"
    return f"L{src['layer']}/{src['position']}" + (" (shifted)" if r.get("source_shifted") else " (within noise)")


def table_markdown(state: dict[str, Any], points: list[dict[str, Any]]) -> str:
    """The sweep's table: per point its compression, movement against the noise floor, safety, cost.
    A BROKEN point (the report's rule, :func:`~refusalkit.study.report.load.broken_reason`) has its
    ASR cells marked with an asterisk: they measure a damaged model, not an unsafe one."""
    from refusalkit.study.report.load import BROKEN_DEGENERATE, BROKEN_PPL_FACTOR

    head = [
        "point", "calibration", "zeros / bits", "cos at base source", "noise floor", "moved", "source", "ASR vanilla",
        "ΔASR vs base (paired)", "over-refusal", "perplexity", "degenerate", "repaired ASR", "vs unrepaired",
        "repair", "seconds",
    ]  # fmt: skip
    base = state.get("base") or {}
    rows, broken = [], []
    for r in points:
        size = f"{100 * r['measured_sparsity']:.1f}%" if r.get("sparsity_setting") is not None else f"{r['bits']} bit"
        noise = r.get("noise") or {}
        rep = r.get("repaired") or {}
        why = point_broken(r, base)
        mark = "*" if why else ""
        if why:
            broken.append(f"{r['variant']} ({why})")
        deg = r.get("degenerate")
        rows.append([
            r["variant"] + (" (BROKEN)" if why else ""), r.get("calibration") or "–", size,
            f"{r['cosine_at_base_source']:.3f}", f"{noise['null_floor']:.3f}" if noise else "–",
            {True: "yes", False: "no", None: "–"}[r.get("moved")], _source(r), _pct(r.get("asr")) + mark,
            _vs(r.get("vs_base")) + mark, _pct(r.get("over_refusal")),
            f"{r['perplexity']:.2f}" if r.get("perplexity") else "–", "–" if deg is None else f"{100 * deg:.0f}%",
            _pct(rep.get("asr")), _vs(rep.get("vs_unrepaired")), rep.get("verdict") or "–",
            f"{(r.get('seconds_when_made') or r['seconds'])['total']:.0f}",
        ])  # fmt: skip
    lines = [
        f"# sweep {state['name']}",
        "",
        f"Base model: ASR vanilla {_pct(base.get('asr'))}, over-refusal {_pct(base.get('over_refusal'))}, "
        f"perplexity {base['perplexity']:.2f}"
        if base.get("perplexity")
        else f"Base model: ASR vanilla {_pct(base.get('asr'))}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        (f"BROKEN: {'; '.join(broken)}. " if broken else "No point is BROKEN. ")
        + f"A point is BROKEN when its perplexity exceeds {BROKEN_PPL_FACTOR:g}× the base model's or more than "
        f"{BROKEN_DEGENERATE:.0%} of its vanilla completions are degenerate; its ASR cells (*) then measure a "
        "damaged model, not an unsafe one. Seconds: the point's stages in the call that made it.",
    ]
    if state.get("seed_groups"):
        lines += ["", "The compression's own noise (points that differ only in their calibration seed):", "",
                  *_seed_lines(state["seed_groups"])]  # fmt: skip
    if state.get("failed"):
        lines += ["", "Failed points: " + "; ".join(f"{k}: {v}" for k, v in state["failed"].items())]
    return "\n".join(lines) + "\n"
