"""Selection plots from synthetic scores (no model)."""

from __future__ import annotations

from refusalkit.direction.plots import plot_selection


def test_one_png_per_position(tmp_path):
    scores = []
    for pos in (-2, -1):
        for layer in range(6):
            s = {
                "position": pos,
                "layer": layer,
                "screen_score": -0.1 * layer,
                "screen_kl": 0.02 * layer,
                "ablation_score": None,
                "addition_score": None,
                "kl": None,
            }
            if layer in (2, 3):
                s.update(ablation_score=-0.3 * layer, addition_score=-1.0, kl=0.05)
            scores.append(s)
    paths = plot_selection(
        scores,
        {"harmful_score": -0.5, "harmless_score": -3.0},
        n_layers=6,
        cutoff=4,
        chosen=(-1, 3),
        out_dir=tmp_path,
        token_labels={-2: "a", -1: "b"},
        kl_threshold=0.1,
    )
    assert sorted(p.name for p in paths) == ["selection_pos-1.png", "selection_pos-2.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
