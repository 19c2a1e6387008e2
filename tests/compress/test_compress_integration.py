"""Compression of the real SmolLM2-135M-Instruct, and re-extraction on the compressed variant."""

from __future__ import annotations

import json

import pytest
import torch

from refusalkit.cli import main
from refusalkit.models.loading import load_model

pytestmark = pytest.mark.integration

CAL = ["--calibration", "wikipedia", "--n-calibration", "8", "--seq-len", "64"]
SMALL_YAML = """
model: smollm2-135m
n_train: 8
n_val: 4
n_test: 4
selection: {screen_keep: 3, prune_layer_fraction: 0.8}
validation: {max_new_tokens: 8}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compress") / "r"


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "small.yaml"
    p.write_text(SMALL_YAML)
    return str(p)


def test_wanda_variant_then_extract_on_it(run_dir, small_cfg, capsys):
    """compress first (the run directory takes --config), then re-extract on the variant."""
    code = main(["-q", "compress", "--run", str(run_dir), "--config", small_cfg, "--method", "wanda-0.5", *CAL])
    out, err = capsys.readouterr()
    assert code == 0, err
    info = json.loads((run_dir / "wanda-0.5" / "compression.json").read_text())
    assert info["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert info["calibration"]["n_tokens"] == 8 * 64 and info["calibration"]["chat_template"] is False
    assert len(info["per_layer"]) == 30 * 7
    assert all(r["sparsity"] == pytest.approx(0.5, abs=1e-3) for r in info["per_layer"].values())
    code = main(["-q", "extract", "--run", str(run_dir), "--variant", "wanda-0.5", "--config", small_cfg])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads((run_dir / "wanda-0.5" / "direction" / "direction.json").read_text())
    assert d["variant"] == "wanda-0.5" and d["n_layers"] == 30
    assert (run_dir / "wanda-0.5" / "direction" / "validation.json").is_file()


def test_llm_int8_variant_keeps_predictions(run_dir, small_cfg, capsys):
    code = main(["-q", "compress", "--run", str(run_dir), "--config", small_cfg, "--method", "llm-int8"])
    assert code == 0, capsys.readouterr().err
    base = load_model("smollm2-135m", dtype="float32", device="cpu")
    q = load_model("smollm2-135m", dtype="float32", device="cpu", path_override=str(run_dir / "llm-int8" / "model"))
    x = torch.tensor([base.tokenizer("The capital of France is Paris. The capital of Italy is")["input_ids"]])
    with torch.no_grad():
        a, b = base.model(x).logits[0], q.model(x).logits[0]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.9
    assert (a.softmax(-1) - b.softmax(-1)).abs().sum(-1).max().item() < 0.5
