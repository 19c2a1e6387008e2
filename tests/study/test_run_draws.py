"""`refusalkit run --draws 2` end to end on a tiny Llama saved to disk: the calibrated variant is made at two
calibration seeds and every stage runs on both; the edit the repair search chose on the first draw is applied
unchanged to the second; the method without calibration is made once; the report pools the draws, and pairs
the refusal-preserving setting with its plain method draw by draw (prevention against cure)."""

from __future__ import annotations

import pytest

from refusalkit.cli import main
from refusalkit.core import artifacts

from conftest import CHATML_TEMPLATE, make_llama
from families import TINY_RUN

pytestmark = pytest.mark.integration

SETTINGS = {
    **TINY_RUN,
    "run.variants": "[wanda-0.5, magnitude-0.5, rp-wanda-0.5]",
    "run.paper_edit": "false",
    "repair.direction": "raw",
    "compress.n_calibration": 4,
    "compress.seq_len": 32,
    "compress.n_refusal": 4,
    "run.drop_models": "true",
}


def test_run_with_two_draws(tokenizer, tmp_path, capsys, one_thread):
    model_dir = tmp_path / "model"
    with one_thread():
        make_llama(tokenizer).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    template = tmp_path / "chat.jinja"
    template.write_text(CHATML_TEMPLATE)
    root = tmp_path / "run"
    sets = [x for k, v in SETTINGS.items() for x in ("--set", f"{k}={v}")]
    args = ["run", "--run", str(root), "--model", str(model_dir), "--set", f"chat_template={template}",
            "--quick", "--draws", "2", *sets]  # fmt: skip
    with one_thread():
        code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    said = out.out + out.err
    assert "[run] magnitude-0.5: magnitude needs no calibration, so it has one draw" in said
    assert "[run] wanda-0.5: 2 draws, calibration seeds 0–1; the repair is searched on the first" in said
    assert not (root / "magnitude-0.5_seed1").exists()
    first = artifacts.read_json(root / "wanda-0.5" / "compression.json")
    second = artifacts.read_json(root / "wanda-0.5_seed1" / "compression.json")
    assert (first["spec"]["seed"], second["spec"]["seed"]) == (0, 1)
    assert first["calibration"] != second["calibration"]  # another calibration sample
    for name in ("wanda-0.5_seed1", "wanda-0.5_seed1+aird"):
        assert (root / name / "eval" / "asr.json").is_file() and (root / "compare" / f"{name}.json").is_file(), name
    assert (root / "wanda-0.5_seed1" / "direction" / "direction.json").is_file()  # selected, as the first draw
    searched = artifacts.read_json(root / "wanda-0.5+aird" / "repair.json")
    moved = artifacts.read_json(root / "wanda-0.5_seed1+aird" / "repair.json")
    assert searched["auto"] and not moved["auto"] and moved["transferred_from"] == "wanda-0.5+aird"
    for key in ("layer", "placement", "direction", "sparsity_preserving", "alphas"):
        assert moved[key] == searched[key], key
    assert float(moved["alpha_scale"]) == float(searched["alpha_scale"])
    report = (root / "report.md").read_text()
    assert "wanda-0.5 over 2 draws (wanda-0.5, wanda-0.5_seed1)" in report
    assert "wanda-0.5+aird (" in report and "on 2 draws, works on " in report
    assert "one compression setting at calibration seeds 0, 1" in report and "Each further draw cost " in report
    stages = artifacts.read_json(root / "run.json")["stages"]
    assert stages["wanda-0.5_seed1+aird/repair"]["status"] == "done"
    # control by behaviour on the test split, for every variant that is not a repair; the base model's own
    # conditions come from its validation (nothing generated twice)
    base = artifacts.read_json(root / "base" / "direction" / "control.json")
    assert base["generated"] == [] and set(base["directions"]) == {"own"}
    for name in ("wanda-0.5", "wanda-0.5_seed1", "magnitude-0.5"):
        ctl = artifacts.read_json(root / name / "direction" / "control.json")
        assert set(ctl["directions"]) == {"own", "base"} and ctl["n_test"] == {"harmful": 3, "harmless": 3}
        assert ctl["conditions"]["harmful_baseline"].keys() == base["conditions"]["harmful_baseline"].keys()
        assert stages[f"{name}/control"]["status"] == "done"
    assert not (root / "wanda-0.5+aird" / "direction" / "control.json").exists()
    assert "## Control by behaviour" in report and "- wanda-0.5_seed1 (3 + 3 test prompts): own direction:" in report
    # the refusal-preserving setting at the same two seeds, judged against wanda-0.5 and its repair
    rp = artifacts.read_json(root / "rp-wanda-0.5_seed1" / "compression.json")
    assert rp["spec"]["seed"] == 1 and rp["calibration"] == second["calibration"]
    prevention = report.split("## Prevention: refusal-preserving compression")[1].split("\n## ")[0]
    assert "- rp-wanda-0.5 against wanda-0.5 over 2 draws (rp-wanda-0.5, rp-wanda-0.5_seed1): " in prevention
    assert "ASR vs plain + repair (wanda-0.5+aird…)" in prevention and "cost per draw: plain " in prevention
    results = artifacts.read_json(root / "results.json")
    assert [p["repaired"] for p in results["prevention"]] == [["wanda-0.5+aird", "wanda-0.5_seed1+aird"]]
    # run.drop_models: the later draws' models (and their repairs') are gone once measured, the first draw's stay;
    # a second call finds everything done and remakes nothing
    for name in ("wanda-0.5_seed1", "wanda-0.5_seed1+aird", "rp-wanda-0.5_seed1"):
        assert not (root / name / "model").exists() and (root / name / "eval" / "asr.json").is_file(), name
    assert (root / "wanda-0.5" / "model").is_dir() and (root / "rp-wanda-0.5" / "model").is_dir()
    assert "rp-wanda-0.5_seed1" in artifacts.read_json(root / "run.json")["dropped"]
    with one_thread():
        assert main(args) == 0
    again = capsys.readouterr()
    assert "[run] wanda-0.5_seed1/compress" not in again.err + again.out
    assert not (root / "wanda-0.5_seed1" / "model").exists()


def test_a_refusal_preserving_variant_asking_for_more_prompts_than_the_run_trains_on(tmp_path, capsys):
    """Refused before any work: one line, exit 2, no run directory."""
    code = main(["run", "--run", str(tmp_path / "run"), "--variants", "wanda-0.5,rp-wanda-0.5", "--set", "n_train=8"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "rp-wanda-0.5 corrects toward compress.n_refusal = 32 training prompts of each kind, but this run" in last
    assert not (tmp_path / "run").exists()


def test_draws_below_one_is_refused(tmp_path, capsys):
    code = main(["run", "--run", str(tmp_path / "run"), "--draws", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run.draws must be a whole number 1 or more" in err
    assert not (tmp_path / "run").exists()
