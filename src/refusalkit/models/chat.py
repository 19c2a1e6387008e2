"""Chat formatting and the post-instruction token positions, derived from the tokenizer.

The post-instruction tokens are the template tokens that follow the user's text (for Qwen:
``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``). They are found by formatting two
different instructions and taking the longest common token suffix, never from the model's name.
"""

from __future__ import annotations

from typing import Any

from refusalkit.core.errors import UserError

_PROBES = ("Tell me a joke about cats.", "What is 2 + 2?")


def messages(instruction: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat messages for one instruction. ``system_prompt=None`` leaves the template's default."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return msgs + [{"role": "user", "content": instruction}]


def format_prompts(tokenizer: Any, instructions: list[str], system_prompt: str | None = None) -> list[str]:
    """Apply the chat template with the generation prompt (the assistant turn is opened)."""
    try:
        return [
            tokenizer.apply_chat_template(messages(i, system_prompt), tokenize=False, add_generation_prompt=True)
            for i in instructions
        ]
    except Exception as e:  # noqa: BLE001 - jinja errors of a user's template
        raise UserError(
            f"the chat template failed ({e}); check the model's template or --chat-template / --system-prompt"
        ) from e


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of formatted prompts; the template already holds any BOS token."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def tokenize_instructions(tokenizer: Any, instructions: list[str], system_prompt: str | None = None) -> list[list[int]]:
    return encode(tokenizer, format_prompts(tokenizer, instructions, system_prompt))


def post_instruction_ids(tokenizer: Any, system_prompt: str | None = None) -> list[int]:
    """Token ids that the template puts after every user instruction (common suffix of two probes)."""
    a, b = tokenize_instructions(tokenizer, list(_PROBES), system_prompt)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    if n == 0:
        raise UserError(
            "the chat template puts no tokens after the user's text; refusalkit cannot locate post-instruction positions"
        )
    return a[len(a) - n :]
