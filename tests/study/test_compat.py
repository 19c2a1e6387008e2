"""A run directory written by refusalkit 0.1.0 is read, resumed and reported by this version.

``tests/fixtures/compat-0.1.0/`` was made by ``tests/fixtures/make_compat_run.py`` with the 0.1.0 code
(a tiny random Llama, every stage of ``refusalkit run`` including AIRD with an automatic α).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from refusalkit.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "compat-0.1.0"


@pytest.fixture()
def old_run(tmp_path, monkeypatch) -> Path:
    dest = tmp_path / "compat"
    shutil.copytree(FIXTURE, dest)
    monkeypatch.chdir(dest)  # config.yaml names the model by a path relative to this folder
    return dest / "run"


def _table(md: str) -> list[str]:
    return [line for line in md.split("## Variants", 1)[1].strip().splitlines() if line.startswith("|")]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "/eval/" not in str(p) and not p.name.startswith("report") and p.suffix != ".png"
    }


def test_old_run_is_reported_as_before(old_run, capsys):
    before = _table((old_run / "report.md").read_text())
    assert main(["-q", "report", "--run", str(old_run)]) == 0
    assert _table((old_run / "report.md").read_text()) == before
    assert (old_run / "report.html").exists()
    out = capsys.readouterr().out
    assert "| magnitude-0.5+aird |" in out and "F2 holds" in out


def test_old_run_resumes_without_recomputing(old_run, one_thread):
    directions = {
        v: (old_run / v / "direction" / "direction.safetensors").read_bytes()
        for v in ("base", "magnitude-0.5", "llm-int8")
    }
    asr = json.loads((old_run / "magnitude-0.5" / "eval" / "asr.json").read_text())["vanilla"]
    # an interrupted evaluation: the variant's vanilla records and summary are gone
    for name in ("asr.json", "vanilla.jsonl", "vanilla.settings.json"):
        (old_run / "magnitude-0.5" / "eval" / name).unlink()
    with one_thread():
        assert main(["-q", "run", "--run", str(old_run)]) == 0
    state = json.loads((old_run / "run.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in state.values()), state
    for v, data in directions.items():
        assert (old_run / v / "direction" / "direction.safetensors").read_bytes() == data, v
    again = json.loads((old_run / "magnitude-0.5" / "eval" / "asr.json").read_text())["vanilla"]
    assert again["judges"]["substring"]["asr"] == asr["judges"]["substring"]["asr"]
    # 0.1.0's alpha curves measured an unedited model: the automatic repair chosen from them is redone (now
    # by the search over edits, at 0.1.0's placement and form: every weight), with its analyses
    search = json.loads((old_run / "repair" / "magnitude-0.5+aird.search.json").read_text())
    assert search["settings"].get("measures") == "edited model"
    repaired = json.loads((old_run / "magnitude-0.5+aird" / "repair.json").read_text())
    assert repaired["search"]["measures"] == "edited model" and not repaired["sparsity_preserving"]
    assert repaired["placement"] == "source"
    assert (old_run / "magnitude-0.5+aird" / "eval" / "asr.json").exists()
    # the paper's literal edit is added beside it
    paper = json.loads((old_run / "magnitude-0.5+aird-paper" / "repair.json").read_text())
    assert paper["alpha_scale"] == 1.0 and not paper["auto"]
