"""The package layout: dependencies point one way (core → models → data → direction →
compress / evaluation → repair → study / export → cli), and size limits a newcomer can rely on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "refusalkit"
LEVEL = {
    "core": 0,
    "models": 1,
    "data": 2,
    "direction": 3,
    "compress": 4,
    "evaluation": 4,
    "repair": 5,
    "study": 6,
    "export": 6,
    "cli": 7,
}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.parent != SRC)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``refusalkit.<package>`` imported anywhere in the module (function-level imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "refusalkit" and len(parts) > 1 and parts[1] in LEVEL:
                out.append((node.lineno, parts[1]))
                break
    return out


def test_every_module_sits_in_a_stage_package():
    assert {p.relative_to(SRC).parts[0] for p in _modules()} <= set(LEVEL)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_points_up_the_stack(path):
    here = path.relative_to(SRC).parts[0]
    for line, there in _imports(path):
        ok = there == here or LEVEL[there] < LEVEL[here]
        assert ok, f"{path.relative_to(SRC)}:{line} imports refusalkit.{there} ({here} may not depend on it)"


def test_only_the_layout_builds_run_directory_paths():
    """Paths inside a run directory come from RunLayout: no other module names its files."""
    names = (
        '"compression.json"',
        '"repair.json"',
        '"splits.json"',
        '"run.json"',
        '"manifest.json"',
        '"config.yaml"',
        '"direction.json"',
        '"asr.json"',
    )
    offenders = [
        f"{p.relative_to(SRC)}: {n}"
        for p in _modules()
        if p.name != "layout.py"
        for n in names
        if f"/ {n}" in p.read_text()
    ]
    assert not offenders, offenders


def _import_graph() -> dict[str, set[str]]:
    """Module -> the refusalkit modules it imports, at the top or inside a function (a lazy import
    still ties the two modules together)."""
    import ast

    src = Path(__file__).resolve().parents[2] / "src"
    mods = {}
    for p in (src / "refusalkit").rglob("*.py"):
        name = ".".join(p.relative_to(src).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                target = node.module if not node.level else base
                names = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def test_no_import_cycles():
    """No two modules import each other, directly or through others (Tarjan's strongly connected
    components of the import graph, lazy imports included)."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles
    assert graph["refusalkit.study.run"] and "refusalkit.core.config" in graph["refusalkit.core.settings"]


def test_no_module_or_function_grows_past_the_house_sizes():
    """Modules stay at about 450 lines and functions at about 75 (docstrings included), so that a module
    can be read whole: at most 460 and 80 here."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src" / "refusalkit"
    too_long = []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 460:
            too_long.append(f"{path.relative_to(src)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{path.relative_to(src)}: {node.name}, {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
