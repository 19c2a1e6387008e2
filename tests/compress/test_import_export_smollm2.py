"""GGUF round trips on the real SmolLM2-135M-Instruct (a llama: the rotary permutation is exercised):
its own Q4_1 file imported as a variant, a refusalkit variant exported and imported back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from refusalkit.cli import main
from refusalkit.core.external import artifact_file
from refusalkit.models.loading import load_model

pytestmark = pytest.mark.integration


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("roundtrip") / "r"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    lm = load_model(str(path), dtype="float32", device="cpu")
    return {k: v.clone() for k, v in lm.model.state_dict().items() if ".layers." in k and v.dim() == 2}


def test_import_the_base_gguf_itself_measures_its_stored_bits(run_dir, capsys):
    gguf = artifact_file("smollm2-135m")
    code, out, err = cli(
        capsys, "compress", "--run", str(run_dir), "--model", "smollm2-135m", "--from", str(gguf), "--name", "q41"
    )
    assert code == 0, err
    info = json.loads((run_dir / "q41" / "compression.json").read_text())
    assert info["format"] == "gguf" and "Q4_1" in info["types"]
    # Q4_1: 4-bit codes and two float16 numbers (scale, minimum) per 32 weights = 5 bits; other types raise it
    assert 5.0 <= info["measured"]["bits_per_weight"] < 6.5
    assert info["bits"] == pytest.approx(info["measured"]["bits_per_weight"], abs=0.01)
    # the base model is this file dequantized: the same weights, so no relative error anywhere
    assert max(r["rel_error"] for r in info["per_layer"].values()) == 0.0


@pytest.mark.parametrize("typ,tol", [("f16", 1e-3), ("q8_0", 1 / 127)])
def test_export_then_import_gives_back_the_weights_within_the_types_step(run_dir, capsys, tmp_path, typ, tol):
    if not (run_dir / "magnitude-0.5" / "compression.json").exists():
        code, _, err = cli(
            capsys, "compress", "--run", str(run_dir), "--model", "smollm2-135m", "--method", "magnitude-0.5"
        )
        assert code == 0, err
    out = tmp_path / f"export-{typ}"
    code, stdout, err = cli(
        capsys,
        "export",
        "--run",
        str(run_dir),
        "--variant",
        "magnitude-0.5",
        "--format",
        "gguf",
        "--type",
        typ,
        "--out",
        str(out),
    )
    assert code == 0, err
    rec = json.loads((out / "reproduce.json").read_text())
    (name,) = rec["files"]
    assert rec["size_bytes"] < rec["dense_bytes"] / (1.8 if typ == "f16" else 3.5)
    code, _, err = cli(capsys, "compress", "--run", str(run_dir), "--from", str(out / name), "--name", f"back-{typ}")
    assert code == 0, err  # same architecture, tokenizer and chat template as the base: the checks pass
    a, b = _weights(run_dir / "magnitude-0.5" / "model"), _weights(run_dir / f"back-{typ}" / "model")
    assert a.keys() == b.keys()
    for k in a:
        scale = a[k].abs().amax().clamp(min=1e-8)
        assert ((a[k] - b[k]).abs().max() / scale).item() <= tol, k
        assert torch.equal(b[k][a[k] == 0], torch.zeros_like(b[k][a[k] == 0])), k  # zeros stay zeros
    info = json.loads((run_dir / f"back-{typ}" / "compression.json").read_text())
    before = json.loads((run_dir / "magnitude-0.5" / "compression.json").read_text())
    assert info["measured"]["sparsity"] >= before["sparsity"] - 1e-9
    shutil.rmtree(out)  # half a GB each: CI's disk is small
    shutil.rmtree(run_dir / f"back-{typ}")


def test_source_type_requantizes_an_imported_q4_1_variant_onto_its_own_grid(run_dir, capsys, tmp_path):
    if not (run_dir / "q41" / "compression.json").exists():
        pytest.skip("needs the imported Q4_1 variant of the first test")
    out = tmp_path / "src"
    code, _, err = cli(
        capsys,
        "export",
        "--run",
        str(run_dir),
        "--variant",
        "q41",
        "--format",
        "gguf",
        "--type",
        "source",
        "--out",
        str(out),
    )
    assert code == 0, err
    rec = json.loads((out / "reproduce.json").read_text())
    assert rec["type"] == "q4_1" and rec["keeps_zeros"] is False
    code, _, err = cli(
        capsys, "compress", "--run", str(run_dir), "--from", str(next(iter(out.glob("*.gguf")))), "--name", "q41-again"
    )
    assert code == 0, err
    a, b = _weights(run_dir / "q41" / "model"), _weights(run_dir / "q41-again" / "model")
    for k in a:  # values already on a Q4_1 grid come back on it (float16 scales: within 1e-3 of the range)
        scale = a[k].abs().amax().clamp(min=1e-8)
        assert ((a[k] - b[k]).abs().max() / scale).item() < 2e-3, k
    shutil.rmtree(out)
    shutil.rmtree(run_dir / "q41-again")
