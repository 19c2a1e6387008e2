"""``refusalkit sweep``: the dose-response of the refusal mechanism over compression strength and
calibration data (issue 15, part 4).

A sweep is a grid of compression points — methods × sparsities (ratios or N:M) or bit widths ×
calibration sources × calibration seeds. Each point is an ordinary variant of the run directory
(every other command works on it), taken through the same stages as in ``refusalkit run``:

1. compress (a variant that exists must have been made with the same settings);
2. extract its candidate directions (the cosine at the base source needs no selection; with
   ``select`` the variant's own direction is selected too);
3. compare with the base direction, with the base model's noise floor
   (:mod:`refusalkit.direction.noise`): the cosine at the base source and whether it moved;
4. evaluate: the sweep's attacks (vanilla by default), over-refusal and perplexity, and the vanilla
   ASR paired with the base model's on the same prompts (exact McNemar);
5. optionally repair it (the configured AIRD repair) and evaluate the repair.

Points run in turn (the local executor); each stage skips what exists, so an interrupted sweep
resumes where it stopped and a finished point costs nothing. ``DIR/sweep/<name>.json`` is
rewritten after every point; ``<name>.md`` holds the table and ``<name>_dose.png`` /
``<name>_movement.png`` the plots. Points that differ only in their calibration seed measure the
compression's own noise: the sweep records the spread of their cosines and ASRs and Cochran's Q on
their vanilla outcomes (:func:`seed_groups`: do the seeds give one ASR?).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.core.migrate import migrate_sweep_state
from refusalkit.study.sweep_grid import (  # noqa: F401 (the grid's names, re-exported)
    GRID_KEYS,
    SPEC_KEYS,
    Point,
    build_points,
    check_calibration,
    parse_items,
    parse_seeds,
    point_spec,
    read_grid,
)


def check_existing(layout: RunLayout, cfg: Config, points: list[Point]) -> None:
    """A point whose variant exists but was made with other settings: one line, before any work."""
    for p in points:
        path = layout.compression(p.name)
        if not path.exists():
            continue
        recorded = artifacts.read_json(path).get("spec") or {}
        want = dataclasses.asdict(point_spec(cfg, p))
        diff = [k for k in SPEC_KEYS if k in recorded and recorded[k] != want.get(k)]
        if diff:
            raise UserError(
                f"variant {p.name} exists in {layout.root} with other settings ({', '.join(diff)}); "
                f"give --force to redo it, or run the sweep in another run directory"
            )


def _paired(layout: RunLayout, first: str, second: str) -> dict[str, Any] | None:
    """Vanilla ASR of ``second`` against ``first`` on the same prompts (exact McNemar)."""
    from refusalkit.evaluation.stats import paired
    from refusalkit.study.report.load import Variant

    a, b = Variant.load(layout, first).outcomes("vanilla"), Variant.load(layout, second).outcomes("vanilla")
    if a is None or b is None:
        return None
    res = paired(a, b)
    return res if res["n"] else None


def _repair_verdict(layout: RunLayout, fixed: str) -> dict[str, Any]:
    """The report's verdict on repaired variant ``fixed`` (works / does not work / undecided / not
    fully measured) and its parts' decisions (:func:`refusalkit.study.report.verdicts.repair_verdict`)."""
    from refusalkit.study.report.load import load_run
    from refusalkit.study.report.verdicts import repair_verdict

    run = load_run(layout)
    rv = repair_verdict(run, run.get(fixed))
    return {"verdict": rv.works, "decisions": rv.decisions}


def _eval_summary(layout: RunLayout, variant: str) -> dict[str, Any]:
    """Vanilla ASR (and other attacks'), over-refusal, borderline refusal, perplexity and the share
    of degenerate vanilla completions of an evaluated variant."""
    from refusalkit.study.report.load import Variant

    v = Variant.load(layout, variant)
    ppl = (v.utility or {}).get("perplexity")
    return {
        "asr": v.attack("vanilla"),
        "attacks": {k: r["asr"] for k, r in v.asr.items() if "asr" in r},
        "over_refusal": (v.over_refusal or {}).get("refusal_rate"),
        "borderline": (v.borderline or {}).get("refusal_rate"),
        "perplexity": ppl.get("perplexity") if isinstance(ppl, dict) else None,
        "degenerate": v.degenerate_rate,
    }


def _dropped_and_finished(layout: RunLayout, name: str, select: bool, attacks: list[str]) -> bool:
    """A point whose model folder ``--drop-models`` removed after every stage this sweep asks for
    had finished: its records stand (re-compressing it would discard them and redo the point)."""
    done = [layout.compression(name), layout.compare(name), layout.eval(name, "asr.json")]
    if select:
        done.append(layout.direction(name, "direction.json"))
    if layout.has_model(name) or not all(f.is_file() for f in done):
        return False
    return set(attacks) <= set(artifacts.read_json(layout.eval(name, "asr.json")))


def run_point(
    cfg: Config,
    root: Path,
    p: Point,
    *,
    select: bool,
    repair: bool,
    drop_models: bool,
    progress: bool,
    echo: Callable[[str], None],
    force: bool = False,
) -> dict[str, Any]:
    """Every stage of one point (each reuses what exists, unless ``force``); the point's record."""
    from refusalkit.compress.job import run_compress
    from refusalkit.direction.compare import run_compare
    from refusalkit.direction.job import run_extract
    from refusalkit.evaluation.job import run_evaluate

    layout = RunLayout(root)
    seconds: dict[str, float] = {}

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        echo(f"[sweep] {p.name}/{stage}")
        t0 = time.time()
        out = fn()
        seconds[stage] = round(time.time() - t0, 1)
        return out

    # a worker killed mid-write (a Ray retry) left temporary files in this point's own folders
    artifacts.remove_partial_writes(layout.variant(p.name))
    artifacts.remove_partial_writes(layout.compare(p.name).parent, prefix=f"{p.name}.json.")
    made_here = not layout.model(p.name).exists()  # --drop-models never deletes a variant made before
    if not force and _dropped_and_finished(
        layout, p.name, select, cfg.evaluation.attacks
    ):  # --drop-models deleted it after it was done
        comp, cmp = artifacts.read_json(layout.compression(p.name)), artifacts.read_json(layout.compare(p.name))
        seconds.update(compress=0.0, extract=0.0, compare=0.0, evaluate=0.0)
    else:
        comp = timed("compress", lambda: run_compress(cfg, root, point_spec(cfg, p), force=force, progress=progress))
        timed("extract", lambda: run_extract(cfg, root, variant=p.name, progress=progress, validate=False,
                                             select=select, force=force))  # fmt: skip
        cmp = timed("compare", lambda: run_compare(cfg, root, p.name, quality=select, force=force))
        timed("evaluate", lambda: run_evaluate(cfg, root, p.name, utility_eval=cfg.run.utility, progress=progress,
                                               force=force))  # fmt: skip
    rec = _point_record(layout, p, comp, cmp)
    if repair:
        from refusalkit.repair.job import run_repair

        repaired_before = {v for v in layout.variants() if v.startswith(f"{p.name}+")}
        info = timed("repair", lambda: run_repair(cfg, root, p.name, force=force, progress=progress))
        fixed = info["variant"]
        timed("repaired/evaluate", lambda: run_evaluate(cfg, root, fixed, utility_eval=cfg.run.utility,
                                                        progress=progress, force=force))  # fmt: skip
        rec["repaired"] = {
            "variant": fixed,
            "edit": {k: info.get(k) for k in ("layer", "placement", "direction", "alpha_scale", "keep_zeros")},
            **_eval_summary(layout, fixed),
            "vs_unrepaired": _paired(layout, p.name, fixed),
            "vs_base": _paired(layout, "base", fixed),
            **_repair_verdict(layout, fixed),
        }
    if drop_models:
        made = [p.name] if made_here else []
        if rec["repaired"] and rec["repaired"]["variant"] not in repaired_before:
            made.append(rec["repaired"]["variant"])
        for v in made:
            shutil.rmtree(layout.model(v), ignore_errors=True)
        rec["models_dropped"] = made
    rec["seconds"] = {**seconds, "total": round(sum(seconds.values()), 1)}
    return rec


def _point_record(layout: RunLayout, p: Point, comp: dict[str, Any], cmp: dict[str, Any]) -> dict[str, Any]:
    """A point's record before its repair: the setting, the measured sparsity, the comparison with the
    base direction and the evaluation, paired with the base model's."""
    return {
        "variant": p.name,
        "method": p.method,
        "sparsity_setting": p.sparsity,
        "bits": p.bits,
        "calibration": p.calibration,
        "seed": p.seed,
        "strength": p.strength(),
        "measured_sparsity": comp.get("sparsity"),
        "cosine_at_base_source": cmp["cosine_at_base_source"],
        "noise": cmp.get("cosine_at_base_source_noise"),
        "moved": cmp.get("moved"),
        "source": cmp.get("variant_source"),
        "source_shifted": cmp.get("source_shifted"),
        **_eval_summary(layout, p.name),
        "vs_base": _paired(layout, "base", p.name),
        "repaired": None,
    }


def sweep_path(layout: RunLayout, name: str) -> Path:
    return layout.root / "sweep" / f"{name}.json"


def default_name(points: list[Point], calibrations: list[str]) -> str:
    methods = sorted({p.method for p in points})
    one_strength = len({p.strength() for p in points}) == 1
    axis = "calibration" if len(calibrations) > 1 and one_strength else None
    if axis is None and one_strength and len({p.seed for p in points}) > 1:
        axis = "seed"
    if axis is None:
        axis = "sparsity" if any(p.sparsity is not None for p in points) else "bits"
    return f"{'+'.join(methods)}-{axis}"


def _base_stage(cfg: Config, root: Path, progress: bool) -> None:
    """The base model's direction, noise floor and evaluation (the sweep's reference), before any point."""
    from refusalkit.direction.job import run_extract
    from refusalkit.evaluation.job import run_evaluate

    run_extract(cfg, root, variant="base", progress=progress)
    run_evaluate(cfg, root, "base", utility_eval=cfg.run.utility, progress=progress)


def run_sweep(
    cfg: Config,
    root: str | Path,
    points: list[Point],
    *,
    name: str,
    select: bool = False,
    repair: bool = False,
    drop_models: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    executor: Any = None,
    point_fn: Callable[..., dict[str, Any]] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run every point (the base model first: its direction, noise floor and evaluation) on
    ``executor`` (:mod:`refusalkit.study.executors`; default: in turn, here); rewrite
    ``DIR/sweep/<name>.json`` after each point finishes; return the sweep record. ``point_fn``
    replaces :func:`run_point` (same signature; fault-injection tests). ``force``: every point's stages
    are redone and the sweep's record replaced, even one made with another grid (the base is kept)."""
    from refusalkit.compress.job import check_name
    from refusalkit.core.layout import prepare
    from refusalkit.study.executors import LocalExecutor

    check_name(name)
    root = Path(root)
    layout = RunLayout(root)
    if not force:
        check_existing(layout, cfg, points)
    path = sweep_path(layout, name)
    settings = {"points": [dataclasses.asdict(p) for p in points], "select": select, "repair": repair,
                "attacks": cfg.evaluation.attacks}  # fmt: skip
    state: dict[str, Any] = artifacts.read_json(path) if path.exists() and not force else {}
    migrate_sweep_state(state)  # a sweep recorded by an older release: its points read as this version's
    if state and state.get("settings") != settings:
        raise UserError(
            f"sweep {name!r} exists in {path.parent} with another grid or options; give --name to start another, or --force to replace it"
        )
    state = {"name": name, "settings": settings, "points": state.get("points", {}), "failed": {}}
    executor = executor or LocalExecutor()
    remote = executor.kind != "local"
    state["executor"] = executor.describe()
    prepare(cfg, root, force=False, keep_existing=True)  # config.yaml before any worker reads the directory
    if remote:
        executor.check_shared(root)
    echo("[sweep] base")
    executor.base(functools.partial(_base_stage, cfg, root, progress and not remote))
    state["base"] = _eval_summary(layout, "base")
    t0 = time.time()
    options = {"select": select, "repair": repair, "drop_models": drop_models, "progress": progress and not remote,
               "echo": _silent if remote else echo, **({"force": True} if force else {})}  # fmt: skip
    jobs = [(p.name, (cfg, root, p), options) for p in points]
    for i, (point, record, error) in enumerate(executor.points(point_fn or run_point, jobs), 1):
        if record is None:  # this point cannot be made or repaired: recorded, the sweep goes on
            state["failed"][point] = error
            echo(f"[sweep] {point}: skipped ({error})")
        else:
            state["points"][point] = _keep_first_seconds(state["points"].get(point), record)
            if remote:
                echo(f"[sweep] {point}: done ({i}/{len(jobs)})")
        artifacts.write_json(path, state)
    state["seconds_this_call"] = round(time.time() - t0, 1)
    ordered = [state["points"][p.name] for p in points if p.name in state["points"]]
    from refusalkit.study.sweep_table import seed_groups, table_markdown

    state["seed_groups"] = seed_groups(layout, ordered)
    artifacts.write_text(path.with_suffix(".md"), table_markdown(state, ordered))
    from refusalkit.study.sweep_plots import plot_sweep

    state["plots"] = [str(f.relative_to(root)) for f in plot_sweep(state, ordered, path.parent)]
    artifacts.write_json(path, state)
    return state


def _keep_first_seconds(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``seconds`` is what this call spent on the point (a reused stage: about 0);
    ``seconds_when_made`` keeps the call that spent the most on it — the one that made it."""
    made = (old or {}).get("seconds_when_made") or (old or {}).get("seconds")
    if not made or made["total"] < new["seconds"]["total"]:
        made = new["seconds"]
    return {**new, "seconds_when_made": made}


def _silent(_: str) -> None:
    pass
