"""``docs/cli.md``, generated from the parser: every command, what it does, and each flag with its help
text and default, as ``--help`` prints them. A test keeps the page equal to this output, so the
documented defaults are the ones the commands use. Regenerate with::

    python -m refusalkit.cli.reference > docs/cli.md
"""

from __future__ import annotations

import argparse
from typing import Any

HEADER = """# Command line

Generated from the parser (`python -m refusalkit.cli.reference > docs/cli.md`; a test keeps it
equal): every command, what it does, and each flag with its help text and default, as `--help`
prints them.

One grammar: every command that reads or writes a run takes `--run DIR` (required, except in
`run`, where it defaults to `runs/<config name>`), `--config FILE_OR_NAME` (over the run's
`config.yaml`), `--set KEY=VALUE` (over both) and `--force` (redo what exists); the commands that
may create a run also take `--profile` (`auto`: `cpu` without a GPU, else `full`). `-q` and `-v`
go before or after the command. Bad input exits 2 with one line, an interrupt 130, and
`refusalkit run` with a failed stage 1.
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return names
    if action.choices:
        return f"{names} {{{','.join(map(str, action.choices))}}}"
    return f"{names} {action.metavar or action.dest.split('.')[-1].split(':')[-1].upper()}"


def _cell(text: Any) -> str:
    return " ".join(str(text).replace("%%", "%").split()).replace("|", "\\|")


def reference() -> str:
    """The page's Markdown."""
    from refusalkit.cli.parser import build_parser

    parser = build_parser()
    out = [HEADER]
    for name, sub in _subparsers(parser).items():
        out.append(f"## refusalkit {name}\n")
        out.append(_cell(_help_of(parser, name)).rstrip(".") + ".\n")
        if sub.description:
            out.append(_cell(sub.description) + "\n")
        out.append("| flag | what it does |")
        out.append("|---|---|")
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            required = " (required)" if action.required else ""
            out.append(f"| {_flag(action)}{required} | {_cell(action.help or '')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference(), end="")
