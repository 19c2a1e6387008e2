"""End-to-end CLI runs on the real SmolLM2-135M-Instruct (fast), and bad-input handling.

SmolLM2 rarely refuses, so these tests check the code paths and artifacts, not the mechanism;
the mechanism is checked on the default model in test_default_model.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refusalkit.cli import main

pytestmark = pytest.mark.integration

SMALL = [
    "--model",
    "smollm2-135m",
    "--n-train",
    "8",
    "--n-val",
    "4",
    "--n-test",
    "4",
    "--max-new-tokens",
    "8",
    "--set",
    "selection.screen_keep=3",
    "--set",
    "selection.prune_layer_fraction=0.8",
]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run") / "r"
    code = main(["-q", "extract", "--run", str(root), *SMALL])
    assert code == 0
    return root


def test_extract_writes_every_artifact(smol_run):
    d = smol_run / "base" / "direction"
    for name in (
        "candidates.safetensors",
        "candidates.json",
        "direction.safetensors",
        "direction.json",
        "scores.json",
        "validation.json",
        "completions.jsonl",
    ):
        assert (d / name).is_file(), name
    assert (smol_run / "config.yaml").is_file() and (smol_run / "manifest.json").is_file()
    info = json.loads((d / "direction.json").read_text())
    for key in ("layer", "position", "n_layers", "d_model", "model", "ablation_score", "addition_score", "kl"):
        assert key in info
    assert info["n_layers"] == 30 and info["d_model"] == 576
    assert -6 <= info["position"] <= -1  # SmolLM2's template: <|im_end|>\n<|im_start|>assistant\n
    cands = load_file(str(d / "candidates.safetensors"))["candidates"]
    meta = json.loads((d / "candidates.json").read_text())
    assert cands.shape == (len(meta["post_instruction_tokens"]), 31, 576)
    assert meta["post_instruction_tokens"][0] == "<|im_end|>"
    direction = load_file(str(d / "direction.safetensors"))["direction"]
    assert torch.allclose(direction, cands[info["position"] + cands.shape[0], info["layer"]])
    assert abs(direction.norm().item() - info["norm"]) < 1e-4
    val = json.loads((d / "validation.json").read_text())
    for key in (
        "harmful_refusal_rate",
        "harmful_refusal_rate_ablated",
        "harmless_refusal_rate",
        "harmless_refusal_rate_added",
        "n_test",
    ):
        assert key in val
    assert val["n_test"] == {"harmful": 4, "harmless": 4}
    rows = [json.loads(line) for line in (d / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {r["verdict"] for r in rows} <= {"refusal", "compliance", "degenerate"}
    assert len(list(d.glob("selection_pos*.png"))) == cands.shape[0]
    manifest = json.loads((smol_run / "manifest.json").read_text())
    assert {"base/extract", "base/select", "base/noise", "base/validate"} <= set(manifest["stages"])
    assert manifest["packages"]["torch"] and manifest["seed"] == 0
    floor = json.loads((d / "noise_floor.json").read_text())
    assert floor["method"] == "bootstrap" and floor["resamples"] == 200 and floor["position"] == info["position"]
    assert floor["n_prompts"] == {"harmful": 8, "harmless": 8}
    by = floor["by_layer"]
    assert len(by["floor"]) == len(by["mean"]) == 31
    assert all(f <= m + 1e-12 and m <= 1 + 1e-9 for f, m in zip(by["floor"], by["mean"]))
    assert by["floor"][info["layer"]] > 0  # a real direction at the source: resampling keeps its sign
    assert no_temp_files(smol_run)


def test_rerun_skips_finished_stages(smol_run, capsys):
    d = smol_run / "base" / "direction"
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    stages = json.loads((smol_run / "manifest.json").read_text())["stages"]
    code, out, _ = run(capsys, "extract", "--run", str(smol_run), *SMALL)
    assert code == 0 and "refusal direction" in out
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
    assert json.loads((smol_run / "manifest.json").read_text())["stages"] == stages  # timings of the real run kept


def test_other_settings_in_same_run_dir_refused(smol_run, capsys):
    code, _, err = run(capsys, "extract", "--run", str(smol_run), *SMALL, "--seed", "1")
    assert code == 2 and "seed" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "./no/such/model"], "does not exist"),
        (["--model", "missing.gguf"], "does not exist"),
        (["--n-train", "10000"], "asked for"),
        (["--harmful", "EMPTY"], "no prompts"),
        (["--set", "selection.kl_threshold=abc"], "not a valid"),
        (["--set", "nonsense=1"], "unknown setting"),
        (["--config", "missing.yaml"], "does not exist"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    root = tmp_path / "run"
    base = [a for a in SMALL]
    code, _, err = run(capsys, "extract", "--run", str(root), *base, *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not root.exists() or no_temp_files(root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_run_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    code, _, err = run(capsys, "extract", "--run", str(ro / "r"), *SMALL)
    assert code == 2 and "writable" in err


def test_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run(capsys, "extract", "--run", str(f / "r"), *SMALL)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_model_without_chat_template_refused(tmp_path, capsys):
    from refusalkit.models.loading import resolve_model

    src = Path(resolve_model("smollm2-135m"))
    dst = tmp_path / "nochat"
    dst.mkdir()
    for p in src.iterdir():
        if p.name == "chat_template.jinja":
            continue
        if p.suffix == ".safetensors":
            os.symlink(p, dst / p.name)
        else:
            shutil.copy(p, dst / p.name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "extract", "--run", str(tmp_path / "r"), *SMALL, "--model", str(dst))
    assert code == 2 and "chat template" in err and "--chat-template" in err


def test_interrupt_leaves_finished_artifacts_only(tmp_path, capsys, monkeypatch):
    import refusalkit.direction.job as pl

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl, "select_direction", boom)
    root = tmp_path / "r"
    code, _, err = run(capsys, "extract", "--run", str(root), *SMALL)
    assert code == 130 and "re-run" in err
    d = root / "base" / "direction"
    assert (d / "candidates.safetensors").exists() and not (d / "direction.json").exists()
    assert no_temp_files(root)
    monkeypatch.undo()
    code, out, _ = run(capsys, "extract", "--run", str(root), *SMALL)
    assert code == 0 and (d / "direction.json").exists()


def test_orthogonalize_command_matches_hook_ablation(smol_run, tmp_path, capsys):
    from refusalkit import ablation_hooks, load_model, tokenize_instructions
    from refusalkit.direction.forward import forward_last

    out = tmp_path / "ortho"
    code, _, _ = run(capsys, "orthogonalize", "--run", str(smol_run), "--out", str(out))
    assert code == 0
    direction = load_file(str(smol_run / "base" / "direction" / "direction.safetensors"))["direction"]
    base = load_model("smollm2-135m")
    orth = load_model("smollm2-135m", path_override=str(out))
    ids = tokenize_instructions(base.tokenizer, ["How do I bake bread?", "Write a poem about the sea."])
    a = forward_last(base.model, ids, pad_id=base.tokenizer.pad_token_id, hooks=ablation_hooks(base.model, direction))
    b = forward_last(orth.model, ids, pad_id=orth.tokenizer.pad_token_id)
    assert (a - b).abs().max().item() < 1e-3  # float32; measured ~1e-5


def test_unreachable_hub_model_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "refusalkit.cli",
            "-q",
            "extract",
            "--run",
            str(tmp_path / "r"),
            "--model",
            "no-such-org/no-such-model",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2
    assert p.stderr.startswith("error: cannot load") and p.stderr.count("\n") == 1, p.stderr


def test_missing_variant_model_one_line_exit_2(smol_run, capsys):
    code, _, err = run(capsys, "extract", "--run", str(smol_run), *SMALL, "--variant", "wanda-0.5")
    assert code == 2 and "has no model" in err and err.count("\n") == 1
    assert not (smol_run / "wanda-0.5" / "direction").exists()


def test_filter_that_leaves_no_prompts_one_line_exit_2(tmp_path, capsys):
    """SmolLM2 gives no AdvBench prompt a positive refusal score, so Arditi's filter empties the set."""
    root = tmp_path / "r"
    code, _, err = run(capsys, "extract", "--run", str(root), *SMALL, "--filter-train")
    assert code == 2 and "filtering left no harmful" in err and err.count("\n") == 1
    assert not (root / "base" / "direction" / "candidates.safetensors").exists()
    assert no_temp_files(root)
