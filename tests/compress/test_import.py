"""``refusalkit compress --from``: a checkpoint compressed elsewhere as a variant (tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refusalkit.cli import main
from refusalkit.core.layout import RunLayout
from refusalkit.models.loading import load_model

from conftest import hidden_files, make_llama, make_qwen2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """The base model folder, a run on it, and checkpoints to import."""
    root = tmp_path_factory.mktemp("import")
    base = root / "base-model"
    model = make_llama(tokenizer)
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    pruned = root / "pruned"  # half of every block matrix zeroed (by magnitude), saved dense
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
                w = lin.weight
                w[w.abs() <= w.abs().median()] = 0
    model.save_pretrained(str(pruned))
    tokenizer.save_pretrained(str(pruned))
    return {"root": root, "base": base, "pruned": pruned}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what the test printed before (a model's saving) is not the command's
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def new_run(tiny: dict[str, Path], name: str) -> Path:
    return tiny["root"] / name


def test_import_dense_pruned_folder_measures_zeros_from_the_weights(capsys, tiny):
    run = new_run(tiny, "run-dense")
    code, out, err = cli(
        capsys, "compress", "--run", str(run), "--model", str(tiny["base"]), "--from", str(tiny["pruned"])
    )
    assert code == 0, err
    assert "imported safetensors" in out
    info = json.loads((run / "pruned" / "compression.json").read_text())
    assert info["method"] == "import" and info["format"] == "safetensors"
    per = info["per_layer"]
    # q_proj and down_proj of every block lost half their weights; the other matrices none
    assert per["0.self_attn.q_proj"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert per["0.mlp.up_proj"]["sparsity"] == 0.0
    assert per["0.mlp.up_proj"]["rel_error"] == 0.0 and per["0.self_attn.q_proj"]["rel_error"] > 0.1
    zeros = sum(r["sparsity"] * r["numel"] for r in per.values()) / info["n_compressed_params"]
    assert info["measured"]["sparsity"] == pytest.approx(zeros)
    assert info["bits"] is None and info["measured"]["bits_per_weight"] == pytest.approx(32.0)
    assert len(info["source"]["sha256"]) == 64
    lm = load_model(str(run / "pruned" / "model"), dtype="float32", device="cpu")
    assert (lm.model.model.layers[0].self_attn.q_proj.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    # the report's kind follows what the weights show
    from refusalkit.compress.imported import imported_kind

    assert imported_kind(info) == "pruned"
    # a second import is reused; --force redoes it
    code, out, _ = cli(capsys, "compress", "--run", str(run), "--from", str(tiny["pruned"]))
    assert code == 0 and "reused" in out


def test_import_llm_int8_folder_keeps_its_layout_and_measures_8_bits(capsys, tiny):
    run = new_run(tiny, "run-int8")
    code, _, err = cli(capsys, "compress", "--run", str(run), "--model", str(tiny["base"]), "--method", "llm-int8")
    assert code == 0, err
    code, out, err = cli(
        capsys, "compress", "--run", str(run), "--from", str(run / "llm-int8" / "model"), "--name", "q8"
    )
    assert code == 0, err
    info = json.loads((run / "q8" / "compression.json").read_text())
    assert info["format"] == "bitsandbytes-8bit"
    # int8 codes plus one float32 scale per row: 8 + 32 / row length (64 or 128) bits per weight
    assert 8.25 < info["measured"]["bits_per_weight"] < 8.51
    assert set(info["types"]) >= {"I8", "F32"}
    a = load_model(str(run / "llm-int8" / "model"), dtype="float32", device="cpu")
    b = load_model(str(run / "q8" / "model"), dtype="float32", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(a.model(ids).logits, b.model(ids).logits)


@pytest.mark.parametrize(
    "what",
    ["architecture", "shape", "tokenizer", "template", "no-template"],
)
def test_import_refuses_a_different_model_and_writes_nothing(capsys, tiny, tokenizer, what, tmp_path):
    other = tmp_path / "other"
    tok = tokenizer
    if what == "architecture":
        make_qwen2(tokenizer).save_pretrained(str(other))
    elif what == "shape":
        make_llama(tokenizer, intermediate_size=96).save_pretrained(str(other))
    else:
        make_llama(tokenizer).save_pretrained(str(other))
    if what == "tokenizer":
        from conftest import _train_tokenizer

        tok = _train_tokenizer()
        tok.add_tokens(["check"])  # one more token, found in the fixed text: its ids change
    elif what in ("template", "no-template"):
        from conftest import _train_tokenizer

        tok = _train_tokenizer()
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}" if what == "template" else None
    tok.save_pretrained(str(other))
    if what == "no-template":
        cfgf = other / "tokenizer_config.json"
        data = json.loads(cfgf.read_text())
        data.pop("chat_template", None)
        cfgf.write_text(json.dumps(data))
        (other / "chat_template.jinja").unlink(missing_ok=True)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "compress", "--run", str(run), "--model", str(tiny["base"]), "--from", str(other))
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    expected = {
        "architecture": "Qwen2ForCausalLM",
        "shape": "mlp",
        "tokenizer": "tokenizer differs",
        "template": "chat template renders",
        "no-template": "no chat template",
    }[what]
    assert expected in err, err
    assert not (run / "other").exists() and not hidden_files(run)


def test_import_bad_sources_are_one_line_errors(capsys, tiny, tmp_path):
    run = tmp_path / "run"
    base = ["compress", "--run", str(run), "--model", str(tiny["base"])]
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    folder = tmp_path / "folder"
    folder.mkdir()
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    cfg = json.loads((tiny["base"] / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mystery"}}))
    cases = {
        str(tmp_path / "missing.gguf"): "no such file",
        str(text): "not a GGUF file",
        str(folder): "no config.json",
        str(gptq): "needs gptqmodel",
        str(odd): "unknown quantization method",
    }
    for src, message in cases.items():
        code, _, err = cli(capsys, *base, "--from", src)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (src, err)
    code, _, err = cli(capsys, *base, "--from", str(tiny["pruned"]), "--sparsity", "0.5")
    assert code == 2 and "measured" in err
    with pytest.raises(SystemExit) as exc:  # the parser's own error
        main(["-q", *base, "--from", str(tiny["pruned"]), "--method", "wanda"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert not run.exists() or not [p for p in run.iterdir() if p.is_dir() and p.name != "data"]


def test_import_from_an_unreachable_hub_id_is_one_line(capsys, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    code, _, err = cli(
        capsys, "compress", "--run", str(run), "--model", str(tiny["base"]), "--from", "someone/no-such-model"
    )
    assert code == 2 and "cannot download" in err and len(err.strip().splitlines()) == 1
    assert not RunLayout(run).has_model("no-such-model")
