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
    from refusalkit.study.run import PROFILES, resolve_profile, run_all

    named = "quick" if args.quick else args.profile
    overrides = config_overrides(args)
    root = _root(args, named)
    layout = RunLayout(root)
    files = [args.config] if args.config else []
    if layout.config.exists():  # resume: the run directory's resolved settings, whatever the profile
        profile, cfg = "as recorded", load_config(files=[layout.config, *files], overrides=overrides)
    else:
        profile = resolve_profile(named, load_config(files=files, overrides=overrides).device)
        cfg = load_config(files=files, overrides=overrides, profile=PROFILES[profile])
    print(
        f"[run] {root}: profile {profile}"
        + (" (no GPU; --profile full for the paper-sized settings)" if profile == "cpu" and named == "auto" else ""),
        file=sys.stderr,
    )
    res = run_all(cfg, root, progress=not args.quiet, echo=lambda m: print(m, file=sys.stderr), profile=profile)
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
