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


RUN_COMMANDS = ("extract", "orthogonalize", "compress", "evaluate", "compare", "repair", "run", "report", "sweep")
CREATES = ("extract", "compress", "evaluate", "run", "sweep")  # may start a run directory


def _subparsers():
    import argparse

    from refusalkit.cli.parser import build_parser

    p = build_parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_command_that_touches_a_run_shares_one_grammar():
    subs = _subparsers()
    for name in RUN_COMMANDS:
        flags = {o: a for a in subs[name]._actions for o in a.option_strings}
        for flag in ("--run", "--config", "--set", "--force", "-q", "-v"):
            assert flag in flags, (name, flag)
        assert flags["--run"].required == (name not in ("run", "sweep")), name  # sweep --list needs no run
        assert flags["--set"].help.startswith("any setting"), name
        assert ("--profile" in flags) == (name in CREATES), name
        if name in CREATES:
            assert flags["--profile"].choices == ("auto", "full", "cpu", "quick")


def test_cli_page_is_generated_from_the_parser():
    """docs/cli.md shows each command's flags with the help and defaults --help prints (regenerate with
    python -m refusalkit.cli.reference > docs/cli.md)."""
    from pathlib import Path

    from refusalkit.cli.reference import reference

    page = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    assert page.read_text(encoding="utf-8") == reference()


def test_help_shows_the_defaults_the_code_uses():
    """Every "[default: X; cpu profile: Y]" of a generated flag is the field's default and the profile's
    value; every "(default N)" of another flag is its argparse default or the method's own default."""
    import re

    from refusalkit.cli.parser import CONFIG_DEST, _show, config_fields
    from refusalkit.compress.job import CompressSpec
    from refusalkit.core.config import CompressConfig
    from refusalkit.core.profiles import PROFILES

    defaults = {dotted: default for dotted, _, default in config_fields()}
    checked = 0
    for name, sub in _subparsers().items():
        for a in sub._actions:
            text = " ".join((a.help or "").replace("%%", "%").split())
            if a.dest.startswith(CONFIG_DEST):
                dotted = a.dest[len(CONFIG_DEST) :]
                shown = dict(part.split(": ", 1) for part in re.search(r"\[(default: .*)\]$", text)[1].split("; "))
                assert shown.pop("default") == _show(defaults[dotted]), (name, dotted)
                for profile, value in shown.items():
                    assert value == _show(PROFILES[profile.removesuffix(" profile")][dotted]), (name, dotted)
                checked += 1
                continue
            for said in re.findall(r"\(default (-?[0-9.]+)\)", text):
                if a.default is not None:
                    assert float(said) == float(a.default), (name, a.dest)
                elif a.dest == "sparsity":
                    assert float(said) == float(CompressSpec.from_config("wanda", CompressConfig()).sparsity)
                elif a.dest == "bits":
                    assert float(said) == float(CompressSpec.from_config("awq", CompressConfig()).bits)
                else:
                    raise AssertionError(f"{name} {a.dest}: help names a default the code does not have")
                checked += 1
    assert checked > 80


def test_evaluate_on_a_new_run_uses_the_profile_run_uses(tmp_path):
    """On a CPU, evaluate on a new directory measures with the cpu profile (vanilla only, 32 tokens, the
    profile's prompt counts), as refusalkit run does; an existing run keeps its recorded settings."""
    import torch

    from refusalkit.cli.parser import build_parser
    from refusalkit.cli.settings import command_config
    from refusalkit.core.layout import prepare
    from refusalkit.core.profiles import PROFILES, resolve_profile
    from refusalkit.core.settings import load_config
    from refusalkit.study.run import attacks_for

    if torch.cuda.is_available():
        pytest.skip("the auto profile is full on a GPU machine")
    args = build_parser().parse_args(["evaluate", "--run", str(tmp_path / "new"), "--model", "smollm2-135m"])
    cfg, _ = command_config(args, may_create=True)
    run_cfg = load_config(None, {"model": "smollm2-135m"}, profile=PROFILES[resolve_profile("auto", "auto")])
    run_cfg.evaluation.attacks = attacks_for(run_cfg, gpu=False)
    assert cfg.evaluation == run_cfg.evaluation
    assert cfg.evaluation.attacks == ["vanilla"] and cfg.evaluation.max_new_tokens == "32"
    full = build_parser().parse_args(["evaluate", "--run", str(tmp_path / "f"), "--model", "x/y", "--profile", "full"])
    assert command_config(full, may_create=True)[0].evaluation.attacks == ["vanilla", "decoding", "suffix"]
    prepare(load_config(None, {"model": "smollm2-135m"}), tmp_path / "old", force=False)  # made with the defaults
    old = build_parser().parse_args(["evaluate", "--run", str(tmp_path / "old")])
    assert command_config(old)[0].evaluation.attacks == ["vanilla", "decoding", "suffix"]
