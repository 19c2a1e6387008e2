"""Selection plots: one figure per post-instruction position, scores across layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusalkit.core.artifacts import atomic_path


def plot_selection(
    scores: list[dict[str, Any]],
    baseline: dict[str, float],
    n_layers: int,
    cutoff: int,
    chosen: tuple[int, int],
    out_dir: Path,
    token_labels: dict[int, str],
    kl_threshold: float | None = None,
) -> list[Path]:
    """Write ``selection_pos{p}.png`` for every position ``p``; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for pos in sorted({s["position"] for s in scores}):
        rows = sorted((s for s in scores if s["position"] == pos), key=lambda s: s["layer"])
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1.3])
        for key, label, style in (
            ("screen_score", "ablation (screen)", "o:"),
            ("ablation_score", "ablation", "o-"),
            ("addition_score", "addition", "s-"),
        ):
            pts = [(s["layer"], s[key]) for s in rows if s.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label, markersize=4)
        ax.axhline(baseline["harmful_score"], color="tab:red", lw=0.8, ls="--", label="harmful baseline")
        ax.axhline(baseline["harmless_score"], color="tab:green", lw=0.8, ls="--", label="harmless baseline")
        ax.axvspan(cutoff - 0.5, n_layers + 0.5, color="0.9", label="excluded layers")
        if chosen[0] == pos:
            ax.axvline(chosen[1], color="k", lw=1, label=f"selected (layer {chosen[1]})")
        ax.set_ylabel("refusal score (log-odds)")
        ax.set_title(f"position {pos} ({token_labels.get(pos, '')!r})")
        ax.legend(fontsize=7, ncol=2)
        for key, label, style in (("screen_kl", "KL (screen)", "^:"), ("kl", "KL", "^-")):
            pts = [(s["layer"], s[key]) for s in rows if s.get(key) is not None]
            if pts:
                ax2.plot(*zip(*pts), style, color="tab:purple", markersize=4, label=label)
        if kl_threshold is not None:
            ax2.axhline(kl_threshold, color="k", lw=0.8, ls="--", label=f"KL limit {kl_threshold}")
        ax2.set_yscale("symlog", linthresh=0.01)
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize=7)
        ax2.set_ylabel("KL (harmless)")
        ax2.set_xlabel("layer (input of block)")
        fig.tight_layout()
        path = out_dir / f"selection_pos{pos}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
