"""``refusalkit compress`` on a tiny random model saved to disk: variants, reloading, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refusalkit.cli import main
from refusalkit.compress.calibration import build_calibration
from refusalkit.compress.job import CompressSpec, compress_model
from refusalkit.models.int8 import Int8Linear, bnb_available
from refusalkit.models.loading import load_model

from conftest import HARMFUL, HARMLESS, make_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "model"
    make_llama(tokenizer).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cal") / "cal.txt"
    p.write_text("\n".join(HARMFUL + HARMLESS) + "\n")
    return p


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def compress(capsys, root: Path, tiny_dir: Path, prompts_file: Path, *extra: str) -> tuple[int, str, str]:
    return run(
        capsys,
        "compress",
        "--run",
        str(root),
        "--model",
        str(tiny_dir),
        "--calibration",
        str(prompts_file),
        "--n-calibration",
        "8",
        "--seq-len",
        "32",
        "--group-size",
        "16",
        *extra,
    )


def _logits(model: torch.nn.Module, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([s])).logits[0] for s in ids])


@pytest.mark.parametrize("method", ["wanda-0.5", "sparsegpt-2:4", "magnitude-0.3", "awq-w4", "rtn-w8"])
def test_saved_variant_reloads_with_identical_logits(
    method, tmp_path, tiny_dir, prompts_file, tokenizer, capsys, one_thread
):
    root = tmp_path / "run"
    with one_thread():
        code, out, err = compress(capsys, root, tiny_dir, prompts_file, "--method", method)
        assert code == 0, err
        name = method + ("-g16" if method.startswith(("awq", "rtn")) else "")  # non-default group size in the name
        info = json.loads((root / name / "compression.json").read_text())
        for key in (
            "method",
            "parameters",
            "calibration",
            "sparsity",
            "per_layer",
            "size_on_disk_bytes",
            "wall_seconds",
            "peak_rss_bytes",
        ):
            assert key in info, key
        assert len(info["per_layer"]) == 4 * 7
        if method.startswith(("wanda", "sparsegpt", "awq")):
            cal = info["calibration"]
            assert cal["source"] == str(prompts_file) and cal["n_samples"] == 8 and cal["chat_template"] is True
        if method.startswith(("wanda", "sparsegpt", "magnitude")):
            target = 0.5 if ":" in method else float(method.split("-")[1])
            assert info["sparsity"] == pytest.approx(target, abs=0.01)
        else:
            assert info["bits"] == int(method[-1])
        # the same compression in memory gives the same logits as the reloaded checkpoint
        base = load_model(str(tiny_dir), dtype="float32", device="cpu")
        spec = CompressSpec(method=method, group_size=16, calibration=str(prompts_file), n_calibration=8, seq_len=32)
        cal = build_calibration(base.tokenizer, str(prompts_file), 8, 32)
        compress_model(base, spec, cal)
        reloaded = load_model(str(tiny_dir), dtype="float32", device="cpu", path_override=str(root / name / "model"))
        ids = cal.samples[:3]
        assert torch.equal(_logits(reloaded.model, ids), _logits(base.model, ids))


def test_existing_variant_is_reused_and_force_redoes_it(tmp_path, tiny_dir, prompts_file, capsys, one_thread):
    root = tmp_path / "run"
    with one_thread():
        assert compress(capsys, root, tiny_dir, prompts_file, "--method", "magnitude")[0] == 0
        (root / "magnitude-0.5" / "direction").mkdir()
        (root / "magnitude-0.5" / "direction" / "direction.json").write_text("{}")
        stamp = (root / "magnitude-0.5" / "compression.json").stat().st_mtime_ns
        code, out, _ = compress(capsys, root, tiny_dir, prompts_file, "--method", "magnitude")
        assert code == 0 and "reused" in out
        assert (root / "magnitude-0.5" / "compression.json").stat().st_mtime_ns == stamp
        code, out, _ = compress(capsys, root, tiny_dir, prompts_file, "--method", "magnitude", "--force")
        assert code == 0 and "reused" not in out
        assert not (root / "magnitude-0.5" / "direction").exists()  # analyses of the old model are discarded
    assert not [p for p in (root / "magnitude-0.5").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--method", "wanda", "--sparsity", "1.2"], "outside [0, 1)"),
        (["--method", "wanda", "--sparsity", "3:3"], "impossible N:M"),
        (["--method", "wanda", "--sparsity", "2:5"], "not a multiple of 5"),
        (["--method", "quantum"], "unknown compression method"),
        (["--method", "wanda", "--n-calibration", "0"], "too few calibration samples"),
        (["--method", "wanda", "--n-calibration", "100"], "too few calibration samples"),
        (["--method", "rtn", "--group-size", "24"], "group size 24"),
        (["--method", "wanda", "--calibration", "nosuch.txt"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_no_variant(args, match, tmp_path, tiny_dir, prompts_file, capsys):
    root = tmp_path / "run"
    base = [
        "compress",
        "--run",
        str(root),
        "--model",
        str(tiny_dir),
        "--calibration",
        str(prompts_file),
        "--n-calibration",
        "8",
        "--seq-len",
        "32",
        "--group-size",
        "16",
    ]
    code = main(["-q", *base, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    variants = [p for p in root.iterdir() if p.is_dir()] if root.exists() else []
    assert variants == []


def test_missing_variant_is_reported(tmp_path, tiny_dir, capsys):
    code, _, err = run(
        capsys, "extract", "--run", str(tmp_path / "r"), "--model", str(tiny_dir), "--variant", "wanda-0.5"
    )
    assert code == 2 and "refusalkit compress" in err


def _int8_variant(root: Path, tiny_dir: Path, backend: str, capsys) -> Path:
    code, _, err = run(
        capsys,
        "compress",
        "--run",
        str(root),
        "--model",
        str(tiny_dir),
        "--method",
        "llm-int8",
        "--backend",
        backend,
        "--name",
        f"int8-{backend}",
    )
    assert code == 0, err
    return root / f"int8-{backend}" / "model"


def test_int8_torch_checkpoint_reloads(tmp_path, tiny_dir, capsys, monkeypatch, one_thread):
    with one_thread():
        path = _int8_variant(tmp_path / "run", tiny_dir, "torch", capsys)
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["quantization_config"]["load_in_8bit"] and cfg["quantization_config"]["llm_int8_threshold"] == 6.0
        monkeypatch.setenv("REFUSALKIT_INT8_BACKEND", "torch")
        lm = load_model(str(tiny_dir), dtype="float32", device="cpu", path_override=str(path))
        assert lm.info["int8_backend"] == "torch"
        assert sum(isinstance(m, Int8Linear) for m in lm.model.modules()) == 4 * 7
        base = load_model(str(tiny_dir), dtype="float32", device="cpu")
        ids = [[1, 5, 9, 14, 20, 33, 40]]
        assert (_logits(lm.model, ids) - _logits(base.model, ids)).abs().max().item() < 0.05


@pytest.mark.skipif(not bnb_available(), reason="bitsandbytes is not installed")
def test_int8_checkpoints_agree_between_backends(tmp_path, tiny_dir, capsys, monkeypatch, one_thread):
    """Both writers give checkpoints both readers load; bitsandbytes and PyTorch agree within 2%."""
    with one_thread():
        ids = [[1, 5, 9, 14, 20, 33, 40, 41, 42]]
        outs = {}
        for writer in ("torch", "bitsandbytes"):
            path = _int8_variant(tmp_path / "run", tiny_dir, writer, capsys)
            for reader in ("torch", "bitsandbytes"):
                monkeypatch.setenv("REFUSALKIT_INT8_BACKEND", reader)
                lm = load_model(str(tiny_dir), dtype="float32", device="cpu", path_override=str(path))
                assert lm.info["int8_backend"] == reader
                outs[writer, reader] = _logits(lm.model, ids)
        scale = outs["torch", "torch"].abs().max().item()
        for key, val in outs.items():
            assert (val - outs["torch", "torch"]).abs().max().item() <= 0.02 * scale, key


@pytest.mark.parametrize("where", ["compress", "save"])
def test_interrupt_leaves_no_variant(where, tmp_path, tiny_dir, prompts_file, capsys, monkeypatch):
    import refusalkit.compress.job as job

    if where == "compress":

        def boom(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(job, "compress_model", boom)
    else:
        from transformers import PreTrainedModel

        real = PreTrainedModel.save_pretrained

        def half_save(self, path, *a, **k):
            real(self, path, *a, **k)  # files written into the temporary folder, then interrupted
            raise KeyboardInterrupt

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_save)
    root = tmp_path / "run"
    code, _, err = compress(capsys, root, tiny_dir, prompts_file, "--method", "wanda")
    assert code == 130 and "interrupted" in err
    assert not (root / "wanda-0.5").exists() or not any((root / "wanda-0.5").iterdir())
    monkeypatch.undo()
    code, _, err = compress(capsys, root, tiny_dir, prompts_file, "--method", "wanda")
    assert code == 0, err
    assert (root / "wanda-0.5" / "compression.json").is_file()
    assert not [p for p in (root / "wanda-0.5").iterdir() if p.name.startswith(".")]


def test_sources_lists_corpus_and_methods(capsys):
    assert main(["sources"]) == 0
    out = capsys.readouterr().out
    for name in ("wikipedia", "magnitude", "wanda", "sparsegpt", "llm-int8", "awq", "rtn", "advbench"):
        assert any(line.split()[0] == name for line in out.splitlines()), name
