"""The ablation attack (an attacker who projects the base refusal direction out of every layer) on a tiny model:
its completions are those of the weight-orthogonalized model (Arditi et al.'s equivalence), and it refuses to
run without the base direction."""

from __future__ import annotations

import copy

import pytest
import torch

from refusalkit.core import artifacts
from refusalkit.core.errors import UserError
from refusalkit.core.settings import load_config
from refusalkit.direction.orthogonalize import orthogonalize
from refusalkit.evaluation.job import run_evaluate
from refusalkit.evaluation.sampling import GREEDY, sample
from refusalkit.models.chat import tokenize_instructions
from refusalkit.models.loading import load_model

from conftest import HARMFUL, make_llama


@pytest.fixture()
def tiny(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny"
    make_llama(tokenizer).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(HARMFUL) + "\n")
    cfg = load_config(
        overrides={
            "model": str(model_dir),
            "dtype": "float32",
            "device": "cpu",
            "evaluation.prompts": str(harmful),
            "evaluation.n_prompts": 3,
            "evaluation.n_harmless": 0,
            "evaluation.n_borderline": 0,
            "evaluation.max_new_tokens": "6",
            "evaluation.attacks": ["vanilla", "ablation"],
            "batch_size": 4,
        }
    )
    return tmp_path / "run", cfg, str(model_dir)


def test_ablation_attack_equals_weight_orthogonalization(tiny, one_thread):
    root, cfg, model_dir = tiny
    with pytest.raises(UserError, match="refusalkit extract"):
        run_evaluate(cfg, root, "base", progress=False)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 4.0
    artifacts.save_tensors(root / "base" / "direction" / "direction.safetensors", {"direction": direction})
    with one_thread():
        res = run_evaluate(cfg, root, "base", progress=False)
    assert set(res["asr"]) == {"vanilla", "ablation"}
    assert res["asr"]["ablation"]["settings"]["direction"]["of"] == "base"
    rows = [
        r for r in map(__import__("json").loads, (root / "base" / "eval" / "ablation.jsonl").read_text().splitlines())
    ]
    lm = load_model(model_dir, dtype="float32", device="cpu")
    orth = copy.deepcopy(lm)
    orthogonalize(orth.model, direction)
    prompts = [r["prompt"] for r in rows]
    ids = tokenize_instructions(lm.tokenizer, prompts, cfg.system_prompt)
    with one_thread():
        expected = [c[0] for c in sample(orth, ids, [GREEDY], max_new_tokens=6, batch_size=4)]
        plain = [c[0] for c in sample(lm, ids, [GREEDY], max_new_tokens=6, batch_size=4)]
    assert [r["completion"] for r in rows] == expected
    assert expected != plain, "the direction should change what this tiny model says"
