"""The GGUF template of a base model that came as a Hugging Face folder: metadata built from its
config and tokenizer, as llama.cpp's ``convert_hf_to_gguf.py`` builds them, for the architectures
whose GGUF layout is Hugging Face's (``llama``, ``mistral`` as ``llama``, ``qwen2``).

* Hyper-parameters: context, embedding and feed-forward lengths, blocks, heads, key/value heads,
  rotary base and dimension, the RMS norm's epsilon, the vocabulary size.
* Tokenizer: a byte-level BPE (``tokenizer.json``, ``gpt2`` in GGUF terms: tokens by id, their
  types (normal, control for special added tokens, user-defined for the others, unused for ids the
  tokenizer lacks), merges), or a byte-fallback BPE from SentencePiece (``llama``: tokens, scores,
  types); the special token ids, ``add_bos`` / ``add_eos`` and the chat template
  (``gguf.SpecialVocab``; the tokenizer's own template when the files do not carry one).
* The pre-tokenizer (``tokenizer.ggml.pre``), which llama.cpp's converter finds from a hash of the
  tokenizer's output, is found here by behaviour: llama.cpp (llama-cpp-python) loads the vocabulary
  under each candidate name and the first whose token ids equal the Hugging Face tokenizer's on
  every probe text (code, digits, whitespace runs, contractions, accents, CJK, emoji, 100 AdvBench
  and 100 Alpaca prompts, the rendered chat template) is written: names that tokenize all of these
  alike are, for this vocabulary, the same pre-tokenizer as far as refusalkit can tell. Without llama-cpp-python, or when no candidate reproduces the
  tokenizer, the export is refused with the way around it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from refusalkit.core.errors import UserError

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# llama.cpp's pre-tokenizer names, most frequent first (a name this llama.cpp lacks fails to load: skipped)
PRE_TOKENIZERS = (
    "llama-bpe", "qwen2", "smollm", "gpt-2", "default", "deepseek-llm", "deepseek-coder", "deepseek-v3",
    "falcon", "mpt", "starcoder", "refact", "command-r", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat",
    "viking", "jais", "tekken", "codeshell", "bloom", "gpt3-finnish", "exaone", "phi-2", "chameleon",
    "minerva-7b", "megrez", "gpt-4o", "superbpe", "trillion", "bailingmoe", "llama4", "pixtral", "seed-coder",
    "kimi-k2", "hunyuan", "grok-2",
)  # fmt: skip
PROBES = (
    "Refusal check: def f(x):\n    return x**2  # 12345 café naïve 日本語 🙂\t tabs  and  spaces!",
    "I'm sure it's 1234567 or 3.14159; HELLO   world\n\n\n  indented\r\nwindows line",
    "Ünïcödé ÀÉÎ ñ ß — «quotes» “smart” 'single' ℃ ½ 한국어 العربية Ελληνικά русский",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C++ 2024-12-07 $100.00 50% @user #tag",
)


def _writer_fields(writer: Any) -> list[tuple[str, Any, Any, Any]]:
    """The key-values a ``GGUFWriter`` holds: ``(key, value, type, sub_type)``."""
    return [(k, v.value, v.type, v.sub_type) for k, v in writer.kv_data[0].items()]


def _hparams(writer: Any, config: Any) -> None:
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or _rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        raise UserError("the base model's config has no rotary base (rope_theta); export --format safetensors")
    return float(theta)


def _bpe_tokens(tok: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types (``convert_hf_to_gguf.py``'s ``get_vocab_base``)."""
    from gguf import TokenType

    rev = {i: t for t, i in tok.get_vocab().items()}
    added = dict(getattr(tok, "added_tokens_decoder", {}) or {})
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            tokens.append(added[i].content)
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED))
        else:
            tokens.append(rev[i])
            types.append(int(TokenType.NORMAL))
    return tokens, types


def _byte_fallback(model_dir: Path) -> bool:
    f = model_dir / "tokenizer.json"
    if not f.is_file():
        return (model_dir / "tokenizer.model").is_file()
    model = json.loads(f.read_text(encoding="utf-8")).get("model") or {}
    return bool(model.get("byte_fallback"))


def _tokenizer(writer: Any, model_dir: Path, tok: Any, n_vocab: int) -> None:
    """Tokens, types, merges or scores, special ids and chat template; the pre-tokenizer ``default``
    (:func:`hf_fields` puts in the one found)."""
    import gguf

    if _byte_fallback(model_dir):  # SentencePiece-style BPE with byte fallback (llama 2, mistral)
        vocab = gguf.vocab.LlamaHfVocab(model_dir)
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(ttype))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        n_vocab = len(tokens)
    else:
        tokens, types = _bpe_tokens(tok, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=not _byte_fallback(model_dir), n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    if gguf.Keys.Tokenizer.CHAT_TEMPLATE not in writer.kv_data[0] and getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)


def _fields(model_dir: Path, config: Any, tok: Any, arch: str) -> list[tuple[str, Any, Any, Any]]:
    import gguf

    with tempfile.TemporaryDirectory() as d:
        writer = gguf.GGUFWriter(str(Path(d) / "unused.gguf"), arch)
        writer.add_name(Path(str(getattr(config, "_name_or_path", "")) or model_dir.name).name or model_dir.name)
        _hparams(writer, config)
        _tokenizer(writer, model_dir, tok, int(config.vocab_size))
        fields = [f for f in _writer_fields(writer) if f[0] != gguf.Keys.General.ARCHITECTURE]
    return fields


def hf_fields(model_dir: Path, config: Any) -> tuple[str, list[tuple[str, Any, Any, Any]], str]:
    """``(arch, key-values, pre-tokenizer)`` of the GGUF metadata of the Hugging Face model ``model_dir``."""
    from transformers import AutoTokenizer

    arch = ARCHITECTURES.get(str(getattr(config, "model_type", "")))
    if arch is None:
        raise UserError(
            f"GGUF export of a Hugging Face {getattr(config, 'model_type', '?')} model is not supported (refusalkit "
            f"builds GGUF metadata for {', '.join(sorted(ARCHITECTURES))}); export --format safetensors and convert "
            "with llama.cpp's convert_hf_to_gguf.py"
        )
    import gguf

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    fields = _fields(model_dir, config, tok, arch)
    if _byte_fallback(model_dir):
        return arch, fields, "default"
    pre = find_pre_tokenizer(fields, tok, arch)
    key = gguf.Keys.Tokenizer.PRE
    return arch, [(k, pre if k == key else v, t, sub) for k, v, t, sub in fields], pre


def find_pre_tokenizer(fields: list[tuple[str, Any, Any, Any]], tok: Any, arch: str) -> str:
    """The llama.cpp pre-tokenizer under which llama.cpp, reading the vocabulary in ``fields``,
    tokenizes every probe text (and the rendered chat template) to the Hugging Face tokenizer's ids."""
    import gguf

    from refusalkit.export import llamacpp

    if not llamacpp.available():
        raise UserError(
            "GGUF export of a Hugging Face base checks its tokenizer in llama.cpp: "
            + llamacpp.MISSING
            + "; or export --format safetensors and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    from refusalkit.data.prompts import load_prompts

    texts = [*PROBES, *load_prompts("advbench")[:100], *load_prompts("alpaca")[:100]]  # shipped, offline
    if getattr(tok, "chat_template", None):
        from refusalkit.models.chat import format_prompts

        texts.append(format_prompts(tok, ["Write a haiku about 42 cats."], None)[0])
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with tempfile.TemporaryDirectory() as d:
        vocab = Path(d) / "vocab.gguf"
        writer = gguf.GGUFWriter(str(vocab), arch)
        for key, value, vtype, sub in fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        for pre in PRE_TOKENIZERS:
            got = llamacpp.tokenize_with(vocab, pre, texts)
            if got is not None and got == want:
                return pre
    raise UserError(
        "none of llama.cpp's pre-tokenizers reproduces this tokenizer's ids; export --format safetensors and "
        "convert with llama.cpp's convert_hf_to_gguf.py"
    )
