"""``--force`` reaches every stage: ``run_all(force=True)`` passes it to every stage function and to
``prepare``; ``run_sweep(force=True)`` to every point (``run_point``: to every stage, and a point that
``--drop-models`` finished is redone), and it replaces a sweep made with another grid. The stage functions
are recorders here: only the threading is tested."""

from __future__ import annotations

import pytest

from refusalkit.core import artifacts
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.core.profiles import CPU
from refusalkit.core.settings import load_config
from stages import stub_stages

STAGES = ("compress", "extract", "compare", "control", "evaluate", "repair")


def small_cfg(**over):
    over = {"model": "some-org/some-model", "run.variants": ["wanda-0.5", "llm-int8"], "run.repair": "none", **over}
    return load_config(None, overrides=over, profile=CPU)


@pytest.mark.parametrize(
    "over",
    [{}, {"run.repair": "pruned", "run.draws": 2, "run.adaptive": True}],
    ids=["no-repair", "repair-draws-adaptive"],
)
@pytest.mark.parametrize("force", [True, False])
def test_run_all_passes_force_to_every_stage(tmp_path, monkeypatch, force, over):
    from refusalkit.study.run import run_all

    calls = stub_stages(monkeypatch)
    res = run_all(small_cfg(**over), tmp_path / "run", force=force, progress=False, echo=lambda m: None)
    assert res["report"] == {"stub": True}
    names = {name for name, _ in calls}
    want = set(STAGES) - ({"repair"} if not over else set())
    assert want | {"prepare", "report"} == names
    for name, kw in calls:
        if name != "report":  # write_report(root) redoes everything anyway
            assert kw.get("force") is force, (name, kw)
    if over:  # the further draw, its transferred repair and the adaptive attacker were among them
        assert any(name == "compress" and kw.get("force") is force for name, kw in calls)
        stages = artifacts.read_json(tmp_path / "run" / "run.json")["stages"]
        assert {"wanda-0.5_seed1+aird/repair", "wanda-0.5+aird/adaptive"} <= set(stages)


def test_run_all_with_force_replaces_a_run_made_with_other_settings(tmp_path, monkeypatch):
    from refusalkit.study.run import run_all

    stub_stages(monkeypatch)
    root = tmp_path / "run"
    run_all(small_cfg(), root, progress=False, echo=lambda m: None)
    other = small_cfg(n_train=8)
    with pytest.raises(UserError, match="other settings"):
        run_all(other, root, progress=False, echo=lambda m: None)
    run_all(other, root, force=True, progress=False, echo=lambda m: None)
    assert "n_train: 8" in (root / "config.yaml").read_text()


# --- the sweep -----------------------------------------------------------------------------------------


@pytest.fixture
def sweep_stubs(monkeypatch):
    """The base stage, the summaries, the table and the plots of a sweep stubbed out."""
    from refusalkit.study import sweep, sweep_plots, sweep_table

    base: list[bool] = []
    monkeypatch.setattr(sweep, "_base_stage", lambda cfg, root, progress: base.append(True))
    monkeypatch.setattr(sweep, "_eval_summary", lambda layout, v: {"asr": None})
    monkeypatch.setattr(sweep, "_paired", lambda layout, a, b: None)
    monkeypatch.setattr(sweep, "_repair_verdict", lambda layout, v: {"verdict": None})
    monkeypatch.setattr(sweep_table, "seed_groups", lambda layout, points: [])
    monkeypatch.setattr(sweep_table, "table_markdown", lambda state, points: "table\n")
    monkeypatch.setattr(sweep_plots, "plot_sweep", lambda state, points, out: [])
    return base


def sweep_cfg():
    cfg = small_cfg()
    cfg.evaluation.attacks = ["vanilla"]
    return cfg


def points_of(cfg, sparsities):
    from refusalkit.study.sweep import build_points

    return build_points(cfg, ["magnitude"], sparsities, [], [])


def record_points(calls):
    def point_fn(cfg, root, p, **kw):
        calls.append((p.name, kw))
        return {"variant": p.name, "seed": p.seed, "seconds": {"total": 1.0}}

    return point_fn


@pytest.mark.parametrize("force", [True, False])
def test_run_sweep_passes_force_to_every_point(tmp_path, sweep_stubs, force):
    from refusalkit.study.sweep import run_sweep

    cfg = sweep_cfg()
    calls: list = []
    state = run_sweep(cfg, tmp_path, points_of(cfg, ["0.25", "0.5"]), name="s", point_fn=record_points(calls),
                      force=force, progress=False, echo=lambda m: None)  # fmt: skip
    assert [n for n, _ in calls] == ["magnitude-0.25", "magnitude-0.5"] and sweep_stubs == [True]
    assert all(kw.get("force", False) is force for _, kw in calls)
    assert set(state["points"]) == {"magnitude-0.25", "magnitude-0.5"}


def test_force_replaces_a_sweep_made_with_another_grid(tmp_path, sweep_stubs):
    from refusalkit.study.sweep import run_sweep, sweep_path

    cfg, calls = sweep_cfg(), []
    quiet = {"progress": False, "echo": lambda m: None, "point_fn": record_points(calls)}
    run_sweep(cfg, tmp_path, points_of(cfg, ["0.25"]), name="s", **quiet)
    with pytest.raises(UserError, match="another grid or options.*--force"):
        run_sweep(cfg, tmp_path, points_of(cfg, ["0.5"]), name="s", **quiet)
    state = run_sweep(cfg, tmp_path, points_of(cfg, ["0.5"]), name="s", force=True, **quiet)
    assert set(state["points"]) == {"magnitude-0.5"}  # the other grid's record replaced
    saved = artifacts.read_json(sweep_path(RunLayout(tmp_path), "s"))
    assert [p["name"] for p in saved["settings"]["points"]] == ["magnitude-0.5"] and set(saved["points"]) == {
        "magnitude-0.5"
    }


def test_force_redoes_a_variant_made_with_other_settings(tmp_path, sweep_stubs):
    from refusalkit.study.sweep import run_sweep

    cfg, calls = sweep_cfg(), []
    points = points_of(cfg, ["0.5"])
    artifacts.write_json(
        RunLayout(tmp_path).compression("magnitude-0.5"), {"spec": {"method": "magnitude", "sparsity": 0.25}}
    )
    quiet = {"progress": False, "echo": lambda m: None, "point_fn": record_points(calls)}
    with pytest.raises(UserError, match="give --force to redo it"):
        run_sweep(cfg, tmp_path, points, name="s", **quiet)
    assert calls == []
    run_sweep(cfg, tmp_path, points, name="s", force=True, **quiet)
    assert [(n, kw["force"]) for n, kw in calls] == [("magnitude-0.5", True)]


@pytest.mark.parametrize("force", [True, False])
def test_run_point_passes_force_to_every_stage(tmp_path, monkeypatch, sweep_stubs, force):
    from refusalkit.study.sweep import run_point

    calls = stub_stages(monkeypatch)
    cfg = sweep_cfg()
    (p,) = points_of(cfg, ["0.5"])
    rec = run_point(cfg, tmp_path, p, select=True, repair=True, drop_models=False, progress=False,
                    echo=lambda m: None, force=force)  # fmt: skip
    assert rec["repaired"]["variant"] == "magnitude-0.5+aird"
    assert [n for n, _ in calls] == ["compress", "extract", "compare", "evaluate", "repair", "evaluate"]
    assert all(kw.get("force") is force for _, kw in calls), calls


@pytest.mark.parametrize("force", [True, False])
def test_force_redoes_a_point_whose_model_was_dropped(tmp_path, monkeypatch, sweep_stubs, force):
    """A point --drop-models finished is read from its records; with force its stages run again."""
    from refusalkit.study.sweep import run_point

    calls = stub_stages(monkeypatch)
    cfg = sweep_cfg()
    (p,) = points_of(cfg, ["0.5"])
    layout = RunLayout(tmp_path)
    artifacts.write_json(layout.compression(p.name), {"sparsity": 0.5})
    artifacts.write_json(layout.compare(p.name), {"cosine_at_base_source": 0.9, "moved": False})
    artifacts.write_json(layout.eval(p.name, "asr.json"), {"vanilla": {"asr": 0.1}})
    rec = run_point(cfg, tmp_path, p, select=False, repair=False, drop_models=False, progress=False,
                    echo=lambda m: None, force=force)  # fmt: skip
    if force:
        assert [n for n, _ in calls] == ["compress", "extract", "compare", "evaluate"]
        assert rec["cosine_at_base_source"] == 0.5  # the stub's: measured again
    else:
        assert calls == [] and rec["cosine_at_base_source"] == 0.9 and rec["seconds"]["total"] == 0.0
