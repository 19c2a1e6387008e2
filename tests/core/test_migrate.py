"""core/migrate.py: what older releases wrote reads as this version's records, and the compatibility
rules stay in that one module."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import yaml

from refusalkit.core import artifacts
from refusalkit.core.migrate import (
    LEGACY_KEYS,
    REMOVED_KEYS,
    migrate_settings,
    migrate_sweep_state,
    repair_asked,
    search_screens_made_on,
    stale_repair_curve,
)
from refusalkit.core.settings import load_config

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "refusalkit"
OLD_RUN = ROOT / "tests" / "fixtures" / "compat-0.1.0" / "run"  # written by refusalkit 0.1.0
SCORE = "first-token refusal log-odds"


# ---------------------------------------------------------------------------------------------- settings


def test_settings_of_0_1_0_move_to_their_new_places(caplog):
    old = {
        "model": "m",
        "run": {
            "calibration": "c4",
            "n_calibration": 16,
            "aird_alpha_scale": "auto",
            "aird_direction": "unit",
            "aird_placement": "previous",
            "aird_scales": "1,4",
            "aird_search_prompts": 8,
            "aird_sparse": True,
            "aird_curve": True,
            "repair": "pruned",
        },
    }
    with caplog.at_level(logging.INFO, logger="refusalkit"):
        new = migrate_settings(old)
    assert new == {
        "model": "m",
        "run": {"repair": "pruned"},
        "compress": {"calibration": "c4", "n_calibration": 16},
        "repair": {
            "keep_zeros": False,  # 0.1.0 / 0.2.0 repaired every weight
            "alpha_scale": "auto",
            "direction": "unit",
            "placement": "previous",
            "scales": "1,4",
            "search_prompts": 8,
        },
    }
    assert "aird_sparse" in old["run"]  # the caller's mapping is left as it was
    assert {r.getMessage().split()[1] for r in caplog.records} == set(REMOVED_KEYS)
    # a repair section beside the old keys keeps its keep_zeros; an old key wins over its new name
    both = migrate_settings({"run": {"aird_sparse": True, "aird_scales": "2"}, "repair": {"keep_zeros": True}})
    assert both["repair"] == {"keep_zeros": True, "scales": "2"}
    assert migrate_settings({"run": {"aird_scales": "2"}, "repair": {"scales": "8"}})["repair"] == {"scales": "2"}
    assert migrate_settings({"model": "m"}) == {"model": "m"}  # nothing to migrate: the same mapping


def test_the_config_of_the_0_1_0_run_loads():
    raw = yaml.safe_load((OLD_RUN / "config.yaml").read_text(encoding="utf-8"))
    assert set(raw["run"]) & {k.split(".", 1)[1] for k in (*LEGACY_KEYS, *REMOVED_KEYS)}
    cfg = load_config(OLD_RUN / "config.yaml")
    assert cfg.repair.keep_zeros is False and cfg.repair.scales == [1.0, 4.0] and cfg.repair.search_prompts == 3
    assert cfg.repair.placement == "source" and cfg.repair.direction == "raw" and cfg.repair.alpha_scale == "auto"
    assert cfg.compress.calibration == "wikipedia" and cfg.compress.n_calibration == 8


# ---------------------------------------------------------------------------------------------- repair.json


def _asked(**over):
    return {
        "source_variant": "magnitude-0.5",
        "alpha_scale": "auto",
        "placement": "source",
        "direction": "raw",
        "keep_zeros": False,
        **over,
    }


def test_an_old_repair_json_gives_its_asked_settings():
    old = json.loads((OLD_RUN / "magnitude-0.5+aird" / "repair.json").read_text())
    assert "asked" not in old
    recorded, requested = repair_asked(old, _asked(), "auto")
    assert recorded is old
    assert requested == {
        "source_variant": "magnitude-0.5",
        "direction": "raw",
        "placement": "source",
        "sparsity_preserving": False,
        "auto": True,
    }
    assert all(recorded.get(k) == v for k, v in requested.items())  # the same settings: reusable
    # a fixed alpha is compared as the number 0.2.0 recorded; keep_zeros as its sparsity_preserving
    _, fixed = repair_asked(old, _asked(alpha_scale="2", keep_zeros=True), 2.0)
    assert fixed["alpha_scale"] == 2.0 and fixed["auto"] is False and fixed["sparsity_preserving"] is True
    assert sorted(k for k, v in fixed.items() if old.get(k) != v) == ["alpha_scale", "auto", "sparsity_preserving"]


def test_a_new_repair_json_is_compared_by_its_asked_record():
    asked = _asked(alpha_scale="1.0")
    recorded, requested = repair_asked({"asked": asked, "auto": True}, asked, 1.0)
    assert recorded is asked and requested is asked


def test_a_0_1_0_curve_is_stale():
    old = json.loads((OLD_RUN / "magnitude-0.5+aird" / "repair.json").read_text())
    assert "unedited model" in stale_repair_curve(old, "edited model")
    assert stale_repair_curve({**old, "curve": {**old["curve"], "measures": "edited model"}}, "edited model") is None
    assert stale_repair_curve({**old, "curve": None}, "edited model") is None


def test_old_repairs_are_reused_or_redone_by_the_job(tmp_path, caplog):
    from refusalkit.core.config import RepairConfig
    from refusalkit.core.errors import UserError
    from refusalkit.core.layout import RunLayout
    from refusalkit.repair.job import _reusable

    layout = RunLayout(tmp_path)
    name = "v+aird"
    layout.model(name).mkdir(parents=True)
    (layout.model(name) / "config.json").write_text("{}")
    old = {"source_variant": "v", "direction": "raw", "placement": "source", "sparsity_preserving": False}
    r = RepairConfig(alpha_scale="2", placement="source", direction="raw", keep_zeros=False)
    artifacts.write_json(layout.repair_info(name), {**old, "auto": False, "alpha_scale": 2.0})
    assert _reusable(layout, name, "v", r)["reused"] is True
    with pytest.raises(UserError, match=r"other settings \(alpha_scale\)"):
        _reusable(
            layout, name, "v", RepairConfig(alpha_scale="4", placement="source", direction="raw", keep_zeros=False)
        )
    artifacts.write_json(layout.repair_info(name), {**old, "auto": False, "alpha_scale": 2.0, "curve": {"points": []}})
    with caplog.at_level(logging.WARNING, logger="refusalkit"):
        assert _reusable(layout, name, "v", r) is None
    assert "v+aird was made by refusalkit 0.1.0 from an alpha curve" in caplog.text


# ---------------------------------------------------------------------------------------------- edit search


def _state_0_3_0(prompts: dict) -> dict:
    """A search state as 0.3.0 wrote it: no screen_settings, its screen rule in its settings."""
    return {
        "settings": {
            "prompts": prompts,
            "system_prompt": None,
            "screen": {"score": "first-token refusal log-odds > 0", "slack": 0.05},
        },
        "screen": {"source/nonzeros/x1.0": {"mean_score": 0.4}},
        "base_screen": {"mean_score": 0.7},
        "unrepaired_screen": {"mean_score": 0.3},
        "points": {"source/nonzeros/x1.0": {"asr": {"rate": 0.5}}},
    }


def test_the_screens_of_a_0_3_0_search_are_kept_on_the_same_prompts(tmp_path):
    from refusalkit.repair.edit_search import _load_state

    prompts = {"harmful": "advbench", "n": 4}
    old = _state_0_3_0(prompts)
    made_on = {"prompts": prompts, "system_prompt": None, "score": SCORE}
    assert search_screens_made_on(old, SCORE) == made_on
    assert search_screens_made_on({"screen_settings": made_on, "settings": {}}, "other") == made_on
    assert search_screens_made_on({}, SCORE) is None

    path = tmp_path / "v+aird.search.json"
    artifacts.write_json(path, old)
    settings = {"prompts": prompts, "system_prompt": None, "screen": {"score": SCORE, "rule": "calibrated"}}
    state = _load_state(path, settings, made_on)
    assert state["settings"] == settings and state["screen_settings"] == made_on
    assert state["points"] == {}  # generated points are measured again
    for k in ("screen", "base_screen", "unrepaired_screen"):
        assert state[k] == old[k], k
    # made on other prompts: nothing kept
    other = _load_state(path, settings, {**made_on, "prompts": {"harmful": "harmbench", "n": 4}})
    assert other["screen"] == {} and "base_screen" not in other


# ---------------------------------------------------------------------------------------------- sweep


def test_a_sweep_of_0_7_3_gets_no_seed():
    state = {"settings": {"points": [{"method": "wanda"}, {"method": "awq", "seed": 3}]}}
    assert migrate_sweep_state(state) is state
    assert state["settings"]["points"] == [{"method": "wanda", "seed": None}, {"method": "awq", "seed": 3}]
    assert migrate_sweep_state({}) == {}


# ---------------------------------------------------------------------------------------------- one place

# What only compatibility code says; any module but core/migrate.py that says it holds an old form.
COMPAT_WORDS = (
    "refusalkit 0.1",
    "refusalkit 0.2",
    "0.3.0 search",
    "written by 0.1",
    "made by refusalkit",
    "aird_sparse",
    "aird_alpha_scale",
    'sparsity_preserving": r.',
    'screen_settings") or',
    'setdefault("seed", None)',
)


def test_compatibility_code_stays_in_migrate():
    offenders = [
        f"{p.relative_to(SRC)}: {w}"
        for p in sorted(SRC.rglob("*.py"))
        if p != SRC / "core" / "migrate.py"
        for w in COMPAT_WORDS
        if w.lower() in p.read_text(encoding="utf-8").lower()
    ]
    assert not offenders, offenders
    tree = ast.parse((SRC / "core" / "migrate.py").read_text(encoding="utf-8"))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.split(".")[0] == "refusalkit"], imported  # below every other module
