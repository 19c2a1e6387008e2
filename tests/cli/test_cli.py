"""The command line's manners: --version, exit statuses (bad input 2, Ctrl-C 130, a failed stage of
``run`` 1), run directories that do not exist, ``--config`` honoured the same way by every command."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from refusalkit import __version__
from refusalkit.cli import main

from conftest import make_llama

main_module = importlib.import_module("refusalkit.cli.app")

COMPAT = Path(__file__).resolve().parents[1] / "fixtures" / "compat-0.1.0"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"refusalkit {__version__}"


def test_interrupt_exits_130_and_bad_input_2(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(main_module.COMMANDS, "config", interrupted)
    assert main(["config"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
    assert main(["compress", "--run", "x", "--method", "pruning-by-hand", "--model", "m"]) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["compress", "--method", "wanda", "--sparsity", "0.5"],
        ["evaluate", "--variant", "base"],
        ["compare", "--variant", "wanda-0.5"],
        ["repair", "--variant", "wanda-0.5"],
        ["orthogonalize", "--out", "o"],
        ["report"],
    ],
)
def test_a_mistyped_run_directory_is_not_created(tmp_path, capsys, argv):
    missing = tmp_path / "runs" / "mistyped"
    assert main(["-q", argv[0], "--run", str(missing), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and ("does not exist" in err[0] or "not a run directory" in err[0])
    assert not missing.exists()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "model"
    make_llama(tokenizer).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


def test_config_file_is_layered_over_the_run_in_every_command(tmp_path, tiny_dir, capsys, one_thread):
    """compress reads its calibration settings from --config on a new run and on an existing one;
    a --config that changes the analysis (the model) of an existing run is refused by every command."""
    cal = tmp_path / "cal.txt"
    cal.write_text("How do I bake bread?\nName three colours.\nWhat is 2 + 2?\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_dir}\ndtype: float32\ncompress:\n  calibration: {cal}\n  n_calibration: 2\n"
        "  seq_len: 16\n  group_size: 16\n"
    )
    root = tmp_path / "run"
    with one_thread():
        assert main(["-q", "compress", "--run", str(root), "--config", str(cfg), "--method", "wanda-0.5"]) == 0
        info = json.loads((root / "wanda-0.5" / "compression.json").read_text())
        assert info["calibration"]["source"] == str(cal) and info["calibration"]["n_samples"] == 2
        other = tmp_path / "c2.yaml"
        other.write_text(f"compress:\n  calibration: {cal}\n  n_calibration: 3\n  seq_len: 16\n")
        assert main(["-q", "compress", "--run", str(root), "--config", str(other), "--method", "sparsegpt-0.5"]) == 0
    info = json.loads((root / "sparsegpt-0.5" / "compression.json").read_text())
    assert info["calibration"]["n_samples"] == 3  # --config layered over the run's config.yaml
    assert "n_calibration: 2" in (root / "config.yaml").read_text()  # one call's settings are not persisted
    capsys.readouterr()
    bad = tmp_path / "c3.yaml"
    bad.write_text("model: smollm2-135m\n")
    for argv in (
        ["compress", "--method", "magnitude-0.5"],
        ["evaluate"],
        ["repair", "--variant", "wanda-0.5"],
        ["compare", "--variant", "wanda-0.5"],
    ):
        assert main(["-q", argv[0], "--run", str(root), "--config", str(bad), *argv[1:]]) == 2, argv
        assert "other settings (model)" in capsys.readouterr().err


def test_run_exits_1_and_lists_the_failed_stage(tmp_path, monkeypatch, capsys, one_thread):
    from refusalkit.core.errors import UserError
    from refusalkit.repair import job

    def no_alpha(*args, **kwargs):
        raise UserError("no alpha scale kept the variant within the budgets")

    shutil.copytree(COMPAT, tmp_path / "compat")
    monkeypatch.chdir(tmp_path / "compat")
    monkeypatch.setattr(job, "run_repair", no_alpha)
    with one_thread():
        assert main(["-q", "run", "--run", "run"]) == 1
    captured = capsys.readouterr()
    assert "stage magnitude-0.5+aird/repair failed: no alpha scale" in captured.err
    assert "| magnitude-0.5 |" in captured.out  # the report is still written and shown
    state = json.loads(Path("run/run.json").read_text())
    assert state["failed"] == ["magnitude-0.5+aird-paper/repair", "magnitude-0.5+aird/repair"]


def test_orthogonalize_force_replaces_a_model_folder_only(tmp_path, tokenizer, capsys, one_thread):
    """--out that holds a model (config.json) is refused, with a hint, unless --force, which replaces it
    whole; any other non-empty folder is refused even with --force, and left as it was."""
    from safetensors.torch import load_file

    from conftest import hidden_files, make_tiny_run

    root, _ = make_tiny_run(tmp_path, tokenizer)
    out = tmp_path / "ortho"
    out.mkdir()  # an empty folder is fine without --force
    argv = ["-q", "orthogonalize", "--run", str(root), "--out", str(out)]
    with one_thread():
        assert main(argv) == 0
        capsys.readouterr()
        first = load_file(str(out / "model.safetensors"))
        (out / "stale.txt").write_text("from an older model")
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not empty" in err[0] and "give --force to replace the model" in err[0]
        assert (out / "stale.txt").exists()
        assert main([*argv, "--force"]) == 0
    assert "orthogonalized model written to" in capsys.readouterr().out
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()  # replaced, not merged
    again = load_file(str(out / "model.safetensors"))
    assert again.keys() == first.keys() and all((again[k] == first[k]).all() for k in first)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["-q", "orthogonalize", "--run", str(root), "--out", str(other), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--force" not in err[0]
    assert [p.name for p in other.iterdir()] == ["notes.txt"] and (other / "notes.txt").read_text() == "mine"
    assert not hidden_files(tmp_path)  # no temporary folder left beside --out
