"""``refusalkit run``: a model from nothing to a report, resumable.

Stages (each one skips what is already done, so an interrupted run resumes where it stopped):

1. extract, select and validate the base model's refusal direction;
2. compress the base model into every configured variant (``run.variants``);
3. re-extract every variant's direction; 4. compare it with the base direction;
5. evaluate safety (ASR per attack, over-refusal) and utility of the base model and every variant;
6. repair with AIRD the variants whose mechanism moved (``run.repair``): the search over edits
   (placement, form, α) and the paper's literal edit; 7. re-extract, compare and evaluate the
   repaired variants (is the mechanism preserved? is the ASR lower? what did utility pay?);
8. write ``report.md`` and ``report.html``.

A stage that fails on one variant with a :class:`UserError` (for example, no α within the
budgets) is recorded in ``DIR/run.json`` and the run goes on; anything else stops it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusalkit.compress.methods import PRUNING
from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.study.report.load import direction_moved

log = logging.getLogger(__name__)


def attacks_for(cfg: Config, gpu: bool) -> list[str]:
    """``run.attacks`` as the list of attacks every variant gets (``auto``: all four on a GPU, vanilla on a CPU)."""
    if cfg.run.attacks != "auto":
        return [a.strip() for a in cfg.run.attacks.split(",") if a.strip()]
    return ["vanilla", "decoding", "suffix", "ablation"] if gpu else ["vanilla"]


# the attacker who adapts to a repair (issue 14, part 5): judged against the same model it attacks
ADAPTIVE = ("decoding", "suffix", "ablation")


def adaptive_attacks(cfg: Config, gpu: bool) -> list[str]:
    """The attacks of the adaptive stage that the variants' evaluation has not run already (``[]``: no stage)."""
    if cfg.run.adaptive is False or (cfg.run.adaptive is None and not gpu):
        return []
    return [a for a in ADAPTIVE if a not in cfg.evaluation.attacks]


def needs_repair(policy: str, method: str | None, compare: dict[str, Any] | None, moved_cosine: float) -> bool:
    """Whether ``run.repair`` selects a variant (``compare``: its ``compare/<V>.json``)."""
    if policy == "none":
        return False
    if policy == "all":
        return True
    if policy == "pruned":
        return method in PRUNING
    if compare is None:
        return False
    return direction_moved(compare, moved_cosine)


class Runner:
    """Runs the stages and keeps ``DIR/run.json`` (stage status, times, recorded failures)."""

    def __init__(self, cfg: Config, root: Path, progress: bool, echo: Callable[[str], None], force: bool = False):
        self.cfg, self.root, self.progress, self.echo, self.force = cfg, root, progress, echo, force
        self.path = RunLayout(root).run_state
        self.state: dict[str, Any] = artifacts.read_json(self.path) if self.path.exists() else {}
        self.state.setdefault("stages", {})

    def stage(self, key: str, fn: Callable[[], Any], *, tolerate: bool = False) -> Any:
        from refusalkit.core.counters import since, snapshot, stage_record
        from refusalkit.models.session import release_memory

        t0, before = time.time(), snapshot()
        self.echo(f"[run] {key}")
        try:
            out = fn()
        except UserError as e:
            if not tolerate:
                raise
            self.state["stages"][key] = {"status": "failed", "why": str(e), "seconds": round(time.time() - t0, 1)}
            self._save()
            self.echo(f"[run] {key}: skipped ({e})")
            return None
        release_memory()  # a stage's models are gone: give their freed buffers back before the next loads
        prev = self.state["stages"].get(key, {})
        secs, work = round(time.time() - t0, 1), stage_record(since(before))
        kept = secs < 1 and not work["tokens"]  # a stage found done: its first time and work stay
        self.state["stages"][key] = {
            "status": "done",
            "seconds": prev.get("seconds", secs) if kept else secs,
            "forward_tokens": prev.get("forward_tokens", work["tokens"]) if kept else work["tokens"],
            "forward": prev.get("forward") if kept else work,
        }
        self._save()
        return out

    def _save(self) -> None:
        artifacts.write_json(self.path, self.state)


def _preflight(cfg: Config) -> list[Any]:
    """What can fail before any work does: unknown methods, unknown tasks, a missing optional package
    (:mod:`refusalkit.core.extras`), a refusal-preserving method asking for more prompts than the run trains on. The variants' compression specs; ``evaluation.attacks`` is set
    from ``run.attacks``."""
    import torch

    from refusalkit.compress.job import CompressSpec
    from refusalkit.core.extras import needed, require
    from refusalkit.evaluation.job import task_names

    specs = [CompressSpec.from_config(v, cfg.compress) for v in cfg.run.variants]
    for spec in specs:
        if spec.registered.preserves is not None and spec.n_refusal > cfg.n_train:
            raise UserError(
                f"{spec.variant} corrects toward compress.n_refusal = {spec.n_refusal} training prompts of each kind, "
                f"but this run trains on n_train = {cfg.n_train}; raise n_train or lower compress.n_refusal"
            )
    cfg.evaluation.attacks = attacks_for(cfg, torch.cuda.is_available() and cfg.device != "cpu")
    require(needed(cfg, utility=cfg.run.utility, methods=[s.method for s in specs]))
    if cfg.run.utility and task_names(cfg.evaluation.utility_tasks):
        from refusalkit.evaluation.utility import resolve_tasks

        resolve_tasks(task_names(cfg.evaluation.utility_tasks))
    return specs


def harmless_prompts(cfg: Config) -> int:
    """How many harmless and borderline prompts an evaluation generates."""
    e = cfg.evaluation
    return e.n_harmless + (e.n_borderline if e.borderline != "none" else 0)


def skips_decided(cfg: Config) -> bool:
    """Whether a repaired variant's harmless sets wait for its ASR (``run.skip_decided``: one draw, and
    there are harmless sets to skip)."""
    return cfg.run.skip_decided and cfg.run.draws == 1 and harmless_prompts(cfg) > 0


def evaluate_repaired(cfg: Config, root: Path, v: str, *, progress: bool, force: bool) -> dict[str, Any]:
    """Evaluate repaired variant ``v``, its harmless and borderline sets only where they can still change
    its verdict (``run.skip_decided``, one draw): the attacks first; when the repair's ASR already fails
    the rule, the repair does not work whatever over-refusal shows (:func:`refusalkit.evaluation.decide.combine`:
    one failing part decides), so those sets are not generated and ``eval/decided.json`` says why."""
    from refusalkit.evaluation.job import run_evaluate

    kw = {"utility_eval": cfg.run.utility, "progress": progress, "force": force}
    layout = RunLayout(root)
    decided = layout.eval(v, "decided.json")
    if not skips_decided(cfg):
        decided.unlink(missing_ok=True)
        return run_evaluate(cfg, root, v, **kw)
    out = run_evaluate(cfg, root, v, parts="asr", **kw)
    why = asr_decides(layout, cfg, v)
    if why is not None:
        unmeasured = ["over_refusal", "borderline"]
        artifacts.write_json(decided, {"verdict": "does not work", "why": why, "not_measured": unmeasured})
        return {**out, "decided": why}
    decided.unlink(missing_ok=True)
    return {**out, **run_evaluate(cfg, root, v, parts="harmless", **kw)}


def asr_decides(layout: RunLayout, cfg: Config, v: str) -> str | None:
    """Why repaired variant ``v``'s verdict is already "does not work" from its vanilla ASR alone (its
    ASR vs the unrepaired variant not lowered, or vs the base not back within the margin), or None."""
    from refusalkit.evaluation.decide import FAILS
    from refusalkit.study.report.load import load_run
    from refusalkit.study.report.verdicts import repair_verdict

    if not layout.eval(v, "vanilla.jsonl").is_file():  # no vanilla ASR measured: nothing decided
        return None
    run = load_run(layout, cfg)
    var = run.get(v)
    if var is None:
        return None
    verdict = repair_verdict(run, var, across=False)
    failed = [k for k in ("asr_lowered", "asr_back_to_base") if verdict.parts.get(k) == FAILS]
    if not failed:
        return None
    texts = [t for t in verdict.texts if t.startswith(("ASR vs unrepaired", "ASR vs base"))]
    return "; ".join(texts) or ", ".join(failed)


def run_all(
    cfg: Config,
    root: str | Path,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    profile: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run every stage that is not done yet (``force``: every stage, replacing what exists); return the
    report's summary (``profile``: recorded in run.json)."""
    from refusalkit.compress.job import run_compress
    from refusalkit.core.layout import prepare
    from refusalkit.direction.compare import run_compare
    from refusalkit.direction.job import run_extract
    from refusalkit.evaluation.job import run_evaluate
    from refusalkit.study.report import write_report

    root = Path(root)
    r = cfg.run
    specs = _preflight(cfg)
    prepare(cfg, root, force=force)
    run = Runner(cfg, root, progress, echo, force=force)
    if profile and profile != "as recorded":
        run.state["profile"] = profile
    _say_draws(cfg, specs, echo)
    t0 = time.time()

    def extract(v: str, validate: bool = True, select: bool = True) -> Any:
        return run_extract(cfg, root, variant=v, progress=progress, validate=validate, select=select, force=force)

    def evaluate(v: str) -> Any:
        return run_evaluate(cfg, root, v, utility_eval=r.utility, progress=progress, force=force)

    def control(v: str) -> Any:
        from refusalkit.direction.control import run_control

        if not cfg.validation.enabled:  # no held-out test split: F1 falls back to the selection scores
            return None
        return run.stage(
            f"{v}/control", lambda: run_control(cfg, root, v, progress=progress, force=force), tolerate=True
        )

    run.stage("base/extract", lambda: extract("base"))
    control("base")
    variants: list[str] = []
    for spec in specs:
        info = run.stage(
            f"{spec.variant}/compress", lambda s=spec: run_compress(cfg, root, s, force=force, progress=progress)
        )
        variants.append(info["variant"])
    compares: dict[str, Any] = {}
    for v in variants:
        run.stage(f"{v}/extract", lambda v=v: extract(v, validate=r.validate_variants))
        compares[v] = run.stage(f"{v}/compare", lambda v=v: run_compare(cfg, root, v, force=force))
        control(v)
    for v in ["base", *variants]:
        run.stage(f"{v}/evaluate", lambda v=v: evaluate(v))
    repaired = [
        name
        for spec, v in zip(specs, variants)
        for name in _repair_variant(run, cfg, root, spec, v, compares.get(v), progress)
    ]
    for v in repaired:
        run.stage(f"{v}/extract", lambda v=v: extract(v, validate=r.validate_variants, select=r.select_repaired))
        run.stage(f"{v}/compare", lambda v=v: run_compare(cfg, root, v, force=force))
        run.stage(f"{v}/evaluate", lambda v=v: evaluate_repaired(cfg, root, v, progress=progress, force=force))
    made = _other_draws(run, cfg, root, specs, variants, repaired, extract, evaluate, control)
    variants += made["variants"]
    repaired += made["repaired"]
    _adaptive(run, cfg, root, repaired, progress)
    report = run.stage("report", lambda: write_report(root))
    run.state["failed"] = sorted(k for k, v in run.state["stages"].items() if v["status"] == "failed")
    run.state["seconds_this_call"] = round(time.time() - t0, 1)
    run._save()
    return {"report": report, "variants": variants, "repaired": repaired, "state": run.state}


def _say_draws(cfg: Config, specs: list[Any], echo: Callable[[str], None]) -> None:
    """With ``run.draws`` > 1, one line per variant: how many draws it gets, at which seeds."""
    for spec in specs if cfg.run.draws > 1 else []:
        n = len(draw_specs(cfg, spec)) + 1
        why = (
            f"{spec.method} needs no calibration, so it has one draw"
            if n == 1
            else f"{n} draws, calibration seeds "
            + (f"{spec.seed}–{spec.seed + n - 1}; the repair is searched on the first and applied to the others")
        )
        echo(f"[run] {spec.variant}: {why}")


def draw_specs(cfg: Config, spec: Any) -> list[Any]:
    """The specs of ``spec``'s other compression draws under ``run.draws``: the same setting at calibration
    seeds ``compress.calibration_seed + 1 …``, named ``<variant>_seed<k>`` (as a sweep names its seed
    points); ``[]`` for a method without calibration, which has one draw."""
    if cfg.run.draws <= 1 or not spec.registered.needs_calibration:
        return []
    return [
        dataclasses.replace(spec, seed=spec.seed + k, name=f"{spec.variant}_seed{spec.seed + k}")
        for k in range(1, cfg.run.draws)
    ]


def transferred_repair(cfg: Config, root: Path, searched: str) -> Any:
    """The repair settings that apply the edit the search chose for ``searched`` (a repaired variant)
    unchanged: its α scale, placement, form of r and zeros rule; no search, no curve."""
    info = artifacts.read_json(RunLayout(root).repair_info(searched))
    return dataclasses.replace(
        cfg.repair,
        alpha_scale=f"{float(info['alpha_scale']):g}",
        placement=info["placement"],
        direction=info.get("direction", cfg.repair.direction),
        keep_zeros=bool(info.get("sparsity_preserving", cfg.repair.keep_zeros)),
        curve=False,
        compare_forms=False,
    )


def _other_draws(
    run: Runner,
    cfg: Config,
    root: Path,
    specs: list[Any],
    variants: list[str],
    repaired: list[str],
    extract: Callable[..., Any],
    evaluate: Callable[[str], Any],
    control: Callable[[str], Any],
) -> dict[str, list[str]]:
    """``run.draws`` > 1: every calibrated variant's other draws, each compressed, extracted, compared
    and evaluated as its first draw was; the edit the repair search chose on the first draw applied to
    each unchanged (``repair.json`` names the repair it was ``transferred_from``), then evaluated."""
    from refusalkit.compress.job import run_compress
    from refusalkit.direction.compare import run_compare
    from refusalkit.repair.job import repair_name, run_repair

    r, made = cfg.run, {"variants": [], "repaired": []}
    if r.draws <= 1:
        return made
    for spec, first in zip(specs, variants):
        others = draw_specs(cfg, spec)
        if not others:
            continue
        searched = repair_name(first)
        chosen = transferred_repair(cfg, root, searched) if searched in repaired else None
        for other in others:
            if _dropped_earlier(run, other.variant):  # measured and dropped by an earlier call: nothing to redo
                made["variants"].append(other.variant)
                made["repaired"] += [x for x in [repair_name(other.variant)] if x in run.state["dropped"]]
                continue
            info = run.stage(
                f"{other.variant}/compress",
                lambda s=other: run_compress(cfg, root, s, force=run.force, progress=run.progress),
            )
            v = info["variant"]
            made["variants"].append(v)
            run.stage(f"{v}/extract", lambda v=v: extract(v, validate=r.validate_variants))
            run.stage(f"{v}/compare", lambda v=v: run_compare(cfg, root, v, force=run.force))
            control(v)
            run.stage(f"{v}/evaluate", lambda v=v: evaluate(v))
            if chosen is None:
                _drop(run, root, [v])
                continue
            name = repair_name(v)

            def transfer(v: str = v, name: str = name, chosen: Any = chosen, searched: str = searched) -> Any:
                out = run_repair(cfg, root, v, repair=chosen, name=name, force=run.force, progress=run.progress)
                path = RunLayout(root).repair_info(name)
                artifacts.write_json(path, {**artifacts.read_json(path), "transferred_from": searched})
                return out

            if run.stage(f"{name}/repair", transfer, tolerate=True) is None:
                continue  # the model stays: a later call tries the transfer again
            made["repaired"].append(name)
            run.stage(
                f"{name}/extract", lambda n=name: extract(n, validate=r.validate_variants, select=r.select_repaired)
            )
            run.stage(f"{name}/compare", lambda n=name: run_compare(cfg, root, n, force=run.force))
            run.stage(f"{name}/evaluate", lambda n=name: evaluate(n))
            _drop(run, root, [v, name])
    return made


def _dropped_earlier(run: Runner, variant: str) -> bool:
    """Did an earlier call measure ``variant`` (a later draw) and delete its model (``run.drop_models``)?"""
    return run.cfg.run.drop_models and not run.force and variant in run.state.get("dropped", [])


def _drop(run: Runner, root: Path, names: list[str]) -> None:
    """``run.drop_models``: delete the model folders of a later draw and its repair once every stage on
    them is done (a failed one keeps them, for the next call), and list them in run.json's ``dropped``."""
    import shutil

    stages = run.state["stages"]
    if not run.cfg.run.drop_models or any(
        rec.get("status") != "done" for key, rec in stages.items() if key.rpartition("/")[0] in names
    ):
        return
    for name in names:
        shutil.rmtree(RunLayout(root).model(name), ignore_errors=True)
    run.state["dropped"] = sorted(set(run.state.get("dropped", [])) | set(names))
    run._save()
    run.echo(f"[run] dropped the models of {', '.join(names)} (run.drop_models; their records stay)")


def _repair_variant(
    run: Runner, cfg: Config, root: Path, spec: Any, variant: str, compare: dict[str, Any] | None, progress: bool
) -> list[str]:
    """AIRD on ``variant`` when ``run.repair`` selects it: the repair section's (by default the search
    over edits) as ``<V>+aird`` and, with ``run.paper_edit``, the paper's literal edit as
    ``<V>+aird-paper``. The names of the repaired variants made."""
    from refusalkit.repair.job import paper_edit, repair_name, run_repair

    r = cfg.run
    if not needs_repair(r.repair, spec.method, compare, r.moved_cosine):
        return []
    e = cfg.evaluation
    ppl = min(cfg.repair.ppl_tokens, e.ppl_tokens) if e.ppl_tokens >= 512 else 0
    made = []
    chosen = dataclasses.replace(cfg.repair, ppl_tokens=ppl)
    kinds = [(repair_name(variant), chosen)] + (
        [(repair_name(variant, paper=True), paper_edit(chosen))] if r.paper_edit else []
    )
    for name, settings in kinds:
        info = run.stage(
            f"{name}/repair",
            lambda s=settings, n=name: run_repair(
                cfg, root, variant, repair=s, name=n, force=run.force, progress=progress
            ),
            tolerate=True,
        )
        if info is not None:
            made.append(info["variant"])
    return made


def _adaptive(run: Runner, cfg: Config, root: Path, repaired: list[str], progress: bool) -> None:
    """The adaptive attacker on each search-repaired variant (not the paper's edit), on its unrepaired
    variant and on the base model, with the same settings, so the report compares them pairwise."""
    import torch

    from refusalkit.evaluation.job import run_evaluate
    from refusalkit.repair.job import repair_name

    attacks = adaptive_attacks(cfg, torch.cuda.is_available() and cfg.device != "cpu")
    if not attacks:
        return
    sub = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, attacks=attacks))
    targets: list[str] = []
    for name in repaired:
        src = artifacts.read_json(RunLayout(root).repair_info(name))["source_variant"]
        if name == repair_name(src):
            targets += [t for t in ("base", src, name) if t not in targets]
    for v in targets:
        run.stage(
            f"{v}/adaptive",
            lambda v=v: run_evaluate(sub, root, v, progress=progress, force=run.force, stage="adaptive"),
            tolerate=True,
        )
