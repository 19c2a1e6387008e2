"""``refusalkit config`` and ``refusalkit sources``: what can be set and named."""

from __future__ import annotations

import argparse


def config(args: argparse.Namespace) -> int:
    from refusalkit.core.errors import UserError
    from refusalkit.core.settings import default_config_text, describe, shipped

    if getattr(args, "list", False):
        for name, path in sorted(shipped("run").items()):
            print(f"{name:20s} {describe(path)}")
        return 0
    if getattr(args, "show", False):
        import yaml

        from refusalkit.cli.settings import require_run
        from refusalkit.core.layout import RunLayout
        from refusalkit.core.settings import load_config

        if not args.run:
            raise UserError("config --show needs --run DIR (the run whose resolved configuration to print)")
        layout = RunLayout(args.run)
        require_run(layout)
        print(yaml.safe_dump(load_config(files=[layout.config]).to_dict(), sort_keys=False), end="")
        return 0
    print(default_config_text(), end="")
    return 0


def list_sweeps() -> int:
    """``refusalkit sweep --list``: the shipped sweep files, one a line."""
    from refusalkit.core.settings import describe, shipped

    for name, path in sorted(shipped("sweep").items()):
        print(f"{name:20s} {describe(path)}")
    return 0


def sources(args: argparse.Namespace) -> int:
    if getattr(args, "check", False):
        return _check_artifacts()
    from refusalkit.compress.methods import listed
    from refusalkit.data.corpus import TEXT_CORPORA
    from refusalkit.data.prompts import NAMED_SOURCES
    from refusalkit.models.loading import SHORT_NAMES

    for k, v in {**NAMED_SOURCES, **SHORT_NAMES}.items():
        print(f"{k:18s} {v}")
    for k, v in TEXT_CORPORA.items():
        print(f"{k:18s} text corpus (calibration, perplexity): {v[1]}")
    for m in listed():
        print(f"{m.name:18s} compression method: {m.description}")
    return 0


def _check_artifacts() -> int:
    """One line per external artifact: ok, or why not. Exit 2 when a core artifact (one that
    ``pip install refusalkit`` installs) fails; an optional one that is not installed is reported."""
    from refusalkit.core.external import check_all

    failed = 0
    for artifact, problem in check_all():
        core = artifact.needed_by == "core"
        if problem is None:
            print(
                f"ok       {artifact.name:26s} {artifact.requirement:32s} {artifact.sha256[:12]}…  ({artifact.needed_by})"
            )
            continue
        failed += core
        print(f"{'FAILED' if core else 'optional':8s} {artifact.name:26s} {problem}")
    if failed:
        print(f"error: {failed} required artifact(s) failed the check; run the pip commands above")
        return 2
    return 0
