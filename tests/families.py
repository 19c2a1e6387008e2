"""Tiny random models of the architecture families refusalkit supports beyond Llama and Qwen2 (issue
16), built from their ``transformers`` configs and shared by the tests of every operation."""

from __future__ import annotations

import torch

from conftest import HIDDEN, VOCAB

E = 4  # experts
MAMBA2 = dict(
    mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16
)  # a hybrid's Mamba-2 layers


def _cfg(cls, tokenizer, **kw):
    base = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    return cls(**{**base, **kw})


def make(family: str, tokenizer, seed: int = 0):
    import transformers as T

    specs = {
        "mixtral": (T.MixtralConfig, dict(num_local_experts=E, num_experts_per_tok=2)),
        "qwen2_moe": (
            T.Qwen2MoeConfig,
            dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
        ),
        "qwen3_moe": (T.Qwen3MoeConfig, dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=32)),
        "olmoe": (T.OlmoeConfig, dict(num_experts=E, num_experts_per_tok=2)),
        "gemma2": (T.Gemma2Config, dict(head_dim=16)),
        "gemma3": (T.Gemma3TextConfig, dict(head_dim=16, sliding_window=8)),
        "mistral": (T.MistralConfig, dict(sliding_window=None)),
        "olmo2": (T.Olmo2Config, dict()),
        "phi3": (T.Phi3Config, dict()),  # fused qkv_proj and gate_up_proj
        "gpt2": (T.GPT2Config, dict(n_inner=96)),  # Conv1D layers, learned position embeddings, biases
        "gpt_neox": (T.GPTNeoXConfig, dict(use_parallel_residual=True)),  # parallel attention and MLP
        "mamba": (T.MambaConfig, dict(state_size=8, expand=2, conv_kernel=4)),
        "mamba2": (T.Mamba2Config, dict(num_heads=8, head_dim=16, state_size=8, expand=2, n_groups=1, chunk_size=16)),
        "granitemoehybrid": (  # Granite 4.0-H: Mamba-2 and attention layers, each with a mixture of experts
            T.GraniteMoeHybridConfig,
            dict(
                num_local_experts=E,
                num_experts_per_tok=2,
                shared_intermediate_size=48,
                layer_types=["mamba", "attention", "mamba"],
                **MAMBA2,
            ),
        ),
        "falcon_h1": (  # Falcon-H1: attention and Mamba-2 side by side in every block
            T.FalconH1Config,
            dict(
                **MAMBA2,
                mamba_d_ssm=128,
                head_dim=16,
            ),
        ),
        "jamba": (
            T.JambaConfig,
            dict(
                num_experts=2,
                num_experts_per_tok=1,
                attn_layer_period=2,
                attn_layer_offset=1,
                expert_layer_period=2,
                expert_layer_offset=1,
                mamba_d_state=8,
                use_mamba_kernels=False,
            ),
        ),  # fmt: skip
    }
    cls, kw = specs[family]
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(_cfg(cls, tokenizer, **kw)).float().eval()
    model.requires_grad_(False)
    with torch.no_grad():  # random init leaves norms at their identity: make their gains matter
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(torch.rand_like(p) * 0.5 - 0.1)
    return model


FAMILIES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",  # mixtures of experts
    "gemma2", "gemma3", "mistral", "olmo2", "phi3", "gpt2", "gpt_neox",  # dense
    "mamba", "mamba2",  # state-space
    "jamba", "granitemoehybrid", "falcon_h1",  # hybrids
]  # fmt: skip


# `refusalkit run --quick` on a tiny model in seconds: every stage on a handful of prompts
TINY_RUN = {
    "n_train": 8, "n_val": 4, "n_test": 3, "validation.max_new_tokens": 4, "selection.screen_keep": 2,
    "selection.screen_prompts": 2, "selection.prune_layer_fraction": 0.0, "evaluation.n_prompts": 4,
    "evaluation.n_harmless": 3, "evaluation.n_borderline": 3, "evaluation.max_new_tokens": 6,
    "evaluation.ppl_tokens": 512, "evaluation.utility_tasks": "none", "run.validate_variants": "false",
    "run.select_repaired": "false", "run.variants": "wanda-0.5", "run.repair": "pruned", "repair.scales": "4,16",
    "repair.search_prompts": 3, "repair.confirm": 1, "repair.direction": "unit", "compress.n_calibration": 8, "compress.seq_len": 64,
}  # fmt: skip
