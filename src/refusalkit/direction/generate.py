"""Greedy completions under optional hooks: the extract job's validation generations.

A thin wrapper over refusalkit's one decode loop (:func:`refusalkit.models.generation.generate_ids`
with the :data:`~refusalkit.models.sampler.GREEDY` decoding), the loop the attacks sample with,
so a validated direction and an attacked model are generated the same way. The completions are
token-identical to Hugging Face ``generate(do_sample=False)`` (tested on the tiny models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from refusalkit.direction.hooks import Hook, RowGroups, add_hooks, intervention_hooks
from refusalkit.models.generation import Groups, decode_completions, generate_ids, settled_ids
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
    groups: Groups | None = None,
) -> list[str]:
    """Greedy completions (special tokens stripped) for tokenized chat prompts, in input order.

    Prompts of similar length share a batch of ``batch_size``; each row stops at the model's stop
    tokens (:func:`~refusalkit.models.generation.default_stop_ids`) or after ``max_new_tokens``;
    hooks stay active for every step; ``progress(n)`` gets the prompts finished by each batch;
    ``settled(text)``: a completion whose verdict it says is decided stops there; ``groups``: grouped
    hooks' rows (:class:`~refusalkit.models.generation.Groups`).
    """
    with add_hooks(*hooks):
        new = generate_ids(lm, ids, [GREEDY], max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                           settled=settled_ids(lm.tokenizer, settled), groups=groups)  # fmt: skip
    return [row[0] for row in decode_completions(lm.tokenizer, new)]


@dataclass(frozen=True)
class Condition:
    """Prompts generated under one intervention: none, the ablation of ``direction`` everywhere
    (Eq. 4), or its addition at the input of block ``layer`` (Eq. 5)."""

    ids: list[list[int]]
    ablate: torch.Tensor | None = None
    add: tuple[torch.Tensor, int] | None = None


def generate_conditions(
    lm: LoadedModel,
    conditions: dict[str, Condition],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    settled: Callable[[str], bool] | None = None,
) -> dict[str, list[str]]:
    """Greedy completions of every condition, all in one call: each condition is a group of rows under
    its own intervention (:func:`~refusalkit.direction.hooks.intervention_hooks`), so conditions of a
    few prompts each share batches of ``batch_size`` rows instead of running one small batch each
    (a decode step of 32 rows uses two CPU cores far worse than one of 128). A row is generated as it
    would be alone under its condition's hooks, up to the floating-point order that other batch
    shapes give."""
    names = list(conditions)
    rows = RowGroups()
    hooks = intervention_hooks(lm.model, [(conditions[n].ablate, conditions[n].add) for n in names], rows)
    ids = [r for n in names for r in conditions[n].ids]
    of = [g for g, n in enumerate(names) for _ in conditions[n].ids]
    outs = generate(lm, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, hooks=hooks, progress=progress,
                    settled=settled, groups=Groups(of, rows))  # fmt: skip
    done, out = 0, {}
    for n in names:
        out[n] = outs[done : done + len(conditions[n].ids)]
        done += len(conditions[n].ids)
    return out
