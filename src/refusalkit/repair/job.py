"""The ``repair`` job: AIRD on a compressed variant → a new variant ``DIR/<V>+aird/``.

``DIR/<V>+aird/model/`` is the variant's checkpoint with the two edited matrices replaced (every
other file hard-linked or copied, so a 70B checkpoint costs two rewritten shards at most), and
``DIR/<V>+aird/repair.json`` records the layer, the alphas, raw or unit ``r`` and the effective
gain ``α‖r‖²``, each matrix's sparsity before and after, the norm of the change, what survived
requantization, and (``alpha_scale="auto"`` or ``curve=True``) the α curve. ``repair.json`` is
written last; its presence marks a finished repair.

Automatic α (beyond the paper): the paper's alphas times a grid of scales; at every scale the
edited model is measured on held-out prompts that the evaluation does not use — vanilla ASR,
over-refusal, degenerate rate, perplexity (and, on request, zero-shot accuracy) — then the edit
is removed bit for bit. The chosen scale is the smallest one whose ASR reaches the target (the
base model's ASR on the same prompts, or ``target_asr``) while over-refusal, degenerate rate,
perplexity and accuracy stay within the user's budgets relative to the unrepaired variant.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from refusalkit.compress.methods import PRUNING
from refusalkit.core import artifacts
from refusalkit.core.config import Config, RepairConfig, alpha_scale
from refusalkit.core.counters import since, snapshot
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.core.manifest import update_manifest
from refusalkit.core.migrate import repair_asked, stale_repair_curve
from refusalkit.core.progress import Progress
from refusalkit.models.session import Session
from refusalkit.repair.aird import PAPER_ALPHAS, PLACEMENTS, AirdEdit, Requantize, apply_aird, edit_block_index
from refusalkit.repair.checkpoint import checkpoint_tensors, model_sparsity, write_edited_checkpoint
from refusalkit.repair.edit_search import Candidate, candidates, search_edits
from refusalkit.repair.search import CURVE_MEASURES, alpha_curve, block_writes, curve_context, search_prompts

log = logging.getLogger(__name__)


def repair_name(variant: str, paper: bool = False) -> str:
    """``<V>+aird``, or ``<V>+aird-paper`` for the paper's literal edit that ``refusalkit run`` adds."""
    return f"{variant}+aird" + ("-paper" if paper else "")


def paper_edit(r: RepairConfig) -> RepairConfig:
    """The paper's literal edit: the source block, its alphas (scale 1), raw r, every weight."""
    return dataclasses.replace(r, alpha_scale="1.0", placement="source", direction="raw", keep_zeros=False, curve=False)


def _asked(r: RepairConfig, variant: str) -> dict[str, Any]:
    """The settings a finished repair is reused for (recorded in ``repair.json`` as ``asked``)."""
    return {
        "source_variant": variant,
        "alpha_scale": str(r.alpha_scale),
        "placement": r.placement,
        "direction": r.direction,
        "keep_zeros": r.keep_zeros,
    }


def _check_variant(layout: RunLayout, variant: str) -> None:
    if variant == "base":
        raise UserError("AIRD repairs a compressed variant; give --variant NAME (not base)")
    if not layout.has_model(variant):
        raise UserError(f"variant {variant!r} does not exist in {layout.root}; create it with refusalkit compress")
    if layout.repair_info(variant).exists():
        raise UserError(f"{variant} is already a repaired variant; repair its source variant instead")
    if not layout.direction("base", "direction.json").exists():
        raise UserError(
            f"{layout.root} has no base refusal direction; run refusalkit extract --run {layout.root} first"
        )


def _reusable(layout: RunLayout, name: str, variant: str, r: RepairConfig) -> dict[str, Any] | None:
    """The finished repair ``name`` when it was made with the same settings (else an error, or
    None when it must be redone); an older release's ``repair.json`` is read by :mod:`refusalkit.core.migrate`."""
    if not (layout.repair_info(name).exists() and layout.has_model(name)):
        return None
    old = artifacts.read_json(layout.repair_info(name))
    recorded, asked = repair_asked(old, _asked(r, variant), alpha_scale(r.alpha_scale))
    differ = sorted(k for k, v in asked.items() if recorded.get(k) != v)
    if differ:
        raise UserError(f"{name} exists with other settings ({', '.join(differ)}); give another --name or --force")
    stale = stale_repair_curve(old, CURVE_MEASURES)
    if stale:
        log.warning("%s %s; redoing it", name, stale)
        return None
    return {**old, "reused": True}


def _curve_scales(r: RepairConfig, unit: bool, norm: float) -> list[float]:
    """The curve's scales; with a unit ``r`` the default grid is rescaled to the raw grid's gains."""
    if unit and r.scales == RepairConfig().scales:
        return [round(s * norm**2, 4) for s in r.scales]
    return list(r.scales)


def _search(
    s: Session, r: RepairConfig, name: str, edit_for: Any, layer: int, norm: float, pruned: bool
) -> dict[str, Any]:
    """The search over edits (``alpha_scale`` auto): both placements unless one is given, the scale
    grid, the variant's form (zeros kept for a pruned variant) and, screened for comparison only,
    the other form."""
    placements = []
    for p in PLACEMENTS if r.placement == "auto" else (r.placement,):
        try:
            edit_block_index(layer, p, s.lm.n_layers)
            placements.append(p)
        except UserError:
            continue  # no block there (a direction at the first or past the last layer)
    keep = r.keep_zeros and pruned
    scales = _curve_scales(r, r.direction == "unit", norm)
    chosen_from = candidates(placements, [keep], scales)
    compared = candidates(placements, [not keep], scales) if pruned and r.compare_forms else []
    ctx = curve_context(s.cfg, s.layout, s.variant, s, r)
    first = min((edit_block_index(layer, p, s.lm.n_layers) for p in placements), default=0)
    return search_edits(ctx, edit_for, chosen_from, compared, s.layout.edit_search(name), first_block=first)


def _chosen_edit(
    s: Session, r: RepairConfig, name: str, edit_for: Any, layer: int, norm: float, pruned: bool
) -> tuple[
    Candidate, dict[str, Any] | None, dict[str, Any] | None
]:  # fmt: skip
    """The edit to apply, and the search or the α curve when one was measured."""
    scale = alpha_scale(r.alpha_scale)
    if scale == "auto":
        search = _search(s, r, name, edit_for, layer, norm, pruned)
        chosen = search["chosen"]
        if chosen is None:
            raise UserError(
                f"no edit kept {s.variant} within the budgets (search in {s.layout.edit_search(name)}); "
                "loosen the budgets or give --alpha-scale"
            )
        return Candidate(chosen["placement"], chosen["keep_zeros"], float(chosen["scale"])), search, None
    cand = Candidate(r.placement, r.keep_zeros and pruned, float(scale))
    if not r.curve:
        return cand, None, None
    unit = r.direction == "unit"
    ctx = curve_context(s.cfg, s.layout, s.variant, s, r)
    curve = alpha_curve(
        ctx, lambda x: edit_for(dataclasses.replace(cand, scale=x)), _curve_scales(r, unit, norm), unit, cand.keep_zeros
    )
    return cand, None, curve


def run_repair(
    cfg: Config,
    root: str | Path,
    variant: str,
    *,
    repair: RepairConfig | None = None,
    name: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Repair ``variant`` with AIRD as ``repair`` says (default: the config's ``repair`` section);
    return the contents of the new variant's ``repair.json``."""
    from refusalkit.compress.job import check_name

    r = repair or cfg.repair
    layout = RunLayout(root)
    _check_variant(layout, variant)
    name = name or repair_name(variant)
    check_name(name)
    if not force:
        old = _reusable(layout, name, variant, r)
        if old is not None:
            return old
    t0, before = time.time(), snapshot()
    layout.discard_analyses(name)  # the analyses of a replaced repaired variant no longer apply
    session = Session(cfg=cfg, layout=layout, variant=variant, progress=Progress(progress))
    try:
        info, tensors, slices = _repair(session, r, name)
    finally:
        session.owner.release()  # before the checkpoint is rewritten: one copy of the weights in memory
    write_edited_checkpoint(layout.model(variant), layout.model(name), tensors, slices)
    info["seconds"] = round(time.time() - t0, 1)
    artifacts.write_json(layout.repair_info(name), info)
    update_manifest(layout.manifest, cfg.seed, f"{name}/repair", info["seconds"], tokens=since(before)["tokens"])
    info["reused"] = False
    return info


def _imported_with_zeros(compression: dict[str, Any] | None) -> bool:
    """An imported variant whose weights showed pruning: its zeros are kept like a pruned variant's."""
    if (compression or {}).get("method") != "import":
        return False
    from refusalkit.compress.imported import imported_kind

    return imported_kind(compression) == "pruned"


def _repair(s: Session, r: RepairConfig, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], list]:
    """Choose α and apply the edit to the owner's model; the record, the edited state-dict entries
    and fused experts' edited slices (CPU copies; the model is restored exactly)."""
    layout, unit = s.layout, r.direction == "unit"
    base_info = artifacts.read_json(layout.direction("base", "direction.json"))
    direction = artifacts.load_tensors(layout.direction("base", "direction.safetensors"))["direction"]
    compression = artifacts.read_json(layout.compression(s.variant)) if layout.compression(s.variant).exists() else None
    scales = artifacts.load_tensors(layout.view_scales(s.variant)) if layout.view_scales(s.variant).exists() else None
    requant = Requantize.from_compression(compression, scales) if r.requantize else None
    norm = float(direction.float().norm())
    layer = int(base_info["layer"])
    pruned = (compression or {}).get("method") in PRUNING or _imported_with_zeros(compression)

    def edit_for(c: Candidate) -> AirdEdit:
        """Edit the model the owner holds now (never a model held from before a swap)."""
        return apply_aird(
            s.lm.model,
            direction,
            edit_block_index(layer, c.placement, s.lm.n_layers),
            alphas={k: a * c.scale for k, a in PAPER_ALPHAS.items()},
            unit=unit,
            keep_zeros=c.keep_zeros,
            requantize=requant,
        )

    cand, search, curve = _chosen_edit(s, r, name, edit_for, layer, norm, pruned)
    block = edit_block_index(layer, cand.placement, s.lm.n_layers)
    writes = block_writes(s.lm, s.cfg, direction, block, search_prompts(s.cfg, layout, r))
    sparsity_before = model_sparsity(s.lm.model)
    edit = edit_for(cand)
    try:
        sparsity_after = model_sparsity(s.lm.model)
        tensors, slices = checkpoint_tensors(edit), list(edit.slices)
    finally:
        edit.remove()
    info = _record(name, s.variant, r, base_info, cand, norm, edit, requant, compression)
    info.update(
        asked=_asked(r, s.variant),
        search=search,
        curve=curve,
        model_sparsity_before=sparsity_before,
        model_sparsity_after=sparsity_after,
        writes_along_r={
            **writes,
            "meaning": "mean r-hat component of what the edited block's attention (or mixer) and MLP "
            "write at the post-instruction positions of the search prompts, before the edit",
        },
        predicted_gap_change=_predicted_gap_change(writes, edit.records),
    )
    return info, tensors, slices


def _record(
    name: str,
    variant: str,
    r: RepairConfig,
    base_info: dict[str, Any],
    cand: Candidate,
    norm: float,
    edit: AirdEdit,
    requant: Requantize | None,
    compression: dict[str, Any] | None,
) -> dict[str, Any]:
    """``repair.json``'s description of the edit (the job adds the curve, sparsity and diagnostics)."""
    recs = edit.records
    info: dict[str, Any] = {
        "variant": name,
        "source_variant": variant,
        "method": "aird-sparse" if cand.keep_zeros else "aird",
        "layer": edit.block,
        "direction_layer": int(base_info["layer"]),
        "direction_position": int(base_info["position"]),
        "placement": cand.placement,
        "placement_meaning": (
            "block `direction_layer` (the paper's layer index read literally)"
            if cand.placement == "source"
            else "block `direction_layer` - 1, whose output is the stream the direction was read from"
        ),
        "direction": r.direction,
        "direction_norm": norm,
        "alphas": edit.per_role("alpha"),
        "paper_alphas": dict(PAPER_ALPHAS),
        "alpha_scale": cand.scale,
        "auto": alpha_scale(r.alpha_scale) == "auto",
        "gain": edit.per_role("gain"),
        "sparsity_preserving": cand.keep_zeros,
        "matrices": recs,
        "quantization": None,
        "compression": None if compression is None else {k: compression.get(k) for k in ("method", "sparsity", "bits")},
    }
    quant = [x["quantization"] for x in recs.values() if "quantization" in x]
    if quant:
        info["quantization"] = {
            **(requant.describe() if requant else {"method": "llm-int8", "requantized_with": "row-wise absmax int8"}),
            "survival": sum(q["survival"] for q in quant) / len(quant),
            "per_matrix": {k: x["quantization"] for k, x in recs.items() if "quantization" in x},
        }
    return info


def _predicted_gap_change(writes: dict[str, Any], recs: dict[str, Any]) -> float | None:
    """First-order change of the harmful − harmless gap along r̂ at the edited block's output."""
    try:
        gains = {rec["role"]: rec["gain"] for rec in recs.values()}
        return sum(gains[k] * (w["harmful"] - w["harmless"]) for k, w in writes.items())
    except KeyError:
        return None  # no harmless search prompts
