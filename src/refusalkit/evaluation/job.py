"""The ``evaluate`` job: safety (attack success rate under three attacks), over-refusal and utility
of one variant of a run directory, the base model included.

Layout (``DIR/<variant>/eval/``, see :class:`~refusalkit.core.layout.RunLayout`)::

    asr.json               per attack: asr (rate, k, n, 95% Wilson interval) under the primary judge,
                           every judge's rates and their agreement, verdict shares, settings
    vanilla.jsonl          one row per prompt: prompt, attack configuration, completion, verdicts
    decoding.jsonl         one row per (prompt, decoding configuration)
    suffix.jsonl           one row per (prompt, suffix): per-prompt and universal GCG suffixes
    suffixes.json          the GCG suffixes (self mode), reusable by other variants (transfer mode)
    over_refusal.json(l)   refusal rate on held-out harmless prompts
    borderline.json(l)     refusal rate on safe prompts that look harmful (``evaluation.borderline``)
    utility.json           zero-shot accuracy per task (with standard errors) and perplexity
    <name>.settings.json   the settings each file was made with

Each attack resumes where it stopped (see :mod:`refusalkit.evaluation.records`) and is skipped
when it is complete with the same settings; ``force`` redoes it. The plan and prompts are in
:mod:`refusalkit.evaluation.plan`, the attacks in :mod:`refusalkit.evaluation.attacks`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.counters import since, snapshot
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.core.manifest import update_manifest
from refusalkit.data.prompts import load_prompts, load_refusal_phrases
from refusalkit.data.refusal import Judge, SubstringJudge
from refusalkit.evaluation.attacks import (
    attack_ablation,
    attack_decoding,
    attack_suffix,
    attack_vanilla,
    over_refusal,
)
from refusalkit.evaluation.plan import check_search_overlap, held_out, make_plan
from refusalkit.evaluation.runner import EvalContext

if TYPE_CHECKING:
    from refusalkit.models.session import Session


def task_names(text: str) -> list[str]:
    """``offline`` / ``paper`` / ``all`` / ``none`` (perplexity only) / a comma-separated list of task names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    return ["offline", "paper"] if names == ["all"] else [] if names == ["none"] else names


def utility(ctx: EvalContext) -> dict[str, Any]:
    """Zero-shot accuracy (lm-evaluation-harness on the in-memory model) and held-out perplexity,
    written to ``utility.json``; reused when it exists with the same settings."""
    from refusalkit.evaluation.perplexity import perplexity_on_corpus
    from refusalkit.evaluation.utility import evaluate_utility, resolve_tasks

    e = ctx.e
    tasks = task_names(e.utility_tasks)
    if tasks:
        resolve_tasks(tasks)
    settings = {"tasks": tasks, "limit": e.utility_limit or None, "ppl_tokens": e.ppl_tokens}
    path = ctx.file("utility.json")
    if path.exists() and not ctx.force:
        old = artifacts.read_json(path)
        if old.get("settings") == settings:
            return old
    lm = ctx.get_lm()
    t0 = time.time()
    res = (
        evaluate_utility(lm, tasks, limit=e.utility_limit or None, batch_size=min(ctx.cfg.batch_size, 16), seed=e.seed)
        if tasks
        else {"tasks": {}, "mean_acc": None, "skipped": {}}
    )
    out = {**res, "settings": settings}
    if e.ppl_tokens:
        out["perplexity"] = perplexity_on_corpus(lm, n_tokens=e.ppl_tokens)
    out["seconds"] = round(time.time() - t0, 1)
    artifacts.write_json(path, out)
    return out


def make_judges(cfg: Config) -> list[Judge]:
    """The substring judge, then the model judge when one is configured (the last judge is primary)."""
    e = cfg.evaluation
    judges: list[Judge] = [SubstringJudge(load_refusal_phrases(cfg.validation.refusal_phrases))]
    if e.judge_model:
        from refusalkit.evaluation.judges import load_model_judge

        judges.append(load_model_judge(e.judge_model, e.judge_format, dtype=cfg.dtype, device=cfg.device))
    return judges


def _run_attack(
    ctx: EvalContext, attack: str, prompts: list[str], info: dict[str, Any], splits: dict[str, Any] | None
) -> dict[str, Any]:
    """One attack's summary; the universal GCG suffix trains on the run's first harmful training prompts."""
    e, plan = ctx.e, ctx.plan
    if attack == "vanilla":
        return attack_vanilla(ctx, prompts, info)
    if attack == "ablation":
        return attack_ablation(ctx, prompts, info)
    if attack == "decoding":
        n = e.decoding_n_prompts or e.n_prompts
        return attack_decoding(ctx, prompts[:n], {**info, "n": min(n, len(prompts))})
    universal: list[str] = []
    if plan.gcg_universal_prompts:
        if not splits:
            raise UserError(
                "the universal GCG suffix trains on the run's harmful training prompts; "
                "run refusalkit extract first, or set evaluation.gcg_universal_prompts=0"
            )
        universal = splits["harmful"]["train"][: plan.gcg_universal_prompts]
    return attack_suffix(ctx, prompts, info, universal)


def _update_asr(ctx: EvalContext, attack: str, summary: dict[str, Any]) -> None:
    """Set ``asr.json``'s entry for ``attack``."""
    path = ctx.file("asr.json")
    data = artifacts.read_json(path) if path.exists() else {}
    data[attack] = summary
    data["variant"] = ctx.variant
    artifacts.write_json(path, data)


def _context(cfg: Config, layout: RunLayout, variant: str, force: bool, progress: bool) -> tuple[EvalContext, Session]:
    """The evaluation context of ``variant`` and the session that owns its model."""
    import torch

    from refusalkit.core.progress import Progress
    from refusalkit.models.session import Session

    session = Session(cfg=cfg, layout=layout, variant=variant, progress=Progress(progress))
    gpu = torch.cuda.is_available() and cfg.device != "cpu"

    def model_path() -> str:
        if variant != "base":
            return str(layout.model(variant))
        from refusalkit.models.loading import resolve_model

        return resolve_model(cfg.model)

    ctx = EvalContext(
        cfg=cfg,
        layout=layout,
        variant=variant,
        plan=make_plan(cfg.evaluation, cfg, gpu),
        force=force,
        progress=session.progress,
        judges=make_judges(cfg),
        get_lm=lambda: session.lm,
        model_path=model_path,
    )
    return ctx, session


def run_evaluate(
    cfg: Config,
    root: str | Path,
    variant: str = "base",
    *,
    utility_eval: bool = False,
    force: bool = False,
    progress: bool = True,
    parts: str = "all",
    stage: str = "evaluate",
) -> dict[str, Any]:
    """Evaluate one variant; return ``{"asr": ..., "over_refusal": ..., "utility": ..., "seconds": ...}``.
    ``parts``: ``"all"``, ``"asr"`` (the attacks and utility only) or ``"harmless"`` (the over-refusal
    sets only): a study measures a repaired variant's harmless sets only when they can still change
    its verdict. ``stage``: the manifest's name for this measurement (``{variant}/{stage}``)."""
    if parts not in ("all", "asr", "harmless"):
        raise ValueError(f"parts is all, asr or harmless, not {parts!r}")
    layout = RunLayout(root)
    if variant != "base" and not layout.has_model(variant):
        raise UserError(
            f"variant {variant!r} does not exist in {layout.root}; create it with refusalkit compress "
            "or use --variant base"
        )
    e = cfg.evaluation
    check_search_overlap(layout, variant, e)
    if utility_eval and task_names(e.utility_tasks):
        from refusalkit.evaluation.utility import resolve_tasks

        resolve_tasks(task_names(e.utility_tasks))  # an unknown task fails before any attack runs
    ctx, session = _context(cfg, layout, variant, force, progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    splits = artifacts.read_json(layout.splits) if layout.splits.exists() else None
    t0, before = time.time(), snapshot()
    result: dict[str, Any] = {"variant": variant, "asr": {}, "out": str(ctx.out)}
    prompts, info = held_out(e.prompts, e.n_prompts, splits, "harmful")
    for attack in e.attacks if parts != "harmless" else []:
        t = time.time()
        summary = _run_attack(ctx, attack, prompts, info, splits)
        summary["seconds"] = round(time.time() - t, 1)
        _update_asr(ctx, attack, summary)
        result["asr"][attack] = summary
    if e.n_harmless and parts != "asr":
        hp, hinfo = held_out(e.harmless, e.n_harmless, splits, "harmless")
        result["over_refusal"] = over_refusal(ctx, hp, hinfo)
    if e.n_borderline and e.borderline != "none" and parts != "asr":
        bp = load_prompts(e.borderline)[: e.n_borderline]
        binfo = {"source": e.borderline, "n": len(bp), "order": "source order"}
        result["borderline"] = over_refusal(ctx, bp, binfo, name="borderline")
    if utility_eval and parts != "harmless":
        result["utility"] = utility(ctx)
    session.owner.release()
    if e.backend == "vllm":  # the engine built for this variant's chunks; its GPU memory goes back
        from refusalkit.evaluation.vllm_backend import release_engine

        release_engine()
    result["seconds"] = round(time.time() - t0, 1)
    tokens = since(before)["tokens"]
    if tokens or result["seconds"] >= 1:  # something was measured (not every record found done)
        key = f"{variant}/{stage}" + ("" if parts == "all" else f":{parts}")
        update_manifest(layout.manifest, cfg.seed, key, result["seconds"], tokens=tokens)
    plan = ctx.plan
    result["plan"] = {
        "max_new_tokens": plan.max_new_tokens,
        "grid": plan.grid,
        "n_decodings": len(plan.decodings) + 1,
        "systems": plan.systems,
        "gpu": plan.gpu,
    }
    return result


__all__ = ["run_evaluate", "task_names", "utility"]
