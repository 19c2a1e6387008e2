"""The edit search's screen: running the blocks before the first edited one once is exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from refusalkit.core.config import Config
from refusalkit.repair.aird import apply_aird
from refusalkit.repair.screen import BlockInputs, _forward, refusal_screen

from conftest import HARMFUL, HARMLESS, N_LAYERS


@pytest.mark.parametrize("first", [1, 2, N_LAYERS - 1])
def test_skipping_the_unedited_blocks_is_exact(tiny_lm, rand_dir, first):
    """For an edit at block ``first`` (and one after it), each kind's logits from a pass that starts
    at block ``first`` (after the shared prefix, which runs through every block) equal a full
    forward of the edited model bit for bit, batch by batch."""
    cfg = dataclasses.replace(Config(), batch_size=3)  # several batches of unequal lengths
    inputs = BlockInputs(tiny_lm, cfg, HARMFUL, HARMLESS, first)
    assert len(inputs.outputs["harmful"]) == -(-len(HARMFUL) // 3)
    unedited = refusal_screen(tiny_lm, cfg, HARMFUL, HARMLESS, inputs)
    assert unedited == inputs.screen  # no edit: the screen of the pass that kept the inputs
    edits = [
        apply_aird(tiny_lm.model, rand_dir(scale=5.0), b, alphas={"attn_out": 0.5, "mlp_down": 0.3})
        for b in {first, N_LAYERS - 1}
    ]
    try:
        for kind, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
            full = _forward(tiny_lm, cfg, prompts)
            skipped = _forward(tiny_lm, cfg, prompts, around_batches=lambda kind=kind: inputs.skipping(tiny_lm, kind))
            assert torch.equal(full, skipped), kind
        edited = refusal_screen(tiny_lm, cfg, HARMFUL, HARMLESS, inputs)
        assert edited != unedited  # the edit changes the scores, and the skipping pass sees it
    finally:
        for e in reversed(edits):
            e.remove()
    # every block runs its own forward again
    assert all("forward" not in vars(layer) for layer in tiny_lm.model.model.layers)
    assert refusal_screen(tiny_lm, cfg, HARMFUL, HARMLESS) == unedited  # the full forward, unedited


def test_skipping_checks_the_batches(tiny_lm):
    cfg = dataclasses.replace(Config(), batch_size=3)
    inputs = BlockInputs(tiny_lm, cfg, HARMFUL, [], 1)
    with pytest.raises(RuntimeError, match="batches"):  # one batch of the kept ones
        _forward(tiny_lm, cfg, HARMFUL[:3], around_batches=lambda: inputs.skipping(tiny_lm, "harmful"))
    assert all("forward" not in vars(layer) for layer in tiny_lm.model.model.layers)
