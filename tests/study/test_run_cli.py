"""`refusalkit compare / repair / run` end to end on the real SmolLM2-135M-Instruct (tiny settings):
every stage's artifacts, AIRD on a pruned and an int8 variant, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from refusalkit.cli import main
from refusalkit.core import artifacts

from conftest import hidden_files

pytestmark = pytest.mark.integration

TINY = [
    "--model",
    "smollm2-135m",
    "--quick",
    "--set",
    "n_train=8",
    "--set",
    "n_val=4",
    "--set",
    "n_test=3",
    "--set",
    "validation.max_new_tokens=4",
    "--set",
    "selection.screen_keep=2",
    "--set",
    "selection.screen_prompts=2",
    "--set",
    "selection.prune_layer_fraction=0.8",
    "--set",
    "evaluation.n_prompts=4",
    "--set",
    "evaluation.n_harmless=3",
    "--set",
    "evaluation.n_borderline=3",
    "--set",
    "evaluation.max_new_tokens=8",
    "--set",
    "evaluation.ppl_tokens=512",
    "--set",
    "evaluation.utility_tasks=none",
    "--set",
    "run.validate_variants=false",
    "--set",
    "run.select_repaired=false",
    "--set",
    "run.variants=magnitude-0.5",
    "--set",
    "run.repair=pruned",
    "--set",
    "repair.scales=4,16",
    "--set",
    "repair.search_prompts=3",
    "--set",
    "repair.confirm=1",
    # the adaptive attacker on the search repair, its unrepaired variant and the base model, tiny
    "--set",
    "run.adaptive=true",
    "--set",
    "evaluation.decoding_grid=temperature=0.7",
    "--set",
    "evaluation.decoding_system_prompts=default",
    "--set",
    "evaluation.decoding_n_prompts=2",
    "--set",
    "evaluation.gcg_prompts=1",
    "--set",
    "evaluation.gcg_universal_prompts=1",
    "--set",
    "evaluation.gcg_steps=2",
    "--set",
    "evaluation.gcg_search_width=8",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("run") / "r"
    assert main(["-q", "run", "--run", str(root), *TINY]) == 0
    return root


def test_run_produces_every_stage(study):
    state = json.loads((study / "run.json").read_text())["stages"]
    for v in ("base", "magnitude-0.5", "magnitude-0.5+aird"):
        # run.select_repaired off: a repaired variant's candidates only, no selection of its own
        assert (study / v / "direction" / "direction.json").exists() == (v != "magnitude-0.5+aird"), v
        assert (study / v / "direction" / "candidates.safetensors").exists(), v
        assert (study / v / "eval" / "asr.json").exists() and (study / v / "eval" / "over_refusal.json").exists(), v
        if v != "base":
            assert (study / "compare" / f"{v}.json").exists(), v
    assert all(s["status"] == "done" for s in state.values()), state
    assert list(state) == [
        "base/extract",
        "base/control",
        "magnitude-0.5/compress",
        "magnitude-0.5/extract",
        "magnitude-0.5/compare",
        "magnitude-0.5/control",
        "base/evaluate",
        "magnitude-0.5/evaluate",
        "magnitude-0.5+aird/repair",
        "magnitude-0.5+aird-paper/repair",
        "magnitude-0.5+aird/extract",
        "magnitude-0.5+aird/compare",
        "magnitude-0.5+aird/evaluate",
        "magnitude-0.5+aird-paper/extract",
        "magnitude-0.5+aird-paper/compare",
        "magnitude-0.5+aird-paper/evaluate",
        "base/adaptive",
        "magnitude-0.5/adaptive",
        "magnitude-0.5+aird/adaptive",
        "report",
    ]
    # the adaptive attacker ran on the three models with the same settings, and the report pairs them
    for v in ("base", "magnitude-0.5", "magnitude-0.5+aird"):
        asr = json.loads((study / v / "eval" / "asr.json").read_text())
        assert {"vanilla", "decoding", "suffix", "ablation"} <= set(asr), (v, sorted(asr))
        assert asr["ablation"]["n_prompts"] == 4 and asr["decoding"]["n_prompts"] == 2, v
    assert "ablation" not in json.loads((study / "magnitude-0.5+aird-paper" / "eval" / "asr.json").read_text())
    md = (study / "report.md").read_text()
    assert "ablation attack vs unrepaired" in md and "suffix attack vs base" in md
    assert "| magnitude-0.5+aird |" in md and "findings" in md
    assert (study / "report.html").exists()
    assert not hidden_files(study)
    # run.validate_variants off: only the base direction is validated by generation
    assert (study / "base" / "direction" / "validation.json").exists()
    assert not (study / "magnitude-0.5" / "direction" / "validation.json").exists()
    # utility_tasks none: perplexity alone, no lm-eval task
    util = json.loads((study / "magnitude-0.5" / "eval" / "utility.json").read_text())
    assert util["tasks"] == {} and util["mean_acc"] is None and util["perplexity"]["perplexity"] > 1


def test_repaired_variant_compared_without_a_selection(study):
    c = json.loads((study / "compare" / "magnitude-0.5+aird.json").read_text())
    assert c["selected"] is False and c["variant_source"] is None and c["cosine_selected"] is None
    assert c["source_shifted"] is None and c["quality"]["variant_direction"] is None
    assert -1 <= c["cosine_at_base_source"] <= 1 and len(c["cosine_by_layer"]) == c["n_layers"] + 1
    assert c["moved"] is c["cosine_at_base_source_noise"]["moved"]  # judged at the base source, by its floor
    assert c["quality"]["base_direction_on_variant"] is not None


def test_compare_record(study):
    c = json.loads((study / "compare" / "magnitude-0.5.json").read_text())
    n = c["n_layers"]
    assert len(c["cosine_by_layer"]) == n + 1 and len(c["cosine_matrix"]) == n + 1
    assert -1 <= c["cosine_selected"] <= 1 and -1 <= c["cosine_at_base_source"] <= 1
    assert c["source_shifted"] == (
        (c["base_source"]["layer"], c["base_source"]["position"])
        != (c["variant_source"]["layer"], c["variant_source"]["position"])
    )
    assert c["single_direction_evidence"]["basis"].startswith("refusal scores")  # not validated by generation
    q = c["quality"]["base_direction_on_variant"]
    assert q is not None and q["layer"] == c["base_source"]["layer"]
    # the base direction read on the base model's own candidates: cosine 1 at its source
    base = json.loads((study / "base" / "direction" / "direction.json").read_text())
    assert c["base_source"]["layer"] == base["layer"] and c["base_source"]["position"] == base["position"]
    # the noise floor made with the base direction: every base-position cosine gets its verdict
    floor = json.loads((study / "base" / "direction" / "noise_floor.json").read_text())
    noise = c["cosine_at_base_source_noise"]
    assert noise["null_floor"] == floor["by_layer"]["floor"][base["layer"]]
    assert c["moved"] is noise["moved"] is (c["cosine_at_base_source"] < noise["null_floor"])
    assert c["noise"]["method"] == "bootstrap" and len(c["cosine_by_layer_noise"]["moved"]) == n + 1


def test_paper_edit_and_search(study):
    base = json.loads((study / "base" / "direction" / "direction.json").read_text())
    plain = json.loads((study / "magnitude-0.5+aird-paper" / "repair.json").read_text())
    assert plain["layer"] == base["layer"] and plain["placement"] == "source" and plain["direction"] == "raw"
    assert plain["alphas"] == {"attn_out": 0.02, "mlp_down": 0.01} and not plain["auto"]
    assert plain["gain"]["attn_out"] == pytest.approx(0.02 * base["norm"] ** 2, rel=1e-4)
    # the paper's edit fills the pruned zeros of the two edited matrices
    assert (
        plain["matrices"]["attn_out"]["sparsity_before"] >= 0.49
        and plain["matrices"]["attn_out"]["sparsity_after"] < 0.01
    )
    assert plain["model_sparsity_after"] < plain["model_sparsity_before"]
    # the saved checkpoint differs from its source only in the two edited matrices
    from safetensors.torch import load_file

    a = load_file(str(study / "magnitude-0.5" / "model" / "model.safetensors"))
    b = load_file(str(study / "magnitude-0.5+aird-paper" / "model" / "model.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {
        plain["matrices"]["attn_out"]["module"] + ".weight",
        plain["matrices"]["mlp_down"]["module"] + ".weight",
    }
    # the default repair: the search over edits, keeping every zero of the pruned variant
    auto = json.loads((study / "magnitude-0.5+aird" / "repair.json").read_text())
    search = auto["search"]
    n_placements = 2 if base["layer"] > 0 else 1
    assert len(search["screened"]) == len(search["compared"]) == 2 * n_placements
    assert search["generated"] == 1 and search["base"] is not None  # repair.confirm=1
    assert all(p["keep_zeros"] for p in search["screened"]) and not any(p["keep_zeros"] for p in search["compared"])
    assert auto["auto"] and auto["sparsity_preserving"]
    assert auto["model_sparsity_after"] == auto["model_sparsity_before"]
    assert auto["alpha_scale"] == search["chosen"]["scale"] and auto["placement"] == search["chosen"]["placement"]


def test_sparse_and_int8_repairs(study, capsys):
    given = ["--alpha-scale", "2", "--placement", "source", "--name"]
    assert main(["-q", "repair", "--run", str(study), "--variant", "magnitude-0.5", *given, "m-sp"]) == 0
    sp = artifacts.read_json(study / "m-sp" / "repair.json")
    assert sp["method"] == "aird-sparse" and sp["model_sparsity_after"] == sp["model_sparsity_before"]
    assert sp["matrices"]["attn_out"]["sparsity_after"] == sp["matrices"]["attn_out"]["sparsity_before"]
    assert (
        main(["-q", "repair", "--run", str(study), "--variant", "magnitude-0.5", "--no-keep-zeros", *given, "m-x2"])
        == 0
    )
    assert artifacts.read_json(study / "m-x2" / "repair.json")["method"] == "aird"
    assert main(["-q", "compress", "--run", str(study), "--method", "llm-int8"]) == 0
    # a variant's direction without validation in a validated run: the run's own settings, no validation.json
    assert main(["-q", "extract", "--run", str(study), "--variant", "llm-int8", "--no-validation"]) == 0
    assert (study / "llm-int8" / "direction" / "direction.json").exists()
    assert not (study / "llm-int8" / "direction" / "validation.json").exists()
    int8 = ["--variant", "llm-int8", "--alpha-scale", "50", "--placement", "source"]
    assert main(["-q", "repair", "--run", str(study), *int8]) == 0
    i8 = artifacts.read_json(study / "llm-int8+aird" / "repair.json")
    assert i8["quantization"]["method"] == "llm-int8" and 0 < i8["quantization"]["survival"] < 1.5
    assert i8["alpha_scale"] == 50 and i8["alphas"]["attn_out"] == pytest.approx(1.0)
    from safetensors.torch import load_file

    a = load_file(str(study / "llm-int8" / "model" / "model.safetensors"))
    b = load_file(str(study / "llm-int8+aird" / "model" / "model.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    o = i8["matrices"]["attn_out"]["module"]
    assert {o + ".weight", o + ".SCB"} <= changed and all(
        k.rsplit(".", 1)[0] in (o, i8["matrices"]["mlp_down"]["module"]) for k in changed
    )
    assert b[o + ".weight"].dtype == torch.int8
    # the repaired int8 variant loads and generates
    assert (
        main(
            [
                "-q",
                "evaluate",
                "--run",
                str(study),
                "--variant",
                "llm-int8+aird",
                "--attacks",
                "vanilla",
                "--n",
                "2",
                "--n-harmless",
                "0",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    capsys.readouterr()


def test_stages_record_their_forward_tokens(study):
    """run.json and manifest.json count each stage's forward tokens (rows x positions of every model
    call), so that a measurement made twice shows up; the report runs no model."""
    state = json.loads((study / "run.json").read_text())["stages"]
    for key in ("base/extract", "base/evaluate", "magnitude-0.5/evaluate", "magnitude-0.5+aird/repair"):
        assert state[key]["forward_tokens"] > 0, key
    assert state["report"]["forward_tokens"] == 0
    # evaluating the base model and a variant with the same settings asks the same work of each
    assert state["base/evaluate"]["forward_tokens"] > 0.5 * state["magnitude-0.5/evaluate"]["forward_tokens"]
    manifest = json.loads((study / "manifest.json").read_text())["stages"]
    assert manifest["base/extract"]["forward_tokens"] > 0
    # prefill and decode split the tokens; the evaluation decodes, the comparison's scoring does not
    for key in ("base/extract", "base/evaluate"):
        work = state[key]["forward"]
        assert work["prefill_tokens"] + work["decode_tokens"] == work["tokens"] == state[key]["forward_tokens"]
        assert work["prefill_seconds"] > 0 and 0 <= work["prefill_padding"] < work["prefill_tokens"]
    assert state["base/evaluate"]["forward"]["decode_calls"] > 0
    assert state["magnitude-0.5/compare"]["forward"]["decode_calls"] == 0
    # compare and evaluate are stages of the manifest too, each with its own tokens
    assert manifest["magnitude-0.5/compare"]["forward_tokens"] > 0  # the base direction scored on the variant
    for key in ("base/evaluate", "base/adaptive", "magnitude-0.5/evaluate", "magnitude-0.5/control"):
        assert manifest[key]["forward_tokens"] == state[key]["forward_tokens"] > 0, key


def test_rerun_skips_and_resumes(study, capsys):
    before = json.loads((study / "run.json").read_text())["stages"]
    records = {p: p.read_bytes() for p in study.rglob("*.jsonl")}  # every completion made so far
    (study / "report.md").unlink()
    (study / "compare" / "magnitude-0.5.json").unlink()
    assert main(["-q", "run", "--run", str(study), *TINY]) == 0
    assert (study / "report.md").exists() and (study / "compare" / "magnitude-0.5.json").exists()
    assert {p: p.read_bytes() for p in study.rglob("*.jsonl")} == records  # nothing regenerated
    after = json.loads((study / "run.json").read_text())["stages"]
    # a stage found done keeps the tokens it took; the comparison removed above is made again
    assert after["base/evaluate"]["forward_tokens"] == before["base/evaluate"]["forward_tokens"]
    stages = json.loads((study / "manifest.json").read_text())["stages"]
    assert {"base/extract", "magnitude-0.5/compress", "magnitude-0.5+aird/repair"} <= set(stages)


def test_repair_cli_auto_and_errors(study, capsys):
    # a search of its own (with a target every model reaches and loose budgets): the base model and the
    # unrepaired variant are read from the run's measurements, and the smallest edit is confirmed first
    loose = ["--set", "repair.max_over_refusal_increase=1", "--set", "repair.max_degenerate_increase=1"]
    code = main(
        ["-q", "repair", "--run", str(study), "--variant", "magnitude-0.5", "--scales", "4,16", "--search-prompts", "3",
         "--ppl-tokens", "512", "--target-asr", "1.0", "--name", "m-auto", "--set", "repair.max_ppl_increase=100",
         *loose]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    info = artifacts.read_json(study / "m-auto" / "repair.json")
    run_search = artifacts.read_json(study / "magnitude-0.5+aird" / "repair.json")["search"]
    assert info["search"]["unrepaired"]["asr"] == run_search["unrepaired"]["asr"]
    assert info["search"]["screen_rule"]["need"] < 0 and info["search"]["target_from"] == "given"
    assert (info["placement"], info["alpha_scale"]) == ("source", 4.0) and info["auto"]
    assert info["search"]["chosen"]["target_reached"]
    for bad, match in (
        (["--variant", "nope"], "does not exist"),
        (["--variant", "base"], "not base"),
        (["--variant", "magnitude-0.5+aird"], "already a repaired"),
        (["--variant", "magnitude-0.5", "--alpha-scale", "-1"], "positive"),
        (["--variant", "magnitude-0.5", "--name", "bad name"], "not usable"),
        (["--variant", "magnitude-0.5", "--alpha-scale", "3"], "needs alpha_scale auto"),
        (["--variant", "magnitude-0.5", "--alpha-scale", "3", "--placement", "source"], "other settings"),
        (["--variant", "magnitude-0.5", "--target-asr", "2"], "target_asr"),
        (["--variant", "magnitude-0.5", "--placement", "middle"], "placement"),
    ):
        assert main(["-q", "repair", "--run", str(study), *bad]) == 2
        assert match in capsys.readouterr().err
    assert main(["-q", "compare", "--run", str(study), "--variant", "nope"]) == 2
    assert "extract" in capsys.readouterr().err
    assert not hidden_files(study)


def test_run_bad_input(tmp_path, capsys):
    assert main(["-q", "run", "--run", str(tmp_path / "x"), "--set", "run.variants=wanda-0.5,zip-9"]) == 2
    assert "unknown compression method" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["-q", "run", "--run", str(tmp_path / "y"), "--set", "run.repair=sometimes"]) == 2
    assert "run.repair" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
