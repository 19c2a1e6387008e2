"""Batched generation: refusalkit's one decode loop, for greedy and sampled decodings alike.

Every completion refusalkit generates goes through :func:`generate_ids`: the extract job's
greedy validation (:func:`refusalkit.direction.generate.generate`), the attacks and the AIRD
search (:func:`refusalkit.evaluation.sampling.sample`). Hooks are the callers' business (they
wrap the call in ``add_hooks``), so this module needs no intervention code.

The loop is its own (not ``model.generate``) so that the expensive part is shared:

* **Shared prefix.** Chat templates put the same tokens before every instruction (Qwen's default
  system prompt and template: about 25 of a 42-token AdvBench prompt). The prefix the prompts of
  one call share is run once and its KV cache copied into every batch; only the suffixes are
  prefilled per prompt (as :func:`refusalkit.direction.forward.forward_last` does). Hooks are
  active for the prefix too, so an intervention changes its keys and values as in a full prefill.
* The suffixes of a batch are left-padded (padding sits between the prefix and the suffix,
  masked out, with explicit ``position_ids``) and **prefilled once**; the prompt's KV cache (a
  transformers ``DynamicCache``) is then repeated over the configurations
  (``batch_repeat_interleave``), so rows ``(prompt p, config c)`` sit at ``p * C + c`` and the
  prompt forward is never repeated per configuration.
* **Prefill without the padding** (CPU). One decode batch holds up to ``batch_size`` prompts of
  every length, and padding them all to the longest wasted most of a prefill (100 Alpaca
  instructions: 8,400 padded suffix tokens for about 2,000 real ones). On a CPU the batch is
  prefilled in runs of similar length (:func:`length_batches`) and their caches are merged,
  each run's keys and values padded with masked zeros between prefix and suffix
  (:func:`refusalkit.models.kv_cache.merge_padded`), so the decode steps still see one wide batch.
  Models whose cache is not plain attention keys and values (state-space, sliding-window layers)
  prefill the batch in one forward as before.
* In the prefill the output head reads a contiguous copy of its input (:func:`contiguous_head`): on
  the strided last position ``F.linear`` ran 8 times slower on a CPU (0.5B model, 100 rows: 3.0 s).
* **Groups** (:class:`Groups`): conditions under different grouped hooks share batches.
* Every step computes only the last position's logits (``logits_to_keep=1``), in float32, and
  picks each row's token with :func:`refusalkit.models.sampler.next_tokens` (argmax for greedy
  rows; per-row seeded exact sampling for the others, independent of batching).
* Rows stop at any stop id (the stop token is kept, so decoding with ``skip_special_tokens``
  matches HF ``generate``), and, given ``settled``, once their verdict is decided: every
  :data:`SETTLE_EVERY` steps each running row's tokens are offered to ``settled`` (for example the
  substring judge's :meth:`~refusalkit.data.refusal.SubstringJudge.settled`, a refusal phrase no
  later token can change), and a row it accepts stops there. Finished rows are fed the pad token and their outputs ignored; once a
  quarter of a batch has finished, those rows are dropped from it (cache included), and the
  batch ends when every row has.

Greedy rows are token-identical to HF ``generate(do_sample=False)`` (tested on the tiny models),
and the loop is a little faster than it on the same batches (README, ``benchmarks/bench_eval.py``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from refusalkit.models.kv_cache import (
    cache_keyword,
    cache_kwargs,
    has_attention_layers,
    merge_padded,
    mergeable,
    new_cache,
    prefix_padding_is_exact,
    repeat_rows,
    select_rows,
)
from refusalkit.models.loading import LoadedModel
from refusalkit.models.sampler import Decoding, RowParams, next_tokens, row_uniforms

# Compact the decode batch (drop finished rows) once at least this share of its rows has finished.
COMPACT_SHARE = 0.25
# New tokens generated, completions made, and prompt-suffix tokens prefilled (real, and with their
# padding) by this process; benchmarks read and reset it.
STATS = {"new_tokens": 0, "completions": 0, "prefill_tokens": 0, "prefill_padded": 0, "settled": 0}
# How often (in decode steps) running rows are offered to ``settled``.
SETTLE_EVERY = 4


def pad_left(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention mask)``, both ``[len(rows), longest]`` long tensors on ``device``, every
    row right-aligned (padding on the left, mask 0 there)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices ``[0, batch_size), [batch_size, 2 batch_size), …`` covering ``range(n)``."""
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


# What one more forward costs on a CPU, in padded tokens: below a few hundred rows a float32
# matmul runs far from its peak (measured on the default model's MLP, 2 threads: 64 rows 11 ms,
# 1,024 rows 94 ms, i.e. about 70 rows' worth of fixed cost per matmul), plus the Python per layer.
CPU_FORWARD_OVERHEAD = 128


def forward_overhead(device: torch.device) -> int | None:
    """:data:`CPU_FORWARD_OVERHEAD` on a CPU; None elsewhere (a GPU runs a wide padded batch
    faster than several narrow ones, so batches keep their fixed size there)."""
    return CPU_FORWARD_OVERHEAD if torch.device(device).type == "cpu" else None


def length_batches(lengths: Sequence[int], max_rows: int, overhead: int | None) -> list[slice]:
    """Contiguous slices of ``lengths`` (in their given order, normally sorted) into batches of at
    most ``max_rows`` rows that minimize the padded tokens plus ``overhead`` per batch:
    ``Σ (rows × longest + overhead)`` (exact dynamic programme). ``overhead=None``: fixed batches
    of ``max_rows`` (:func:`batches`)."""
    n = len(lengths)
    max_rows = max(1, max_rows)
    if overhead is None or n <= 1:
        return list(batches(n, max_rows))
    best = [0.0] + [math.inf] * n  # best[i]: cost of the first i rows
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        longest = 0
        for j in range(i - 1, max(-1, i - max_rows - 1), -1):  # last batch = rows j..i-1
            longest = max(longest, lengths[j])
            c = best[j] + (i - j) * longest + overhead
            if c < best[i]:
                best[i], cut[i] = c, j
    out: list[slice] = []
    i = n
    while i > 0:
        out.append(slice(cut[i], i))
        i = cut[i]
    return out[::-1]


def _contiguous_inputs(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


@contextmanager
def contiguous_head(model: Any) -> Iterator[None]:
    """While active, the model's output head gets a contiguous copy of its input (a forward
    pre-hook; the module docstring says why). A model without an ``nn.Module`` head is left alone."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, torch.nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(_contiguous_inputs)
    try:
        yield
    finally:
        handle.remove()


def common_prefix_len(ids: list[list[int]], keep: int) -> int:
    """Length of the token prefix shared by all rows, leaving at least ``keep`` tokens per row."""
    if not ids:
        return 0
    first = ids[0]
    n = min(len(r) for r in ids) - keep
    p = 0
    while p < n and all(r[p] == first[p] for r in ids):
        p += 1
    return max(p, 0)


# A shared prefix shorter than this is prefilled with each prompt (copying its cache costs more).
MIN_PREFIX = 4


def default_stop_ids(lm: LoadedModel) -> list[int]:
    """``tokenizer.eos_token_id`` plus ``model.generation_config.eos_token_id`` (an int or a list)."""
    return stop_ids_of(lm.tokenizer, getattr(lm.model, "generation_config", None))


def stop_ids_of(tokenizer: Any, generation_config: Any) -> list[int]:
    """:func:`default_stop_ids` from a tokenizer and a generation config (None: the tokenizer's ids)."""
    eos = (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None))
    flat = [int(i) for v in eos for i in (v if isinstance(v, (list, tuple)) else [v]) if i is not None]
    return list(dict.fromkeys(flat))  # in order, each once


def plan_batches(n_prompts: int, n_configs: int, batch_size: int) -> tuple[int, list[slice]]:
    """``(prompts per batch, config chunks)``: configurations are split into the fewest equal-ish
    chunks of at most ``batch_size``; prompts fill the rest, so a decode batch has at most
    ``max(batch_size, 1)`` rows (prompts × configs of one chunk)."""
    batch_size = max(1, batch_size)
    n_chunks = max(1, math.ceil(n_configs / batch_size))
    per = math.ceil(n_configs / n_chunks) if n_configs else 1
    chunks = [slice(s, min(n_configs, s + per)) for s in range(0, n_configs, per)]
    return max(1, min(n_prompts, batch_size // per)), chunks


@dataclass
class Groups:
    """Rows in groups that run under different hooks in one batch: ``of[i]`` is prompt ``i``'s group;
    ``rows`` (a :class:`refusalkit.direction.hooks.RowGroups`) gets the group of every row of each
    forward in its ``index``, where grouped hooks read it."""

    of: list[int]
    rows: Any


def _prefix_cache(model: Any, prefix: list[int], device: torch.device, groups: Groups | None = None) -> Any:
    """The KV cache of the prompts' shared ``prefix``: one row, or one per group (row ``g`` under group
    ``g``'s hooks, which change the prefix's keys and values too)."""
    cache = new_cache(model)
    if prefix:
        n = 1 if groups is None else max(groups.of) + 1
        if groups is not None:
            groups.rows.index = torch.arange(n)
        model(input_ids=torch.tensor([prefix] * n, device=device), logits_to_keep=1,
              **cache_kwargs(cache, cache_keyword(model)))  # fmt: skip
    return cache


def _shared_prefix(
    model: Any, ids: list[list[int]], device: torch.device, share: bool, groups: Groups | None
) -> tuple[int, Any]:
    """``(length, cache)`` of the prompts' shared prefix, ``(0, None)`` when not shared."""
    n = common_prefix_len(ids, 1) if share and prefix_padding_is_exact(model) else 0
    if n < MIN_PREFIX:
        return 0, None
    return n, _prefix_cache(model, ids[0][:n], device, groups)


def _prefill(
    model: Any,
    rows: list[list[int]],
    pad_id: int,
    device: torch.device,
    prefix: tuple[int, Any] = (0, None),
    grouped: tuple[Groups, torch.Tensor] | None = None,
):
    """One forward over the left-padded prompt suffixes ``rows`` after the shared prefix
    ``(length, cache)``: ``(cache, mask [P, L], last positions [P, 1], last-position
    float32 logits [P, V])``; ``mask`` and the cache cover the prefix too. ``grouped``: the groups and
    each row's group (the prefix cache then has a row per group)."""
    n_prefix, prefix_cache = prefix
    x, mask = pad_left(rows, pad_id, device)
    STATS["prefill_tokens"] += int(mask.sum())
    STATS["prefill_padded"] += x.numel()
    pos = (n_prefix + mask.cumsum(-1) - 1).clamp(min=n_prefix)
    if grouped is not None:
        grouped[0].rows.index = grouped[1]
    if n_prefix:
        cache = copy.deepcopy(prefix_cache)
        if grouped is None:
            repeat_rows(cache, len(rows))
        else:
            select_rows(cache, grouped[1])
        mask = torch.cat([mask.new_ones((len(rows), n_prefix)), mask], dim=-1)
    else:
        cache = new_cache(model)
    with contiguous_head(model):  # decode steps hand the head one position: contiguous already
        res = model(
            input_ids=x,
            attention_mask=mask,
            position_ids=pos,
            logits_to_keep=1,
            **cache_kwargs(cache, cache_keyword(model)),
        )
    return cache, mask, pos[:, -1:], res.logits[:, -1, :].float()


def _prefill_runs(
    model: Any,
    rows: list[list[int]],
    pad_id: int,
    device: torch.device,
    prefix: tuple[int, Any],
    overhead: int | None,
    grouped: tuple[Groups, torch.Tensor] | None = None,
):
    """:func:`_prefill` of ``rows`` (sorted by length), in runs of similar length
    (:func:`length_batches`) whose caches are merged into one; the same return value.
    ``overhead``: None where the caches cannot be merged (:func:`refusalkit.models.kv_cache.mergeable`)
    or batches keep their size (:func:`forward_overhead`): one prefill."""
    runs = length_batches([len(r) for r in rows], len(rows), overhead)
    if len(runs) == 1:
        return _prefill(model, rows, pad_id, device, prefix, grouped)
    n_prefix = prefix[0]
    parts = [
        _prefill(model, rows[sl], pad_id, device, prefix, None if grouped is None else (grouped[0], grouped[1][sl]))
        for sl in runs
    ]
    width = max(p[1].shape[1] for p in parts)
    masks = []
    for _, mask, _, _ in parts:
        gap = mask.new_zeros((mask.shape[0], width - mask.shape[1]))
        masks.append(torch.cat([mask[:, :n_prefix], gap, mask[:, n_prefix:]], dim=-1))
    cache = merge_padded([p[0] for p in parts], n_prefix)
    return cache, torch.cat(masks), torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])


def _decode(
    model: Any,
    cache: Any,
    mask: torch.Tensor,
    pos: torch.Tensor,
    logits: torch.Tensor,
    params: RowParams,
    uniforms: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_id: int,
    stop: torch.Tensor,
    attends: bool,
    settled: Callable[[list[int]], bool] | None = None,
    grouped: tuple[Groups, torch.Tensor] | None = None,
) -> list[list[int]]:
    """Decode ``R`` rows whose prompts are in ``cache`` (``mask [R, L]``, ``pos [R, 1]``, first-step
    ``logits [R, V]``, ``uniforms [R, max_new_tokens]``). Returns each row's new tokens, up to
    and including its stop token. ``attends`` (:func:`has_attention_layers`): False for a pure
    state-space model, whose decode steps take no attention mask. ``settled``: a row whose new tokens it
    accepts (asked every :data:`SETTLE_EVERY` steps) stops there."""
    n = logits.shape[0]
    keyword = cache_keyword(model)
    out: list[list[int]] = [[] for _ in range(n)]
    alive = torch.arange(n)  # original row of each batch row
    done = torch.zeros(n, dtype=torch.bool, device=logits.device)
    for t in range(max_new_tokens):
        tok = next_tokens(logits, params, uniforms[alive, t])
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        for r, v, finished in zip(alive.tolist(), tok.tolist(), done.tolist()):
            if not finished:
                out[r].append(v)
        done = done | torch.isin(tok, stop)
        if settled is not None and (t + 1) % SETTLE_EVERY == 0 and t < max_new_tokens - 1:
            now = [not d and settled(out[r]) for r, d in zip(alive.tolist(), done.tolist())]
            if any(now):
                STATS["settled"] += sum(now)
                done = done | torch.tensor(now, device=done.device)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if int(done.sum()) >= COMPACT_SHARE * len(alive):
            keep = (~done).nonzero().squeeze(-1)
            select_rows(cache, keep)
            mask, pos, tok, params, done = mask[keep], pos[keep], tok[keep], params.select(keep), done[keep]
            alive = alive[keep.cpu()]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        pos = pos + 1
        if grouped is not None:
            grouped[0].rows.index = grouped[1][alive]
        res = model(
            input_ids=tok.unsqueeze(-1),
            attention_mask=mask if attends else None,
            position_ids=pos,
            logits_to_keep=1,
            **cache_kwargs(cache, keyword),
        )
        logits = res.logits[:, -1, :].float()
    return out


def _row_keys(ids: list[list[int]], keys: list[str] | None) -> list[str]:
    """``keys``, or ``str(i)`` for prompt ``i``; one per prompt."""
    if keys is None:
        keys = [str(i) for i in range(len(ids))]
    if len(keys) != len(ids):
        raise ValueError(f"{len(keys)} keys for {len(ids)} prompts")
    return keys


@torch.inference_mode()
def generate_ids(
    lm: LoadedModel,
    ids: list[list[int]],
    decodings: Sequence[Decoding],
    *,
    max_new_tokens: int,
    seed: int = 0,
    keys: list[str] | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    stop_ids: list[int] | None = None,
    share_prefix: bool = True,
    settled: Callable[[list[int]], bool] | None = None,
    groups: Groups | None = None,
) -> list[list[list[int]]]:
    """New token ids ``[prompt i][decoding j]`` of the token-id prompts ``ids`` under ``decodings``,
    each up to and including its stop token (at most ``max_new_tokens``), or cut where ``settled``
    accepted its tokens (the module docstring).

    ``keys[i]`` (default ``str(i)``) names prompt ``i`` in the per-row seed (pass stable keys for
    runs that resume). ``batch_size`` bounds the rows (prompts × configs) of one decode batch;
    prompts of similar length share a batch. ``progress(n)`` gets the rows finished by each
    batch. ``stop_ids`` defaults to :func:`default_stop_ids`. Runs under whatever hooks the
    caller has registered. ``share_prefix``: run the prompts' shared prefix once (exact up to
    float rounding; the module docstring). ``groups``: prompts under different grouped hooks in one
    call (:class:`Groups`), so that conditions of a few prompts each fill a batch.
    """
    keys = _row_keys(ids, keys)
    if not ids or not decodings or max_new_tokens <= 0:
        return [[[] for _ in decodings] for _ in ids]
    if any(len(r) == 0 for r in ids):
        raise ValueError("every prompt needs at least one token")
    model, device = lm.model, lm.device
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else default_stop_ids(lm)[0]
    stop = torch.tensor(stop_ids if stop_ids is not None else default_stop_ids(lm), dtype=torch.long, device=device)
    per_batch, chunks = plan_batches(len(ids), len(decodings), batch_size)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    prefix = _shared_prefix(model, ids, device, share_prefix, groups)
    n_prefix = prefix[0]
    group_of = None if groups is None else torch.tensor(groups.of, dtype=torch.long)
    attends = has_attention_layers(model)
    overhead = forward_overhead(device) if mergeable(model) else None
    out: list[list[list[int]]] = [[[] for _ in decodings] for _ in ids]
    for s in range(0, len(order), per_batch):
        idx = order[s : s + per_batch]
        suffixes = [ids[i][n_prefix:] for i in idx]
        batch_groups = None if group_of is None else group_of[torch.tensor(idx)]
        grouped = None if batch_groups is None else (groups, batch_groups)
        cache, mask, pos, logits = _prefill_runs(model, suffixes, pad_id, device, prefix, overhead, grouped)
        for n_chunk, chunk in enumerate(chunks):
            decs = decodings[chunk]
            c = len(decs)
            # the last chunk takes the prefill cache itself; earlier ones a copy
            rep = cache if n_chunk == len(chunks) - 1 else copy.deepcopy(cache)
            repeat_rows(rep, c)
            params = RowParams.of([d for _ in idx for d in decs], device)
            uniforms = torch.stack([row_uniforms(seed, keys[i], d.name, max_new_tokens) for i in idx for d in decs])
            rows = _decode(
                model,
                rep,
                mask.repeat_interleave(c, 0),
                pos.repeat_interleave(c, 0),
                logits.repeat_interleave(c, 0),
                params,
                uniforms,
                max_new_tokens=max_new_tokens,
                pad_id=pad_id,
                stop=stop,
                attends=attends,
                settled=settled,
                grouped=None if grouped is None else (groups, batch_groups.repeat_interleave(c)),
            )
            for r, new in enumerate(rows):
                out[idx[r // c]][chunk.start + r % c] = new
            STATS["new_tokens"] += sum(len(new) for new in rows)
            STATS["completions"] += len(rows)
            del rep
            if progress is not None:
                progress(len(rows))
    return out


def settled_ids(tokenizer: Any, settled: Callable[[str], bool] | None) -> Callable[[list[int]], bool] | None:
    """A text rule ``settled`` (on a decoded, stripped completion) as a rule on new token ids."""
    if settled is None:
        return None
    return lambda new: settled(tokenizer.decode(new, skip_special_tokens=True).strip())


def decode_completions(tokenizer: Any, rows: list[list[list[int]]]) -> list[list[str]]:
    """Texts of :func:`generate_ids`' output: ``decode(skip_special_tokens=True)``, stripped."""
    return [[tokenizer.decode(t, skip_special_tokens=True).strip() for t in row] for row in rows]
