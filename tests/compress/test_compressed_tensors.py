"""compressed-tensors: the grid recovered from dequantized weights, export of RTN variants (pack-quantized,
written by the compressed-tensors library) and their import back as variants (tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refusalkit.cli import main
from refusalkit.compress.quant import quantize_groupwise
from refusalkit.core import artifacts
from refusalkit.core.layout import RunLayout
from refusalkit.export.ct_file import Scheme, dequantize, recover_grid

from conftest import hidden_files, make_llama

pytest.importorskip("compressed_tensors")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_is_recovered_exactly_from_dequantized_weights(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 64, generator=g) * 0.05
    w[0, :16] = w[0, :16].abs() + 0.01  # a group of one sign: asymmetric quantization clamps its zero point to 0
    w[1, :16] = -w[1, :16].abs() - 0.01  # ... and to Q
    w[2, :16] = 0.0  # a group of zeros (pruned, then quantized)
    w[3, 16:32] = 0.3  # a constant group
    q = quantize_groupwise(w, bits, 16, zero_point=not symmetric)
    if not symmetric and bits > 2:  # a group whose maximum sits one code short of Q (float32 rounding at .5)
        short = torch.arange(16) % (2**bits - 1)
        short[-1] = 2**bits - 2
        q[4, :16] = (short.float() - 2) * 0.01
    codes, scale, zero, misses = recover_grid(q, Scheme(bits, 16, symmetric))
    assert misses == 0
    assert (zero is None) == symmetric
    if not symmetric:
        assert int(codes.max()) <= 2**bits - 1 and int(zero.min()) >= 0 and int(zero.max()) <= 2**bits - 1
    back = dequantize(codes, scale, zero, 16)
    step = scale.repeat_interleave(16, dim=1)
    assert ((back - q).abs() <= 1e-5 * step).all()  # the stored weight to within a few ulps of its step
    assert (back[2, :16] == 0).all()  # zeros stay exactly zero


def test_weights_off_their_grid_are_counted_per_group():
    w = quantize_groupwise(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), 4, 32)
    w[5, 40] += 1e-3  # one weight moved a fraction of a step in group (5, 1)
    assert recover_grid(w, Scheme(4, 32))[3] == 1
    assert recover_grid(torch.randn(8, 64), Scheme(4, 32))[3] == 16  # dense weights: on no 4-bit grid


@pytest.fixture(scope="module")
def rtn_run(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A run on a tiny Llama with an RTN 4-bit variant (group 32)."""
    root = tmp_path_factory.mktemp("ct")
    base = root / "base-model"
    make_llama(tokenizer).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    run = root / "run"
    code = main(
        ["-q", "compress", "--run", str(run), "--model", str(base), "--method", "rtn", "--bits", "4"]
        + ["--group-size", "32", "--dtype", "float32", "--device", "cpu"]
    )
    assert code == 0
    return {"root": root, "run": run, "base": base}


def test_rtn_variant_exports_pack_quantized_and_imports_back_to_the_same_weights(capsys, rtn_run, tmp_path):
    run = rtn_run["run"]
    (variant,) = [v for v in RunLayout(run).variants() if v.startswith("rtn")]
    out = tmp_path / "ct"
    code, stdout, err = cli(
        capsys, "export", "--run", str(run), "--variant", variant, "--format", "compressed-tensors", "--out", str(out)
    )
    assert code == 0, err
    assert "pack-quantized, 4 bits, group 32, zero points" in stdout
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert "lm_head" in config["ignore"]
    stored = _weights(out)
    assert stored["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    rec = json.loads((out / "reproduce.json").read_text())
    assert rec["size_bytes"] < rec["dense_bytes"] and rec["matrices_quantized"] == 4 * 7
    card = (out / "README.md").read_text()
    assert "vllm" in card and "4-bit integers in groups of 32" in card and "base_model_relation" not in card
    assert (out / "tokenizer_config.json").is_file()

    # imported back: the variant's weights, the stored bits measured from the packed tensors
    code, stdout, err = cli(capsys, "compress", "--run", str(run), "--from", str(out), "--name", "back")
    assert code == 0, err
    info = json.loads((run / "back" / "compression.json").read_text())
    assert info["format"] == "compressed-tensors"
    # 4-bit codes + a float32 scale and a 4-bit zero point per 32 weights (+ the shape): 5.125 bits and a little
    assert 5.12 <= info["measured"]["bits_per_weight"] < 5.2
    a, b = _weights(run / variant / "model"), _weights(run / "back" / "model")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6 and worst == pytest.approx(rec["max_abs_error"], abs=1e-7)

    # the imported variant exports in the format it came in, on the same grid
    code, _, err = cli(
        capsys,
        "export",
        "--run",
        str(run),
        "--variant",
        "back",
        "--format",
        "compressed-tensors",
        "--out",
        str(tmp_path / "again"),
    )
    assert code == 0, err
    again = _weights(tmp_path / "again")
    for k, v in stored.items():
        if k.endswith(("weight_packed", "weight_zero_point")):
            assert torch.equal(again[k], v), k
    assert not hidden_files(tmp_path)


def test_a_repaired_rtn_variant_requantized_on_its_grid_exports_with_its_edit(capsys, rtn_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from refusalkit.repair.aird import Requantize

    run = rtn_run["run"]
    layout = RunLayout(run)
    (variant,) = [v for v in layout.variants() if v.startswith("rtn")]
    rep = f"{variant}+edit"
    import shutil

    shutil.copytree(layout.model(variant), layout.model(rep))
    f = layout.model(rep) / "model.safetensors"
    state = load_file(str(f))
    key = "model.layers.1.mlp.down_proj.weight"
    w = state[key]
    r = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(3))
    r = r / r.norm()
    requant = Requantize.from_compression(artifacts.read_json(layout.compression(variant)))
    state[key] = requant(w + 0.5 * torch.outer(r, r @ w))  # W + a r r^T W, back on the variant's grid
    save_file(state, str(f), metadata={"format": "pt"})
    artifacts.write_json(layout.repair_info(rep), {"variant": rep, "source_variant": variant})
    code, stdout, err = cli(
        capsys,
        "export",
        "--run",
        str(run),
        "--variant",
        rep,
        "--format",
        "compressed-tensors",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    rec = json.loads((tmp_path / "o" / "reproduce.json").read_text())
    assert list(rec["edit_survival"]) == [key] and rec["edit_survival"][key]["kept"] == pytest.approx(1.0)

    # edited without requantizing: off the grid, refused, nothing written
    state[key] = w + 0.5 * torch.outer(r, r @ w)
    save_file(state, str(f), metadata={"format": "pt"})
    code, _, err = cli(
        capsys,
        "export",
        "--run",
        str(run),
        "--variant",
        rep,
        "--format",
        "compressed-tensors",
        "--out",
        str(tmp_path / "p"),
    )
    assert code == 2 and "off their 4-bit group grid" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists() and not hidden_files(tmp_path)
    shutil.rmtree(layout.variant(rep))


def test_variants_without_a_group_grid_are_refused_naming_what_works(capsys, tmp_path, tokenizer):
    from conftest import make_tiny_run

    root, _ = make_tiny_run(tmp_path, tokenizer)
    artifacts.write_json(RunLayout(root).compression("v"), {"method": "wanda", "sparsity": 0.5})
    args = [
        "export",
        "--run",
        str(root),
        "--variant",
        "v",
        "--format",
        "compressed-tensors",
        "--out",
        str(tmp_path / "o"),
    ]
    code, _, err = cli(capsys, *args)
    assert code == 2 and "a wanda variant" in err and "--format safetensors" in err
    code, _, err = cli(capsys, *args, "--type", "q4_0")
    assert code == 2 and "--type applies to --format gguf" in err
    assert not (tmp_path / "o").exists() and not hidden_files(tmp_path)


def _library_quantized(tokenizer, folder: Path, symmetric: bool, bits: int, group: int | None) -> None:
    """A tiny Llama quantized by the compressed-tensors library alone (its own scales and zero points:
    ``calculate_qparams`` on each group's range, 0 included), packed and saved: a checkpoint that
    refusalkit's exporter did not write."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = make_llama(tokenizer, seed=5)
    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group" if group else "channel", group_size=group
    )
    config = QuantizationConfig(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"],
        quantization_status="frozen",
    )
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for _, m in model.named_modules():
            if getattr(m, "quantization_scheme", None) is None:
                continue
            w = m.weight.reshape(m.weight.shape[0], -1, group or m.weight.shape[1])
            scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), args)
            m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.copy_(torch.round(zp).reshape(m.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(folder))
    compressor.update_config(str(folder))
    tokenizer.save_pretrained(str(folder))


@pytest.mark.parametrize("symmetric,bits,group", [(False, 4, 32), (True, 4, 16), (True, 8, None)])
def test_a_library_written_checkpoint_imports_and_exports_on_its_own_grid(
    capsys, rtn_run, tokenizer, tmp_path, symmetric, bits, group
):
    src = tmp_path / "library"
    _library_quantized(tokenizer, src, symmetric, bits, group)
    run = rtn_run["run"]
    name = f"lib-{int(symmetric)}-{bits}"
    code, _, err = cli(capsys, "compress", "--run", str(run), "--from", str(src), "--name", name)
    assert code == 0, err
    info = json.loads((run / name / "compression.json").read_text())
    assert info["format"] == "compressed-tensors" and info["measured"]["bits_per_weight"] > bits
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys, "export", "--run", str(run), "--variant", name, "--format", "compressed-tensors", "--out", str(out)
    )
    assert code == 0, err
    a, b = _weights(src), _weights(out)
    packed = [k for k in a if k.endswith("weight_packed")]
    assert len(packed) == 4 * 7
    for k in packed:  # the same integer codes, recovered from the dequantized variant
        assert torch.equal(a[k], b[k]), k
    for k in a:
        if k.endswith("weight_scale"):
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=0), k
    import shutil

    shutil.rmtree(run / name)
