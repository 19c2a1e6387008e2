"""refusalkit sweep: the grid parser, settings checks, the table and plots on hand-made points, and a
three-point sweep end to end on SmolLM2 (resume, bad input)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from refusalkit.cli import main
from refusalkit.core import artifacts
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.study.sweep import (
    build_points,
    check_existing,
    default_name,
    parse_items,
    point_spec,
)
from refusalkit.study.sweep_plots import plot_sweep
from refusalkit.study.sweep_table import seed_groups, table_markdown

from conftest import hidden_files


def test_parse_items():
    assert parse_items(" 0.1, 0.25 ,2:4", "sparsity") == ["0.1", "0.25", "2:4"]
    assert parse_items(None, "bits") == [] and parse_items("  ", "bits") == []
    with pytest.raises(UserError, match="empty item"):
        parse_items("0.1,,0.5", "sparsity")


def test_grid_of_pruning_ratios_nm_and_calibrations():
    cfg = Config()
    pts = build_points(cfg, ["wanda"], ["0.25", "0.5", "2:4"], [], [])
    assert [p.name for p in pts] == ["wanda-0.25", "wanda-0.5", "wanda-2:4"]
    assert [p.strength() for p in pts] == [0.25, 0.5, 0.5]
    assert all(p.calibration == cfg.compress.calibration for p in pts)
    cal = build_points(cfg, ["wanda"], ["0.5"], [], ["wikipedia", "alpaca"])
    assert [p.name for p in cal] == ["wanda-0.5", "wanda-0.5_alpaca"]
    assert default_name(cal, ["wikipedia", "alpaca"]) == "wanda-calibration"
    assert point_spec(cfg, cal[1]).calibration == "alpaca" and point_spec(cfg, cal[1]).variant == "wanda-0.5_alpaca"
    # a calibration-free method makes one point per ratio whatever the calibration list
    mag = build_points(cfg, ["magnitude", "wanda"], ["0.5"], [], [])
    assert [p.name for p in mag] == ["magnitude-0.5", "wanda-0.5"] and mag[0].calibration is None
    assert default_name(mag, []) == "magnitude+wanda-sparsity"


def test_grid_of_bits():
    pts = build_points(Config(), ["rtn"], [], ["8", "4"], [])
    assert [p.name for p in pts] == ["rtn-w8", "rtn-w4"] and [p.strength() for p in pts] == [8.0, 4.0]
    assert default_name(pts, []) == "rtn-bits"
    (int8,) = build_points(Config(), ["llm-int8"], [], [], [])
    assert int8.name == "llm-int8" and int8.bits == 8


def test_grid_of_calibration_seeds():
    cfg = Config()
    pts = build_points(cfg, ["wanda"], ["0.5"], [], [], ["0", "3", "7"])
    # the configured seed (0) keeps the run's variant name; the others add _seed<N>
    assert [p.name for p in pts] == ["wanda-0.5", "wanda-0.5_seed3", "wanda-0.5_seed7"]
    assert [p.seed for p in pts] == [0, 3, 7] and default_name(pts, []) == "wanda-seed"
    assert [point_spec(cfg, p).seed for p in pts] == [0, 3, 7]
    assert point_spec(cfg, pts[1]).variant == "wanda-0.5_seed3"
    # a method without calibration data gets one point whatever the seeds; no seed axis: seed None
    mixed = build_points(cfg, ["magnitude", "wanda"], ["0.5"], [], ["wikipedia", "alpaca"], ["1", "2"])
    assert [p.name for p in mixed] == [
        "magnitude-0.5", "wanda-0.5_seed1", "wanda-0.5_seed2", "wanda-0.5_alpaca_seed1", "wanda-0.5_alpaca_seed2",
    ]  # fmt: skip
    assert mixed[0].seed is None and build_points(cfg, ["wanda"], ["0.5"], [], [])[0].seed is None
    for bad, needle in [(["x"], "whole numbers"), (["-1"], ">= 0"), (["1", "1"], "distinct")]:
        with pytest.raises(UserError, match=needle):
            build_points(cfg, ["wanda"], ["0.5"], [], [], bad)
    with pytest.raises(UserError, match="none of --method calibrates"):
        build_points(cfg, ["rtn"], [], ["4"], [], ["0", "1"])


def _vanilla(layout, variant, broken):
    """A variant's vanilla records: prompt i broke it when i is in ``broken`` (of 10 prompts)."""
    rows = [
        {
            "key": f"p{i}",
            "prompt": f"p{i}",
            "verdicts": {"substring": {"label": "compliance" if i in broken else "refusal"}},
        }
        for i in range(10)
    ]
    artifacts.write_text(layout.eval(variant, "vanilla.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def test_seed_groups_measure_the_compressions_own_noise(tmp_path):
    layout = RunLayout(tmp_path)
    recs = []
    # three seeds of one point; their vanilla outcomes: seed 0 breaks on p0-p5, seed 1 on p0-p1, seed 2 on p0-p2
    for seed, broken, cos in [(0, range(6), 0.88), (1, range(2), 0.91), (2, range(3), 0.86)]:
        name = "wanda-0.5" if seed == 0 else f"wanda-0.5_seed{seed}"
        _vanilla(layout, name, set(broken))
        recs.append({**_point(name, 0.5, cos, 0.95, len(broken) / 10, 0.1, 0.01), "seed": seed})
    recs.append({**_point("wanda-0.25", 0.25, 0.99, 0.95, 0.3, 0.0, 1.0), "seed": 0})  # alone: no group
    (g,) = seed_groups(layout, recs)
    assert g["seeds"] == [0, 1, 2] and g["variants"][1] == "wanda-0.5_seed1"
    assert g["asr_range"] == [0.2, 0.6] and g["cosine_range"] == [0.86, 0.91] and g["moved"] == [True] * 3
    # by hand: C = 6, 2, 3 (T = 11); R = 3, 3, 2, 1, 1, 1, 0... -> sum R^2 = 9 + 9 + 4 + 1 + 1 + 1 = 25
    # Q = 2 (3 * 49 - 121) / (3 * 11 - 25) = 2 * 26 / 8 = 6.5, df = 2, p = e^-3.25
    q = g["cochran_q"]
    assert q["q"] == pytest.approx(6.5) and q["p"] == pytest.approx(math.exp(-3.25)) and q["discordant"] == 4
    state = {"name": "wanda-seed", "base": {"asr": _rate(0.27)}, "seed_groups": [g]}
    md = table_markdown(state, recs)
    assert "* wanda-0.5 over calibration seeds 0, 1, 2: ASR 20–60% (Cochran's Q = 6.5, df = 2, p = 0.039; 4" in md
    assert "cosine at the base source 0.860–0.910, moved at 3 of 3 seeds." in md
    # records without vanilla outcomes: the spread, no test
    (g2,) = seed_groups(RunLayout(tmp_path / "empty"), recs)
    assert g2["cochran_q"] is None and "no test" in table_markdown({**state, "seed_groups": [g2]}, recs)


@pytest.mark.parametrize(
    ("methods", "sparsity", "bits", "cal", "needle"),
    [
        ([], ["0.5"], [], [], "--method"),
        (["wanda"], ["1.5"], [], [], "sparsity"),
        (["wanda"], ["3:2"], [], [], "3:2"),
        (["wanda"], [], ["4"], [], "not --bits"),
        (["wanda"], [], [], [], "give --sparsity"),
        (["rtn"], ["0.5"], [], [], "not --sparsity"),
        (["rtn"], [], ["x"], [], "whole numbers"),
        (["rtn"], [], ["1"], [], "bit"),
        (["wanda"], ["0.5"], [], ["no-such-corpus"], "unknown calibration"),
        (["nope"], ["0.5"], [], [], "unknown compression method"),
        (["wanda-0.5"], ["0.5"], [], [], "bare method"),
        (["wanda"], ["0.5", "0.5"], [], [], "repeats"),
    ],
)
def test_impossible_grids_are_one_line_errors(methods, sparsity, bits, cal, needle):
    with pytest.raises(UserError, match=needle):
        build_points(Config(), methods, sparsity, bits, cal)


def test_a_point_made_with_other_settings_is_refused(tmp_path):
    cfg = Config()
    (p,) = build_points(cfg, ["wanda"], ["0.5"], [], [])
    layout = RunLayout(tmp_path)
    spec = json.loads(json.dumps(dataclasses.asdict(point_spec(cfg, p))))
    artifacts.write_json(layout.compression(p.name), {"spec": spec})
    check_existing(layout, cfg, [p])  # the same settings: reused
    artifacts.write_json(layout.compression(p.name), {"spec": {**spec, "n_calibration": 3}})
    with pytest.raises(UserError, match="other settings.*n_calibration"):
        check_existing(layout, cfg, [p])


def _rate(r, n=100):
    return {"rate": r, "k": round(r * n), "n": n, "ci95": [max(0, r - 0.09), min(1, r + 0.09)]}


def _point(name, strength, cos, floor, asr, diff, p):
    return {
        "variant": name, "method": "wanda", "sparsity_setting": str(strength), "bits": None, "calibration": "wikipedia",
        "strength": strength, "measured_sparsity": strength, "cosine_at_base_source": cos,
        "noise": {"null_floor": floor, "null_mean": 0.97, "moved": cos < floor}, "moved": cos < floor,
        "asr": _rate(asr), "over_refusal": _rate(0.1), "perplexity": 30 + 100 * strength,
        "vs_base": {"difference": diff, "ci95": [diff - 0.08, diff + 0.08], "p": p, "only_first": 2,
                    "only_second": 2 + round(100 * diff)},
        "repaired": None, "seconds": {"total": 61.0},
    }  # fmt: skip


def test_table_and_plots_on_hand_made_points(tmp_path):
    pts = [
        _point("wanda-0.25", 0.25, 0.99, 0.95, 0.28, 0.01, 1.0),
        _point("wanda-0.75", 0.75, 0.6, 0.95, 0.7, 0.43, 1e-9),
    ]
    state = {"name": "wanda-sparsity", "base": {"asr": _rate(0.27), "over_refusal": _rate(0.1), "perplexity": 24.1}}
    md = table_markdown(state, pts)
    assert "| wanda-0.25 | wikipedia | 25.0% | 0.990 | 0.950 | no | – | 28% [19–37] | +1 pt" in md
    pts[1]["source"], pts[1]["source_shifted"] = {"layer": 13, "position": -1}, True
    assert "| yes | L13/-1 (shifted) |" in table_markdown(state, pts)
    assert "| yes |" in md and "p = 1.0e-09" in md
    # perplexity above 3x the base model's (105 vs 24.1), or most completions degenerate: BROKEN, ASR starred
    assert "| wanda-0.75 (BROKEN) |" in md and "70% [61–79]* | +43 pt" in md and "| wanda-0.25 |" in md
    assert "BROKEN: wanda-0.75 (perplexity 4.4× the base model's)." in md
    pts[0]["degenerate"] = 0.87
    md = table_markdown(state, pts)
    assert "| wanda-0.25 (BROKEN) |" in md and "| 87% |" in md and "87% of vanilla completions degenerate" in md
    pts[0]["degenerate"], pts[1]["perplexity"] = 0.0, 60.0
    assert "No point is BROKEN" in table_markdown(state, pts)
    files = plot_sweep(state, pts, tmp_path)
    assert [f.name for f in files] == ["wanda-sparsity_dose.png", "wanda-sparsity_movement.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)
    assert plot_sweep(state, [], tmp_path) == []
    # a calibration sweep (one strength): the calibration sources are the x axis, one line per method
    cal = [
        {**_point(f"wanda-0.5_{c}", 0.5, 0.9, 0.95, 0.5, 0.2, 0.01), "calibration": c} for c in ("wikipedia", "alpaca")
    ]
    from refusalkit.study.sweep_plots import _categories, _series, _x

    assert _categories(cal) == ["wikipedia", "alpaca"] and list(_series(cal, True)) == ["wanda"]
    assert _x(cal, ["wikipedia", "alpaca"]) == ([0.0, 1.0], "calibration data")
    assert _categories(pts) is None and _x(pts, None)[1] == "share of weights pruned"
    # a seed sweep (one strength, one source): the seeds are the x axis; both varying: both name a category
    seeds = [{**_point(f"wanda-0.5_seed{i}", 0.5, 0.9, 0.95, 0.5, 0.2, 0.01), "seed": i} for i in (0, 3)]
    assert _categories(seeds) == ["seed 0", "seed 3"] and _x(seeds, ["seed 0", "seed 3"]) == (
        [0.0, 1.0],
        "calibration seed",
    )
    both = [{**cal[0], "seed": 0}, {**cal[1], "seed": 0}, {**cal[1], "seed": 1}]
    assert _categories(both) == ["wikipedia, seed 0", "alpaca, seed 0", "alpaca, seed 1"]
    assert _x(both, _categories(both)) == ([0.0, 1.0, 2.0], "calibration data, seed")
    assert len(plot_sweep({**state, "name": "seed"}, seeds, tmp_path)) == 2
    assert len(plot_sweep({**state, "name": "cal"}, cal, tmp_path)) == 2


# ------------------------------------------------------------------------------------------------
# End to end on SmolLM2: three points, resume, bad input
# ------------------------------------------------------------------------------------------------

SMALL = [
    "--model", "smollm2-135m", "--set", "n_train=8", "--set", "n_val=4", "--set", "n_test=3",
    "--set", "validation.max_new_tokens=4", "--set", "selection.screen_keep=2", "--set", "selection.screen_prompts=2",
    "--set", "selection.prune_layer_fraction=0.8", "--set", "evaluation.n_prompts=4", "--set", "evaluation.n_harmless=3",
    "--set", "evaluation.n_borderline=3", "--set", "evaluation.max_new_tokens=8", "--set", "evaluation.ppl_tokens=512",
    "--set", "evaluation.utility_tasks=none",
]  # fmt: skip


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "r"
    args = ["-q", "sweep", "--run", str(root), *SMALL, "--method", "magnitude", "--sparsity", "0.1,0.5,2:4"]
    assert main(args) == 0
    return root, args


@pytest.mark.integration
def test_sweep_records_every_point(swept):
    root, _ = swept
    state = json.loads((root / "sweep" / "magnitude-sparsity.json").read_text())
    assert list(state["points"]) == ["magnitude-0.1", "magnitude-0.5", "magnitude-2:4"] and not state["failed"]
    for name, rec in state["points"].items():
        assert (root / name / "compression.json").exists() and (root / name / "model").is_dir()
        assert (root / name / "direction" / "candidates.safetensors").exists()
        assert not (root / name / "direction" / "direction.json").exists()  # no selection by default
        assert -1 <= rec["cosine_at_base_source"] <= 1 and rec["noise"]["null_floor"] <= 1
        assert rec["moved"] is (rec["cosine_at_base_source"] < rec["noise"]["null_floor"])
        assert rec["asr"]["n"] == 4 and rec["vs_base"]["n"] == 4 and rec["perplexity"] > 1
        assert set(rec["seconds"]) >= {"compress", "extract", "compare", "evaluate", "total"}
    sp = [state["points"][n]["measured_sparsity"] for n in ("magnitude-0.1", "magnitude-0.5")]
    assert sp[0] == pytest.approx(0.1, abs=0.01) and sp[1] == pytest.approx(0.5, abs=0.01)
    assert (root / "sweep" / "magnitude-sparsity.md").read_text().count("| magnitude-") == 3
    assert {p.split("/")[-1] for p in state["plots"]} == {
        "magnitude-sparsity_dose.png",
        "magnitude-sparsity_movement.png",
    }
    assert not hidden_files(root)


@pytest.mark.integration
def test_sweep_resumes_and_redoes_only_what_is_missing(swept, capsys):
    root, args = swept
    state = json.loads((root / "sweep" / "magnitude-sparsity.json").read_text())
    (root / "magnitude-0.5" / "eval" / "asr.json").unlink()
    (root / "magnitude-0.5" / "eval" / "vanilla.jsonl").unlink()
    assert main(args) == 0
    again = json.loads((root / "sweep" / "magnitude-sparsity.json").read_text())
    for name in state["points"]:
        a, b = state["points"][name], again["points"][name]
        assert a["cosine_at_base_source"] == b["cosine_at_base_source"] and a["asr"] == b["asr"], name
    # the points that were complete cost nothing: no compression, extraction or evaluation ran again
    assert again["points"]["magnitude-0.1"]["seconds"]["compress"] < 5
    # the seconds of the call that made the point are kept
    made = again["points"]["magnitude-0.1"]["seconds_when_made"]
    assert made == state["points"]["magnitude-0.1"]["seconds_when_made"] and made["total"] > 1
    # another grid under the same name: one line, exit 2
    assert main([*args[:-1], "0.1,0.5"]) == 2
    assert "another grid" in capsys.readouterr().err
    # a sweep recorded before points had a calibration seed resumes as the same grid
    path = root / "sweep" / "magnitude-sparsity.json"
    old = json.loads(path.read_text())
    for p in old["settings"]["points"]:
        del p["seed"]
    path.write_text(json.dumps(old))
    assert main(args) == 0
    assert all(p["seed"] is None for p in json.loads(path.read_text())["settings"]["points"])


@pytest.mark.integration
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "magnitude", "--sparsity", "1.5"], "sparsity"),
        (["--method", "magnitude", "--bits", "4"], "--bits"),
        (["--method", "magnitude", "--sparsity", "0.5", "--seeds", "0,1"], "none of --method calibrates"),
        (["--method", "wanda", "--sparsity", "0.5", "--seeds", "1,1"], "distinct"),
    ],
)
def test_sweep_bad_input_exit_2(swept, capsys, extra, needle):
    root, _ = swept
    assert main(["-q", "sweep", "--run", str(root), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1


def test_calibration_mixtures():
    import random

    from refusalkit.compress.calibration import _mixture, parse_mixture
    from refusalkit.data.prompts import load_prompts

    assert parse_mixture("mix:advbench:alpaca:0.25") == ("advbench", "alpaca", 0.25)
    chosen, pool = _mixture("mix:advbench:alpaca:0.25", 8, random.Random(0))
    harmful, harmless = set(load_prompts("advbench")), set(load_prompts("alpaca"))
    assert len(chosen) == 8 and sum(c in harmful for c in chosen) == 2 and sum(c in harmless for c in chosen) == 6
    assert pool == len(harmful) + len(harmless)
    assert _mixture("mix:advbench:alpaca:0.25", 8, random.Random(0)) == (chosen, pool)  # seeded
    assert all(c in harmless for c in _mixture("mix:advbench:alpaca:0", 8, random.Random(1))[0])
    for bad in ("mix:advbench:alpaca", "mix:advbench:alpaca:1.5", "mix::alpaca:0.5", "mix:wikipedia:alpaca:0.5"):
        with pytest.raises(UserError, match="mix"):
            parse_mixture(bad)
    pts = build_points(Config(), ["wanda"], ["0.5"], [], ["mix:advbench:alpaca:0.25", "mix:advbench:alpaca:1"])
    assert [p.name for p in pts] == ["wanda-0.5_mix-advbench-alpaca-0.25", "wanda-0.5_mix-advbench-alpaca-1"]
    with pytest.raises(UserError, match="unknown"):
        build_points(Config(), ["wanda"], ["0.5"], [], ["mix:advbench:nope:0.5"])


def test_shipped_sweep_files_build_their_grids(tmp_path):
    from pathlib import Path

    from refusalkit.study.sweep import read_grid

    root = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
    sizes = {}
    for f in sorted(root.glob("*.yaml")):
        g = read_grid(f)
        pts = build_points(
            Config(),
            parse_items(g.get("method"), "method"),
            parse_items(g.get("sparsity"), "sparsity"),
            parse_items(g.get("bits"), "bits"),
            parse_items(g.get("calibration"), "calibration"),
            parse_items(g.get("seeds"), "seeds"),
        )
        sizes[g["name"]] = [p.name for p in pts]
    assert (
        sizes["calibration-study"][2] == "wanda-0.5_mix-advbench-alpaca-0.25" and len(sizes["calibration-study"]) == 5
    )
    assert sizes["wanda-sparsity"] == ["wanda-0.1", "wanda-0.25", "wanda-0.5", "wanda-0.75", "wanda-0.9"]
    assert sizes["rtn-bits"] == ["rtn-w8", "rtn-w6", "rtn-w4", "rtn-w3"]
    assert sizes["wanda-seeds"] == ["wanda-0.5", *(f"wanda-0.5_seed{i}" for i in range(1, 5))]
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: wanda\nsparsities: 0.5\n")
    with pytest.raises(UserError, match="unknown key"):
        read_grid(bad)
    bad.write_text("method: [wanda\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_grid(bad)
    with pytest.raises(UserError, match="does not exist"):
        read_grid(tmp_path / "missing.yaml")


@pytest.mark.integration
def test_ray_executor_matches_local_and_redoes_a_killed_point(swept, tmp_path_factory, capsys):
    """The same three points on a Ray instance of two workers on this machine: the first attempt at
    magnitude-0.5 compresses, leaves a half-written file and kills its own worker; Ray re-runs the
    point, which resumes from the finished compression. The records match the local executor's."""
    pytest.importorskip("ray")
    import shutil

    from refusalkit.cli.parser import build_parser
    from refusalkit.cli.settings import command_config
    from refusalkit.study.executors import make_executor
    from refusalkit.study.sweep import run_sweep

    local_root, local_args = swept
    tmp = tmp_path_factory.mktemp("ray")
    root, marker = tmp / "r", tmp / "killed-once"
    root.mkdir()
    for name in ("data", "base"):  # the base model's stages are reused (the Ray task finds them done)
        shutil.copytree(local_root / name, root / name)
    shutil.copy2(local_root / "config.yaml", root / "config.yaml")
    args = ["-q", "sweep", "--run", str(root), *local_args[4:]]
    cfg, _ = command_config(build_parser().parse_args(args[1:]), may_create=True)
    cfg.evaluation.attacks = ["vanilla"]
    points = build_points(cfg, ["magnitude"], ["0.1", "0.5", "2:4"], [], [])

    def dies_once(cfg, root, p, **kw):  # pickled by value into the Ray worker
        import os
        import signal

        from refusalkit.compress.job import run_compress
        from refusalkit.study.sweep import point_spec, run_point

        if p.name == "magnitude-0.5" and not marker.exists():
            run_compress(cfg, root, point_spec(cfg, p), progress=False)
            (root / p.name / ".compression.json.x1y2z3w4.tmp").write_text("half")  # as a killed writer leaves it
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return run_point(cfg, root, p, **kw)

    ex = make_executor("ray", workers=2, max_retries=1)
    try:
        state = run_sweep(cfg, root, points, name="magnitude-sparsity", executor=ex, point_fn=dies_once, progress=False)
    finally:
        ex.close()
    assert marker.exists() and not state["failed"], state["failed"]
    assert state["executor"]["kind"] == "ray" and state["executor"]["cluster_cpus"] == 2
    local = json.loads((local_root / "sweep" / "magnitude-sparsity.json").read_text())
    assert list(state["points"]) != [] and set(state["points"]) == set(local["points"])
    for name, a in local["points"].items():
        b = state["points"][name]
        assert b["measured_sparsity"] == a["measured_sparsity"] and b["moved"] == a["moved"], name
        assert b["cosine_at_base_source"] == pytest.approx(a["cosine_at_base_source"], abs=1e-4), name
        assert b["asr"]["n"] == a["asr"]["n"] and abs(b["asr"]["k"] - a["asr"]["k"]) <= 1, name
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-3), name
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert {f"{n}/compress" for n in local["points"]} <= set(stages)  # parallel writers kept every stage
    assert not hidden_files(root)  # the killed attempt's half-written file was removed on the retry
    # the CLI on the finished directory: every point reused, on Ray
    assert main([*args, "--executor", "ray", "--workers", "2"]) == 0
    assert ": done (3/3)" in capsys.readouterr().out


@pytest.mark.integration
def test_a_dropped_finished_point_is_not_redone(swept, tmp_path):
    """--drop-models deletes a point's model once it is evaluated; running the sweep again reads
    the point's records instead of compressing it again (which would discard them)."""
    import shutil

    local_root, local_args = swept
    root = tmp_path / "r"
    root.mkdir()
    for name in ("data", "base"):
        shutil.copytree(local_root / name, root / name)
    shutil.copy2(local_root / "config.yaml", root / "config.yaml")
    args = ["-q", "sweep", "--run", str(root), *local_args[4:-4], "--method", "magnitude", "--sparsity", "0.5"]
    assert main([*args, "--drop-models"]) == 0
    assert not (root / "magnitude-0.5" / "model").exists()
    stamp = (root / "magnitude-0.5" / "compression.json").stat().st_mtime_ns
    first = json.loads((root / "sweep" / "magnitude-sparsity.json").read_text())["points"]["magnitude-0.5"]
    assert main(args) == 0
    again = json.loads((root / "sweep" / "magnitude-sparsity.json").read_text())["points"]["magnitude-0.5"]
    assert (root / "magnitude-0.5" / "compression.json").stat().st_mtime_ns == stamp
    assert again["seconds"]["total"] < 1 and again["asr"] == first["asr"]
    assert again["cosine_at_base_source"] == first["cosine_at_base_source"]
