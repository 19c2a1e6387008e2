"""The configuration of one command, the same way in every command.

Precedence: defaults < (a new run directory: the ``--profile``, :mod:`refusalkit.core.profiles`) < the run directory's
``config.yaml`` < ``--config FILE`` < flags and ``--set``. A command pointed at a directory that is
not a run says so, unless it may create one (``extract``, ``run``, and ``compress`` / ``evaluate``
when given ``--model`` or ``--config``). On an existing run, a command that would change a setting
its analyses depend on (the model, the prompts, the split, ...) stops with one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from refusalkit.cli.parser import config_overrides
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.extras import needed, require
from refusalkit.core.layout import RunLayout, check_same_analysis
from refusalkit.core.profiles import PROFILES, resolve_profile
from refusalkit.core.settings import load_config


def asked_to_create(args: argparse.Namespace) -> bool:
    """``compress`` / ``evaluate`` start a new run only when told which model (or config) to use."""
    return bool(getattr(args, "config", None)) or getattr(args, "cfg:model", None) is not None


def require_run(layout: RunLayout) -> None:
    """A one-line error when ``layout`` is not a run directory (nothing is created)."""
    if not layout.config.exists():
        what = "does not exist" if not layout.root.exists() else "is not a run directory (no config.yaml)"
        raise UserError(
            f"{layout.root} {what}; check the path, or start a run there with refusalkit extract --run {layout.root}"
        )


def new_run_profile(args: argparse.Namespace, files: list[str | Path], overrides: dict[str, Any]) -> str:
    """The profile a new run directory starts from: ``--profile`` (``auto``: ``cpu`` unless the
    configured device is a GPU that this machine has)."""
    named = "quick" if getattr(args, "quick", False) else getattr(args, "profile", "auto") or "auto"
    return resolve_profile(named, load_config(files=files, overrides=overrides).device)


def command_config(
    args: argparse.Namespace,
    *,
    may_create: bool = False,
    check: bool = True,
    overrides: dict[str, Any] | None = None,
    needs: dict[str, Any] | None = None,
) -> tuple[Config, RunLayout]:
    """The command's configuration and its run directory's layout; a missing optional package the
    command will import (``needs``: :func:`refusalkit.core.extras.needed`'s options) stops it here."""
    layout = RunLayout(args.run)
    exists = layout.config.exists()
    if not may_create:
        require_run(layout)
    files: list[str | Path] = [layout.config] if exists else []
    if getattr(args, "config", None):
        files.append(args.config)
    overrides = {**config_overrides(args), **(overrides or {})}
    profile = None if exists else new_run_profile(args, files, overrides)
    cfg = load_config(files=files, overrides=overrides, profile=PROFILES[profile] if profile else None)
    if exists and check:
        check_same_analysis(cfg, layout)
    if needs is not None:  # the command loads a model
        require(needed(cfg, **{"evaluates": False, **needs}))
    return cfg, layout
