"""One grammar across the commands: -q / -v anywhere, and `run`'s own flags for what it runs."""

from __future__ import annotations

import pytest

from refusalkit.cli.parser import build_parser, config_overrides


@pytest.mark.parametrize("argv", [["-q", "report", "--run", "R"], ["report", "--run", "R", "-q"], ["run", "--quiet"]])
def test_quiet_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.verbose is False


def test_verbose_and_defaults():
    p = build_parser()
    assert p.parse_args(["compare", "--run", "R", "--variant", "v", "-v"]).verbose is True
    args = p.parse_args(["report", "--run", "R"])
    assert (args.quiet, args.verbose) == (False, False)


def test_run_flags_for_variants_attacks_repair_and_draws():
    from refusalkit.core.settings import load_config

    args = build_parser().parse_args(
        ["run", "--variants", "wanda-0.5,awq-w4", "--attacks", "vanilla,decoding", "--repair", "all", "--draws", "3"]
    )
    cfg = load_config(overrides=config_overrides(args))
    assert cfg.run.variants == ["wanda-0.5", "awq-w4"] and cfg.run.attacks == "vanilla,decoding"
    assert cfg.run.repair == "all" and cfg.run.draws == 3


def test_shipped_configurations_by_name(capsys, tmp_path):
    from refusalkit.cli import main
    from refusalkit.core.settings import load_config, shipped
    from refusalkit.study.sweep import read_grid

    assert {"default", "llama2-7b-chat", "llama3-8b-instruct"} <= set(shipped("run"))
    assert load_config(files=["llama2-7b-chat"]).model == "meta-llama/Llama-2-7b-chat-hf"
    for name in shipped("sweep"):
        assert read_grid(name)  # every shipped sweep file reads by name
    assert main(["config", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == sorted(shipped("run")) and all(len(ln.split()) > 1 for ln in lines)
    assert main(["sweep", "--list"]) == 0
    assert capsys.readouterr().out.split()[0] == sorted(shipped("sweep"))[0]
    for argv in (["run", "--config", "llama9-chat", "--run", str(tmp_path / "r")], ["sweep", "--grid", "nope"],
                 ["config", "--show"], ["sweep", "--method", "wanda"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (argv, err)
    assert not (tmp_path / "r").exists()
