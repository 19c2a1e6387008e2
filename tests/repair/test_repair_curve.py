"""The α curve measures the edited model (regression: it once measured an unedited copy).

A tiny random Llama saved to disk as the run's base model and as a variant; ``run_repair`` with
``curve=True`` measures the base (the variant is swapped out and back in), the unrepaired
variant and two scales. Every call of ``measure`` records the weight of the edited attention
output projection of the model it runs: at a scale it must be the edited weight, unrepaired it
must be the checkpoint's weight, and a scale that changes the logits must change the figures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refusalkit.repair import job, search

from conftest import make_tiny_run


@pytest.fixture()
def tiny_run(tmp_path, tokenizer) -> tuple[Path, object]:
    return make_tiny_run(tmp_path, tokenizer)


def test_curve_measures_the_edited_model(tiny_run, monkeypatch, one_thread):
    root, cfg = tiny_run
    stored = load_file(str(root / "v" / "model" / "model.safetensors"))["model.layers.2.self_attn.o_proj.weight"]
    seen: list[tuple[bool, float]] = []
    real_measure = search.measure

    def spy(lm, *args, **kwargs):
        w = lm.model.model.layers[2].self_attn.o_proj.weight
        seen.append((torch.equal(w, stored), float((w - stored).abs().max())))
        return real_measure(lm, *args, **kwargs)

    monkeypatch.setattr(search, "measure", spy)
    settings = dataclasses.replace(
        cfg.repair,
        alpha_scale="1.0",
        placement="source",
        scales=[1.0, 200.0],
        search_prompts=2,
        max_new_tokens=4,
        ppl_tokens=512,
        curve=True,
    )
    with one_thread():
        info = job.run_repair(cfg, root, "v", repair=settings, progress=False)
    curve = info["curve"]
    # calls: base (its own weights differ from nothing: same checkpoint here), unrepaired, x1, x200
    assert len(seen) == 4
    assert seen[0][0] and seen[1][0], "the base and the unrepaired variant are measured without the edit"
    assert not seen[2][0] and not seen[3][0], "every curve point must be measured on the edited model"
    assert seen[3][1] > seen[2][1] > 0
    unrepaired = curve["unrepaired"]["perplexity"]
    x200 = next(p for p in curve["points"] if p["alpha_scale"] == 200.0)["perplexity"]
    assert abs(x200 - unrepaired) > 1e-3 * unrepaired, (x200, unrepaired)
    # the repaired checkpoint still carries the x1 edit and nothing else
    repaired = load_file(str(root / "v+aird" / "model" / "model.safetensors"))["model.layers.2.self_attn.o_proj.weight"]
    assert not torch.equal(repaired, stored)
