"""forward.py: batched last-position logits (shared prefix, left padding) against plain forwards."""

from __future__ import annotations

import pytest
import torch

from refusalkit.direction.forward import common_prefix_len, forward_last
from refusalkit.direction.hooks import ablation_hooks, add_hooks, addition_hooks, merge
from refusalkit.models.generation import batches, pad_left

from conftest import hook_ids


def _reference(model, ids, hooks=([], [])) -> torch.Tensor:
    """One prompt at a time, no padding, no cache: ``[n, vocab]`` last-position logits."""
    rows = []
    with torch.no_grad(), add_hooks(*hooks):
        for r in ids:
            rows.append(model(input_ids=torch.tensor([r])).logits[0, -1].float())
    return torch.stack(rows)


@pytest.fixture(scope="module")
def prompts(harmful_ids, harmless_ids):
    ids = harmful_ids[:3] + harmless_ids[:4]
    assert len({len(r) for r in ids}) >= 4, "the prompts must differ in length"
    return ids


def test_prompts_share_a_prefix(prompts):
    # The default system prompt gives a long shared prefix, so share_prefix=True really takes the
    # cached path (forward_last ignores prefixes shorter than 4 tokens).
    assert common_prefix_len(prompts, keep=8) >= 4


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_shared_prefix_equals_plain_equals_one_at_a_time(tiny_lm, prompts, batch_size):
    model, pad = tiny_lm.model, tiny_lm.tokenizer.pad_token_id
    ref = _reference(model, prompts)
    shared = forward_last(model, prompts, pad_id=pad, batch_size=batch_size, share_prefix=True)
    plain = forward_last(model, prompts, pad_id=pad, batch_size=batch_size, share_prefix=False)
    assert shared.shape == plain.shape == (len(prompts), model.config.vocab_size)
    assert shared.dtype == torch.float32
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(shared, ref, atol=1e-4, rtol=0)
    # Rows are distinct (the comparison is not trivially satisfied by equal rows).
    assert (ref[0] - ref[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["ablation", "addition", "both"])
def test_forward_last_under_hooks(tiny_lm, prompts, rand_dir, kind):
    model, pad = tiny_lm.model, tiny_lm.tokenizer.pad_token_id
    r = rand_dir(seed=21, scale=2.0)
    hooks = {
        "ablation": ablation_hooks(model, r),
        "addition": addition_hooks(model, r, layer=1),
        "both": merge(ablation_hooks(model, r), addition_hooks(model, rand_dir(seed=4), layer=2)),
    }[kind]
    before = hook_ids(model)
    ref = _reference(model, prompts, hooks)
    base = _reference(model, prompts)
    assert (ref - base).abs().max() > 1e-3  # the hooks do change the logits
    shared = forward_last(model, prompts, pad_id=pad, batch_size=3, hooks=hooks, share_prefix=True)
    plain = forward_last(model, prompts, pad_id=pad, batch_size=3, hooks=hooks, share_prefix=False)
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(shared, ref, atol=1e-4, rtol=0)
    assert hook_ids(model) == before


def test_forward_last_on_batch_and_no_logits(llama_lm, prompts):
    model, pad = llama_lm.model, llama_lm.tokenizer.pad_token_id
    seen = []
    out = forward_last(model, prompts, pad_id=pad, batch_size=3, on_batch=seen.append, want_logits=False)
    assert out is None
    # batches of at most 3 rows, cut by length on a CPU; every prompt once
    assert sum(seen) == len(prompts) and max(seen) <= 3 and len(seen) >= 3


def test_forward_last_identical_prompts(llama_lm, prompts):
    """All rows identical: the shared prefix stops ``keep`` tokens before the end."""
    model, pad = llama_lm.model, llama_lm.tokenizer.pad_token_id
    same = [prompts[0]] * 3
    assert common_prefix_len(same, keep=8) == len(prompts[0]) - 8
    out = forward_last(model, same, pad_id=pad, batch_size=2)
    ref = _reference(model, same[:1])
    torch.testing.assert_close(out, ref.expand(3, -1), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# common_prefix_len and helpers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, keep, expected",
    [
        ([], 0, 0),
        ([[1, 2, 3]], 0, 3),
        ([[1, 2, 3]], 1, 2),
        ([[1, 2, 3]], 5, 0),  # keep larger than the row
        ([[1, 2, 3, 4], [1, 2, 3, 4]], 0, 4),
        ([[1, 2, 3, 4], [1, 2, 3, 4]], 2, 2),  # keep respected although all tokens agree
        ([[1, 2, 3, 4, 5], [1, 2, 3]], 0, 3),  # limited by the shortest row
        ([[1, 2, 3, 4, 5], [1, 2, 3]], 1, 2),  # keep applies to the shortest row
        ([[1, 2, 9, 4], [1, 2, 3, 4]], 0, 2),  # stops at the first difference (not a suffix match)
        ([[7, 2, 3], [1, 2, 3]], 0, 0),  # no common prefix
        ([[1, 2, 3], [1, 2, 3], [1, 5, 3]], 0, 1),  # every row must agree
        ([[1], [1, 2]], 3, 0),
    ],
)
def test_common_prefix_len(ids, keep, expected):
    assert common_prefix_len(ids, keep) == expected


def test_common_prefix_len_leaves_keep_tokens_in_every_row():
    ids = [[5] * 10 + [1, 2], [5] * 10 + [3], [5] * 10 + [4, 4, 4, 4]]
    for keep in range(12):
        p = common_prefix_len(ids, keep)
        assert all(len(r) - p >= keep for r in ids) or p == 0


def test_pad_left_and_batches():
    ids, mask = pad_left([[1, 2, 3], [4]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert list(batches(5, 2)) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert list(batches(0, 2)) == []


# ----------------------------------------------------------------------------------------------
# generate (batched greedy generation with left padding)
# ----------------------------------------------------------------------------------------------


def _greedy_reference(lm, ids, n, hooks=([], [])):
    """Greedy decoding by hand: one prompt, no padding, no cache, argmax of a full forward."""
    eos = lm.model.config.eos_token_id
    out = []
    with torch.no_grad(), add_hooks(*hooks):
        for r in ids:
            seq = list(r)
            for _ in range(n):
                nxt = int(lm.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                seq.append(nxt)
                if nxt == eos:
                    break
            out.append(lm.tokenizer.decode(seq[len(r) :], skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("hooked", [False, True])
def test_generate_batched_equals_one_at_a_time(tiny_lm, prompts, rand_dir, hooked):
    from refusalkit.direction.generate import generate

    before = hook_ids(tiny_lm.model)
    hooks = ablation_hooks(tiny_lm.model, rand_dir(seed=30)) if hooked else ([], [])
    batched = generate(tiny_lm, prompts, max_new_tokens=5, batch_size=4, hooks=hooks)
    single = generate(tiny_lm, prompts, max_new_tokens=5, batch_size=1, hooks=hooks)
    assert len(batched) == len(prompts)
    assert batched == single
    assert batched == _greedy_reference(tiny_lm, prompts, 5, hooks)
    assert any(t for t in batched)  # something was generated
    assert hook_ids(tiny_lm.model) == before


def test_generate_keeps_input_order_and_reports_progress(llama_lm, prompts):
    from refusalkit.direction.generate import generate

    seen: list[int] = []
    order = list(reversed(prompts))
    a = generate(llama_lm, order, max_new_tokens=3, batch_size=3, progress=seen.append)
    b = generate(llama_lm, prompts, max_new_tokens=3, batch_size=3)
    assert a == list(reversed(b))
    assert sum(seen) == len(prompts)


@pytest.mark.parametrize("batch_size", [1, 5, 32])
def test_conditions_in_one_call_equal_each_condition_alone(tiny_lm, prompts, rand_dir, batch_size):
    """Conditions generated together (grouped hooks: a plain group, an ablation, additions at two
    layers) give each row the tokens of its condition generated alone under its own hooks, with any
    batch size; the hooks do act (the additions' completions differ from plain ones) and are removed
    afterwards."""
    from refusalkit.direction.generate import Condition, generate, generate_conditions

    model = tiny_lm.model
    before = hook_ids(model)
    r, q = rand_dir(seed=30, scale=4.0), rand_dir(seed=31, scale=4.0)
    conds = {
        "plain": Condition(prompts[:3]),
        "ablated": Condition(prompts[1:5], ablate=r),
        "added": Condition(prompts[:4], add=(r, 1)),
        "added_other": Condition(prompts[2:], add=(q, 2)),
    }
    together = generate_conditions(tiny_lm, conds, max_new_tokens=5, batch_size=batch_size)
    alone_hooks = {
        "plain": ([], []),
        "ablated": ablation_hooks(model, r),
        "added": addition_hooks(model, r, layer=1),
        "added_other": addition_hooks(model, q, layer=2),
    }
    for name, cond in conds.items():
        alone = generate(tiny_lm, cond.ids, max_new_tokens=5, batch_size=batch_size, hooks=alone_hooks[name])
        assert together[name] == alone, name
    plain = generate(tiny_lm, prompts, max_new_tokens=5, batch_size=batch_size)
    assert together["added"] != plain[:4] and together["added_other"] != plain[2:]  # (an ablation may not flip a token)
    assert hook_ids(model) == before
