"""``refusalkit export``: bad requests, the safetensors folder with its card, the edit's survival."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from refusalkit.cli import main
from refusalkit.core import artifacts
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.export.job import check_request, edit_survival

from conftest import hidden_files, make_tiny_run


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what the test printed before (a model's saving) is not the command's
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "fmt,typ,message",
    [
        ("onnx", None, "unknown --format"),
        ("gguf", "q4_k_m", "k-quant"),
        ("gguf", "q3_x", "unknown --type"),
        ("safetensors", "q8_0", "--type applies to --format gguf"),
        ("compressed-tensors", "q4_0", "--type applies to --format gguf"),
    ],
)
def test_export_requests_that_cannot_be_written_are_refused(tmp_path, monkeypatch, fmt, typ, message):
    from refusalkit.export import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: False)  # k-quants need llama.cpp
    with pytest.raises(UserError, match=message):
        check_request(fmt, typ, tmp_path / "out", False, None)


def test_export_refuses_an_existing_folder_and_a_bad_repo_name(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not empty"):
        check_request("gguf", None, out, False, None)
    assert check_request("gguf", None, out, True, None) == "f16"
    with pytest.raises(UserError, match="not a hub repository name"):
        check_request("gguf", "q8_0", tmp_path / "new", False, "no spaces/allowed here")
    assert (out / "x").read_text() == "keep me"


def test_safetensors_export_writes_model_card_and_reproduce(capsys, tmp_path, tokenizer):
    root, _ = make_tiny_run(tmp_path, tokenizer)
    out = tmp_path / "export"
    code, stdout, err = cli(
        capsys, "export", "--run", str(root), "--variant", "v", "--format", "safetensors", "--out", str(out)
    )
    assert code == 0, err
    assert "exported as safetensors" in stdout
    rec = json.loads((out / "reproduce.json").read_text())
    for name, f in rec["files"].items():
        import hashlib

        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == f["sha256"]
    assert "model.safetensors" in rec["files"] and rec["size_bytes"] >= rec["dense_bytes"]
    assert rec["inputs_sha256"]["v/model.safetensors"] == rec["files"]["model.safetensors"]["sha256"]
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert "refusalkit" in meta["tags"] and meta["library_name"] == "transformers"
    assert "## Reproduce" in text and "No report in the run" in text
    assert not hidden_files(tmp_path)
    # the same --out again: refused, untouched; with --force: replaced
    code, _, err = cli(
        capsys, "export", "--run", str(root), "--variant", "v", "--format", "safetensors", "--out", str(out)
    )
    assert code == 2 and "exists" in err
    code, _, err = cli(
        capsys, "export", "--run", str(root), "--variant", "v", "--format", "safetensors", "--out", str(out), "--force"
    )
    assert code == 0, err


def test_gguf_export_of_a_hugging_face_base_builds_its_metadata(capsys, tmp_path, tokenizer, monkeypatch):
    """A base that came as a Hugging Face folder: hyper-parameters, tokenizer (its llama.cpp
    pre-tokenizer found by behaviour) and chat template written from the folder; the file reads back
    in transformers with the same weights (within f16), token ids and template, and loads in llama.cpp."""
    from refusalkit.export import llamacpp

    root, _ = make_tiny_run(tmp_path, tokenizer)
    out = tmp_path / "o"
    args = ["export", "--run", str(root), "--variant", "v", "--format", "gguf", "--type", "f16", "--out", str(out)]
    if not llamacpp.available():
        code, _, err = cli(capsys, *args)
        assert code == 2 and "llama" in err and len(err.strip().splitlines()) == 1
        assert not out.exists() and not hidden_files(tmp_path)
        return
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    rec = json.loads((out / "reproduce.json").read_text())
    (name,) = rec["files"]
    from refusalkit.export.gguf_meta import PROBES

    pre = rec["pre_tokenizer"].split()[0]
    # llama.cpp reads the file's vocabulary and tokenizes as the Hugging Face tokenizer does
    want = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROBES]
    assert llamacpp.tokenize_with(out / name, pre, list(PROBES)) == want
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32)
    from safetensors.torch import load_file

    want = load_file(str(root / "v" / "model" / "model.safetensors"))
    got = model.state_dict()
    for k, w in want.items():
        assert torch.allclose(got[k], w, rtol=1e-3, atol=1e-4), k  # f16, and llama's rotary permutation undone
    back = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    for text in PROBES:
        assert (
            back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        )
    chat = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    runtime = llamacpp.Runtime(out / name, n_ctx=64)
    try:
        assert len(runtime.greedy(tokenizer("hello world")["input_ids"], 3, set(), None)) == 3
    finally:
        runtime.close()
    # an architecture whose GGUF metadata refusalkit does not build (here: pretend llama is one): one line
    monkeypatch.setattr("refusalkit.export.gguf_meta.ARCHITECTURES", {"qwen2": "qwen2"})
    code, _, err = cli(capsys, *args[:-1], str(tmp_path / "o2"))
    assert code == 2 and "convert_hf_to_gguf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists() and not hidden_files(tmp_path)


def test_push_without_a_token_is_one_line_and_keeps_the_export(capsys, tmp_path, tokenizer, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    root, _ = make_tiny_run(tmp_path, tokenizer)
    out = tmp_path / "export"
    code, _, err = cli(
        capsys,
        "export",
        "--run",
        str(root),
        "--variant",
        "v",
        "--format",
        "safetensors",
        "--out",
        str(out),
        "--push-to-hub",
        "someone/tiny-repaired",
    )
    assert code == 2 and "no Hugging Face token" in err and str(out) in err
    assert (out / "README.md").is_file()


def _repaired(tmp_path, tokenizer, scale: float) -> RunLayout:
    """A tiny run with ``v`` and ``v+aird``: ``v`` with a rank-1 edit of block 1's down projection."""
    root, _ = make_tiny_run(tmp_path, tokenizer)
    layout = RunLayout(root)
    from safetensors.torch import load_file, save_file

    state = load_file(str(layout.model("v") / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    w = state[key]
    r = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(3))
    r = r / r.norm()
    state[key] = w + scale * torch.outer(r, r @ w)  # W + a r r^T W, the AIRD form
    import shutil

    shutil.copytree(layout.model("v"), layout.model("v+aird"))
    save_file(state, str(layout.model("v+aird") / "model.safetensors"), metadata={"format": "pt"})
    artifacts.write_json(layout.repair_info("v+aird"), {"variant": "v+aird", "source_variant": "v"})
    return layout


@pytest.mark.parametrize("typ", ["f16", "q8_0", "q4_0"])
def test_edit_survival_is_near_one_for_a_large_edit_and_small_below_the_step(tmp_path, tokenizer, typ):
    big = edit_survival(_repaired(tmp_path / "big", tokenizer, 0.5), "v+aird", typ)
    small = edit_survival(_repaired(tmp_path / "small", tokenizer, 1e-4), "v+aird", typ)
    (key,) = big
    assert key == "model.layers.1.mlp.down_proj.weight" and list(small) == [key]
    tolerance = {"f16": 0.01, "q8_0": 0.05, "q4_0": 0.3}[typ]
    assert abs(big[key]["kept"] - 1) < tolerance
    if typ != "f16":  # a relative edit of 1e-4 is far below an 8- or 4-bit step: most of it is lost or noise
        assert small[key]["residual"] > 0.5
    assert edit_survival(_repaired(tmp_path / "none", tokenizer, 0.5), "v", typ) is None


def test_recheck_equivalence_holds_fails_or_waits_by_the_paired_interval():
    from refusalkit.evaluation.stats import paired
    from refusalkit.export.recheck import equivalent

    n = 200
    a = {str(i): i < 60 for i in range(n)}
    same = equivalent(paired(a, dict(a)), 0.05, "ASR unchanged")
    assert same["verdict"] == "holds" and same["difference"] == 0  # 0 discordant of 200: bound about 2 pt
    shifted = {k: v or int(k) < 100 for k, v in a.items()}  # 40 more prompts broke it: +20 pt
    assert equivalent(paired(a, shifted), 0.05, "x")["verdict"] == "fails"
    noisy = {k: (not v) if int(k) % 20 == 0 else v for k, v in a.items()}  # 3 prompts fewer broke it, 7 more
    res = equivalent(paired(a, noisy), 0.05, "x")
    assert res["discordant"] == [3, 7] and res["verdict"] == "undecided"  # +2 pt, interval reaching past 5
    small = {str(i): i < 3 for i in range(10)}
    assert equivalent(paired(small, dict(small)), 0.05, "x")["verdict"] == "undecided"  # 10 prompts decide nothing


def test_the_report_leaves_out_an_exports_read_back(tmp_path, tokenizer):
    """``export --check`` registers the file read back as ``<variant>.<type>``; the report leaves it out
    (the export's card reports it), and keeps an ordinary import."""
    import shutil

    from refusalkit.study.report.load import load_run

    root, _ = make_tiny_run(tmp_path, tokenizer)
    layout = RunLayout(root)
    artifacts.write_json(layout.compression("v"), {"variant": "v", "method": "magnitude", "sparsity": 0.5})
    for name, of in (("v.q8_0", "v"), ("mine", None)):
        shutil.copytree(layout.model("v"), layout.model(name))
        artifacts.write_json(layout.compression(name), {"variant": name, "method": "import", "recheck_of": of})
    names = [v.name for v in load_run(layout).variants]
    assert "mine" in names and "v" in names and "v.q8_0" not in names
