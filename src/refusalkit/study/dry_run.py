"""``refusalkit run --dry-run``: the plan of a run, what it needs, its time and disk; nothing is written.

What this machine lacks for the estimates (the model's description, a GPU, memory, disk) is one
informational line each and the exit status stays 0; a plan that cannot run here as configured (an
unknown method, a missing optional package) is a one-line error, exit 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from refusalkit.core.config import Config
from refusalkit.study.estimate import estimate, machine_gflops
from refusalkit.study.plan import Plan, build_plan


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def _machine() -> tuple[str, float | None]:
    """One line about this machine, and its memory in bytes (None: unknown)."""
    import torch

    from refusalkit.core.manifest import hardware

    hw = hardware()
    mem = hw.get("memory_gb")
    gpus = hw.get("gpus")
    line = (
        f"{hw['cpu_count']} CPU cores ({hw['processor']}, {hw['cpu_capability']} kernels, torch threads "
        f"{torch.get_num_threads()})"
        + (f", {mem} GiB" if mem else "")
        + (f", GPU: {', '.join(gpus)}" if gpus else ", no GPU")
    )
    return line, mem * 2**30 if mem else None


def _free_disk(root: Path) -> int:
    p = root.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def dry_run(cfg: Config, root: Path, profile: str, *, auto: bool = True, echo: Any = print) -> int:
    """Print the plan of ``refusalkit run`` with ``cfg`` in ``root``; write nothing; exit status 0."""
    import torch

    from refusalkit import __version__
    from refusalkit.models.facts import Facts, model_facts

    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    needs = _needs(cfg)
    facts = model_facts(cfg.model)
    known = isinstance(facts, Facts)
    plan = build_plan(cfg, gpu, facts.n_layers if known else None)
    machine, memory = _machine()
    lacks = _lacks(cfg, facts if known else None, str(facts), gpu, memory)
    timed = known and not any(x.startswith(("no GPU", "a GPU")) for x in lacks)
    gflops = machine_gflops() if timed else None
    if timed:
        estimate(plan, facts.matmul_params, gflops, root)
    echo(f"[dry run] {root}: profile {profile}" + (" (no GPU)" if profile == "cpu" and auto else "")
         + f"; refusalkit {__version__}; nothing is written")  # fmt: skip
    echo(f"machine   {machine}" + (f"; float32 matrix products {gflops:.0f} GFLOP/s" if gflops else ""))
    if known:
        echo(f"model     {cfg.model}: {facts.params / 1e9:.2f} B parameters, {facts.n_layers} blocks, width "
             f"{facts.d_model}, vocabulary {facts.vocab:,} (from {facts.source})")  # fmt: skip
    else:
        echo(f"model     {cfg.model}")
    e = cfg.evaluation
    echo(f"prompts   direction: {cfg.harmful} / {cfg.harmless}, {cfg.n_train} train, {cfg.n_val} validation, "
         f"{cfg.n_test} test of each kind; evaluation: {e.n_prompts} {e.prompts}, {e.n_harmless} harmless, "
         f"{e.n_borderline if e.borderline != 'none' else 0} borderline")  # fmt: skip
    echo(f"variants  {', '.join(plan.variants) or 'none'}; repairs: {', '.join(plan.repairs) or 'none'}")
    echo("extras    " + (", ".join(f"{x.name} (installed)" for x, _ in needs) or "none needed"))
    _stages(plan, echo)
    if timed:
        sure = sum(s.seconds or 0 for s in plan.stages if not s.conditional)
        every = sum(s.seconds or 0 for s in plan.stages)
        echo(
            f"time      about {_minutes(sure)}"
            + (f" (up to {_minutes(every)} if every conditional stage runs)" if every > sure + 1 else "")  # fmt: skip
            + "; scaled from a measured reference run, expect +-30 %"
        )
    if known:
        lacks += _disk(cfg, plan, facts, root, echo)
    for note in plan.notes:
        echo(f"note      {note}")
    for line in lacks:
        echo(f"info      {line}")
    return 0


def _needs(cfg: Config) -> list[Any]:
    """The optional packages the run needs (a missing one: a one-line UserError, exit 2)."""
    from refusalkit.compress.job import CompressSpec
    from refusalkit.core.errors import UserError
    from refusalkit.core.extras import installed, missing_line, needed

    specs = [CompressSpec.from_config(v, cfg.compress) for v in cfg.run.variants]  # unknown methods: exit 2
    needs = needed(cfg, utility=cfg.run.utility, methods=[s.method for s in specs])
    absent = [(e, why) for e, why in needs if not installed(e)]
    if absent:
        raise UserError("this plan cannot run here: " + missing_line(absent))
    return needs


def _lacks(cfg: Config, facts: Any, why: str, gpu: bool, memory: float | None) -> list[str]:
    """One line for each thing this machine lacks for the plan's estimates."""
    import torch

    lacks: list[str] = []
    if facts is None:
        lacks.append(f"the model's size is unknown here ({why}): time and disk estimates skipped")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        lacks.append(f"no GPU here (device {cfg.device}): the plan is shown, time estimates skipped")
    elif gpu:
        lacks.append("a GPU run: its time is not estimated (the reference run is a CPU run)")
    if facts is not None and memory:
        need = 2 * facts.params * _float_bytes(cfg)
        if need > memory:
            lacks.append(f"memory: the model needs about {_gib(need)} here (twice its weights), this machine has "
                         f"{_gib(memory)}")  # fmt: skip
    return lacks


def _float_bytes(cfg: Config) -> int:
    """Bytes per weight of the loaded model (the dtype ``load_model`` resolves)."""
    from refusalkit.models.loading import resolve_dtype

    return resolve_dtype(cfg.dtype, cfg.device).itemsize


def _stages(plan: Plan, echo: Any) -> None:
    echo("stages")
    width = max(len(s.key) for s in plan.stages)
    for st in plan.stages:
        est = ""
        if st.seconds is not None:
            est = "done" if st.done else f"~{_minutes(st.seconds)}" + (" (this run's own)" if st.measured else "")
        cond = f"  [{st.conditional}]" if st.conditional else ""
        echo(f"  {st.key:{width}s}  {est:>10s}  {st.what}{cond}")


def _disk(cfg: Config, plan: Plan, facts: Any, root: Path, echo: Any) -> list[str]:
    """Print the disk the run will use; a line for ``info`` when the free disk is short."""
    from refusalkit.core.named_models import NAMED

    model_bytes = facts.params * _float_bytes(cfg)
    sure = len(plan.variants) + len([r for r in plan.repairs if not _conditional_repair(plan, r)])
    every = len(plan.variants) + len(plan.repairs)
    cache = 0
    named = NAMED.get(cfg.model)
    if named is not None and named.converted() is None:
        cache = facts.params * 4
    disk, upper, free = sure * model_bytes + cache, every * model_bytes + cache, _free_disk(root)
    echo(f"disk      about {_gib(disk)}" + (f" (up to {_gib(upper)})" if upper > disk else "")
         + f": {every} variant models at {_gib(model_bytes)} each"
         + (f", the {cfg.model} model's converted copy in the cache ({_gib(cache)})" if cache else "")
         + f"; {_gib(free)} free")  # fmt: skip
    return (
        [f"disk: up to {_gib(upper)} needed, {_gib(free)} free where the run would be written"] if upper > free else []
    )


def _conditional_repair(plan: Plan, name: str) -> bool:
    return any(s.key == f"{name}/repair" and s.conditional for s in plan.stages)
