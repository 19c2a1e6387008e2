"""Noise floors for direction cosines: how low a cosine sampling noise alone would give.

A cosine between the base model's refusal direction and a variant's is estimated, like the
directions themselves, from a finite sample of training prompts. Even with no compression at all,
the difference in means (Arditi et al. 2024, Eq. 1) moves when the prompts are redrawn, so a
cosine of 0.96 says nothing until it is set beside the cosine that redrawing the prompts gives.

The floor, per layer at the base direction's position (its post-instruction token):

* The base model's per-prompt residual-stream activations of the training prompts are resampled
  with replacement (``B`` bootstrap resamples, harmful and harmless prompts separately, seeded).
* Each resample's difference in means ``r_b`` is compared with the full-sample ``r``:
  ``null_b = cos(r, r_b)``. The floor is the null's lower 2.5% quantile; its mean and spread are
  recorded too.
* A cosine **moved** when it lies below the floor: a cosine that low is not explained by which
  prompts happened to be drawn.

How the null matches the comparison. The base and a variant are estimated from the *same*
prompts, so their cosine carries no prompt-sampling noise of its own; it carries the per-prompt
differences between the two models' activations. A bootstrap resample shares about 63% of its
distinct prompts with the full sample, so ``cos(r, r_b)`` is lower than what the shared-prompt
comparison would give for an unchanged mechanism: the floor is **conservative** (a cosine called
moved is below it with room to spare; a small real rotation can read "within noise"). This is
the split-half null of "Cosine Similarity Is Not Evidence" (arXiv 2609.30275) made tighter: two
disjoint halves share no prompt and have half the sample each, so their cosine is lower still.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from refusalkit.direction.extract import prompt_streams
from refusalkit.models.loading import LoadedModel

METHOD = "bootstrap"
QUANTILE = 0.025


def prompt_activations(
    lm: LoadedModel,
    ids: list[list[int]],
    offset: int,
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The residual stream of every prompt at position ``offset`` (< 0, from the end) at the input
    of every block and the final stream: ``[n_prompts, L + 1, d]`` float32, in input order (the
    layers of :func:`refusalkit.direction.extract.mean_activations`)."""
    return prompt_streams(lm, ids, -offset, batch_size=batch_size, progress=progress)[:, 0]


def _resample_counts(n: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, n]`` float64 counts of each item in ``B`` bootstrap resamples of ``n`` items."""
    idx = torch.randint(0, n, (resamples, n), generator=generator)
    counts = torch.zeros((resamples, n), dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)


def bootstrap_null(
    harmful: torch.Tensor, harmless: torch.Tensor, *, resamples: int = 200, seed: int = 0
) -> torch.Tensor:
    """``[B, L + 1]``: ``cos(r, r_b)`` per layer for ``B`` bootstrap resamples of the prompts, where
    ``r`` is the difference in means of ``harmful [n_h, L + 1, d]`` and ``harmless [n_l, L + 1, d]``
    (per-prompt activations) and ``r_b`` the same on a resample (each kind resampled on its own)."""
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    if harmful.shape[0] < 2 or harmless.shape[0] < 2:
        raise ValueError("a bootstrap needs at least 2 prompts of each kind")
    g = torch.Generator().manual_seed(seed)
    h, s = harmful.double(), harmless.double()
    r = _unit(h.mean(0) - s.mean(0))  # [L + 1, d]
    ch = _resample_counts(h.shape[0], resamples, g) / h.shape[0]
    cs = _resample_counts(s.shape[0], resamples, g) / s.shape[0]
    layers, d = h.shape[1], h.shape[2]
    rb = (ch @ h.reshape(h.shape[0], -1) - cs @ s.reshape(s.shape[0], -1)).reshape(resamples, layers, d)
    return (_unit(rb) * r.unsqueeze(0)).sum(-1)


def summarize_null(null: torch.Tensor) -> dict[str, list[float]]:
    """Per layer: the null's mean, standard deviation and lower 2.5% quantile (the floor)."""
    n = null.double()
    return {
        "mean": n.mean(0).tolist(),
        "sd": (n.std(0) if n.shape[0] > 1 else torch.zeros(n.shape[1], dtype=torch.float64)).tolist(),
        "floor": torch.quantile(n, QUANTILE, dim=0).tolist(),
    }


def floors_by_position(
    harmful: torch.Tensor, harmless: torch.Tensor, positions: list[int], *, resamples: int, seed: int
) -> dict[str, Any]:
    """The null of every post-instruction position from per-prompt streams ``[n, n_pos, L + 1, d]``
    (:func:`refusalkit.direction.extract.prompt_streams`), made with the extraction's own forward so
    that the floor at the position selection picks later costs no second pass over the prompts. Each
    position's summary is the one :func:`noise_floor_record` makes there (the same resample seed)."""
    return {
        "resamples": resamples,
        "seed": seed,
        "n_prompts": {"harmful": int(harmful.shape[0]), "harmless": int(harmless.shape[0])},
        "by_position": {
            str(p): summarize_null(bootstrap_null(harmful[:, i], harmless[:, i], resamples=resamples, seed=seed))
            for i, p in enumerate(positions)
        },
    }


def noise_floor_record(
    harmful: torch.Tensor, harmless: torch.Tensor, *, layer: int, position: int, resamples: int, seed: int
) -> dict[str, Any]:
    """``base/direction/noise_floor.json``: the null per layer at the base position, and how it was made."""
    s = summarize_null(bootstrap_null(harmful, harmless, resamples=resamples, seed=seed))
    n = {"harmful": int(harmful.shape[0]), "harmless": int(harmless.shape[0])}
    return floor_record(s, n, layer=layer, position=position, resamples=resamples, seed=seed)


def floor_record(
    summary: dict[str, list[float]], n_prompts: dict[str, int], *, layer: int, position: int, resamples: int, seed: int
) -> dict[str, Any]:
    """The record of a null ``summary`` (:func:`summarize_null`) at ``position``."""
    return {
        "method": METHOD,
        "statistic": "cos(r, r_b): full-sample difference in means vs a bootstrap resample's, base model",
        "resamples": resamples,
        "seed": seed,
        "quantile": QUANTILE,
        "position": position,
        "source_layer": layer,
        "n_prompts": n_prompts,
        "by_layer": summary,
        "conservative": True,
        "meaning": "a cosine below by_layer.floor[l] is lower than redrawing the training prompts gives "
        "for the base model's own direction at layer l: it moved",
    }


def verdict(cos: float, floor: dict[str, Any], layer: int) -> dict[str, Any]:
    """The noise fields of one cosine at ``layer``: the null's mean and floor and ``moved``."""
    by = floor["by_layer"]
    return {
        "null_mean": by["mean"][layer],
        "null_sd": by["sd"][layer],
        "null_floor": by["floor"][layer],
        "moved": bool(cos < by["floor"][layer]),
    }
