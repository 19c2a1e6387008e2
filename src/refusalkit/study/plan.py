"""The plan of ``refusalkit run``: its stages in order, with the work each one does, before anything runs.

:func:`build_plan` lists the stages :func:`refusalkit.study.run.run_all` would run, under the keys
it records in ``run.json``, with what each one does and its work in tokens: prefill tokens (prompts
read in batches) and decode tokens (generated one step at a time). A repair that depends on a
measurement (``run.repair moved``: only when the variant's direction moved) is marked *if needed*.
:mod:`refusalkit.study.estimate` turns the work into seconds, :mod:`refusalkit.study.dry_run`
prints the plan (``refusalkit run --dry-run``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from refusalkit.core.config import Config

# Tokens of an instruction in its chat template (system prompt, template and prompt), for every
# prompt: the default model's measured mean on the evaluation's prompts is about 64.
PROMPT_TOKENS = 64
POSITIONS = 5  # post-instruction positions of a chat template (the candidates' token axis)
GCG_SUFFIX = 20  # GCG suffix tokens


@dataclass
class Stage:
    key: str  # as run.json names it, e.g. wanda-0.5/evaluate
    what: str  # one line
    work: dict[str, float]  # kind -> (prefill tokens, decode tokens, seconds-at-reference) parts
    conditional: str | None = None  # why it may not run
    done: bool = False
    seconds: float | None = None  # estimated (None: not estimated)
    measured: bool = False  # the estimate is this run's own measured time


@dataclass
class Plan:
    stages: list[Stage]
    variants: list[str]  # compressed variants, every draw
    repairs: list[str]  # repaired variants (some conditional)
    notes: list[str]


def _decode_n(cfg: Config, gpu: bool) -> int:
    from refusalkit.evaluation.plan import make_plan

    return make_plan(cfg.evaluation, cfg, gpu).max_new_tokens


def _tokens(prefill: float, decode: float) -> dict[str, float]:
    return {"prefill": prefill, "decode": decode}


def _extract_work(cfg: Config, n_layers: int, *, validate: bool, select: bool) -> dict[str, dict[str, float]]:
    T = PROMPT_TOKENS
    work = {"activations": _tokens(2 * (cfg.n_train + cfg.n_val) * T, 0)}
    if select:
        s = cfg.selection
        candidates = n_layers * POSITIONS
        scored = candidates if s.mode == "full" else s.screen_keep
        screen = 0 if s.mode == "full" else candidates * s.screen_prompts
        work["select"] = _tokens((screen + scored * 3 * cfg.n_val) * T, 0)
    if validate and cfg.validation.enabled:
        n = 4 * cfg.n_test
        work["validate"] = _tokens(n * T, n * cfg.validation.max_new_tokens)
    return work


def _control_work(cfg: Config, conditions: int) -> dict[str, dict[str, float]]:
    n = conditions * cfg.n_test
    return {"control": _tokens(n * PROMPT_TOKENS, n * cfg.validation.max_new_tokens)}


def _evaluate_work(cfg: Config, gpu: bool, utility: bool) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The evaluation's tokens: vanilla (harmful, harmless, borderline) as the reference measured it, and
    each further attack and utility from the token rates (``notes``: which)."""
    from refusalkit.evaluation.plan import make_plan
    from refusalkit.study.run import harmless_prompts

    e, T = cfg.evaluation, PROMPT_TOKENS
    p = make_plan(e, cfg, gpu)
    n = e.n_prompts + harmless_prompts(cfg)
    work = {"evaluate": _tokens(n * T, n * p.max_new_tokens)}
    rated: list[str] = []
    for attack in e.attacks:
        if attack == "decoding":
            k = (e.decoding_n_prompts or e.n_prompts) * len(p.decodings) * len(p.systems)
            work["attack:decoding"] = _tokens(k * T, k * p.max_new_tokens)
        elif attack == "suffix":
            goals = p.gcg_prompts + (1 if p.gcg_universal_prompts else 0) * p.gcg_universal_prompts
            fwd = p.gcg_steps * (p.gcg_search_width + 3) * goals * (T + GCG_SUFFIX)  # candidates + fwd/bwd
            work["attack:suffix"] = _tokens(fwd, e.n_prompts * p.max_new_tokens)
        elif attack == "ablation":
            work["attack:ablation"] = _tokens(e.n_prompts * T, e.n_prompts * p.max_new_tokens)
        if attack != "vanilla":
            rated.append(attack)
    tasks = [t for t in e.utility_tasks.split(",") if t.strip() and t.strip() != "none"]
    if utility:
        items = (e.utility_limit or 1000) * max(len(tasks), 0) * 4
        work["utility"] = _tokens(items * 2 * T + e.ppl_tokens, 0)
        if tasks:
            rated.append("utility")
    return work, rated


def _compress_work(cfg: Config, spec: Any, gpu: bool) -> dict[str, dict[str, float]]:
    """Calibration tokens (twice for the float64 calibration of a CPU) and the per-weight work, which
    the reference measured for wanda and llm-int8 (``fixed``: a multiple of that measured part)."""
    c, m = cfg.compress, spec.registered
    tokens = c.n_calibration * c.seq_len if m.needs_calibration else 0
    exact = m.exact_calibration and not gpu and c.calibration_dtype != "model"
    prefill = tokens * (2 if exact else 1)
    if m.preserves:  # rp-*: one more calibration pass, and four passes over the refusal prompts (about 40 tokens each)
        prefill += tokens + 4 * 2 * c.n_refusal * 40
    return {f"compress:{spec.method}": {"prefill": prefill, "decode": 0.0, "fixed": 1.0}}


def _repair_work(cfg: Config, gpu: bool, search: bool) -> dict[str, dict[str, float]]:
    r, T = cfg.repair, PROMPT_TOKENS
    if not search:
        return {"repair:fixed": _tokens(r.ppl_tokens, 0)}
    points = 2 * len(r.scales)
    mnt = r.max_new_tokens or _decode_n(cfg, gpu)
    gen = r.confirm * 2 * r.search_prompts
    return {"repair:search": _tokens(points * 2 * r.search_prompts * T + r.confirm * r.ppl_tokens, gen * mnt)}


def build_plan(cfg: Config, gpu: bool, n_layers: int | None) -> Plan:
    """The stages ``refusalkit run`` would run with ``cfg``, in its order (which of them a run directory
    has done already, :func:`refusalkit.study.estimate.estimate` reads from its ``run.json``)."""
    from refusalkit.compress.job import CompressSpec
    from refusalkit.study.run import attacks_for

    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, attacks=attacks_for(cfg, gpu)))
    b = _Builder(cfg, gpu, n_layers or 24)
    specs = [CompressSpec.from_config(v, cfg.compress) for v in cfg.run.variants]
    b.add(
        "base/extract",
        f"difference in means ({cfg.n_train} train, {cfg.n_val} validation, {cfg.n_test} test prompts of each "
        f"kind), selection ({cfg.selection.mode}), noise floor"
        + (f", validation by generation ({cfg.validation.max_new_tokens} tokens)" if b.val else ""),
        {**_extract_work(cfg, b.L, validate=True, select=True), "noise": {"ref": cfg.noise_resamples / 200}},
    )
    if b.val:
        b.add("base/control", "control by behaviour (reuses the validation's completions)", {})
    for spec in specs:
        b.compress(spec)
    for spec in specs:
        b.variant(spec.variant)
    for v in ["base", *b.variants]:
        b.add(f"{v}/evaluate", b.eval_what, b.eval_work)
    b.repairs_of(specs)
    b.other_draws(specs)
    b.adaptive(specs)
    b.add("report", "report.md, report.html, results.json", {"report": {"ref": 1.0}})
    if b.rated:
        b.notes.append(
            f"{', '.join(b.rated)}: estimated from the token rates alone (the reference run measured vanilla only)"
        )
    return Plan(b.stages, b.variants, b.repairs, b.notes)


class _Builder:
    """The plan's stages as :func:`build_plan` adds them, in ``run_all``'s order."""

    def __init__(self, cfg: Config, gpu: bool, n_layers: int):
        self.cfg, self.gpu, self.L = cfg, gpu, n_layers
        self.val = cfg.validation.enabled
        self.stages: list[Stage] = []
        self.variants: list[str] = []
        self.repairs: list[str] = []
        self.notes: list[str] = []
        self.eval_work, self.rated = _evaluate_work(cfg, gpu, cfg.run.utility)
        e, r = cfg.evaluation, cfg.run
        self.eval_what = (
            f"{', '.join(e.attacks)} on {e.n_prompts} harmful prompts; over-refusal on {e.n_harmless} harmless"
            + (f" and {e.n_borderline} borderline" if e.borderline != "none" and e.n_borderline else "")
            + f"; {_decode_n(cfg, gpu)} new tokens"
            + ("; zero-shot utility" if r.utility and "utility" in self.rated else "; perplexity" if r.utility else "")
        )

    def add(self, key: str, what: str, work: dict[str, Any], conditional: str | None = None) -> None:
        self.stages.append(Stage(key, what, work, conditional))

    def compress(self, spec: Any, title: str | None = None) -> None:
        c = self.cfg.compress
        cal = (
            f"; calibration {c.n_calibration} x {c.seq_len} tokens of {c.calibration}, seed {spec.seed}"
            if spec.registered.needs_calibration
            else ""
        )
        self.add(f"{spec.variant}/compress", (title or spec.registered.title) + cal, _compress_work(self.cfg, spec,
                                                                                                  self.gpu))  # fmt: skip
        self.variants.append(spec.variant)

    def variant(self, v: str) -> None:
        """A compressed variant's direction, comparison and control."""
        r = self.cfg.run
        self.add(f"{v}/extract", "its own direction" + (" with validation" if r.validate_variants else ""),
                 _extract_work(self.cfg, self.L, validate=r.validate_variants, select=True))  # fmt: skip
        self.add(f"{v}/compare", "cosines with the base direction against the noise floor", {"compare": {"ref": 1.0}})
        if self.val:
            self.add(f"{v}/control", "control by behaviour of its own and the base direction",
                     _control_work(self.cfg, 6))  # fmt: skip

    def repaired(self, name: str, cond: str | None) -> None:
        """A repaired variant's direction, comparison and evaluation."""
        from refusalkit.study.run import harmless_prompts, skips_decided

        r = self.cfg.run
        self.add(f"{name}/extract", "its direction" + ("" if r.select_repaired else " at the base source"),
                 _extract_work(self.cfg, self.L, validate=r.validate_variants, select=r.select_repaired), cond)  # fmt: skip
        self.add(f"{name}/compare", "cosines with the base direction", {"compare": {"ref": 1.0}}, cond)
        if not skips_decided(self.cfg):
            self.add(f"{name}/evaluate", self.eval_what, self.eval_work, cond)
            return
        e, n_harmless = self.cfg.evaluation, harmless_prompts(self.cfg)
        # run.skip_decided: the harmless sets only when the attacks have not already failed the repair
        share = n_harmless / (e.n_prompts + n_harmless)
        ev = self.eval_work["evaluate"]
        asr = {**self.eval_work, "evaluate": {k: v * (1 - share) for k, v in ev.items()}}
        self.add(f"{name}/evaluate", f"{', '.join(e.attacks)} on {e.n_prompts} harmful prompts", asr, cond)
        self.add(f"{name}/evaluate:harmless", f"over-refusal on {n_harmless} harmless and borderline prompts",
                 {"evaluate": {k: v * share for k, v in ev.items()}}, "if its ASR does not already fail the repair")  # fmt: skip

    def repairs_of(self, specs: list[Any]) -> None:
        """``run.repair``'s repairs (the search, and the paper's edit beside it), then their follow-ups."""
        from refusalkit.repair.job import repair_name
        from refusalkit.study.run import needs_repair

        cfg, policy = self.cfg, self.cfg.run.repair
        made: list[tuple[str, str | None]] = []
        for spec in specs:
            if policy == "none" or (policy == "pruned" and not needs_repair("pruned", spec.method, None, 0)):
                continue
            cond = "if its direction moved" if policy == "moved" else None
            search = cfg.repair.alpha_scale == "auto"
            what = (
                f"AIRD: the search over edits (block, alpha, form) on {cfg.repair.search_prompts} + "
                f"{cfg.repair.search_prompts} held-out prompts"
                if search
                else f"AIRD at alpha x{cfg.repair.alpha_scale}"
            )
            self.add(f"{repair_name(spec.variant)}/repair", what, _repair_work(cfg, self.gpu, search), cond)
            made.append((repair_name(spec.variant), cond))
            if cfg.run.paper_edit:
                name = repair_name(spec.variant, paper=True)
                self.add(f"{name}/repair", "AIRD: the paper's literal edit", _repair_work(cfg, self.gpu, False), cond)
                made.append((name, cond))
        for name, cond in made:
            self.repairs.append(name)
            self.repaired(name, cond)

    def other_draws(self, specs: list[Any]) -> None:
        """``run.draws`` > 1: each calibrated variant's other draws, and the first draw's edit on each."""
        from refusalkit.repair.job import repair_name
        from refusalkit.study.run import draw_specs

        for spec in specs:
            for other in draw_specs(self.cfg, spec):
                self.compress(other, f"{spec.registered.title}, another draw")
                self.variant(other.variant)
                self.add(f"{other.variant}/evaluate", self.eval_what, self.eval_work)
                if repair_name(spec.variant) not in self.repairs:
                    continue
                name = repair_name(other.variant)
                cond = "if the first draw was repaired" if self.cfg.run.repair == "moved" else None
                self.add(f"{name}/repair", "the first draw's edit, applied unchanged",
                         _repair_work(self.cfg, self.gpu, False), cond)  # fmt: skip
                self.repaired(name, cond)
                self.repairs.append(name)

    def adaptive(self, specs: list[Any]) -> None:
        """The adaptive attacker on each search repair, its variant and the base model."""
        from refusalkit.repair.job import repair_name
        from refusalkit.study.run import ADAPTIVE, adaptive_attacks, draw_specs

        attacks = adaptive_attacks(self.cfg, self.gpu)
        searched = [s for s in specs if repair_name(s.variant) in self.repairs]
        if not attacks or not searched:
            return
        # run_all attacks every <V>+aird it made: the searched ones and the other draws' transferred edits
        sources = [s.variant for s in searched] + [o.variant for s in searched for o in draw_specs(self.cfg, s)]
        sub = dataclasses.replace(self.cfg, evaluation=dataclasses.replace(self.cfg.evaluation, attacks=attacks))
        work = {k: v for k, v in _evaluate_work(sub, self.gpu, False)[0].items() if k != "evaluate"}
        what = f"the adaptive attacker: {', '.join(a for a in ADAPTIVE if a in attacks)}"
        for v in ["base", *sources, *[repair_name(v) for v in sources]]:
            self.add(f"{v}/adaptive", what, work, None if v == "base" else "if repaired")
