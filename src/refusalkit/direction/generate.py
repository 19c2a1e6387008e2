"""Greedy completions under optional hooks: the extract job's validation generations.

A thin wrapper over refusalkit's one decode loop (:func:`refusalkit.models.generation.generate_ids`
with the :data:`~refusalkit.models.sampler.GREEDY` decoding), the loop the attacks sample with,
so a validated direction and an attacked model are generated the same way. The completions are
token-identical to Hugging Face ``generate(do_sample=False)`` (tested on the tiny models).
"""

from __future__ import annotations

from collections.abc import Callable

from refusalkit.direction.hooks import Hook, add_hooks
from refusalkit.models.generation import decode_completions, generate_ids, settled_ids
from refusalkit.models.loading import LoadedModel
from refusalkit.models.sampler import GREEDY


def generate(
    lm: LoadedModel,
    ids: list[list[int]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    hooks: tuple[list[Hook], list[Hook]] = ([], []),
    progress: Callable[[int], None] | None = None,
    settled: Callable[[str], bool] | None = None,
) -> list[str]:
    """Greedy completions (special tokens stripped) for tokenized chat prompts, in input order.

    Prompts of similar length share a batch of ``batch_size``; each row stops at the model's stop
    tokens (:func:`~refusalkit.models.generation.default_stop_ids`) or after ``max_new_tokens``;
    hooks stay active for every step; ``progress(n)`` gets the prompts finished by each batch;
    ``settled(text)``: a completion whose verdict it says is decided stops there.
    """
    with add_hooks(*hooks):
        new = generate_ids(lm, ids, [GREEDY], max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                           settled=settled_ids(lm.tokenizer, settled))  # fmt: skip
    return [row[0] for row in decode_completions(lm.tokenizer, new)]
