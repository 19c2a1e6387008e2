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


# the run's base model, with training and validation sizes that keep its direction's extraction short
SMOLLM2 = ("--model", "smollm2-135m", "--set", "n_train=24", "--set", "n_val=8")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("roundtrip") / "r"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    lm = load_model(str(path), dtype="float32", device="cpu")
    return {k: v.clone() for k, v in lm.model.state_dict().items() if ".layers." in k and v.dim() == 2}


def test_import_the_base_gguf_itself_measures_its_stored_bits(run_dir, capsys):
    gguf = artifact_file("smollm2-135m")
    code, out, err = cli(capsys, "compress", "--run", str(run_dir), *SMOLLM2, "--from", str(gguf), "--name", "q41")
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
        code, _, err = cli(capsys, "compress", "--run", str(run_dir), *SMOLLM2, "--method", "magnitude-0.5")
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
    if typ == "q8_0":
        _direction_survives_the_round_trip(run_dir, capsys, "magnitude-0.5", f"back-{typ}")
    shutil.rmtree(out)  # half a GB each: CI's disk is small
    shutil.rmtree(run_dir / f"back-{typ}")


def _direction_survives_the_round_trip(run_dir: Path, capsys, variant: str, back: str) -> None:
    """The refusal direction re-extracted on the imported file lies within the base direction's
    noise floor of the variant's own: their cosine at the base's source (layer, token) is above the
    floor that redrawing the training prompts gives there (conservative: a bootstrap resample)."""
    from refusalkit.core import artifacts
    from refusalkit.core.layout import RunLayout, recorded_config
    from refusalkit.direction.job import run_extract

    code, _, err = cli(capsys, "extract", "--run", str(run_dir), "--no-validation")  # the base direction, its floor
    assert code == 0, err
    layout = RunLayout(run_dir)
    cfg = recorded_config(layout)
    info = artifacts.read_json(layout.direction("base", "direction.json"))
    floor = artifacts.read_json(layout.direction("base", "noise_floor.json"))["by_layer"]["floor"][info["layer"]]
    dirs = []
    for v in (variant, back):
        run_extract(cfg, run_dir, v, progress=False, validate=False, select=False)
        cands = artifacts.load_tensors(layout.direction(v, "candidates.safetensors"))["candidates"]
        positions = artifacts.read_json(layout.direction(v, "candidates.json"))["positions"]
        dirs.append(cands[positions.index(info["position"]), info["layer"]].double())
    cos = float(torch.nn.functional.cosine_similarity(dirs[0], dirs[1], dim=0))
    assert 0.5 < floor < 1.0
    assert cos > floor, (cos, floor)


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


llama = pytest.mark.skipif(
    not __import__("refusalkit.export.llamacpp", fromlist=["available"]).available(),
    reason="llama-cpp-python is not installed (pip install 'refusalkit[llama]')",
)


def _tiny_eval() -> list[str]:
    sets = {"evaluation.n_prompts": 6, "evaluation.n_harmless": 4, "evaluation.n_borderline": 4}
    sets |= {"evaluation.max_new_tokens": 12, "evaluation.ppl_tokens": 0, "evaluation.utility_tasks": "none"}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@llama
def test_k_quant_export_is_written_by_llama_cpp_and_rechecked_in_both_runtimes(run_dir, capsys, tmp_path):
    if not (run_dir / "magnitude-0.5" / "compression.json").exists():
        code, _, err = cli(capsys, "compress", "--run", str(run_dir), *SMOLLM2, "--method", "magnitude-0.5")
        assert code == 0, err
    out = tmp_path / "kq"
    args = ["export", "--run", str(run_dir), "--variant", "magnitude-0.5", "--format", "gguf", "--type", "q4_k_m"]
    code, stdout, err = cli(capsys, *args, "--out", str(out), "--check", *_tiny_eval())
    assert code == 0, err
    rec = json.loads((out / "reproduce.json").read_text())
    assert rec["quantizer"].startswith("llama.cpp") and rec["keeps_zeros"] is False
    assert {"Q4_K", "Q6_K"} <= set(rec["types_written"])  # llama.cpp's Q4_K_M mix
    assert rec["size_bytes"] < rec["dense_bytes"] / 4
    rc = rec["recheck"]
    assert [r["runtime"].split()[0] for r in rc["runtimes"]] == ["transformers", "llama.cpp"]
    for r in rc["runtimes"]:
        assert {"vanilla", "over_refusal", "borderline"} == set(r["parts"])
        assert r["parts"]["vanilla"]["n"] == 6 and r["parts"]["over_refusal"]["n"] == 4
    rows = [json.loads(x) for x in (run_dir / "magnitude-0.5.q4_k_m" / "eval-llama.cpp" / "vanilla.jsonl").open()]
    assert len(rows) == 6 and all(r["completion"] and "substring" in r["verdicts"] for r in rows)
    assert "llama.cpp" in stdout and "## This file, re-checked" in (out / "README.md").read_text()
    # the file read back by transformers is the same model llama.cpp ran: its first greedy tokens agree on
    # most prompts (llama.cpp quantizes activations to 8 bits: not all)
    mine = {
        json.loads(x)["key"]: json.loads(x)
        for x in (run_dir / "magnitude-0.5.q4_k_m" / "eval" / "vanilla.jsonl").open()
    }
    agree = sum(mine[r["key"]]["completion"][:10] == r["completion"][:10] for r in rows)
    assert agree >= 3, [(mine[r["key"]]["completion"], r["completion"]) for r in rows]
    shutil.rmtree(out)
    shutil.rmtree(run_dir / "magnitude-0.5.q4_k_m")


@llama
def test_a_file_quantized_by_llama_cpp_alone_imports_and_exports_in_its_own_type(run_dir, capsys, tmp_path):
    import ctypes

    import llama_cpp

    src = tmp_path / "q8.gguf"  # the base's own Q4_1 file requantized by llama.cpp: no refusalkit code wrote it
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, True
    assert (
        llama_cpp.llama_model_quantize(
            str(artifact_file("smollm2-135m")).encode(), str(src).encode(), ctypes.byref(params)
        )
        == 0
    )
    code, _, err = cli(capsys, "compress", "--run", str(run_dir), *SMOLLM2, "--from", str(src), "--name", "lcpp")
    assert code == 0, err
    info = json.loads((run_dir / "lcpp" / "compression.json").read_text())
    assert "Q5_K" in info["types"] and 5.0 < info["measured"]["bits_per_weight"] < 7.0
    out = tmp_path / "again"
    code, _, err = cli(
        capsys,
        "export",
        "--run",
        str(run_dir),
        "--variant",
        "lcpp",
        "--format",
        "gguf",
        "--type",
        "source",
        "--out",
        str(out),
    )
    assert code == 0, err
    rec = json.loads((out / "reproduce.json").read_text())
    # SmolLM2's 576-column matrices are not a multiple of a k-quant's 256-weight block: llama.cpp stored them
    # in Q5_1, its most frequent type, which "source" writes again
    assert rec["type"] == "q5_1" and "Q5_1" in rec["types_written"]
    shutil.rmtree(run_dir / "lcpp")


@llama
def test_a_hugging_face_base_exports_gguf_that_llama_cpp_tokenizes_and_runs_alike(run_dir, capsys, tmp_path):
    """SmolLM2 as a Hugging Face folder (no GGUF to copy from): the metadata is built from its config and
    tokenizer, and llama.cpp tokenizes and continues a chat prompt as transformers does."""
    from refusalkit.export import llamacpp
    from refusalkit.export.gguf_meta import PROBES
    from refusalkit.models.chat import tokenize_instructions

    if not (run_dir / "q41" / "model").is_dir():
        pytest.skip("needs the imported Q4_1 variant of the first test")
    hf = tmp_path / "smollm2-hf"
    shutil.copytree(run_dir / "q41" / "model", hf)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "compress", "--run", str(run), "--model", str(hf), "--method", "magnitude-0.3")
    assert code == 0, err
    out = tmp_path / "gguf"
    code, _, err = cli(
        capsys,
        "export",
        "--run",
        str(run),
        "--variant",
        "magnitude-0.3",
        "--format",
        "gguf",
        "--type",
        "q8_0",
        "--out",
        str(out),
    )
    assert code == 0, err
    rec = json.loads((out / "reproduce.json").read_text())
    (name,) = rec["files"]
    pre = rec["pre_tokenizer"].split()[0]
    lm = load_model(str(run / "magnitude-0.3" / "model"), dtype="float32", device="cpu")
    want = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROBES]
    assert llamacpp.tokenize_with(out / name, pre, list(PROBES)) == want
    ids = tokenize_instructions(lm.tokenizer, ["What is the capital of France?"])[0]
    with torch.no_grad():
        ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :].tolist()
    runtime = llamacpp.Runtime(out / name, n_ctx=256)
    try:
        got = runtime.greedy(ids, 6, set(), None)
    finally:
        runtime.close()
    assert got[:3] == ref[:3], (got, ref)  # q8_0 weights and llama.cpp's 8-bit activations: the first tokens agree
