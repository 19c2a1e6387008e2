"""The decoding-based jailbreak attack: many decoding configurations per prompt.

Huang et al. 2023 ("Catastrophic jailbreak of open-source LLMs via exploiting generation")
show that an aligned model which refuses under its default decoding often complies under some
other temperature, nucleus (top-p) or top-k setting; the attack samples one completion per
(prompt, configuration) and counts a prompt as jailbroken when any configuration succeeds.

This module holds the attack's configuration grids and :func:`sample`, the attacks' entry to
refusalkit's one decode loop (:mod:`refusalkit.models.generation`: one prefill per prompt batch,
the prompt's KV cache shared by its configurations, finished rows dropped) under hooks. The
per-row filters and the seeded sampler are in :mod:`refusalkit.models.sampler`: how a row is
sampled depends on ``(seed, key, configuration name)`` and its own logits only, so samples do
not depend on batch size, composition or order, and a resumed run that passes the same keys
reproduces them.
"""

from __future__ import annotations

from collections.abc import Callable

from refusalkit.direction.hooks import Hook, add_hooks
from refusalkit.models.generation import decode_completions, default_stop_ids, generate_ids, settled_ids
from refusalkit.models.loading import LoadedModel
from refusalkit.models.sampler import GREEDY, Decoding, row_seed

# Re-exported: the attacks and the repair search name their decodings from here.
__all__ = [
    "GREEDY",
    "HUANG_TOP_K",
    "Decoding",
    "default_stop_ids",
    "huang_grid",
    "row_seed",
    "sample",
    "sample_ids",
    "small_grid",
    "temperature_config",
    "top_k_config",
    "top_p_config",
]


def _steps(start: float, stop: float, step: float) -> list[float]:
    """``start, start + step, …, stop`` rounded to 2 decimals (no float drift in names)."""
    n = round((stop - start) / step)
    return [round(start + i * step, 2) for i in range(n + 1)]


def temperature_config(t: float) -> Decoding:
    return Decoding(f"temperature={t:g}", temperature=t)


def top_p_config(p: float) -> Decoding:
    return Decoding(f"top_p={p:g}", top_p=p)


def top_k_config(k: int) -> Decoding:
    return Decoding(f"top_k={k}", top_k=k)


HUANG_TOP_K = (1, 2, 5, 10, 20, 50, 100, 200, 500)


def huang_grid() -> list[Decoding]:
    """Huang et al. 2023's grid, one parameter varied at a time, the others neutral (T=1, top-p=1,
    top-k off): temperature 0.05..1.00 step 0.05 (20), top-p 0.00..1.00 step 0.05 (21), top-k in
    {1,2,5,10,20,50,100,200,500} (9): 50 configs. Names follow ``temperature=0.05``,
    ``top_p=0.9``, ``top_k=50`` (the same names as ``parse_grid`` gives)."""
    return (
        [temperature_config(t) for t in _steps(0.05, 1.0, 0.05)]
        + [top_p_config(p) for p in _steps(0.0, 1.0, 0.05)]
        + [top_k_config(k) for k in HUANG_TOP_K]
    )


def small_grid() -> list[Decoding]:
    """A CPU-sized subset of :func:`huang_grid` (7 configs, each one of its members):
    temperature 0.3 / 0.7 / 1.0, top-p 0.5 / 0.9, top-k 5 / 50."""
    return (
        [temperature_config(t) for t in (0.3, 0.7, 1.0)]
        + [top_p_config(p) for p in (0.5, 0.9)]
        + [top_k_config(k) for k in (5, 50)]
    )


def sample_ids(
    lm: LoadedModel,
    ids: list[list[int]],
    decodings: list[Decoding],
    *,
    max_new_tokens: int,
    seed: int = 0,
    keys: list[str] | None = None,
    batch_size: int = 64,
    hooks: tuple[list[Hook], list[Hook]] = ([], []),
    progress: Callable[[int], None] | None = None,
    stop_ids: list[int] | None = None,
    share_prefix: bool = True,
    settled: Callable[[str], bool] | None = None,
) -> list[list[list[int]]]:
    """New token ids ``[prompt i][decoding j]``, each up to and including its stop token (at most
    ``max_new_tokens``); the arguments are :func:`sample`'s (``share_prefix``: :func:`generate_ids`')."""
    with add_hooks(*hooks):
        return generate_ids(
            lm,
            ids,
            decodings,
            max_new_tokens=max_new_tokens,
            seed=seed,
            keys=keys,
            batch_size=batch_size,
            progress=progress,
            stop_ids=stop_ids,
            share_prefix=share_prefix,
            settled=settled_ids(lm.tokenizer, settled),
        )


def sample(
    lm: LoadedModel,
    ids: list[list[int]],
    decodings: list[Decoding],
    *,
    max_new_tokens: int,
    seed: int = 0,
    keys: list[str] | None = None,
    batch_size: int = 64,
    hooks: tuple[list[Hook], list[Hook]] = ([], []),
    progress: Callable[[int], None] | None = None,
    stop_ids: list[int] | None = None,
    settled: Callable[[str], bool] | None = None,
) -> list[list[str]]:
    """``completions[i][j]`` for prompt ``i`` (token ids of a chat-formatted prompt) under
    ``decodings[j]``, decoded with ``skip_special_tokens=True`` and stripped (as ``generate``).

    ``keys[i]`` (default ``str(i)``) names prompt ``i`` in the per-row seed, so pass stable keys
    (the prompt text) for runs that resume. ``batch_size`` bounds the rows (prompts × configs) of
    one decode batch; ``progress(n)`` gets the completions finished by each batch; ``hooks``
    are active for the prefill and every step. ``stop_ids`` defaults to :func:`default_stop_ids`.
    ``settled(text)``: a completion whose verdict it says is decided stops there (the judge's rule).
    """
    new = sample_ids(
        lm,
        ids,
        decodings,
        max_new_tokens=max_new_tokens,
        seed=seed,
        keys=keys,
        batch_size=batch_size,
        hooks=hooks,
        progress=progress,
        stop_ids=stop_ids,
        settled=settled,
    )
    return decode_completions(lm.tokenizer, new)
