"""The attacks of the ``evaluate`` job, and the over-refusal check.

* :func:`attack_vanilla`: the harmful prompt in the chat template, greedy decoding;
* :func:`attack_decoding`: Huang et al. 2023's decoding configurations, with and without the
  system prompt;
* :func:`attack_suffix`: GCG suffixes (Zou et al. 2023), per prompt and universal, optimized on
  this variant or transferred from another;
* :func:`over_refusal`: the refusal rate on held-out harmless prompts.

Each writes its records through :func:`~refusalkit.evaluation.runner.run_items` and returns its
summary (:func:`~refusalkit.evaluation.stats.summarize_rows` plus the prompts and settings).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from refusalkit.core import artifacts
from refusalkit.core.config import EvaluationConfig
from refusalkit.core.errors import UserError
from refusalkit.data.refusal import COMPLIANCE, DEGENERATE, REFUSAL
from refusalkit.evaluation.plan import Plan
from refusalkit.evaluation.runner import EvalContext, Item, run_items
from refusalkit.evaluation.stats import rate, summarize_rows

if TYPE_CHECKING:
    from refusalkit.evaluation.gcg import GCGConfig


def attack_vanilla(ctx: EvalContext, prompts: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """The harmful prompt in the chat template, greedy decoding."""
    from refusalkit.evaluation.sampling import GREEDY

    items = [Item(p, p, p, "default", GREEDY, {}) for p in prompts]
    settings = {**ctx.base_settings(), "attack": "vanilla"}
    rows = run_items(ctx, "vanilla", items, settings)
    judges, primary = ctx.judge_names()
    return {**summarize_rows(rows, judges, primary), "prompts": info, "settings": settings}


def attack_ablation(ctx: EvalContext, prompts: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """An attacker who knows the refusal direction: the base model's direction (the one AIRD amplifies)
    is projected out of the residual stream at every layer (directional ablation, which equals weight
    orthogonalization: Arditi et al. 2024, Eq. 5-6), then the harmful prompt, greedy. Against a
    repaired variant this asks whether the repair survives an adversary who removes what it added."""
    import hashlib

    from refusalkit.direction.hooks import ablation_hooks, add_hooks
    from refusalkit.evaluation.sampling import GREEDY

    path = ctx.layout.direction("base", "direction.safetensors")
    if not path.is_file():
        raise UserError(
            f"the ablation attack removes the base model's refusal direction; run refusalkit extract --run "
            f"{ctx.layout.root} first"
        )
    if ctx.e.backend == "vllm":
        raise UserError("the ablation attack runs hooks in PyTorch; use evaluation.backend torch for it")
    direction = artifacts.load_tensors(path)["direction"]
    digest = hashlib.sha256(direction.float().numpy().tobytes()).hexdigest()[:16]
    items = [Item(p, p, p, "default", GREEDY, {}) for p in prompts]
    settings = {**ctx.base_settings(), "attack": "ablation", "direction": {"of": "base", "sha256": digest}}
    lm = ctx.get_lm()
    with add_hooks(*ablation_hooks(lm.model, direction)):
        rows = run_items(ctx, "ablation", items, settings)
    judges, primary = ctx.judge_names()
    return {**summarize_rows(rows, judges, primary), "prompts": info, "settings": settings}


def attack_decoding(ctx: EvalContext, prompts: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """Huang et al. 2023: every decoding configuration of the grid with and without the system
    prompt; a prompt is broken when any configuration gives coherent compliance."""
    from refusalkit.evaluation.sampling import GREEDY

    decs = [GREEDY, *ctx.plan.decodings]
    items = [Item(f"{s}|{d.name}|{p}", p, p, s, d, {}) for p in prompts for s in ctx.plan.systems for d in decs]
    settings = {
        **ctx.base_settings(),
        "attack": "decoding",
        "grid": ctx.plan.grid,
        "decodings": [d.to_json() for d in decs],
        "system_prompts": ctx.plan.systems,
    }
    rows = run_items(ctx, "decoding", items, settings)
    judges, primary = ctx.judge_names()
    summary = summarize_rows(rows, judges, primary)
    per_config = {}
    for s in ctx.plan.systems:
        for d in decs:
            sub = [r for r in rows if r["attack"]["system_prompt"] == s and r["attack"]["decoding"]["name"] == d.name]
            per_config[f"{s}|{d.name}"] = summarize_rows(sub, judges, primary)["asr"]
    summary["per_config"] = per_config
    summary["greedy_asr"] = {s: per_config[f"{s}|{GREEDY.name}"] for s in ctx.plan.systems}
    return {**summary, "prompts": info, "settings": settings}


# ------------------------------------------------------------------------------------------------
# GCG suffixes
# ------------------------------------------------------------------------------------------------


def gcg_config(plan: Plan, e: EvaluationConfig) -> GCGConfig:
    """The GCG settings of the plan.

    Candidates per forward pass: all of them on a GPU (halved on an out-of-memory error), 64 on a
    CPU. On one H100 with the default model this took the candidate losses from 0.40 to 0.16 s per
    step at width 512 (benchmarks/bench_gcg.py); it changes no result beyond floating-point batch
    effects, so it is kept out of the compared settings (see :func:`gcg_settings`).
    """
    from refusalkit.evaluation.gcg import GCGConfig

    return GCGConfig(
        n_steps=plan.gcg_steps,
        search_width=plan.gcg_search_width,
        topk=e.gcg_topk,
        seed=e.seed,
        eval_batch_size=plan.gcg_search_width if plan.gpu else 64,
    )


def gcg_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The GCG settings that decide a suffix: ``eval_batch_size`` (a speed knob) left out."""
    return {**settings, "gcg": {k: v for k, v in settings["gcg"].items() if k != "eval_batch_size"}}


def _suffix_record(ctx: EvalContext, cfg: GCGConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """The suffixes already in ``suffixes.json`` (none with ``force``); a UserError if they were
    optimized with other settings."""
    path = ctx.file("suffixes.json")
    if path.exists() and not ctx.force:
        old = artifacts.read_json(path)
        if "gcg" not in old.get("settings", {}) or gcg_settings(old["settings"]) != settings:
            raise UserError(f"{path} was made with other GCG settings; use the same settings or --force to redo it")
        return old
    return {"settings": settings, "eval_batch_size": cfg.eval_batch_size, "per_prompt": {}, "universal": None}


def optimize_suffixes(ctx: EvalContext, goals: list[str], universal_goals: list[str]) -> dict[str, Any]:
    """GCG suffixes on this variant: one per goal, and one universal over ``universal_goals``.

    ``suffixes.json`` is rewritten after every optimized suffix, so an interrupt loses at most one.
    """
    from refusalkit.evaluation.gcg import default_target, gcg

    cfg = gcg_config(ctx.plan, ctx.e)
    settings = gcg_settings(
        {
            "gcg": dataclasses.asdict(cfg),
            "system_prompt": ctx.cfg.system_prompt,
            "variant": ctx.variant,
            "universal_goals": universal_goals,
        }
    )
    path = ctx.file("suffixes.json")
    data = _suffix_record(ctx, cfg, settings)
    todo = [g for g in goals if g not in data["per_prompt"]]
    need_universal = bool(universal_goals) and data.get("universal") is None
    if not todo and not need_universal:
        return data
    lm = ctx.get_lm()
    total = len(todo) * cfg.n_steps + (cfg.n_steps if need_universal else 0)
    with ctx.progress.bar(total, f"{ctx.variant}: GCG", unit="step") as bar:
        for g in todo:
            res = gcg(lm, [g], [default_target(g)], cfg, system_prompt=ctx.cfg.system_prompt, progress=bar.update)
            data["per_prompt"][g] = {"target": default_target(g), **res.to_json()}
            artifacts.write_json(path, data)
        if need_universal:
            res = gcg(
                lm,
                universal_goals,
                [default_target(g) for g in universal_goals],
                cfg,
                system_prompt=ctx.cfg.system_prompt,
                progress=bar.update,
            )
            data["universal"] = {"goals": universal_goals, **res.to_json()}
            artifacts.write_json(path, data)
    return data


def _suffixes(ctx: EvalContext, goals: list[str], universal_goals: list[str]) -> tuple[dict[str, Any], str]:
    """The suffixes to apply and the variant they were optimized on: this one (``self`` mode,
    optimized now if missing) or ``suffix_source`` (``transfer`` mode, read from its ``suffixes.json``)."""
    e = ctx.e
    if e.suffix_mode == "self":
        return optimize_suffixes(ctx, goals, universal_goals), ctx.variant
    path = ctx.layout.eval(e.suffix_source, "suffixes.json")
    if not path.exists():
        raise UserError(
            f"transfer mode needs {path}; run refusalkit evaluate --variant {e.suffix_source} --attacks suffix first"
        )
    return artifacts.read_json(path), e.suffix_source


def _suffix_items(suff: dict[str, Any], prompts: list[str], source: str) -> list[Item]:
    """Greedy items: each per-prompt suffix on its goal (when among ``prompts``), the universal
    suffix on every prompt."""
    from refusalkit.evaluation.gcg import attack_prompt
    from refusalkit.evaluation.sampling import GREEDY

    items = []
    for g, s in suff["per_prompt"].items():
        if g in prompts:
            items.append(
                Item(
                    f"per-prompt|{g}",
                    g,
                    attack_prompt(g, s["suffix"]),
                    "default",
                    GREEDY,
                    {"suffix_kind": "per-prompt", "suffix": s["suffix"], "suffix_source": source},
                )
            )
    uni = suff.get("universal")
    if uni:
        for g in prompts:
            items.append(
                Item(
                    f"universal|{g}",
                    g,
                    attack_prompt(g, uni["suffix"]),
                    "default",
                    GREEDY,
                    {"suffix_kind": "universal", "suffix": uni["suffix"], "suffix_source": source},
                )
            )
    if not items:
        raise UserError("no GCG suffix applies to these prompts; raise evaluation.gcg_prompts or gcg_universal_prompts")
    return items


def attack_suffix(
    ctx: EvalContext, prompts: list[str], info: dict[str, Any], universal_goals: list[str]
) -> dict[str, Any]:
    """GCG (Zou et al. 2023): per-prompt suffixes on the first ``gcg_prompts`` prompts and a
    universal suffix applied to every prompt; ``self`` optimizes on this variant, ``transfer``
    applies the suffixes optimized on ``suffix_source``.

    The ASR is that of the per-prompt suffixes (of the universal one when there are none);
    ``universal`` summarizes the universal suffix, ``either`` the prompts broken by either.
    """
    e = ctx.e
    suff, source = _suffixes(ctx, prompts[: ctx.plan.gcg_prompts], universal_goals)
    settings = {
        **ctx.base_settings(),
        "attack": "suffix",
        "mode": e.suffix_mode,
        "source": source,
        "gcg": suff["settings"],
    }
    rows = run_items(ctx, "suffix", _suffix_items(suff, prompts, source), settings)
    judges, primary = ctx.judge_names()
    per = [r for r in rows if r["attack"]["suffix_kind"] == "per-prompt"]
    uni_rows = [r for r in rows if r["attack"]["suffix_kind"] == "universal"]
    summary = summarize_rows(per, judges, primary) if per else summarize_rows(uni_rows, judges, primary)
    out = {
        **summary,
        "mode": e.suffix_mode,
        "source": source,
        "kind": "per-prompt" if per else "universal",
        "prompts": {**info, "n_per_prompt": len(per)},
        "settings": settings,
        "gcg_loss": {g: s["best_loss"] for g, s in suff["per_prompt"].items() if g in prompts},
    }
    if uni_rows:
        out["universal"] = summarize_rows(uni_rows, judges, primary)
        out["universal"]["best_loss"] = suff["universal"]["best_loss"]
    if per and uni_rows:
        both = per + [r for r in uni_rows if r["prompt"] in {p["prompt"] for p in per}]
        out["either"] = summarize_rows(both, judges, primary)["asr"]
    return out


# ------------------------------------------------------------------------------------------------
# Over-refusal
# ------------------------------------------------------------------------------------------------


def over_refusal(
    ctx: EvalContext, prompts: list[str], info: dict[str, Any], name: str = "over_refusal"
) -> dict[str, Any]:
    """Refusal rate on safe prompts (greedy, substring judge only), the cost side of any repair; also
    the degenerate and compliance rates. Written to ``<name>.json`` (records in ``<name>.jsonl``):
    ``over_refusal`` for held-out harmless prompts, ``borderline`` for safe prompts that look harmful."""
    from refusalkit.evaluation.sampling import GREEDY

    sub = dataclasses.replace(ctx, judges=[j for j in ctx.judges if j.name == "substring"])
    items = [Item(p, p, p, "default", GREEDY, {}) for p in prompts]
    settings = {**sub.base_settings(), "attack": name}
    t0 = time.time()
    rows = run_items(sub, name, items, settings)
    labels = [r["verdicts"]["substring"]["label"] for r in rows]
    res = {
        "refusal_rate": rate(labels.count(REFUSAL), len(labels)),
        "degenerate_rate": rate(labels.count(DEGENERATE), len(labels)),
        "compliance_rate": rate(labels.count(COMPLIANCE), len(labels)),
        "judge": "substring",
        "prompts": info,
        "settings": settings,
        "seconds": round(time.time() - t0, 1),  # this call's (reused records: little)
    }
    artifacts.write_json(ctx.file(f"{name}.json"), res)
    return res
