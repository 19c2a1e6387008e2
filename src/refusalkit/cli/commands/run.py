"""``refusalkit run``: the whole study, resumable; exits 1 when a stage failed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refusalkit.cli.commands.report import report_summary
from refusalkit.cli.parser import config_overrides
from refusalkit.core.layout import RunLayout
from refusalkit.core.settings import load_config


def _root(args: argparse.Namespace, named: str) -> Path:
    if args.run:
        return Path(args.run)
    stem = Path(args.config).stem if args.config else "default"
    return Path("runs") / (stem + ("" if named == "auto" else f"-{named}"))


def run(args: argparse.Namespace) -> int:
    from refusalkit.cli.settings import new_run_profile
    from refusalkit.core.profiles import PROFILES
    from refusalkit.study.run import run_all

    named = "quick" if args.quick else args.profile
    overrides = config_overrides(args)
    root = _root(args, named)
    layout = RunLayout(root)
    files: list[str | Path] = [args.config] if args.config else []
    if layout.config.exists() and not args.force:  # resume: the run's resolved settings, whatever the profile
        profile, cfg = "as recorded", load_config(files=[layout.config, *files], overrides=overrides)
    else:
        profile = new_run_profile(args, files, overrides)
        cfg = load_config(files=files, overrides=overrides, profile=PROFILES[profile])
    if args.dry_run:
        from refusalkit.study.dry_run import dry_run

        return dry_run(cfg, root, profile, auto=named == "auto")
    print(
        f"[run] {root}: profile {profile}"
        + (" (no GPU; --profile full for the paper-sized settings)" if profile == "cpu" and named == "auto" else ""),
        file=sys.stderr,
    )
    res = run_all(
        cfg,
        root,
        progress=not args.quiet,
        echo=lambda m: print(m, file=sys.stderr),
        profile=profile,
        force=args.force,
    )
    failed = {k: v["why"] for k, v in res["state"]["stages"].items() if v["status"] == "failed"}
    if res["report"] is not None:
        print(report_summary(res["report"]))
    if failed:
        for k, why in failed.items():
            print(f"error: stage {k} failed: {why}", file=sys.stderr)
        print(
            f"error: {len(failed)} stage(s) failed ({', '.join(failed)}); fix the cause and re-run the same "
            "command to resume",
            file=sys.stderr,
        )
        return 1
    return 0
