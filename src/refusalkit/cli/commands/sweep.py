"""``refusalkit sweep``: compress, re-extract, compare and evaluate a grid of compression points."""

from __future__ import annotations

import argparse

from refusalkit.cli.settings import asked_to_create, command_config


def run(args: argparse.Namespace) -> int:
    from refusalkit.cli.commands.info import list_sweeps
    from refusalkit.core.errors import UserError
    from refusalkit.core.extras import needed, require
    from refusalkit.study.executors import make_executor
    from refusalkit.study.sweep import build_points, default_name, parse_items, read_grid, run_sweep, sweep_path

    if args.list:
        return list_sweeps()
    if not args.run:
        raise UserError("sweep needs --run DIR (the run directory whose base model the points compress)")
    grid = read_grid(args.grid) if args.grid else {}

    def pick(key: str) -> str | None:  # a flag wins over the grid file
        value = getattr(args, key)
        return value if value is not None else grid.get(key)

    cfg, layout = command_config(args, may_create=asked_to_create(args))
    cfg.evaluation.attacks = parse_items(pick("attacks"), "attacks") or ["vanilla"]
    calibrations = parse_items(pick("calibration"), "calibration")
    points = build_points(
        cfg,
        parse_items(pick("method"), "method"),
        parse_items(pick("sparsity"), "sparsity"),
        parse_items(pick("bits"), "bits"),
        calibrations,
        parse_items(pick("seeds"), "seeds"),
    )
    name = pick("name") or default_name(points, calibrations)
    require(needed(cfg, utility=cfg.run.utility, methods=[p.method for p in points], executor=args.executor))
    executor = make_executor(
        args.executor,
        address=args.address,
        workers=args.workers,
        cpus_per_point=args.cpus_per_point,
        gpus_per_point=args.gpus_per_point,
        max_retries=args.max_retries,
    )
    try:
        state = run_sweep(
            cfg,
            layout.root,
            points,
            name=name,
            select=args.select or bool(grid.get("select")),
            repair=args.repair or bool(grid.get("repair")),
            drop_models=args.drop_models,
            progress=not args.quiet,
            executor=executor,
            force=args.force,
        )
    finally:
        executor.close()
    path = sweep_path(layout, name)
    print(path.with_suffix(".md").read_text(encoding="utf-8"))
    print(f"written: {path}, {path.with_suffix('.md')}" + "".join(f", {layout.root / p}" for p in state["plots"]))
    return 1 if state["failed"] else 0
