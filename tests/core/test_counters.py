"""counters.py: every forward of a loaded model is counted once, split into prefill and decode, with
its seconds; a forward that raises keeps the count paired; the rates are the arithmetic they say."""

from __future__ import annotations

import pytest
import torch

from refusalkit.core.counters import count_forward, forward_rates, since, snapshot, stage_record, time_forward


@pytest.fixture
def counted(llama_lm):
    """The tiny Llama with the counting hooks load_model gives every model."""
    handles = [
        llama_lm.model.register_forward_pre_hook(count_forward, with_kwargs=True),
        llama_lm.model.register_forward_hook(time_forward, with_kwargs=True, always_call=True),
    ]
    yield llama_lm
    for h in handles:
        h.remove()


def test_prefill_and_decode_are_counted_apart(counted, harmful_ids):
    from refusalkit.direction.generate import generate

    ids = harmful_ids[:3]
    before = snapshot()
    outs = generate(counted, ids, max_new_tokens=5, batch_size=3)
    work = stage_record(since(before))
    assert work["prefill_tokens"] + work["decode_tokens"] == work["tokens"] > 0
    assert work["prefill_rows"] >= 3 and work["decode_calls"] >= 1
    assert work["decode_tokens"] <= 3 * 4  # at most 4 decode steps after the prefill's first token
    assert work["prefill_seconds"] > 0 and work["decode_seconds"] > 0
    lengths = {len(r) for r in ids}
    if len(lengths) > 1:  # left padding of the shorter prompts is counted as padding
        assert work["prefill_padding"] > 0
    assert len(outs) == 3


def test_a_forward_that_raises_stays_paired(counted, harmful_ids):
    from refusalkit.models.structure import decoder_layers

    model = counted.model
    x = torch.tensor([harmful_ids[0]])

    def boom(module, args):
        raise RuntimeError("boom")

    before = snapshot()
    handle = decoder_layers(model)[0].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), torch.inference_mode():
            model(input_ids=x)
    finally:
        handle.remove()
    with torch.inference_mode():
        model(input_ids=x)
    work = since(before)
    assert work["calls"] == 2 and work["tokens"] == 2 * x.shape[1]  # the second call is not taken as nested
    assert work["prefill_seconds"] > 0


def test_forward_rates_arithmetic():
    work = {"prefill_tokens": 1000, "prefill_rows": 10, "prefill_seconds": 2.0, "prefill_padding": 100,
            "decode_tokens": 500, "decode_calls": 50, "decode_seconds": 5.0}  # fmt: skip
    r = forward_rates(work, block_params=10**6, head_params=10**5, weight_bytes=4 * 11 * 10**5)
    assert r["prefill_gflops"] == pytest.approx(2 * (10**6 * 1000 + 10**5 * 10) / 2.0 / 1e9)
    assert r["decode_gflops"] == pytest.approx(2 * 1.1e6 * 500 / 5.0 / 1e9)
    assert r["decode_gbytes_per_s"] == pytest.approx(4.4e6 * 50 / 5.0 / 1e9)
    assert r["padding_share"] == pytest.approx(0.1)
    assert forward_rates({}, block_params=1, head_params=1, weight_bytes=1) == dict.fromkeys(r)
