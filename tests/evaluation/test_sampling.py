"""The decode loop (models/generation.py), its filters and sampler (models/sampler.py), the
decoding attack's entry and grids (evaluation/sampling.py), and the vLLM translation (vLLM itself
is not installed here). Greedy rows are checked token for token against Hugging Face
``generate(do_sample=False)``, the implementation refusalkit's ``generate`` had before."""

from __future__ import annotations

import pytest
import torch

from refusalkit.core.errors import UserError
from refusalkit.direction.generate import generate
from refusalkit.direction.hooks import add_hooks, addition_hooks
from refusalkit.evaluation import vllm_backend
from refusalkit.evaluation.sampling import huang_grid, sample, sample_ids, small_grid
from refusalkit.models import generation
from refusalkit.models.generation import (
    common_prefix_len,
    contiguous_head,
    default_stop_ids,
    length_batches,
    pad_left,
    plan_batches,
)
from refusalkit.models.sampler import (
    GREEDY,
    Decoding,
    apply_temperature,
    blocked_inverse_cdf,
    row_seed,
    sample_from_logits,
    sample_rows,
    top_k_filter,
    top_p_filter,
    warp,
)

from conftest import HARMFUL, HARMLESS, hook_ids

N_NEW = 6
TOP_K1 = Decoding("top_k=1", top_k=1)
TOP_P0 = Decoding("top_p=0", top_p=0.0)
MIXED = [
    Decoding("temperature=1", temperature=1.0),
    GREEDY,
    Decoding("top_p=0.9", top_p=0.9),
    TOP_K1,
    Decoding("top_k=50", top_k=50),
    TOP_P0,
    Decoding("temperature=0.5", temperature=0.5),
]


def hf_greedy_ids(lm, ids: list[list[int]], n: int, hooks=([], [])) -> list[list[int]]:
    """Hugging Face ``generate(do_sample=False)`` on one left-padded batch (the former ``generate``):
    each row's new tokens up to and including its first stop token."""
    tok = lm.tokenizer
    x, mask = pad_left(ids, tok.pad_token_id, lm.device)
    with torch.inference_mode(), add_hooks(*hooks):
        gen = lm.model.generate(
            input_ids=x,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    stop = set(default_stop_ids(lm))
    out = []
    for row in gen[:, x.shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        out.append(row[:cut])
    return out


def hf_greedy(lm, ids: list[list[int]], n: int, hooks=([], [])) -> list[str]:
    tok = lm.tokenizer
    return [tok.decode(r, skip_special_tokens=True).strip() for r in hf_greedy_ids(lm, ids, n, hooks)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return HARMFUL[:2] + HARMLESS[:2]


@pytest.fixture(scope="module")
def prompts(tokenizer, texts) -> list[list[int]]:
    from refusalkit.models.chat import tokenize_instructions

    ids = tokenize_instructions(tokenizer, texts)
    assert len({len(r) for r in ids}) >= 3, "the prompts must differ in length (left padding is exercised)"
    return ids


# ------------------------------------------------------------------------------------------------
# Filters and the sampler: pure tensor functions against hand-made inputs and HF's warpers
# ------------------------------------------------------------------------------------------------


def _kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in logits]


def test_top_p_keep_sets_on_a_hand_made_distribution():
    probs = torch.tensor([0.10, 0.50, 0.15, 0.25])  # sorted: 1 (0.5), 3 (0.25), 2 (0.15), 0 (0.1)
    ps = [0.0, 0.3, 0.6, 0.8, 0.95, 1.0]
    logits = probs.log().repeat(len(ps), 1)
    kept = _kept(top_p_filter(logits, torch.tensor(ps)))
    assert kept == [{1}, {1}, {1, 3}, {1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}]
    # kept logits are unchanged
    out = top_p_filter(logits, torch.tensor(ps))
    assert torch.equal(out[2, [1, 3]], logits[2, [1, 3]])


def test_top_k_keep_sets_on_hand_made_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]]).repeat(4, 1)
    kept = _kept(top_k_filter(logits, torch.tensor([2, 0, 1, 10])))
    assert kept == [{1, 3}, {0, 1, 2, 3, 4}, {1}, {0, 1, 2, 3, 4}]
    ties = top_k_filter(torch.tensor([[3.0, 1.0, 3.0, 2.0]]), torch.tensor([1]))
    assert _kept(ties) == [{0, 2}]  # like HF: values tied with the k-th are kept


def test_temperature_scales_sampled_rows_only():
    logits = torch.tensor([[2.0, -4.0], [2.0, -4.0]])
    out = apply_temperature(logits, torch.tensor([0.5, 0.0]))
    assert torch.equal(out, torch.tensor([[4.0, -8.0], [2.0, -4.0]]))


@pytest.mark.parametrize("seed", [0, 1])
def test_filters_match_hf_warpers(seed):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 40, generator=g) * 3
    for t, k, p in [(0.7, 0, 0.9), (1.0, 5, 1.0), (1.3, 10, 0.5), (0.2, 3, 0.05), (1.0, 0, 0.35)]:
        ref = logits.clone()
        ref = TemperatureLogitsWarper(t)(None, ref)
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        n = logits.shape[0]
        ours = warp(logits, torch.full((n,), t), torch.full((n,), k), torch.full((n,), p))
        assert _kept(ours) == _kept(ref), (t, k, p)
        assert torch.allclose(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


def test_inverse_cdf_sampling_is_exact_and_never_picks_filtered_tokens():
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3])
    logits = probs.log().repeat(1000, 1)  # log 0 = -inf
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # stratified uniforms
    counts = torch.bincount(sample_from_logits(logits, u), minlength=4)
    assert counts.tolist() == [200, 0, 500, 300]
    edge = sample_from_logits(probs.log().repeat(2, 1), torch.tensor([0.0, 1.0 - 1e-12], dtype=torch.float64))
    assert edge.tolist() == [0, 3]


def _stratified(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def test_blocked_inverse_cdf_is_the_token_order_inverse_cdf():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(1, 50, generator=g)
    w[0, 8:16] = 0.0  # a whole block of zeros (block = 8: 6 blocks and a remainder of 2)
    w[0, [3, 20, 49]] = 0.0
    n = 5000
    u = _stratified(n)
    got = blocked_inverse_cdf(w.expand(n, -1).contiguous(), u, block=8)
    counts = torch.bincount(got, minlength=50).double()
    assert torch.all((counts - n * w[0] / w.sum()).abs() <= 1.0 + 1e-9)
    assert counts[8:16].sum() == 0 and counts[[3, 20, 49]].sum() == 0
    plain = torch.searchsorted(w[0].double().cumsum(0), (u * w.double().sum()).contiguous(), right=True)
    assert (got == plain).double().mean() > 0.999  # the same token order (ties only at float boundaries)


@pytest.mark.parametrize(
    "k,p,n_candidates",
    [
        (0, 1.0, 4),  # no filter
        (0, 0.3, 4),  # top-p inside the candidates
        (0, 0.9, 4),  # top-p past them: sampled again with more candidates
        (0, 0.0, 4),  # argmax only
        (5, 1.0, 8),  # top-k inside
        (5, 1.0, 4),  # k >= candidates
        (6, 0.5, 16),  # top-k then top-p
        (60, 1.0, 4),  # k > V: off
        (3, 0.7, 1024),  # candidates = the whole vocabulary
    ],
)
def test_sample_rows_draws_exactly_from_the_hf_filtered_distribution(k, p, n_candidates):
    g = torch.Generator().manual_seed(k * 100 + int(p * 10))
    logits = torch.randn(40, generator=g) * 2
    n = 4000
    ref = warp(logits[None], torch.ones(1), torch.tensor([k]), torch.tensor([p]))[0].softmax(-1).double()
    got = sample_rows(
        logits.expand(n, -1).contiguous(),
        torch.full((n,), k),
        torch.full((n,), p),
        _stratified(n),
        n_candidates=n_candidates,
    )
    counts = torch.bincount(got, minlength=40).double()
    assert torch.all((counts - n * ref).abs() <= 1.0 + 1e-6), (counts, n * ref)
    assert counts[ref == 0].sum() == 0


def test_a_rows_sample_does_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(8, 300, generator=g) * 3
    k = torch.tensor([0, 0, 5, 0, 50, 0, 2, 0])
    p = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.95, 0.0, 0.3, 0.99])
    u = torch.rand(8, generator=g, dtype=torch.float64)
    together = sample_rows(logits, k, p, u, n_candidates=16)
    alone = torch.cat(
        [sample_rows(logits[i : i + 1], k[i : i + 1], p[i : i + 1], u[i : i + 1], n_candidates=16) for i in range(8)]
    )
    assert torch.equal(together, alone)


# ------------------------------------------------------------------------------------------------
# Grids, configurations, small helpers
# ------------------------------------------------------------------------------------------------


def test_huang_grid_has_50_configs_with_the_right_values():
    grid = huang_grid()
    assert len(grid) == 50 and len({d.name for d in grid}) == 50
    temps = [d for d in grid if d.name.startswith("temperature=")]
    tops = [d for d in grid if d.name.startswith("top_p=")]
    topk = [d for d in grid if d.name.startswith("top_k=")]
    assert [d.temperature for d in temps] == [round(0.05 * i, 2) for i in range(1, 21)]
    assert [d.top_p for d in tops] == [round(0.05 * i, 2) for i in range(21)]
    assert [d.top_k for d in topk] == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    assert all(d.top_p == 1.0 and d.top_k == 0 for d in temps)
    assert all(d.temperature == 1.0 and d.top_k == 0 for d in tops)
    assert all(d.temperature == 1.0 and d.top_p == 1.0 for d in topk)
    assert temps[0].name == "temperature=0.05" and tops[18].name == "top_p=0.9" and topk[5].name == "top_k=50"
    assert not any(d.greedy for d in grid)
    assert set(small_grid()) <= set(grid) and len(small_grid()) == 7


def test_decoding_json_and_greedy():
    assert GREEDY.greedy and not TOP_K1.greedy
    assert GREEDY.to_json() == {"name": "greedy", "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    assert len({GREEDY, Decoding("greedy", temperature=0.0)}) == 1  # hashable, compared by value


@pytest.mark.parametrize(
    "n_prompts,n_configs,batch_size", [(10, 7, 64), (10, 50, 64), (3, 50, 32), (5, 9, 4), (2, 3, 1)]
)
def test_plan_batches_bounds_rows(n_prompts, n_configs, batch_size):
    per, chunks = plan_batches(n_prompts, n_configs, batch_size)
    assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(n_configs))
    assert per * max(c.stop - c.start for c in chunks) <= batch_size
    assert per >= 1


def test_row_seed_is_stable():
    assert row_seed(0, "a", "greedy") == row_seed(0, "a", "greedy")
    assert len({row_seed(0, "a", "x"), row_seed(1, "a", "x"), row_seed(0, "b", "x"), row_seed(0, "a", "y")}) == 4
    assert 0 <= row_seed(3, "prompt", "top_k=5") < 2**63


def test_default_stop_ids_reads_int_or_list(llama_lm):
    eos = llama_lm.tokenizer.eos_token_id
    assert default_stop_ids(llama_lm) == [eos]
    other = type(llama_lm)(model=llama_lm.model, tokenizer=llama_lm.tokenizer, spec="x", source="x")
    gc = llama_lm.model.generation_config
    before = gc.eos_token_id
    try:
        gc.eos_token_id = [eos, 7]
        assert default_stop_ids(other) == [eos, 7]
    finally:
        gc.eos_token_id = before


# ------------------------------------------------------------------------------------------------
# The decode loop on the tiny models
# ------------------------------------------------------------------------------------------------


def test_greedy_is_token_identical_to_hf_generate(tiny_lm, prompts):
    """The one greedy path (``generate`` and the GREEDY rows of ``sample``) gives Hugging Face's
    tokens: what refusalkit's ``generate`` returned when it called ``model.generate``."""
    ref_ids = hf_greedy_ids(tiny_lm, prompts, N_NEW)
    assert [r[0] for r in sample_ids(tiny_lm, prompts, [GREEDY], max_new_tokens=N_NEW)] == ref_ids
    for batch_size in (1, 3, 32):
        assert generate(tiny_lm, prompts, max_new_tokens=N_NEW, batch_size=batch_size) == hf_greedy(
            tiny_lm, prompts, N_NEW
        )


def test_greedy_rows_equal_hf_generate(tiny_lm, prompts):
    ref = hf_greedy(tiny_lm, prompts, N_NEW)
    assert any(ref)
    # configs are chunked (batch_size 3 < 7 configs) and mixed with sampled rows
    out = sample(tiny_lm, prompts, MIXED, max_new_tokens=N_NEW, batch_size=3)
    for j in (MIXED.index(GREEDY), MIXED.index(TOP_K1), MIXED.index(TOP_P0)):  # top_k=1 and top_p=0 are greedy too
        assert [row[j] for row in out] == ref, MIXED[j].name


def test_samples_do_not_depend_on_batching_or_order(tiny_lm, prompts, texts):
    together = sample(tiny_lm, prompts, MIXED, max_new_tokens=N_NEW, keys=texts, batch_size=64, seed=3)
    rev = list(reversed(range(len(prompts))))
    alone = sample(
        tiny_lm,
        [prompts[i] for i in rev],
        MIXED,
        max_new_tokens=N_NEW,
        keys=[texts[i] for i in rev],
        batch_size=2,
        seed=3,
    )
    assert [alone[rev.index(i)] for i in range(len(prompts))] == together
    one = [
        sample(tiny_lm, [p], MIXED[:3], max_new_tokens=N_NEW, keys=[t], batch_size=1, seed=3)[0]
        for p, t in zip(prompts[:2], texts[:2])
    ]
    assert one == [row[:3] for row in together[:2]]  # and with another subset of configs


def test_seeds_and_keys_change_samples_but_not_greedy(tiny_lm, prompts):
    t1 = [GREEDY, Decoding("temperature=1", temperature=1.0)]
    a = sample(tiny_lm, prompts, t1, max_new_tokens=N_NEW, seed=0)
    assert sample(tiny_lm, prompts, t1, max_new_tokens=N_NEW, seed=0) == a  # reproducible
    b = sample(tiny_lm, prompts, t1, max_new_tokens=N_NEW, seed=1)
    assert [r[0] for r in a] == [r[0] for r in b]
    assert any(x[1] != y[1] for x, y in zip(a, b))
    c = sample(tiny_lm, prompts, t1, max_new_tokens=N_NEW, seed=0, keys=[f"k{i}" for i in range(len(prompts))])
    assert any(x[1] != y[1] for x, y in zip(a, c))


def test_hooks_apply_to_every_step_and_are_removed(tiny_lm, prompts, rand_dir):
    before = hook_ids(tiny_lm.model)
    hooks = addition_hooks(tiny_lm.model, rand_dir(seed=5, scale=50.0), layer=1)
    plain = sample(tiny_lm, prompts, [GREEDY], max_new_tokens=N_NEW)
    steered = sample(tiny_lm, prompts, [GREEDY], max_new_tokens=N_NEW, hooks=hooks)
    assert steered != plain
    assert [r[0] for r in steered] == hf_greedy(tiny_lm, prompts, N_NEW, hooks)
    assert [r[0] for r in steered] == generate(tiny_lm, prompts, max_new_tokens=N_NEW, hooks=hooks)
    assert hook_ids(tiny_lm.model) == before


def test_rows_stop_at_a_stop_token_and_the_rest_go_on(llama_lm, prompts):
    free = sample_ids(llama_lm, prompts, MIXED, max_new_tokens=N_NEW, stop_ids=[])
    assert all(len(t) == N_NEW for row in free for t in row)
    stop = free[0][MIXED.index(GREEDY)][1]  # a token greedy emits at step 2 of prompt 0
    cut = sample_ids(llama_lm, prompts, MIXED, max_new_tokens=N_NEW, stop_ids=[stop], batch_size=8)
    n_stopped = 0
    for row_free, row_cut in zip(free, cut):
        for f, c in zip(row_free, row_cut):
            expect = f[: f.index(stop) + 1] if stop in f else f  # same tokens up to and including the stop
            assert c == expect
            n_stopped += stop in f[:-1]
    assert n_stopped >= 1 and len(cut[0][MIXED.index(GREEDY)]) == 2


@pytest.mark.parametrize("compact_share", [1e-9, 2.0])  # drop finished rows at once / never
def test_greedy_equals_generate_when_rows_stop_at_different_steps(
    tokenizer, llama_lm, prompts, monkeypatch, compact_share
):
    from refusalkit.models.loading import LoadedModel

    from conftest import make_llama

    free = [r[0] for r in sample_ids(llama_lm, prompts, [GREEDY], max_new_tokens=N_NEW, stop_ids=[])]

    def stop_lengths(t: int) -> set[int]:
        return {r.index(t) + 1 if t in r else N_NEW for r in free}

    stop = max(sorted({t for r in free for t in r}), key=lambda t: len(stop_lengths(t)))
    # the same weights, with a token that greedy decoding emits at different steps as the model's EOS
    lm = LoadedModel(model=make_llama(tokenizer, eos_token_id=stop), tokenizer=tokenizer, spec="t", source="m")
    assert stop in default_stop_ids(lm)
    monkeypatch.setattr(generation, "COMPACT_SHARE", compact_share)
    ref = hf_greedy(lm, prompts, N_NEW)
    assert generate(lm, prompts, max_new_tokens=N_NEW) == ref
    out = sample(lm, prompts, MIXED, max_new_tokens=N_NEW, stop_ids=[stop])
    for j in (MIXED.index(GREEDY), MIXED.index(TOP_K1)):
        assert [row[j] for row in out] == ref
    lengths = {len(r[0]) for r in sample_ids(lm, prompts, [GREEDY], max_new_tokens=N_NEW, stop_ids=[stop])}
    assert len(lengths) >= 2  # rows really stopped at different steps
    assert sample(llama_lm, prompts, MIXED, max_new_tokens=N_NEW, stop_ids=[]) == [
        [tokenizer.decode(t, skip_special_tokens=True).strip() for t in row]
        for row in sample_ids(llama_lm, prompts, MIXED, max_new_tokens=N_NEW, stop_ids=[])
    ]


def test_forced_eos_ends_the_batch_after_the_prefill(llama_lm, prompts):
    eos = llama_lm.tokenizer.eos_token_id
    calls = []

    def force_eos(module, args, output):
        output = output.clone()
        output[..., eos] += 1e4
        return output

    count = (llama_lm.model.model, lambda m, a, o: calls.append(1))
    out = sample_ids(
        llama_lm,
        prompts,
        MIXED,
        max_new_tokens=N_NEW,
        hooks=([], [(llama_lm.model.get_output_embeddings(), force_eos), count]),
    )
    assert out == [[[eos]] * len(MIXED)] * len(prompts)
    assert len(calls) == 2  # the shared prefix, one prefill (every prompt and config fits one batch), no step
    text = sample(
        llama_lm,
        prompts[:1],
        [GREEDY],
        max_new_tokens=N_NEW,
        hooks=([], [(llama_lm.model.get_output_embeddings(), force_eos)]),
    )
    assert text == [[""]]


def test_prefill_runs_once_per_prompt_batch(llama_lm, prompts):
    calls = []
    hook = (llama_lm.model.model, lambda m, a, o: calls.append(tuple(o.last_hidden_state.shape[:2])))
    seen: list[int] = []
    sample_ids(llama_lm, prompts, MIXED, max_new_tokens=3, stop_ids=[], hooks=([], [hook]), progress=seen.append)
    n = len(prompts) * len(MIXED)
    shared = common_prefix_len(prompts, 1)
    assert shared >= generation.MIN_PREFIX  # the chat template's tokens before the instruction
    assert calls[0] == (1, shared)  # the shared prefix once
    assert calls[1] == (len(prompts), max(len(p) for p in prompts) - shared)  # one prefill of the suffixes
    assert calls[2:] == [(n, 1), (n, 1)]  # then one-token steps over prompts x configs
    assert sum(seen) == len(prompts) * len(MIXED)


def _brute_force_cost(lengths, max_rows, overhead):
    """The least ``Σ (rows × longest + overhead)`` over every cut of ``lengths`` into contiguous batches."""
    n, best = len(lengths), None
    for mask in range(1 << max(0, n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        parts = [lengths[a:b] for a, b in zip(cuts, cuts[1:])]
        if any(len(q) > max_rows for q in parts):
            continue
        cost = sum(len(q) * max(q) + overhead for q in parts)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_length_batches_is_the_cheapest_cut(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(1, 90, (9,), generator=g).tolist(), reverse=bool(seed % 2))
    for max_rows, overhead in [(3, 0), (4, 20), (9, 128), (2, 5)]:
        cut = length_batches(lengths, max_rows, overhead)
        assert [i for sl in cut for i in range(sl.start, sl.stop)] == list(range(len(lengths)))  # contiguous, in order
        assert all(sl.stop - sl.start <= max_rows for sl in cut)
        cost = sum((sl.stop - sl.start) * max(lengths[sl]) + overhead for sl in cut)
        assert cost == _brute_force_cost(lengths, max_rows, overhead)
    assert length_batches(lengths, 4, None) == [slice(0, 4), slice(4, 8), slice(8, 9)]  # fixed batches off the CPU
    assert length_batches([], 4, 0) == [] and length_batches([7], 4, 0) == [slice(0, 1)]
    # the 100 Alpaca prompts' case in miniature: one long prompt is not worth padding the rest to
    assert length_batches([84, 20, 19, 18, 18, 17], 128, 16) == [slice(0, 1), slice(1, 6)]


@pytest.mark.parametrize("lm_name", ["llama_lm", "qwen_lm"])
def test_prefill_in_runs_merges_into_the_same_completions(request, lm_name, prompts, monkeypatch):
    """Prefilling a decode batch in runs of similar length (their caches merged with masked
    zeros) gives the tokens of one padded prefill, greedy and sampled, and prefills fewer tokens."""
    lm = request.getfixturevalue(lm_name)
    calls = []
    hook = (lm.model.model, lambda m, a, o: calls.append(tuple(o.last_hidden_state.shape[:2])))
    kw = dict(max_new_tokens=N_NEW, keys=[str(i) for i in range(len(prompts))], seed=5, batch_size=64)
    monkeypatch.setattr(generation, "CPU_FORWARD_OVERHEAD", 10**9)  # one prefill per decode batch
    whole = sample_ids(lm, prompts, MIXED[:3], hooks=([], [hook]), **kw)
    one = [c for c in calls if c[1] > 1]
    calls.clear()
    monkeypatch.setattr(generation, "CPU_FORWARD_OVERHEAD", 0)  # one run per distinct length
    runs = sample_ids(lm, prompts, MIXED[:3], hooks=([], [hook]), **kw)
    split = [c for c in calls if c[1] > 1]
    assert len(split) == len(one) - 1 + len({len(p) for p in prompts})  # the prefix once, then a run per length
    assert sum(a * b for a, b in split) < sum(a * b for a, b in one)  # less padding prefilled
    assert runs == whole
    assert [row[MIXED.index(GREEDY)] for row in runs] == hf_greedy_ids(lm, prompts, N_NEW)  # and HF generate's


def test_contiguous_head_changes_no_logit_and_is_removed(llama_lm, prompts):
    model = llama_lm.model
    x = torch.tensor([prompts[0]])
    ref = model(input_ids=x, logits_to_keep=1).logits
    head = model.get_output_embeddings()
    seen = []
    probe = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    try:
        with contiguous_head(model):
            inside = model(input_ids=x, logits_to_keep=1).logits
        model(input_ids=x, logits_to_keep=1)
    finally:
        probe.remove()
    torch.testing.assert_close(inside, ref, atol=0, rtol=0)
    assert seen[0] is True and len(head._forward_pre_hooks) == 0


def test_shared_prefix_runs_once_per_call_and_changes_no_token(llama_lm, prompts):
    calls = []
    hook = (llama_lm.model.model, lambda m, a, o: calls.append(tuple(o.last_hidden_state.shape[:2])))
    kw = dict(max_new_tokens=N_NEW, stop_ids=[], batch_size=2)
    shared = sample_ids(llama_lm, prompts, MIXED[:2], hooks=([], [hook]), **kw)
    prefills = [c for c in calls if c[1] > 1]
    assert prefills[0] == (1, common_prefix_len(prompts, 1))
    assert len(prefills) == 1 + len(prompts)  # the prefix once, then one prefill per batch of one prompt
    # the same tokens as prefilling every whole prompt (greedy and seeded sampling)
    assert shared == sample_ids(llama_lm, prompts, MIXED[:2], share_prefix=False, **kw)


def test_empty_inputs(llama_lm, prompts):
    assert sample(llama_lm, [], MIXED, max_new_tokens=4) == []
    assert sample(llama_lm, prompts[:2], [], max_new_tokens=4) == [[], []]
    with pytest.raises(ValueError):
        sample(llama_lm, prompts[:2], MIXED, max_new_tokens=4, keys=["a"])


# ------------------------------------------------------------------------------------------------
# vLLM back end: translation and the missing-package error only
# ------------------------------------------------------------------------------------------------


def test_vllm_sampling_params_translation():
    kw = vllm_backend.sampling_params_kwargs
    assert kw(GREEDY, 64, 5) == {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 64, "seed": 5}
    assert kw(Decoding("temperature=0.7", temperature=0.7), 8, 1) == {
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": -1,
        "max_tokens": 8,
        "seed": 1,
    }
    assert kw(Decoding("top_p=0.9", top_p=0.9), 8, 1)["top_p"] == 0.9
    assert kw(Decoding("top_k=50", top_k=50), 8, 1)["top_k"] == 50
    assert kw(TOP_P0, 8, 1)["temperature"] == 0.0 and kw(TOP_P0, 8, 1)["top_p"] == 1.0  # vLLM needs top_p > 0
    for d in huang_grid():
        k = kw(d, 8, 1)
        assert 0 < k["top_p"] <= 1 and (k["top_k"] == -1 or k["top_k"] >= 1) and k["temperature"] >= 0


def test_vllm_missing_is_a_user_error(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)
    with pytest.raises(UserError, match=r"pip install vllm \(or use --backend torch\)"):
        vllm_backend.sample_vllm("/nowhere", ["hi"], [GREEDY], max_new_tokens=4, seed=0)
    assert isinstance(vllm_backend.vllm_available(), bool)


def test_a_settled_row_stops_at_the_next_check_with_the_same_tokens(llama_lm, prompts):
    """``settled`` cuts a row at the first check (every SETTLE_EVERY steps) after it accepts the row's
    tokens; those tokens are the full generation's first ones, and the other rows are untouched."""
    n_new = 3 * generation.SETTLE_EVERY
    free = [r[0] for r in sample_ids(llama_lm, prompts, [GREEDY], max_new_tokens=n_new, stop_ids=[])]
    marker = free[0][1]  # a token prompt 0 emits at step 2

    def settled(new: list[int]) -> bool:
        return marker in new

    before = generation.STATS["settled"]
    for batch_size in (1, 32):  # one row at a time: exact; a batch: rows leave it as they settle
        cut = generation.generate_ids(
            llama_lm, prompts, [GREEDY], max_new_tokens=n_new, stop_ids=[], settled=settled, batch_size=batch_size
        )
        for f, (c,) in zip(free, cut):
            if marker in f[: n_new - 1]:
                k = f.index(marker) + 1
                stop_at = min(n_new, -(-k // generation.SETTLE_EVERY) * generation.SETTLE_EVERY)
                assert c == f[:stop_at]
            else:
                assert c == f
    assert generation.STATS["settled"] > before
