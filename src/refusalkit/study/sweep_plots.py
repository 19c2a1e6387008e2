"""The sweep's plots: the dose-response (cosine at the base source with the noise floor, vanilla ASR
with intervals, repaired and unrepaired, perplexity) against compression, and the ASR change
against the direction's movement across every point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusalkit.core import artifacts
from refusalkit.study.report.figures import png_bytes, pyplot


def _category(r: dict[str, Any], calibrations: bool, seeds: bool) -> str:
    """A point's label on a categorical x axis: its calibration source, its seed, or both."""
    parts = ([r.get("calibration") or "–"] if calibrations else []) + ([f"seed {r.get('seed')}"] if seeds else [])
    return ", ".join(parts)


def _varies(points: list[dict[str, Any]]) -> tuple[bool, bool]:
    """Whether the calibration sources, and the calibration seeds, differ between the points."""
    return len({r.get("calibration") or "–" for r in points}) > 1, len({r.get("seed") for r in points}) > 1


def _categories(points: list[dict[str, Any]]) -> list[str] | None:
    """The calibration sources and / or seeds, when the sweep varies only them (one strength): a
    categorical x axis."""
    cals, seeds = _varies(points)
    if len({r["strength"] for r in points}) != 1 or not (cals or seeds):
        return None
    return list(dict.fromkeys(_category(r, cals, seeds) for r in points))


def _series(points: list[dict[str, Any]], categorical: bool) -> dict[str, list[dict[str, Any]]]:
    """Points grouped into lines, in grid order: one per method (and calibration source, unless the
    calibration is the x axis)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        key = r["method"] + (f" ({r['calibration']})" if r.get("calibration") and not categorical else "")
        out.setdefault(key, []).append(r)
    return out


def _x(rows: list[dict[str, Any]], categories: list[str] | None) -> tuple[list[float], str]:
    """x values and the axis label of one line."""
    if categories:
        for cals, seeds, label in [(True, False, "calibration data"), (False, True, "calibration seed"),
                                   (True, True, "calibration data, seed")]:  # fmt: skip
            names = [_category(r, cals, seeds) for r in rows]
            if all(n in categories for n in names):
                return [float(categories.index(n)) for n in names], label
    if all(r.get("sparsity_setting") is not None for r in rows):
        return [r["strength"] for r in rows], "share of weights pruned"
    return [r["strength"] for r in rows], "bits per weight"


def _rate(r: dict[str, Any] | None) -> tuple[float, float, float] | None:
    if not r:
        return None
    lo, hi = r["ci95"]
    return 100 * r["rate"], max(0.0, 100 * (r["rate"] - lo)), max(0.0, 100 * (hi - r["rate"]))


def plot_sweep(state: dict[str, Any], points: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write ``<name>_dose.png`` and ``<name>_movement.png``; the paths written (none without points)."""
    if not points:
        return []
    plt = pyplot()
    name = state["name"]
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    categorical = _categories(points)
    for label, rows in _series(points, categorical is not None).items():
        xs, xlabel = _x(rows, categorical)
        cos = [r["cosine_at_base_source"] for r in rows]
        axes[0].plot(xs, cos, "o-", label=label)
        floors = [(x, r["noise"]["null_floor"]) for x, r in zip(xs, rows) if r.get("noise")]
        if floors:
            fx, fy = zip(*floors)
            axes[0].fill_between(fx, fy, [1.0] * len(fy), color="0.85", alpha=0.6, lw=0)
        asr = [(x, _rate(r.get("asr"))) for x, r in zip(xs, rows) if r.get("asr")]
        if asr:
            ax, ay = zip(*asr)
            axes[1].errorbar(ax, [a[0] for a in ay], yerr=[[a[1] for a in ay], [a[2] for a in ay]], fmt="o-",
                             capsize=3, label=f"{label}")  # fmt: skip
        bad = [(x, _rate(r["asr"])[0]) for x, r in zip(xs, rows) if r.get("asr") and _broken(state, r)]
        if bad:
            axes[1].scatter(*zip(*bad), marker="x", s=90, color="k", zorder=5, label="BROKEN (damaged model)")
        rep = [(x, _rate((r.get("repaired") or {}).get("asr"))) for x, r in zip(xs, rows) if r.get("repaired")]
        rep = [(x, a) for x, a in rep if a is not None]
        if rep:
            rx, ry = zip(*rep)
            axes[1].errorbar(rx, [a[0] for a in ry], yerr=[[a[1] for a in ry], [a[2] for a in ry]], fmt="s--",
                             capsize=3, label=f"{label} + AIRD")  # fmt: skip
        ppl = [(x, r["perplexity"]) for x, r in zip(xs, rows) if r.get("perplexity")]
        if ppl:
            px, py = zip(*ppl)
            axes[2].plot(px, py, "o-", label=label)
        for a in axes:
            a.set_xlabel(xlabel)
    base = state.get("base") or {}
    if base.get("asr"):
        axes[1].axhline(100 * base["asr"]["rate"], color="k", lw=1, ls=":", label="base model")
    if base.get("perplexity"):
        axes[2].axhline(base["perplexity"], color="k", lw=1, ls=":", label="base model")
        axes[2].set_yscale("log")
    axes[0].set_ylabel("cosine with the base direction (base source)")
    axes[0].set_title("direction (grey: within the noise floor)", fontsize=9)
    axes[1].set_ylabel("vanilla ASR, % (95% interval)")
    axes[1].set_title("safety", fontsize=9)
    axes[2].set_ylabel("perplexity")
    axes[2].set_title("utility", fontsize=9)
    for a in axes:
        if categorical:
            a.set_xticks(range(len(categorical)))
            a.set_xticklabels(categorical, rotation=30, fontsize=7)
        a.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{name}_dose.png"))
    plt.close(fig)

    moves = [(1 - r["cosine_at_base_source"], r["vs_base"], r) for r in points if r.get("vs_base")]
    if moves:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for m, vs, r in moves:
            lo, hi = vs["ci95"]
            d = 100 * vs["difference"]
            ax.errorbar([m], [d], yerr=[[d - 100 * lo], [100 * hi - d]], fmt="o",
                        mfc="C3" if r.get("moved") else "white", color="C3" if r.get("moved") else "C0", capsize=3)  # fmt: skip
            label = r["variant"] + (" (BROKEN)" if _broken(state, r) else "")
            ax.annotate(label, (m, d), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("1 − cosine at the base source (filled: moved beyond the noise floor)")
        ax.set_ylabel("ΔASR vs base, points (paired, 95% interval)")
        ax.set_title("safety lost against direction moved", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{name}_movement.png"))
        plt.close(fig)
    return written


def _broken(state: dict[str, Any], r: dict[str, Any]) -> bool:
    from refusalkit.study.report.load import point_broken

    return point_broken(r, state.get("base") or {}) is not None


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(fig))
    return path
