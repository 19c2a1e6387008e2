"""config.py (precedence, validation, the commented default file) and artifacts.py (atomic writes,
corrupt files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from refusalkit.core.artifacts import (
    atomic_path,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
    write_jsonl,
    write_text,
)
from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.settings import commented_yaml, load_config

# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


def _yaml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_defaults():
    cfg = load_config()
    assert cfg.to_dict() == Config().to_dict()
    assert cfg.n_train == 128 and cfg.selection.kl_threshold == 0.1 and cfg.system_prompt is None


def test_precedence_defaults_file_overrides(tmp_path):
    path = _yaml(tmp_path, "n_train: 10\nn_val: 12\nseed: 3\nselection:\n  kl_threshold: 0.5\n  mode: full\n")
    from_file = load_config(path)
    assert (from_file.n_train, from_file.n_val, from_file.seed) == (10, 12, 3)
    assert from_file.selection.kl_threshold == 0.5 and from_file.selection.mode == "full"
    assert from_file.n_test == Config().n_test  # untouched: default
    assert from_file.selection.prune_layer_fraction == 0.2

    cfg = load_config(path, {"n_train": 20, "selection.kl_threshold": 0.25, "seed": None, "batch_size": 4})
    assert cfg.n_train == 20  # override beats file
    assert cfg.selection.kl_threshold == 0.25  # dotted override beats file
    assert cfg.selection.mode == "full"  # the file's sibling setting in the same section is kept
    assert cfg.seed == 3  # None overrides are ignored
    assert cfg.batch_size == 4 and cfg.n_val == 12


def test_hyphenated_keys_and_type_coercion(tmp_path):
    cfg = load_config(_yaml(tmp_path, "n-train: '16'\nfilter_train: 'yes'\nselection:\n  kl-threshold: 1\n"))
    assert cfg.n_train == 16 and isinstance(cfg.n_train, int)
    assert cfg.filter_train is True
    assert cfg.selection.kl_threshold == 1.0 and isinstance(cfg.selection.kl_threshold, float)


@pytest.mark.parametrize(
    "text",
    [
        "n_trian: 5\n",  # unknown top-level key
        "selection:\n  kl_treshold: 0.2\n",  # unknown nested key
        "n_train: abc\n",  # bad int
        "n_train: 1.5\n",  # non-integral float for an int
        "n_train: true\n",  # bool is not an int
        "selection:\n  kl_threshold: high\n",  # bad float
        "filter_train: maybe\n",  # bad bool
        "filter_train: 3\n",
        "selection: 3\n",  # a section given a scalar
        "selection:\n  mode: quick\n",  # invalid choice
        "selection:\n  fallback: ignore\n",
        "selection:\n  prune_layer_fraction: 1.0\n",
        "n_val: 0\n",
        "batch_size: 0\n",
        "- a\n- b\n",  # not a mapping
        "n_train: [1, 2\n",  # invalid YAML
    ],
)
def test_bad_config_files_raise_user_error(tmp_path, text):
    with pytest.raises(UserError):
        load_config(_yaml(tmp_path, text))


def test_bad_overrides_raise_user_error():
    with pytest.raises(UserError):
        load_config(None, {"n_train": "abc"})
    with pytest.raises(UserError):
        load_config(None, {"selection.nope": 1})
    with pytest.raises(UserError):
        load_config(None, {"nope.kl_threshold": 1})


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError):
        load_config(str(tmp_path / "missing.yaml"))


def test_empty_config_file_gives_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "# nothing\n")).to_dict() == Config().to_dict()


def test_screen_prompts_clamped_to_n_val():
    cfg = load_config(None, {"n_val": 4, "selection.screen_prompts": 8})
    assert cfg.selection.screen_prompts == 4


def test_optional_settings_accept_null(tmp_path):
    cfg = load_config(_yaml(tmp_path, "system_prompt: 'Be brief.'\n"))
    assert cfg.system_prompt == "Be brief."
    cfg = load_config(_yaml(tmp_path, "system_prompt: null\nchat_template: null\n"))
    assert cfg.system_prompt is None and cfg.chat_template is None


def test_null_for_required_string_setting_is_rejected(tmp_path):
    with pytest.raises(UserError):
        load_config(_yaml(tmp_path, "model:\n"))


def test_commented_yaml_round_trip(tmp_path):
    text = commented_yaml()
    assert yaml.safe_load(text) == Config().to_dict()
    # Every setting is documented by a comment line.
    n_comments = sum(1 for line in text.splitlines() if line.lstrip().startswith("# ") and "Precedence" not in line)
    n_leaves = 0
    stack = [Config().to_dict()]
    while stack:
        d = stack.pop()
        for v in d.values():
            if isinstance(v, dict):
                stack.append(v)
            else:
                n_leaves += 1
    assert n_comments == n_leaves
    # The text is also a valid config file that gives the defaults.
    assert load_config(_yaml(tmp_path, text)).to_dict() == Config().to_dict()


def test_shipped_default_config_matches(tmp_path):
    shipped = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    if not shipped.is_file():
        pytest.skip("configs/default.yaml is not in this checkout")
    assert yaml.safe_load(shipped.read_text(encoding="utf-8")) == Config().to_dict()


def test_analysis_key_ignores_device_and_batch_size():
    a = load_config(None, {"device": "cpu", "batch_size": 2}).analysis_key()
    b = load_config(None, {"batch_size": 64}).analysis_key()
    assert a == b
    assert load_config(None, {"seed": 1}).analysis_key() != b


# ----------------------------------------------------------------------------------------------
# artifacts
# ----------------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_exception_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            assert tmp.exists() and tmp.parent == target.parent
            raise RuntimeError("interrupted")
    assert _leftovers(target.parent) == []


def test_atomic_path_exception_keeps_previous_file(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new but partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == ["out.txt"]


def test_atomic_path_success(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done"
    assert _leftovers(tmp_path) == ["a.txt"]


def test_atomic_write_respects_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_atomic_path_unwritable_parent(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError):
        with atomic_path(blocker / "out.json"):
            pass


def test_json_round_trip_and_corrupt(tmp_path):
    p = tmp_path / "x.json"
    write_json(p, {"a": torch.tensor([1.0, 2.0]), "b": Path("/tmp"), "c": torch.tensor(3)})
    assert read_json(p) == {"a": [1.0, 2.0], "b": "/tmp", "c": 3}
    p.write_text('{"a": [1, 2')  # truncated
    with pytest.raises(UserError, match="corrupt"):
        read_json(p)
    with pytest.raises(UserError, match="missing"):
        read_json(tmp_path / "none.json")


def test_write_jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    write_jsonl(p, [{"a": 1}, {"b": torch.tensor(2.5)}])
    assert [json.loads(line) for line in p.read_text().splitlines()] == [{"a": 1}, {"b": 2.5}]


def test_tensors_round_trip(tmp_path):
    p = tmp_path / "t.safetensors"
    t = {"x": torch.randn(3, 4), "y": torch.arange(5)}
    save_tensors(p, t, metadata={"k": "v"})
    got = load_tensors(p)
    assert set(got) == {"x", "y"} and torch.equal(got["x"], t["x"]) and torch.equal(got["y"], t["y"])
    assert _leftovers(tmp_path) == ["t.safetensors"]


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty", "bad_header_json"])
def test_load_tensors_corrupt_raises_user_error(tmp_path, corruption):
    p = tmp_path / "t.safetensors"
    save_tensors(p, {"x": torch.randn(16, 16)})
    data = p.read_bytes()
    if corruption == "garbage":
        p.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    elif corruption == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif corruption == "empty":
        p.write_bytes(b"")
    else:
        header = b"{not json"
        p.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(UserError, match="corrupt"):
        load_tensors(p)


def test_load_tensors_missing(tmp_path):
    with pytest.raises(UserError, match="missing"):
        load_tensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["llama2-7b-chat.yaml", "llama3-8b-instruct.yaml"])
def test_shipped_paper_configs_load(name, caplog, recwarn):
    """The paper configurations load with no legacy key and no warning, and repair with the default
    search, the paper's literal edit beside it."""
    import logging

    import yaml

    from refusalkit.compress.job import CompressSpec
    from refusalkit.core.migrate import LEGACY_KEYS, REMOVED_KEYS
    from refusalkit.evaluation.job import task_names
    from refusalkit.evaluation.utility import resolve_tasks

    path = Path(__file__).resolve().parents[2] / "configs" / name
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    flat = {f"{k}.{kk}" for k, v in raw.items() if isinstance(v, dict) for kk in v} | set(raw)
    assert not flat & (set(LEGACY_KEYS) | set(REMOVED_KEYS)), flat & (set(LEGACY_KEYS) | set(REMOVED_KEYS))
    with caplog.at_level(logging.WARNING):
        cfg = load_config(str(path))
    assert not caplog.records and not recwarn.list
    assert cfg.model.startswith("meta-llama/") and cfg.evaluation.max_new_tokens == "256"
    assert cfg.evaluation.decoding_grid == "huang" and cfg.repair.alpha_scale == "auto"
    assert cfg.repair.placement == "auto" and cfg.run.paper_edit and cfg.compress.seq_len == 2048
    specs = [CompressSpec(method=v) for v in cfg.run.variants]
    assert {s.method for s in specs} >= {"magnitude", "wanda", "llm-int8", "awq"}
    assert {t.name for t in resolve_tasks(task_names(cfg.evaluation.utility_tasks))} >= {"boolq", "mmlu_dev"}


def test_run_section_validation():
    with pytest.raises(UserError, match="run.repair"):
        load_config(None, {"run.repair": "sometimes"})
    with pytest.raises(UserError, match="repair.alpha_scale"):
        load_config(None, {"repair.alpha_scale": "-2"})
    with pytest.raises(UserError, match="repair.scales"):
        load_config(None, {"repair.scales": "1,x"})
    with pytest.raises(UserError, match="run.attacks must be one of vanilla, decoding, suffix"):
        load_config(None, {"run.attacks": "vanilla,fuzz"})
    assert load_config(None, {"repair.alpha_scale": "auto"}).repair.alpha_scale == "auto"
    # run settings do not change the analysis: a run directory accepts other run settings
    assert "run" not in load_config(None, {"run.repair": "all"}).analysis_key()


def test_run_profiles_sit_between_defaults_and_file(tmp_path):
    from refusalkit.core.profiles import CPU, PROFILES, QUICK, resolve_profile

    f = tmp_path / "c.yaml"
    f.write_text("n_train: 96\nevaluation:\n  n_prompts: 40\n")
    cfg = load_config(str(f), {"evaluation.n_prompts": 30}, profile=CPU)
    assert cfg.n_train == 96  # the file beats the profile
    assert cfg.evaluation.n_prompts == 30  # --set beats both
    assert cfg.n_val == CPU["n_val"] and cfg.run.variants == CPU["run.variants"]  # the profile beats the defaults
    assert load_config(None, profile=PROFILES["full"]).to_dict() == Config().to_dict()
    for prof in (CPU, QUICK):  # every profile key is a real, valid setting
        cfg = load_config(None, profile=prof)
        for key, value in prof.items():
            section, _, name = key.rpartition(".")
            assert getattr(getattr(cfg, section) if section else cfg, name) == value, key
    assert resolve_profile("quick", "cuda") == "quick"
    assert resolve_profile("auto", "cpu") == "cpu"  # an explicit CPU device never gets the GPU settings
    expected = "full" if torch.cuda.is_available() else "cpu"
    assert resolve_profile("auto", "auto") == expected


def test_utility_tasks_none_means_perplexity_only():
    from refusalkit.evaluation.job import task_names

    assert task_names("none") == []
    assert task_names("all") == ["offline", "paper"]
    assert load_config(None, {"evaluation.utility_tasks": "none"}).evaluation.utility_tasks == "none"


def test_settings_renamed_in_0_2_0_still_load(tmp_path):
    """A config.yaml of refusalkit 0.1.0 keeps AIRD and calibration settings in its run section."""
    path = _yaml(
        tmp_path,
        "run:\n  aird_scales: '1,16'\n  aird_search_prompts: 16\n  aird_alpha_scale: auto\n"
        "  aird_placement: previous\n  aird_direction: unit\n  n_calibration: 16\n"
        "  calibration: alpaca\n  variants: wanda-0.5,llm-int8\n",
    )
    cfg = load_config(path)
    assert cfg.repair.scales == [1.0, 16.0] and cfg.repair.search_prompts == 16 and cfg.repair.alpha_scale == "auto"
    assert cfg.repair.placement == "previous" and cfg.repair.direction == "unit"
    assert cfg.compress.n_calibration == 16 and cfg.compress.calibration == "alpaca"
    assert cfg.run.variants == ["wanda-0.5", "llm-int8"]
    assert load_config(None, {"run.aird_scales": "2,4"}).repair.scales == [2.0, 4.0]  # --set with an old key
    assert load_config(None, {"run.aird_scales": 4}).repair.scales == [4.0]  # one number: a list of one
    assert load_config(None, {"run.variants": "wanda-0.5"}).run.variants == ["wanda-0.5"]


def test_fixed_choices_are_checked_where_every_setting_passes():
    for key, value in (
        ("selection.mode", "slow"),
        ("evaluation.backend", "tgi"),
        ("dtype", "int4"),
        ("compress.backend", "cuda"),
        ("repair.direction", "both"),
    ):
        with pytest.raises(UserError, match=key.split(".")[-1]):
            load_config(None, {key: value})


def test_every_section_is_printed_and_every_flag_has_help():
    from refusalkit.cli.parser import build_parser, config_fields

    text = commented_yaml()
    for section in ("selection:", "validation:", "evaluation:", "compress:", "repair:", "run:"):
        assert "\n" + section in text
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings)
    exposed = {d for d, f, _ in config_fields() if f.metadata.get("commands")}
    assert {"compress.calibration", "repair.scales", "evaluation.n_prompts", "selection.mode"} <= exposed


def test_adaptive_stage_attacks():
    """run.adaptive: the attacks the adaptive stage adds to what every variant already got."""
    from refusalkit.study.run import adaptive_attacks

    cfg = load_config(None, {})
    cfg.evaluation.attacks = ["vanilla"]
    assert adaptive_attacks(cfg, gpu=False) == []  # null (auto): not on a CPU
    assert adaptive_attacks(cfg, gpu=True) == ["decoding", "suffix", "ablation"]
    cfg.evaluation.attacks = ["vanilla", "decoding", "suffix", "ablation"]  # run.attacks auto on a GPU
    assert adaptive_attacks(cfg, gpu=True) == []  # nothing left to add: no stage
    cfg = load_config(None, {"run.adaptive": "true"})  # as --set gives it
    cfg.evaluation.attacks = ["vanilla", "ablation"]
    assert adaptive_attacks(cfg, gpu=False) == ["decoding", "suffix"]
    cfg = load_config(None, {"run.adaptive": "false"})
    assert adaptive_attacks(cfg, gpu=True) == []
    with pytest.raises(UserError, match="adaptive"):
        load_config(None, {"run.adaptive": "sometimes"})


@pytest.mark.parametrize("key", ["verdict.asr_margin", "verdict.over_refusal_margin", "verdict.degenerate_margin"])
@pytest.mark.parametrize("value", [0, 1, -0.05, 1.5])
def test_a_margin_outside_its_range_is_a_user_error(key, value):
    with pytest.raises(UserError, match=rf"{key} is an absolute margin on a rate: between 0 and 1"):
        load_config(None, {key: value})
    assert getattr(load_config(None, {key: 0.03}).verdict, key.split(".")[1]) == 0.03


def test_a_bad_margin_exits_2_from_the_cli(tmp_path, capsys):
    from refusalkit.cli import main

    assert main(["evaluate", "--run", str(tmp_path / "r"), "--model", "default", "--set", "verdict.asr_margin=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: verdict.asr_margin is an absolute margin") and not (tmp_path / "r").exists()
