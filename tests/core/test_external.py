"""Every external artifact (refusalkit.core.external): located in its installed package, checked
against its pinned sha256, and a one-line error with the pip command when it is not there."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from refusalkit.cli import main
from refusalkit.core import external as X
from refusalkit.core.errors import UserError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "artifacts.md"


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """An importable package ``rk_fake_pkg`` with two data files, and an artifact for each shape."""
    root = tmp_path / "site" / "rk_fake_pkg"
    (root / "data").mkdir(parents=True)
    (root / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    (root / "data" / "a.txt").write_text("alpha\n")
    (root / "data" / "b.txt").write_text("beta\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    one = X.Artifact(
        name="fake-one",
        package="rk_fake_pkg",
        requirement="rk-fake-pkg==1.0",
        files=("data/a.txt",),
        sha256=hashlib.sha256(b"alpha\n").hexdigest(),
        purpose="a test file",
    )
    lines = "".join(
        f"{hashlib.sha256(t).hexdigest()}  data/{n}\n" for n, t in (("a.txt", b"alpha\n"), ("b.txt", b"beta\n"))
    )
    many = X.Artifact(
        name="fake-many",
        package="rk_fake_pkg",
        requirement="rk-fake-pkg==1.0",
        files=("data/*.txt",),
        sha256=hashlib.sha256(lines.encode()).hexdigest(),
        purpose="test files",
        no_deps=True,
    )
    monkeypatch.setitem(X.ARTIFACTS, one.name, one)
    monkeypatch.setitem(X.ARTIFACTS, many.name, many)
    monkeypatch.setattr(X, "_VERIFIED", {})
    return root


def test_files_found_and_checked_without_importing(fake_package):
    assert X.artifact_file("fake-one") == fake_package / "data" / "a.txt"
    assert X.artifact_files("fake-many") == [fake_package / "data" / "a.txt", fake_package / "data" / "b.txt"]
    assert "rk_fake_pkg" not in sys.modules


def test_several_files_digest_as_the_shell_computes_it(fake_package):
    shell = subprocess.run(
        "LC_ALL=C sha256sum data/*.txt | LC_ALL=C sort -k2 | sha256sum",
        shell=True,
        cwd=fake_package,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    assert X.digest(fake_package, X.artifact_files("fake-many")) == shell == X.ARTIFACTS["fake-many"].sha256


def test_a_changed_file_is_a_one_line_error_with_the_reinstall_command(fake_package):
    X.artifact_files("fake-many")
    (fake_package / "data" / "b.txt").write_text("BETA, another version\n")
    with pytest.raises(UserError) as e:
        X.artifact_files("fake-many")
    msg = str(e.value)
    assert (
        "do not match rk-fake-pkg==1.0" in msg and "pip install --force-reinstall --no-deps 'rk-fake-pkg==1.0'" in msg
    )
    assert "\n" not in msg
    assert X.artifact_files("fake-many", verify=False)  # found; only the check fails


def test_a_missing_file_or_package_names_the_pip_command(fake_package, monkeypatch):
    (fake_package / "data" / "a.txt").unlink()
    with pytest.raises(
        UserError, match=r"a\.txt is missing from the installed rk-fake-pkg; run: pip install --force-reinstall"
    ):
        X.artifact_file("fake-one")
    monkeypatch.setitem(
        X.ARTIFACTS,
        "fake-gone",
        X.Artifact(
            "fake-gone",
            "rk_no_such_pkg",
            "rk-no-such-pkg==2.0",
            ("x",),
            "0" * 64,
            "a thing",
            extra="utility",
            needed_by="utility",
        ),
    )
    with pytest.raises(UserError) as e:
        X.artifact_file("fake-gone")
    assert "the rk-no-such-pkg package is not installed (a thing); run: pip install 'refusalkit[utility]'" in str(
        e.value
    )


def test_sources_check_exits_2_only_for_a_core_artifact(fake_package, monkeypatch, capsys):
    optional = X.Artifact(
        "fake-optional", "rk_no_such_pkg", "rk-no-such-pkg==2.0", ("x",), "0" * 64, "a thing", needed_by="tests"
    )
    monkeypatch.setattr(X, "ARTIFACTS", {"fake-one": X.ARTIFACTS["fake-one"], "fake-optional": optional})
    assert main(["sources", "--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok       fake-one") and out[1].startswith("optional fake-optional")
    (fake_package / "data" / "a.txt").write_text("changed\n")
    assert main(["sources", "--check"]) == 2
    assert "FAILED   fake-one" in capsys.readouterr().out


def test_the_docs_table_lists_every_artifact_with_its_pin_and_digest():
    text = DOCS.read_text(encoding="utf-8")
    lines = text.splitlines()
    start = lines.index("| artifact | package | files inside the package | sha256 | needed by | what it is |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert len(rows) == len(X.ARTIFACTS)
    for row, artifact in zip(rows, X.ARTIFACTS.values()):
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        assert cells[0] == artifact.name and cells[1] == artifact.requirement
        assert cells[2] == " ".join(artifact.files) and cells[3] == artifact.sha256
    assert X.DEFAULT_GGUF_SHA256 in text


@pytest.mark.integration
def test_every_artifact_the_suite_needs_resolves_and_matches_its_pin():
    """The packages .ci/run installs hold every artifact the suite needs, byte for byte as pinned (the named
    models beside the default and SmolLM2 are extras the test command does not install)."""
    suite = {"core", "default model", "tests", "utility"}
    problems = {a.name: why for a, why in X.check_all() if why is not None and a.needed_by in suite}
    assert problems == {}


def test_named_models_are_extras_of_pinned_parts():
    """Every named model beyond the default and SmolLM2 is an optional extra made of its pinned parts, and
    says which command installs it; its name is what needs its artifacts."""
    import tomllib

    from refusalkit.core.named_models import NAMED

    project = tomllib.loads((DOCS.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for m in NAMED.values():
        parts = [X.ARTIFACTS[p] for p in m.parts]
        if m.name in ("default", "smollm2-135m"):
            continue
        extra = parts[0].extra
        assert all(a.extra == extra and a.needed_by == m.name for a in parts), m.name
        assert [a.requirement for a in parts] == project["optional-dependencies"][extra], m.name
        assert not set(project["dependencies"]) & {a.requirement for a in parts}
        assert m.install == f"pip install 'refusalkit[{extra}]'"
    assert NAMED["qwen2.5-coder-1.5b"].instruct and not NAMED["gemma-3-270m"].instruct


def test_the_default_model_is_an_extra_not_a_dependency():
    """Studying one's own model installs no default-model weights; a run that needs them says in one line
    what to install."""
    import tomllib

    project = tomllib.loads((DOCS.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    parts = [a for a in X.ARTIFACTS.values() if a.name.startswith("default-model-part")]
    assert len(parts) == 6
    for a in parts:
        assert (
            a.requirement not in project["dependencies"]
            and a.requirement in project["optional-dependencies"]["default-model"]
        )
        assert a.needed_by != "core" and a.install.startswith("pip install 'refusalkit[default-model]'")
        assert a.requirement in project["optional-dependencies"]["test"]
