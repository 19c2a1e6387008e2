"""Mechanism comparison: the refusal direction of a compressed variant against the base model's.

Both directions come from the same pipeline (difference in means at every layer and
post-instruction position, Arditi et al. 2024 Eq. 1; selection as in their App. C), so the
candidate tensors ``[positions, L + 1, d]`` of the base and of the variant are indexed alike.
Chhabra & Khalili 2025 (§4) compare a compressed model's direction with the original one by

* its **source** — the (layer, position) the selection picks — and whether it moved, and
* the **cosine similarity** ``cos(r, r') = r·r' / (‖r‖ ‖r'‖)`` between the two selected
  directions (their Tables 2–3: pruned 0.34–0.90, quantized > 0.99).

We add the cosine of the variant's candidate at the base source (the same stream, so it isolates
how compression rotated the direction from where the selection went), the cosine at every layer
at the base position, the layer × layer cosine matrix, and the direction's quality on the
variant: the variant's own ablation/addition scores and, on the variant model, those of the
*base* direction (does the original direction still mediate refusal after compression?).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.counters import since, snapshot
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.core.manifest import update_manifest


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``a·b / (‖a‖ ‖b‖)`` in float64 (0 when either vector is zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else 0.0


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``M[i, j] = cos(a[i], b[j])`` for row vectors ``a [n, d]``, ``b [m, d]`` (float64)."""
    an = a.double() / a.double().norm(dim=-1, keepdim=True).clamp(min=1e-30)
    bn = b.double() / b.double().norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return an @ bn.T


def _source(info: dict[str, Any]) -> dict[str, Any]:
    return {"layer": int(info["layer"]), "position": int(info["position"]), "token": info.get("token")}


def single_direction(info: dict[str, Any], validation: dict[str, Any] | None) -> dict[str, Any]:
    """Does ablating the direction lower refusal and adding it induce refusal? (Arditi's two tests.)

    By generation when the variant was validated (refusal rates on held-out prompts), else by the
    selection scores (refusal log-odds against the unsteered baseline).
    """
    if validation:
        drop = validation["harmful_refusal_rate"] - validation["harmful_refusal_rate_ablated"]
        rise = validation["harmless_refusal_rate_added"] - validation["harmless_refusal_rate"]
        basis = "refusal rates by generation on held-out prompts"
    else:
        drop = info["baseline"]["harmful_score"] - info["ablation_score"]
        rise = info["addition_score"] - info["baseline"]["harmless_score"]
        basis = "refusal scores (log-odds) on validation prompts"
    return {
        "holds": bool(drop > 0 and rise > 0),
        "ablation_lowers_refusal_by": drop,
        "addition_raises_refusal_by": rise,
        "basis": basis,
    }


def compare_directions(
    base_cands: torch.Tensor,
    var_cands: torch.Tensor,
    base_info: dict[str, Any],
    var_info: dict[str, Any] | None,
    floor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The comparison record of two runs' candidates ``[n_pos, L + 1, d]`` and selections.

    ``var_info`` None: the variant's candidates were extracted without a selection (a sweep point,
    a repaired variant with ``run.select_repaired`` off); everything about its own source is then
    None and the base-position cosines carry the comparison. ``floor``: the base model's noise floor
    (:mod:`refusalkit.direction.noise`, made at the base position); every base-position cosine then
    gets the null's mean and floor and ``moved`` (below the floor), and ``moved`` itself is the
    verdict at the base source."""
    if base_cands.shape != var_cands.shape:
        raise UserError(
            f"the base and variant candidates differ in shape ({list(base_cands.shape)} vs "
            f"{list(var_cands.shape)}); both must come from the same model architecture and chat template"
        )
    from refusalkit.direction.stability import in_stable_set

    n_pos = base_cands.shape[0]
    b = _source(base_info)
    bi = b["position"] + n_pos
    r_base = base_cands[bi, b["layer"]]
    at_base = var_cands[bi, b["layer"]]
    mat = cosine_matrix(base_cands[bi], var_cands[bi])
    by_pos = [cosine(base_cands[p, b["layer"]], var_cands[p, b["layer"]]) for p in range(n_pos)]
    own: dict[str, Any] = dict.fromkeys(
        ("variant_source", "source_changed", "source_shift_within_noise", "source_shifted", "layer_shift",
         "position_shift", "cosine_selected", "norm_ratio_selected"),
    )  # fmt: skip
    selected = None
    if var_info is not None:
        v = _source(var_info)
        r_var = var_cands[v["position"] + n_pos, v["layer"]]
        selected = cosine(r_base, r_var)
        changed = (b["layer"], b["position"]) != (v["layer"], v["position"])
        within = in_stable_set(base_info.get("source_stability"), v["layer"], v["position"]) if changed else None
        own = {
            "variant_source": v,
            # with the base selection's stability record: a change of source into the base model's own
            # stable set is within noise and does not count as shifted
            "source_changed": changed,
            "source_shift_within_noise": within,
            "source_shifted": bool(changed and not within),
            "layer_shift": v["layer"] - b["layer"],
            "position_shift": v["position"] - b["position"],
            "cosine_selected": selected,
            "norm_ratio_selected": float(r_var.norm() / r_base.norm().clamp(min=1e-30)),
        }
    at_base_cos = cosine(r_base, at_base)
    return {
        "base_source": b,
        **own,
        "selected": var_info is not None,
        "base_stable_set": (base_info.get("source_stability") or {}).get("stable_set"),
        "cosine_at_base_source": at_base_cos,
        "cosine_by_layer": torch.diagonal(mat).tolist(),
        "cosine_by_position": {str(p - n_pos): c for p, c in enumerate(by_pos)},
        "cosine_matrix": mat.tolist(),
        "cosine_matrix_meaning": "[i][j] = cos(base candidate at layer i, variant candidate at layer j), base position",
        "norm_ratio_at_base_source": float(at_base.norm() / r_base.norm().clamp(min=1e-30)),
        "n_layers": base_cands.shape[1] - 1,
        **_noise_fields(floor, b, mat, selected, at_base_cos),
    }


def _noise_fields(
    floor: dict[str, Any] | None, b: dict[str, Any], mat: torch.Tensor, selected: float | None, at_base: float
) -> dict[str, Any]:
    """The noise-floor verdicts of :func:`compare_directions` (``moved`` is None without a floor)."""
    from refusalkit.direction.noise import verdict

    if floor is None or int(floor["position"]) != b["position"]:
        why = "no noise floor (noise_resamples 0)" if floor is None else "the noise floor is of another position"
        return {"moved": None, "noise": {"method": None, "why": why}}
    layer = b["layer"]
    by_layer = [verdict(float(c), floor, i) for i, c in enumerate(torch.diagonal(mat).tolist())]
    return {
        "moved": verdict(at_base, floor, layer)["moved"],
        "noise": {
            k: floor[k] for k in ("method", "statistic", "resamples", "seed", "quantile", "n_prompts", "conservative")
        },
        "cosine_at_base_source_noise": verdict(at_base, floor, layer),
        # the selected directions may sit elsewhere: judged against the floor at the base source
        "cosine_selected_noise": None if selected is None else verdict(selected, floor, layer),
        "cosine_by_layer_noise": {
            "null_mean": [v["null_mean"] for v in by_layer],
            "null_floor": [v["null_floor"] for v in by_layer],
            "moved": [v["moved"] for v in by_layer],
        },
    }


def _direction_files(
    layout: RunLayout, variant: str, need_selection: bool = True
) -> tuple[torch.Tensor, dict[str, Any] | None, dict[str, Any] | None]:
    """``(candidates, direction.json or None, validation.json or None)``; a variant extracted without a
    selection (candidates only) has no direction.json, which only the base model must have."""
    cand, info = layout.direction(variant, "candidates.safetensors"), layout.direction(variant, "direction.json")
    if not cand.exists() or (need_selection and not info.exists()):
        raise UserError(
            f"{variant} has no refusal direction in {layout.direction_dir(variant)}; run refusalkit "
            f"extract --run {layout.root} --variant {variant} first"
        )
    val = layout.direction(variant, "validation.json")
    return (
        artifacts.load_tensors(cand)["candidates"],
        artifacts.read_json(info) if info.exists() else None,
        artifacts.read_json(val) if val.exists() else None,
    )


def base_direction_quality(cfg: Config, layout: RunLayout, variant: str, base_info: dict[str, Any]) -> dict[str, Any]:
    """Ablation score, addition score and KL of the *base* direction on the variant model,
    scored exactly as in selection (the run's validation prompts)."""
    from refusalkit.direction.select import Scorer, default_refusal_ids
    from refusalkit.models.chat import post_instruction_ids, tokenize_instructions
    from refusalkit.models.session import Session

    s = Session(cfg=cfg, layout=layout, variant=variant)
    lm = s.lm
    data = artifacts.read_json(layout.splits)
    direction = artifacts.load_tensors(layout.direction("base", "direction.safetensors"))["direction"]
    n_pos = len(post_instruction_ids(lm.tokenizer, cfg.system_prompt))
    scorer = Scorer(
        lm,
        tokenize_instructions(lm.tokenizer, data["harmful"]["val"], cfg.system_prompt),
        tokenize_instructions(lm.tokenizer, data["harmless"]["val"], cfg.system_prompt),
        default_refusal_ids(lm.tokenizer),
        n_pos,
        batch_size=cfg.batch_size,
    )
    abl, add, kl = scorer.full(direction.unsqueeze(0), [int(base_info["layer"])])[0]
    s.owner.release()
    return {
        "ablation_score": abl,
        "addition_score": add,
        "kl": kl,
        "baseline": scorer.baseline(),
        "layer": int(base_info["layer"]),
    }


def run_compare(
    cfg: Config, root: str | Path, variant: str, *, quality: bool = True, force: bool = False
) -> dict[str, Any]:
    """Write (or reuse) ``DIR/compare/<variant>.json``."""
    layout = RunLayout(root)
    if variant == "base":
        raise UserError("compare a compressed variant with the base model: give --variant NAME (not base)")
    out = layout.compare(variant)
    t0, before = time.time(), snapshot()
    base_cands, base_info, _ = _direction_files(layout, "base")
    var_cands, var_info, var_val = _direction_files(layout, variant, need_selection=False)
    assert base_info is not None
    from refusalkit.direction.job import ensure_noise_floor

    floor = ensure_noise_floor(cfg, root)
    inputs = {
        name: {k: (info or {}).get(k) for k in ("layer", "position", "norm")}
        for name, info in (("base", base_info), ("variant", var_info))
    }
    # candidates re-extracted without a selection change only the candidate file
    cand_bytes = layout.direction(variant, "candidates.safetensors").read_bytes()
    inputs["variant"]["candidates_sha256"] = hashlib.sha256(cand_bytes).hexdigest()[:16]
    inputs["noise"] = None if floor is None else {k: floor[k] for k in ("position", "resamples", "seed")}
    if out.exists() and not force:
        old = artifacts.read_json(out)
        fresh = old.get("inputs") == inputs  # a re-extracted direction makes the comparison stale
        if fresh and (old.get("quality", {}).get("base_direction_on_variant") is not None or not quality):
            return old
    res = {
        "variant": variant,
        "base": "base",
        "inputs": inputs,
        **compare_directions(base_cands, var_cands, base_info, var_info, floor),
    }
    res["quality"] = {
        "variant_direction": None
        if var_info is None
        else {k: var_info[k] for k in ("ablation_score", "addition_score", "kl", "baseline")},
        "base_direction_on_variant": base_direction_quality(cfg, layout, variant, base_info) if quality else None,
    }
    res["validation"] = (
        None
        if var_val is None
        else {
            k: var_val[k]
            for k in (
                "harmful_refusal_rate",
                "harmful_refusal_rate_ablated",
                "harmless_refusal_rate",
                "harmless_refusal_rate_added",
            )
        }
    )
    sd = single_direction(var_info, var_val) if var_info is not None else None
    res["single_direction"] = None if sd is None else sd["holds"]
    res["single_direction_evidence"] = sd
    res["fallback"] = None if var_info is None else var_info.get("fallback")
    res["seconds"] = round(time.time() - t0, 1)
    artifacts.write_json(out, res)
    update_manifest(layout.manifest, cfg.seed, f"{variant}/compare", res["seconds"], tokens=since(before)["tokens"])
    return res
