"""The cheap screen of the edit search: the first-token refusal score of a model state.

For every held-out search prompt, one forward pass to the last prompt position gives the log-odds
that the model's first new token opens a refusal (:func:`~refusalkit.direction.select.refusal_scores`,
the score Arditi et al.'s selection uses). A prompt with a positive score is *predicted* to be
refused. On the default model this costs one prompt-length forward per prompt, against 32 decoding
steps per prompt for generation, so every candidate edit can be screened and only the few that
pass are generated from (:mod:`refusalkit.repair.edit_search`).
"""

from __future__ import annotations

from typing import Any

import torch


@torch.inference_mode()
def refusal_screen(lm: Any, cfg: Any, harmful: list[str], harmless: list[str]) -> dict[str, Any]:
    """The model as it is, on the search prompts: per kind, the share of prompts with a positive
    refusal score (``refusing``) and the mean score."""
    from refusalkit.direction.forward import forward_last
    from refusalkit.direction.select import default_refusal_ids, refusal_scores
    from refusalkit.models.chat import tokenize_instructions

    ids = default_refusal_ids(lm.tokenizer)
    out: dict[str, Any] = {}
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        if not prompts:
            continue
        logits = forward_last(
            lm.model,
            tokenize_instructions(lm.tokenizer, prompts, cfg.system_prompt),
            pad_id=lm.tokenizer.pad_token_id,
            batch_size=cfg.batch_size,
        )
        scores = refusal_scores(logits, ids)
        out[kind] = {"refusing": float((scores > 0).double().mean()), "mean_score": float(scores.mean())}
    return out
