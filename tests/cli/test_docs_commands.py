"""The docs cannot drift from the code: every `refusalkit …` command line shown in README.md, CHANGELOG's
current entry, CONTRIBUTING.md and docs/ parses with today's parser (a renamed flag fails here), and every
relative link between the pages resolves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
PAGES = [p for p in PAGES if p.is_file()]


def _code(text: str) -> str:
    """Fenced code blocks and inline code spans of a Markdown page."""
    fenced = [re.sub(r"\\\n\s*", " ", b) for b in re.findall(r"```[^\n]*\n(.*?)```", text, re.DOTALL)]
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    return "\n".join(fenced + inline)


def command_lines(text: str) -> list[str]:
    """Each `refusalkit <command> …` invocation in the page's code: the text from `refusalkit` to the
    end of the line, a pipe, a redirection, `&&` or a comment."""
    out = []
    for line in _code(text).splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment
        for m in re.finditer(r"(?:^|[\s;&(])refusalkit\s+(-[qv]\s+)*([a-z][a-z-]*)\b([^\n|>#&;]*)", line):
            cmd = f"refusalkit {m.group(1) or ''}{m.group(2)}{m.group(3)}".strip()
            if m.group(2) in ("import", "is", "and", "the") or re.search(r"(^|\s)\[", cmd):  # code, prose, a synopsis
                continue
            out.append(cmd)
    return out


def _lines() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), c) for p in PAGES for c in command_lines(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page,line", _lines())
def test_documented_command_parses(page, line):
    import contextlib
    import io

    from refusalkit.cli.parser import build_parser

    parser = build_parser()
    words = shlex.split(line.replace("…", "X"))[1:]
    words = [re.sub(r"^<[^>]+>$", "X", w) for w in words]  # placeholders such as <hub id>
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(words)
    except SystemExit as e:  # argparse: 0 for --help, 2 for an unknown command, flag or value
        # a command named in prose without its required --run (`refusalkit compare`) is a reference, not a call
        missing_only = "the following arguments are required" in err.getvalue()
        assert e.code == 0 or missing_only, f"{page}: `{line}` does not parse: {err.getvalue().strip()}"


def test_the_docs_show_enough_commands():
    # the README's own examples and the docs' commands; fewer means the extraction above broke
    readme = command_lines((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "refusalkit run" in readme and any("--draws" in c for c in readme)
    assert len(_lines()) >= 40


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES + [ROOT / "CHANGELOG.md"]])
def test_relative_links_resolve(page):
    path = ROOT / page
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#", 1)[0]
        assert (path.parent / file).exists(), f"{page}: link to {target} does not resolve"
