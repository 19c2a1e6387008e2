"""The cheap screen of the edit search: the first-token refusal score of a model state.

For every held-out search prompt, one forward pass to the last prompt position gives the log-odds
that the model's first new token opens a refusal (:func:`~refusalkit.direction.select.refusal_scores`,
the score Arditi et al.'s selection uses). A prompt with a positive score is *predicted* to be
refused. On the default model this costs one prompt-length forward per prompt, against 32 decoding
steps per prompt for generation, so every candidate edit can be screened and only the few that
pass are generated from (:mod:`refusalkit.repair.edit_search`).

**Blocks before the edit are run once** (:class:`BlockInputs`). Every candidate edits block ``l`` or
``l − 1``; the blocks before the first edited one compute the same thing for every candidate, so
their output on the search prompts is kept from one pass of the unedited variant, and each
candidate's pass starts at the first edited block: the earlier blocks return the kept output at
once (the model's own forward still builds the masks and position embeddings). Exact: the kept
output is the one the unedited blocks would compute again, for the same batches (tested
bit-for-bit against a full forward). On the default model (24 blocks, edits at 13 and 14) it runs
11 of 24 blocks per candidate, apart from the shared prefix of the chat template.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from refusalkit.models.structure import decoder_layers

KINDS = ("harmful", "harmless")


def _forward(lm: Any, cfg: Any, prompts: list[str], around_batches: Any = None) -> torch.Tensor:
    from refusalkit.direction.forward import forward_last
    from refusalkit.models.chat import tokenize_instructions

    return forward_last(
        lm.model,
        tokenize_instructions(lm.tokenizer, prompts, cfg.system_prompt),
        pad_id=lm.tokenizer.pad_token_id,
        batch_size=cfg.batch_size,
        around_batches=around_batches,
    )


def _summary(logits: torch.Tensor, ids: list[int]) -> dict[str, float]:
    from refusalkit.direction.select import refusal_scores

    scores = refusal_scores(logits, ids)
    return {"refusing": float((scores > 0).double().mean()), "mean_score": float(scores.mean())}


class BlockInputs:
    """The output of block ``first − 1`` of the unedited model on the search prompts, batch by batch
    as :func:`~refusalkit.direction.forward.forward_last` runs them. The chat template's shared
    prefix runs through every block in each pass (a few tokens, once: its keys and values at the
    edited blocks change with the edit); the kept outputs stand in for the earlier blocks in the
    batches that follow it."""

    def __init__(self, lm: Any, cfg: Any, harmful: list[str], harmless: list[str], first: int):
        self.first = first
        self.outputs: dict[str, list[Any]] = {}
        self.screen: dict[str, Any] = {}  # the unedited model's screen, from the same passes
        if first <= 0:
            return
        block = decoder_layers(lm.model)[first - 1]
        ids = _refusal_ids(lm)
        for kind, prompts in zip(KINDS, (harmful, harmless), strict=True):
            if not prompts:
                continue
            kept: list[Any] = []

            @contextmanager
            def keeping(kept: list[Any] = kept) -> Iterator[None]:
                handle = block.register_forward_hook(lambda m, i, out: kept.append(out))
                try:
                    yield
                finally:
                    handle.remove()

            logits = _forward(lm, cfg, prompts, around_batches=keeping)
            self.outputs[kind] = kept
            self.screen[kind] = _summary(logits, ids)

    @contextmanager
    def skipping(self, lm: Any, kind: str) -> Iterator[None]:
        """Blocks ``0 … first − 1`` return the kept output of block ``first − 1`` for the batch in flight."""
        if self.first <= 0:
            yield
            return
        layers = decoder_layers(lm.model)[: self.first]
        kept, batch = self.outputs[kind], [-1]

        def first_block(*args: Any, **kwargs: Any) -> Any:
            batch[0] += 1
            return kept[batch[0]]

        def later_block(*args: Any, **kwargs: Any) -> Any:
            return kept[batch[0]]

        for i, layer in enumerate(layers):
            layer.forward = first_block if i == 0 else later_block
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward  # back to the class's forward
        if batch[0] + 1 != len(kept):
            raise RuntimeError(f"the screen ran {batch[0] + 1} batches, {len(kept)} were kept")


def _refusal_ids(lm: Any) -> list[int]:
    from refusalkit.direction.select import default_refusal_ids

    return default_refusal_ids(lm.tokenizer)


@torch.inference_mode()
def refusal_screen(
    lm: Any, cfg: Any, harmful: list[str], harmless: list[str], inputs: BlockInputs | None = None
) -> dict[str, Any]:
    """The model as it is, on the search prompts: per kind, the share of prompts with a positive
    refusal score (``refusing``) and the mean score. ``inputs``: the model differs from the one
    ``inputs`` was kept from in blocks ``inputs.first`` and later only, which are the only ones run."""
    ids = _refusal_ids(lm)
    out: dict[str, Any] = {}
    for kind, prompts in zip(KINDS, (harmful, harmless), strict=True):
        if not prompts:
            continue
        around = None if inputs is None else (lambda kind=kind: inputs.skipping(lm, kind))
        logits = _forward(lm, cfg, prompts, around_batches=around)
        out[kind] = _summary(logits, ids)
    return out
