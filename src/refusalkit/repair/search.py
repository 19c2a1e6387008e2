"""The α curve and the automatic α: held-out search prompts, measuring one model state, budgets and
the choice of a scale."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from refusalkit.core import artifacts
from refusalkit.core.config import Config, RepairConfig
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout


@dataclass
class SearchData:
    harmful: list[str]
    harmless: list[str]
    info: dict[str, Any]


def search_prompts(cfg: Config, layout: RunLayout, spec: RepairConfig) -> SearchData:
    """Held-out prompts for the α search, disjoint from the direction's and the evaluation's: the
    ``spec.search_prompts`` harmful and harmless prompts that follow the evaluation's in source order,
    without those that paraphrase an evaluation prompt (:func:`~refusalkit.evaluation.plan.held_out_after`)."""
    from refusalkit.evaluation.plan import held_out_after

    e, n = cfg.evaluation, spec.search_prompts
    splits = artifacts.read_json(layout.splits) if layout.splits.exists() else None
    harmful, harmful_info = held_out_after(e.prompts, e.n_prompts, n, splits, "harmful")
    harmless, harmless_info = held_out_after(e.harmless, e.n_harmless, n, splits, "harmless")
    return SearchData(harmful, harmless, {"harmful": harmful_info, "harmless": harmless_info})


def check_disjoint(layout: RunLayout, models: list[str], data: SearchData) -> None:
    """Raise :class:`UserError` when a search prompt is among the prompts ``models`` were evaluated on
    (their finished ``eval/*.jsonl`` records: an evaluation run with more prompts than the search
    skips), so a repair is never chosen on the prompts that judge it."""
    from refusalkit.evaluation.records import read_records

    wanted = {"vanilla": set(data.harmful), "over_refusal": set(data.harmless)}
    for name in models:
        for record, prompts in wanted.items():
            rows = read_records(layout.eval(name, f"{record}.jsonl")) or []
            both = prompts & {r["prompt"] for r in rows}
            if both:
                raise UserError(
                    f"{len(both)} repair search prompts are among the {record.replace('_', '-')} prompts {name} was "
                    f"evaluated on; evaluate {name} with evaluation.n_prompts / n_harmless as in this config, or "
                    "lower them here"
                )


def measure(
    lm: Any, cfg: Config, data: SearchData, spec: RepairConfig, max_new_tokens: int, perplexity: float | None = None
) -> dict[str, Any]:
    """Vanilla ASR, degenerate rate, over-refusal, perplexity (and accuracy) of the model as it is
    (``perplexity``: already measured on this state)."""
    from refusalkit.data.prompts import load_refusal_phrases
    from refusalkit.data.refusal import COMPLIANCE, DEGENERATE, REFUSAL, SubstringJudge, settle_rule
    from refusalkit.evaluation.sampling import GREEDY, sample
    from refusalkit.evaluation.stats import rate
    from refusalkit.models.chat import tokenize_instructions

    judge = SubstringJudge(load_refusal_phrases(cfg.validation.refusal_phrases))

    # harmful and harmless prompts in one call: one set of full batches instead of two smaller ones
    prompts = data.harmful + data.harmless
    ids = tokenize_instructions(lm.tokenizer, prompts, cfg.system_prompt)
    comps = [c[0] for c in sample(lm, ids, [GREEDY], max_new_tokens=max_new_tokens, batch_size=cfg.batch_size,
                                  settled=settle_rule(cfg.early_stop, [judge]))]  # fmt: skip
    all_labels = [v.label for v in judge.judge_many(prompts, comps)]
    labels, hl = all_labels[: len(data.harmful)], all_labels[len(data.harmful) :]
    out: dict[str, Any] = {
        "asr": rate(labels.count(COMPLIANCE), len(labels)),
        "degenerate_rate": labels.count(DEGENERATE) / len(labels),
        "examples": comps[:3],
        # per prompt, in the order of the search prompts: what the paired budgets compare
        "labels": {"harmful": labels},
    }
    if data.harmless:
        out["over_refusal"] = rate(hl.count(REFUSAL), len(hl))
        out["labels"]["harmless"] = hl
    if spec.ppl_tokens:
        out["perplexity"] = perplexity if perplexity is not None else search_perplexity(lm, spec)
    if spec.max_utility_drop is not None:
        from refusalkit.evaluation.utility import evaluate_utility

        out["mean_acc"] = evaluate_utility(
            lm, ["offline"], limit=spec.utility_limit, batch_size=min(cfg.batch_size, 16)
        )["mean_acc"]
    return out


def search_perplexity(lm: Any, spec: RepairConfig) -> float:
    """Perplexity of the model as it is on the last ``spec.ppl_tokens`` held-out Wikipedia tokens:
    disjoint from the first ones, which the evaluation judges on."""
    from refusalkit.evaluation.perplexity import perplexity_on_corpus

    return perplexity_on_corpus(lm, n_tokens=spec.ppl_tokens, screen=True)["perplexity"]


@torch.inference_mode()
def block_writes(lm: Any, cfg: Config, direction: torch.Tensor, block: int, data: SearchData) -> dict[str, Any]:
    """What the edited block writes along ``r̂``, before the edit (a diagnostic of the placement).

    The mean of ``r̂ᵀ·out`` over the post-instruction positions of the harmful and of the harmless
    search prompts, for what block ``block``'s attention (``attn_out``; a state-space mixer's output
    counts here too) and its MLP or mixture of experts (``mlp_down``) write. AIRD
    turns each such component ``c`` into ``(1 + α‖r‖²)·c``, so ``α‖r‖²·(c_harmful − c_harmless)``
    is the first-order change of the harmful − harmless gap along ``r̂`` at the block's output: a
    block that writes against ``r`` (negative gap) is pushed *away* from refusal by the edit.
    """
    from refusalkit.direction.forward import forward_last
    from refusalkit.models.chat import post_instruction_ids, tokenize_instructions
    from refusalkit.models.structure import branches, decoder_layers

    u = direction.detach().double() / direction.double().norm()
    n_pos = len(post_instruction_ids(lm.tokenizer, cfg.system_prompt))
    blk = decoder_layers(lm.model)[block]
    mods = [("mlp_down" if kind == "mlp" else "attn_out", m) for kind, m in branches(blk)]
    out: dict[str, Any] = {k: {} for k, _ in mods}
    for kind, prompts in (("harmful", data.harmful), ("harmless", data.harmless)):
        if not prompts:
            continue
        sums = {k: [0.0, 0] for k in out}

        def hook(key: str, sums: dict[str, list[float]] = sums):
            def fn(module, inputs, output):
                y = (output[0] if isinstance(output, (tuple, list)) else output)[:, -n_pos:, :].double()
                sums[key][0] += float((y @ u.to(y.device)).sum())
                sums[key][1] += y.shape[0] * y.shape[1]

            return fn

        handles = [m.register_forward_hook(hook(k)) for k, m in mods]
        try:
            forward_last(
                lm.model,
                tokenize_instructions(lm.tokenizer, prompts, cfg.system_prompt),
                pad_id=lm.tokenizer.pad_token_id,
                batch_size=cfg.batch_size,
                share_prefix=False,
                want_logits=False,
            )
        finally:
            for h in handles:
                h.remove()
        for k, (total, n) in sums.items():
            out[k][kind] = total / max(n, 1)
    return out


def over_refusal_excess(point: dict[str, Any], ref: dict[str, Any], spec: RepairConfig) -> str | None:
    """Why ``point`` breaks the over-refusal budget against the unrepaired ``ref``, or None.

    Both were judged on the same harmless search prompts, so the budget is paired and decided by the
    report's rule (:func:`refusalkit.evaluation.decide.not_worse` with margin
    ``max_over_refusal_increase``): it is broken only when the claim "over-refusal not above" *fails*,
    i.e. the rise is significant (exact McNemar, p < 0.05) and its estimate beyond the margin. On 32
    prompts one prompt is 3 points and most candidates are *undecided*, which the search lets
    through; the final evaluation (100 harmless and 120 borderline prompts) then decides the chosen
    edit. Points measured without per-prompt verdicts (refusalkit < 0.3.1) are judged on the rates alone."""
    if "over_refusal" not in point or "over_refusal" not in ref:
        return None
    new, old = point["over_refusal"]["rate"], ref["over_refusal"]["rate"]
    if new <= old + spec.max_over_refusal_increase + 1e-12:
        return None
    why = f"over-refusal {new:.0%} > {old:.0%} + {spec.max_over_refusal_increase:.0%}"
    a, b = point.get("labels", {}).get("harmless"), ref.get("labels", {}).get("harmless")
    if a is None or b is None or len(a) != len(b):
        return why
    from refusalkit.data.refusal import REFUSAL
    from refusalkit.evaluation.decide import FAILS, not_worse
    from refusalkit.evaluation.stats import paired

    res = paired({i: y == REFUSAL for i, y in enumerate(b)}, {i: x == REFUSAL for i, x in enumerate(a)})
    d = not_worse(res, spec.max_over_refusal_increase, "over-refusal not above")
    if d.verdict != FAILS:
        return None
    return f"{why} (+{res['only_second']}/-{res['only_first']} prompts, p = {res['p']:.2g})"


def within_budgets(point: dict[str, Any], ref: dict[str, Any], spec: RepairConfig) -> list[str]:
    """Why ``point`` breaks a budget relative to the unrepaired ``ref`` (empty: within budgets)."""
    why = []
    excess = over_refusal_excess(point, ref, spec)
    if excess:
        why.append(excess)
    if point["degenerate_rate"] > ref["degenerate_rate"] + spec.max_degenerate_increase:
        why.append(
            f"degenerate {point['degenerate_rate']:.0%} > {ref['degenerate_rate']:.0%} + "
            f"{spec.max_degenerate_increase:.0%}"
        )
    if "perplexity" in point and point["perplexity"] > ref["perplexity"] * (1 + spec.max_ppl_increase):
        why.append(f"perplexity {point['perplexity']:.1f} > {ref['perplexity']:.1f} x {1 + spec.max_ppl_increase:.2f}")
    if spec.max_utility_drop is not None and point["mean_acc"] < ref["mean_acc"] - spec.max_utility_drop:
        why.append(f"accuracy {point['mean_acc']:.3f} < {ref['mean_acc']:.3f} - {spec.max_utility_drop}")
    return why


def choose_scale(curve: list[dict[str, Any]], ref: dict[str, Any], target: float, spec: RepairConfig) -> dict[str, Any]:
    """The smallest scale within budgets whose ASR reaches ``target``; else the feasible scale with
    the lowest ASR (``target_reached`` false); ``scale`` None when no scale is within budgets."""
    feasible = [p for p in curve if not p["over_budget"]]
    reached = [p for p in feasible if p["asr"]["rate"] <= target + spec.asr_tolerance]
    if reached:
        return {"scale": min(p["alpha_scale"] for p in reached), "target_reached": True}
    if feasible:
        best = min(feasible, key=lambda p: (p["asr"]["rate"], p["alpha_scale"]))
        return {"scale": best["alpha_scale"], "target_reached": False}
    return {"scale": None, "target_reached": False}


def _cached_point(layout: RunLayout, name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A measured model state cached in ``DIR/repair/<name>.json`` when it was made with ``settings``."""
    path = layout.search_point(name)
    if path.exists():
        old = artifacts.read_json(path)
        if old.get("settings") == settings:
            return old["point"]
    return None


def _store_point(layout: RunLayout, name: str, settings: dict[str, Any], point: dict[str, Any]) -> None:
    artifacts.write_json(layout.search_point(name), {"settings": settings, "point": point})


@dataclass
class CurveContext:
    """What every point of one α curve shares."""

    cfg: Config
    layout: RunLayout
    variant: str
    session: Any  # the job's Session: its owner holds the model measured
    spec: RepairConfig
    data: SearchData
    max_new_tokens: int

    def measure(self, perplexity: float | None = None) -> dict[str, Any]:
        """The model the owner holds now, as it is (edited or not)."""
        return measure(self.session.lm, self.cfg, self.data, self.spec, self.max_new_tokens, perplexity)

    def settings(self) -> dict[str, Any]:
        """What a measured point's figures depend on (the key of the caches in ``DIR/repair/``)."""
        s = self.spec
        search = {
            "n_prompts": s.search_prompts,
            "n_harmless": s.search_prompts,
            "ppl_tokens": s.ppl_tokens,
            "ppl_part": "last",  # the last held-out tokens, disjoint from the evaluation's first ones (0.7.5)
            "near_duplicates": "dropped",  # search prompts that paraphrase an evaluation prompt are skipped (0.7.5)
            "utility_limit": s.utility_limit,
            "accuracy": s.max_utility_drop is not None,
            "per_prompt": True,  # points cached before 0.3.1 lack per-prompt verdicts: measured again
        }
        return {
            "search": search,
            "max_new_tokens": self.max_new_tokens,
            "prompts": self.data.info,
            "system_prompt": self.cfg.system_prompt,
        }


def curve_context(cfg: Config, layout: RunLayout, variant: str, session: Any, spec: RepairConfig) -> CurveContext:
    from refusalkit.evaluation.plan import make_plan

    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    mnt = spec.max_new_tokens or make_plan(cfg.evaluation, cfg, gpu).max_new_tokens
    data = search_prompts(cfg, layout, spec)
    check_disjoint(layout, ["base", variant], data)
    return CurveContext(cfg, layout, variant, session, spec, data, mnt)


def _target(ctx: CurveContext) -> tuple[dict[str, Any] | None, float, str]:
    """The ASR to reach: given, or the base model's on the search prompts (measured once, cached,
    with the owner swapped to the base model and back: one model in memory at a time)."""
    if ctx.spec.target_asr is not None:
        return None, float(ctx.spec.target_asr), "given"
    base = _cached_point(ctx.layout, "base", ctx.settings())
    if base is None:
        owner = ctx.session.owner
        owner.use("base")
        base = ctx.measure()
        owner.use(ctx.variant)
        _store_point(ctx.layout, "base", ctx.settings(), base)
    return base, base["asr"]["rate"], "base model on the search prompts"


def _unrepaired(ctx: CurveContext, state: dict[str, Any]) -> dict[str, Any]:
    """The unrepaired variant, shared by every kind of edit (cached in ``repair/<V>.unrepaired.json``)."""
    name = f"{ctx.variant}.unrepaired"
    ref = state.get("unrepaired") or _cached_point(ctx.layout, name, ctx.settings())
    if ref is None:
        ref = ctx.measure()
        _store_point(ctx.layout, name, ctx.settings(), ref)
    return ref


def _measure_points(
    ctx: CurveContext, state: dict[str, Any], path: Any, edit_at: Callable[[float], Any], scales: list[float]
) -> None:
    """Every scale not yet in ``state``: edit the owner's model, measure it, remove the edit exactly."""
    bar = ctx.session.progress.bar(len(scales), f"{ctx.variant}: alpha curve", unit="alpha")
    try:
        for s in scales:
            key = repr(float(s))
            if key not in state["points"]:
                edit = edit_at(float(s))
                try:
                    point = ctx.measure()
                finally:
                    edit.remove()
                point["alphas"] = edit.per_role("alpha")
                point["gain"] = edit.per_role("gain")
                state["points"][key] = point
                artifacts.write_json(path, state)
            bar.update(1)
    finally:
        bar.close()


# What a curve point measures (a key of the curve caches, recorded in repair.json's curve); a curve without it
# measured an unedited model (0.1.0: refusalkit.core.migrate.stale_repair_curve).
CURVE_MEASURES = "edited model"

BUDGETS = (
    "max_over_refusal_increase",
    "max_degenerate_increase",
    "max_ppl_increase",
    "max_utility_drop",
    "asr_tolerance",
)


def alpha_curve(
    ctx: CurveContext, edit_at: Callable[[float], Any], scales: list[float], unit: bool, keep_zeros: bool
) -> dict[str, Any]:
    """Measure the base model (the target), the unrepaired variant and every scale; resumable
    (:meth:`RunLayout.curve`). ``edit_at(scale)`` edits the model the owner holds now."""
    # "measures": a cached curve without it measured an unedited model; its settings differ, so it is measured again
    settings = {
        **ctx.settings(),
        "unit": unit,
        "placement": ctx.spec.placement,
        "keep_zeros": keep_zeros,
        "measures": CURVE_MEASURES,
    }
    path = ctx.layout.curve(ctx.variant, unit, ctx.spec.placement, keep_zeros)
    state = artifacts.read_json(path) if path.exists() else {}
    if state.get("settings") != settings:
        state = {"settings": settings, "points": {}}
    base, target, target_from = _target(ctx)
    ref = _unrepaired(ctx, state)
    if "unrepaired" not in state:
        state["unrepaired"] = ref
        artifacts.write_json(path, state)
    _measure_points(ctx, state, path, edit_at, scales)
    curve = [{**state["points"][repr(float(s))], "alpha_scale": float(s)} for s in scales]
    for p in curve:
        p["over_budget"] = within_budgets(p, ref, ctx.spec)
    return {
        "points": curve,
        "measures": CURVE_MEASURES,
        "unrepaired": ref,
        "base": base,
        "target_asr": target,
        "target_from": target_from,
        "chosen": choose_scale(curve, ref, target, ctx.spec),
        "budgets": {k: getattr(ctx.spec, k) for k in BUDGETS},
        "prompts": ctx.data.info,
        "max_new_tokens": ctx.max_new_tokens,
    }
