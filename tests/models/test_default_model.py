"""The mechanism on the embedded default model (Qwen2.5-Coder-0.5B-Instruct, dequantized Q4_K_M).

A reduced configuration of the default job — the ``cpu`` profile's extraction: 64 + 64 training
prompts, 16 + 16 validation prompts (a 2-prompt screen keeping 4 candidates), 32 + 32 held-out test
prompts, 16 new tokens (the model's refusals open within them: on these 128 completions every
refusal verdict at 16 tokens equals the one at 32), 128-row batches — so the test stays within a few
minutes on 2 CPU cores. The README's figures come from the full default configuration.
"""

from __future__ import annotations

import json

import pytest

from refusalkit.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("default") / "run"
    code = main(
        [
            "-q",
            "extract",
            "--run",
            str(root),
            "--n-train",
            "64",
            "--n-val",
            "16",
            "--n-test",
            "32",
            "--max-new-tokens",
            "16",
            # the cpu profile's lighter selection and wider batches (refusalkit run's default without a GPU)
            "--set",
            "selection.screen_prompts=2",
            "--set",
            "selection.screen_keep=4",
            "--set",
            "batch_size=128",
            # no noise floor: nothing here reads it (the SmolLM2 study and tests/direction/test_noise.py test it)
            "--set",
            "noise_resamples=0",
        ]
    )
    assert code == 0
    return root / "base" / "direction"


def test_direction_is_in_the_middle_layers(default_run):
    info = json.loads((default_run / "direction.json").read_text())
    assert info["n_layers"] == 24 and info["d_model"] == 896
    assert 1 <= info["layer"] < int(24 * 0.8)  # layer 0 is a zero vector, late layers are excluded
    assert -5 <= info["position"] <= -1
    assert info["kl"] <= 0.1 or info["fallback"]  # within Arditi's KL limit unless the recorded fallback says otherwise
    assert info["ablation_score"] < info["baseline"]["harmful_score"] - 0.5


def test_ablation_removes_refusal_and_addition_induces_it(default_run):
    v = json.loads((default_run / "validation.json").read_text())
    assert v["harmful_refusal_rate"] >= 0.5  # the model refuses most AdvBench prompts
    assert v["harmful_refusal_rate_ablated"] <= 0.5 * v["harmful_refusal_rate"]
    assert v["harmless_refusal_rate_added"] >= v["harmless_refusal_rate"] + 0.2


def test_early_stop_keeps_every_verdict():
    """The default model on 8 harmful and 2 harmless prompts, 16 greedy tokens: with the substring
    judge's early stop every verdict equals the full completion's (one prompt per batch: the same
    arithmetic), each cut completion is the full one's beginning, and refusals do stop early."""
    from refusalkit.data.prompts import load_prompts
    from refusalkit.data.refusal import REFUSAL, SubstringJudge
    from refusalkit.direction.generate import generate
    from refusalkit.models.chat import tokenize_instructions
    from refusalkit.models.loading import load_model

    lm = load_model("default")
    judge = SubstringJudge()
    texts = load_prompts("advbench")[:8] + load_prompts("alpaca")[:2]
    ids = tokenize_instructions(lm.tokenizer, texts, None)
    full = generate(lm, ids, max_new_tokens=16, batch_size=1)
    cut = generate(lm, ids, max_new_tokens=16, batch_size=1, settled=judge.settled)
    a, b = judge.judge_many(texts, full), judge.judge_many(texts, cut)
    assert [v.label for v in a] == [v.label for v in b]
    assert all(f.startswith(c) for f, c in zip(full, cut))
    stopped = [v for v, f, c in zip(b, full, cut) if len(c) < len(f)]
    assert len(stopped) >= 2 and all(v.label == REFUSAL for v in stopped)
