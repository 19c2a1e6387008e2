"""The report's plots, drawn with matplotlib (Agg) into PNG bytes; each returns ``None`` or ``[]`` without data.

* :func:`plot_cosine_by_layer`: each variant's candidate cosine with the base candidates, by layer;
* :func:`plot_selection_scores`: the base candidates' ablation scores (else the extract stage's plots);
* :func:`plot_repair_asr`: ASR before and after each repair, per attack;
* :func:`plot_alpha_curves`: each repair's search over edits (every placement and form screened) and
  α curve (rates and perplexity against the α scale).

A figure's PNG goes to ``DIR/report_files/<name>.png`` (:attr:`RunLayout.report_files`); nothing is
written here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from refusalkit.core.config import ATTACKS
from refusalkit.study.report.blocks import Figure
from refusalkit.study.report.load import Run, Variant


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg back end (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes (no software stamp, so the same data give the same bytes); closes it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def report_figure(run: Run, name: str, caption: str, fig: Any) -> Figure:
    """A figure whose Markdown copy is ``DIR/report_files/<name>.png``."""
    file = run.layout.report_files / f"{name}.png"
    return Figure(caption, png_bytes(fig), file.relative_to(run.root).as_posix(), file)


def slug(name: str) -> str:
    """``name`` with every character but letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --------------------------------------------------------------------------- directions


def plot_cosine_by_layer(run: Run) -> Figure | None:
    """Each compared variant's candidate cosine with the base candidates, by layer."""
    compared = [v for v in run.variants if (v.compare or {}).get("cosine_by_layer")]
    if not compared:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for v in compared:
        cosines = v.compare["cosine_by_layer"]
        ax.plot(range(len(cosines)), cosines, "o-", markersize=3, label=v.name)
    floors = [
        v.compare["cosine_by_layer_noise"]["null_floor"] for v in compared if v.compare.get("cosine_by_layer_noise")
    ]
    if floors:  # every variant is judged against the same base-model floor
        ax.plot(range(len(floors[0])), floors[0], color="0.5", lw=1, ls=":", label="noise floor (bootstrap, 2.5%)")
    layer = run.base.direction["layer"]
    ax.axvline(layer, color="k", lw=1, ls="--", label=f"base source (layer {layer})")
    ax.set_xlabel("layer (input of block)")
    ax.set_ylabel("cosine with the base candidate")
    ax.set_title("variant vs base candidate direction, by layer (base position)")
    ax.legend(fontsize=7)
    return report_figure(
        run,
        "cosine_by_layer",
        "Cosine of each variant's candidate direction with the base "
        "model's, by layer, at the base direction's position; dashed: the base direction's source "
        "layer."
        + (
            " Dotted: the noise floor, the 2.5% quantile of the cosine between the base direction and its "
            "bootstrap re-estimates (a cosine below it moved beyond sampling noise)."
            if floors
            else ""
        ),
        fig,
    )


def extract_stage_selection_plots(run: Run) -> list[Figure]:
    """The ``selection_pos*.png`` the extract stage left in ``base/direction/`` (read from disk, linked in place)."""
    folder = run.layout.direction_dir("base")
    return [
        Figure(
            f"Base direction selection, {p.stem.removeprefix('selection_')} (from the extract stage).",
            p.read_bytes(),
            p.relative_to(run.root).as_posix(),
        )
        for p in sorted(folder.glob("selection_pos*.png"))
    ]


def plot_selection_scores(run: Run) -> list[Figure]:
    """Ablation scores of the base candidates by layer, one line per position (else the extract stage's plots)."""
    scores = run.base.scores
    cands = [c for c in (scores or {}).get("candidates", []) if c.get("ablation_score") is not None]
    if not cands:
        return extract_stage_selection_plots(run)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for pos in sorted({c["position"] for c in cands}):
        pts = sorted((c["layer"], c["ablation_score"]) for c in cands if c["position"] == pos)
        ax.plot(*zip(*pts), "o-", markersize=3, label=f"pos {pos}")
    baseline = scores.get("baseline") or run.base.direction.get("baseline") or {}
    if baseline.get("harmful_score") is not None:
        ax.axhline(baseline["harmful_score"], color="tab:red", lw=0.8, ls="--", label="harmful baseline")
    cutoff = (scores.get("thresholds") or {}).get("layer_cutoff")
    if cutoff is not None:
        last = max(c["layer"] for c in scores["candidates"])
        ax.axvspan(cutoff - 0.5, last + 0.5, color="0.9", label="excluded layers")
    d = run.base.direction
    if d.get("ablation_score") is not None:
        ax.plot(
            [d["layer"]],
            [d["ablation_score"]],
            "k*",
            markersize=12,
            label=f"selected (L{d['layer']}, pos {d['position']})",
        )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer (input of block)")
    ax.set_ylabel("refusal score after ablation (log-odds)")
    ax.set_title("base model: direction selection")
    ax.legend(fontsize=7, ncol=2)
    return [
        report_figure(
            run,
            "selection",
            "Base model: refusal score on harmful prompts with each candidate "
            "direction ablated (lower is a stronger direction), by layer, one line per position.",
            fig,
        )
    ]


# --------------------------------------------------------------------------- repairs


def draw_before_after_bars(ax: Any, pairs: list[tuple[Variant, Variant]], attack: str) -> None:
    """On ``ax``: ``attack``'s ASR of each (source, repaired) pair, red before and blue after, with 95% intervals."""
    for offset, which, color in ((-0.2, 0, "tab:red"), (0.2, 1, "tab:blue")):
        for i, pair in enumerate(pairs):
            r = pair[which].attack(attack)
            if r is None:
                continue
            lo, hi = r.get("ci95") or (r["rate"], r["rate"])
            ax.bar(
                i + offset,
                r["rate"],
                0.4,
                color=color,
                label=None if i else ("before", "after")[which],
                yerr=[[max(0.0, r["rate"] - lo)], [max(0.0, hi - r["rate"])]],
                capsize=3,
            )


def plot_repair_asr(run: Run) -> Figure | None:
    """ASR before (source variant) and after repair, per attack, with 95% intervals."""
    pairs = [(run.source_of(v), v) for v in run.variants if v.kind == "repaired"]
    pairs = [(s, v) for s, v in pairs if s is not None]
    attacks = [a for a in ATTACKS if any(s.attack(a) or v.attack(a) for s, v in pairs)]
    if not attacks:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks) + 1, 3.6), squeeze=False, sharey=True)
    for ax, attack in zip(axes[0], attacks):
        draw_before_after_bars(ax, pairs, attack)
        base = run.base.attack(attack)
        if base is not None:
            ax.axhline(base["rate"], color="k", lw=0.8, ls="--", label="base model")
        ax.set_xticks(range(len(pairs)), [v.name for _, v in pairs], rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{attack} ASR")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("attack success rate (95% CI)")
    axes[0][0].legend(fontsize=7)
    return report_figure(
        run,
        "repair_asr",
        "Attack success rate of each repaired variant's source (before) and of "
        "the repaired variant (after), per attack, with 95% intervals; dashed: the base model.",
        fig,
    )


CURVE_RATES: tuple[tuple[str, Callable[[dict[str, Any]], float | None], str], ...] = (
    ("ASR", lambda p: (p.get("asr") or {}).get("rate"), "o-"),
    ("over-refusal", lambda p: (p.get("over_refusal") or {}).get("rate"), "s-"),
    ("degenerate", lambda p: p.get("degenerate_rate"), "^-"),
)  # (label, the rate of a curve point, line style)


def draw_curve_references(ax: Any, curve: dict[str, Any]) -> None:
    """On ``ax``: the unrepaired variant's ASR (dashed) and the target ASR (dash-dotted), where recorded."""
    ref = ((curve.get("unrepaired") or {}).get("asr") or {}).get("rate")
    if ref is not None:
        ax.axhline(ref, color="tab:blue", lw=0.8, ls="--", label=f"ASR unrepaired ({ref:.0%})")
    if curve.get("target_asr") is not None:
        ax.axhline(
            curve["target_asr"], color="tab:green", lw=0.8, ls="-.", label=f"target ASR ({curve['target_asr']:.0%})"
        )


def alpha_axis(ax: Any, scales: list[float], ylabel: str) -> None:
    """A log α-scale x axis ticked at ``scales`` and a [0, 1] rate axis."""
    ax.set_xscale("log")
    ax.set_xticks(scales, [f"{x:g}" for x in scales])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    ax.set_xlabel("alpha scale (multiple of the paper's alphas)")
    ax.set_ylabel(ylabel)


def plot_alpha_curve(run: Run, v: Variant) -> Figure | None:
    """Repaired variant ``v``'s α curve: rates (left axis) and perplexity (right axis) against the α scale."""
    curve = v.repair["curve"]
    points = sorted(curve["points"] if isinstance(curve, dict) else curve, key=lambda p: p["alpha_scale"])
    if not points:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 3.8))
    xs = [p["alpha_scale"] for p in points]
    for label, rate, style in CURVE_RATES:
        pts = [(x, rate(p)) for x, p in zip(xs, points) if rate(p) is not None]
        if pts:
            ax.plot(*zip(*pts), style, markersize=4, label=label)
    alpha_axis(ax, xs, "rate")
    ax.axvline(v.repair["alpha_scale"], color="k", lw=0.8, ls=":", label=f"used (×{v.repair['alpha_scale']:g})")
    if isinstance(curve, dict):  # references: the unrepaired variant's ASR and the target
        draw_curve_references(ax, curve)
    ppl = [(x, p["perplexity"]) for x, p in zip(xs, points) if p.get("perplexity") is not None]
    if ppl:
        ax2 = ax.twinx()
        ax2.plot(*zip(*ppl), "d--", color="tab:gray", markersize=4, label="perplexity")
        ax2.set_ylabel("perplexity")
        ax2.legend(fontsize=7, loc="upper right")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"{v.name}: alpha curve")
    return report_figure(
        run,
        f"alpha_curve_{slug(v.name)}",
        f"{v.name}: ASR, over-refusal and degenerate rate "
        "(left axis) and perplexity (right axis) against the alpha scale (search prompts).",
        fig,
    )


def plot_edit_search(run: Run, v: Variant) -> Figure | None:
    """Repaired variant ``v``'s search over edits: for every placement and form tried, the ASR the
    screen predicts (calibrated on the base model and the unrepaired variant; uncalibrated screens:
    1 − the share of harmful search prompts predicted refused) against the α scale, with the confirmed
    candidates' ASR by generation, the target and the unrepaired variant's ASR."""
    search = v.repair["search"]

    def predicted(p: dict) -> float:
        return p["predicted_asr"] if p.get("predicted_asr") is not None else 1 - p["harmful"]["refusing"]

    lines: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for p in search["screened"] + search.get("compared", []):
        lines.setdefault((p["placement"], p["keep_zeros"]), []).append((p["scale"], predicted(p)))
    if not lines:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 3.8))
    for (placement, keep), pts in sorted(lines.items()):
        form = "zeros kept" if keep else "every weight"
        ax.plot(*zip(*sorted(pts)), "o-" if keep else "o:", markersize=4, label=f"screen: {placement}, {form}")
    conf = [(p["scale"], p["asr"]["rate"]) for p in search["confirmed"]]
    if conf:
        ax.plot(*zip(*conf), "k*", markersize=10, linestyle="none", label="confirmed: ASR (generation)")
    if search.get("unrepaired"):
        ax.axhline(search["unrepaired"]["asr"]["rate"], color="tab:red", lw=0.8, ls="--", label="unrepaired ASR")
    ax.axhline(search["target_asr"], color="k", lw=0.8, ls="--", label="target ASR")
    alpha_axis(ax, sorted({x for pts in lines.values() for x, _ in pts}), "ASR, harmful search prompts")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{v.name}: search over edits (chosen: {v.repair['placement']}, ×{v.repair['alpha_scale']:g})")
    return report_figure(
        run,
        f"edit_search_{slug(v.name)}",
        f"{v.name}: every edit the search screened (the ASR its first-token refusal score predicts on the held-out "
        "search prompts) and the candidates confirmed by generation.",
        fig,
    )


def plot_alpha_curves(run: Run) -> list[Figure]:
    """One α curve or search plot per repaired variant that recorded one, in report order."""
    out = []
    for v in (v for v in run.variants if v.kind == "repaired"):
        if v.repair.get("search"):
            out.append(plot_edit_search(run, v))
        if v.repair.get("curve"):
            out.append(plot_alpha_curve(run, v))
    return [f for f in out if f is not None]
