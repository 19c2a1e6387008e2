"""``refusalkit sweep``: compress, re-extract, compare and evaluate a grid of compression points."""

from __future__ import annotations

import argparse

from refusalkit.cli.settings import asked_to_create, command_config


def run(args: argparse.Namespace) -> int:
    from refusalkit.study.sweep import build_points, default_name, parse_items, run_sweep, sweep_path

    cfg, layout = command_config(args, may_create=asked_to_create(args))
    attacks = parse_items(args.attacks, "attacks") or ["vanilla"]
    cfg.evaluation.attacks = attacks
    calibrations = parse_items(args.calibration, "calibration")
    points = build_points(
        cfg,
        parse_items(args.method, "method"),
        parse_items(args.sparsity, "sparsity"),
        parse_items(args.bits, "bits"),
        calibrations,
    )
    name = args.name or default_name(points, calibrations)
    state = run_sweep(
        cfg,
        layout.root,
        points,
        name=name,
        select=args.select,
        repair=args.repair,
        drop_models=args.drop_models,
        progress=not args.quiet,
    )
    path = sweep_path(layout, name)
    print(path.with_suffix(".md").read_text(encoding="utf-8"))
    print(f"written: {path}, {path.with_suffix('.md')}" + "".join(f", {layout.root / p}" for p in state["plots"]))
    return 1 if state["failed"] else 0
