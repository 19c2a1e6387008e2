"""The profiles: the settings a new run directory starts from, between the defaults and the
configuration file (a file, a flag or ``--set`` always wins). ``full`` is the configured defaults
(paper-sized); ``cpu`` the default model's study sized for a 2-core CPU; ``quick`` a smoke run.
Every command that may create a run directory (``run``, ``extract``, ``compress``, ``evaluate``,
``sweep``) takes ``--profile`` (default ``auto``: ``cpu`` without a GPU, else ``full``), so that
``evaluate`` on a new directory and ``run`` measure with the same settings; an existing run keeps
the settings recorded in its ``config.yaml``."""

from __future__ import annotations

from typing import Any

# A smoke run: every stage on few prompts (minutes on a laptop CPU). Intervals are wide.
QUICK: dict[str, Any] = {
    "n_train": 32,
    "n_val": 8,
    "n_test": 16,
    "validation.max_new_tokens": 32,
    "selection.screen_keep": 4,
    "evaluation.n_prompts": 24,
    "evaluation.n_harmless": 100,
    "evaluation.max_new_tokens": "32",
    "evaluation.utility_tasks": "offline",
    "evaluation.utility_limit": 20,
    "evaluation.ppl_tokens": 1024,
    "run.variants": ["magnitude-0.5", "llm-int8"],
    "compress.n_calibration": 8,
    "run.attacks": "vanilla",
    "evaluation.attacks": ["vanilla"],
    "repair.scales": [1.0, 4.0, 16.0],
    "repair.search_prompts": 8,
}

# The default on a machine without a GPU: the whole study on the default model in about 25 minutes on 2
# AVX2 cores (0.7.8: 24:30 to 26:20; 0.8.0: 24:28; docs/results.md, where halving the sizes to reach 20
# minutes is costed: it would leave every repair's over-refusal and F2 undecidable). What it trades off: one
# pruned and one quantized variant instead of four; half the training prompts and a lighter
# selection (16 validation prompts, a 2-prompt screen, 4 candidates scored in full); 16 calibration
# samples; variants' directions judged by their selection scores, not by generation; 32-token
# completions on 100 harmful, 100 harmless and 120 borderline prompts;
# perplexity instead of zero-shot accuracy (the offline suite is at chance on a 0.5B model);
# 128 rows per forward instead of 64 (a decode step costs 17 instead of 25 ms a row here: the matrix
# products of a small batch use the 2 cores poorly);
# the search over edits on 32 + 32 held-out prompts (first-token screen of the variant's form only, at
# most 3 candidates generated); the repaired variants' candidates compared at the base source without a
# selection of their own;
# no adaptive attacker unless run.adaptive is true (then: the small decoding grid on 25 prompts, GCG on
# 2 prompts + a universal suffix from 2, 10 steps of 16 candidates, the direction ablated on all 100).
CPU: dict[str, Any] = {
    "batch_size": 128,
    "n_train": 64,
    "n_val": 16,
    "n_test": 32,
    "validation.max_new_tokens": 32,
    "selection.screen_prompts": 2,
    "selection.screen_keep": 4,
    "evaluation.n_prompts": 100,
    "evaluation.n_harmless": 100,
    "evaluation.max_new_tokens": "32",
    "evaluation.utility_tasks": "none",
    "evaluation.ppl_tokens": 2048,
    "run.variants": ["wanda-0.5", "llm-int8"],
    "compress.n_calibration": 16,
    "run.validate_variants": False,
    "run.select_repaired": False,  # a repair's candidates compared at the base source; no selection (~3 min each)
    "repair.search_prompts": 32,
    "repair.compare_forms": False,  # the plain edit's screens are for the record (README: what keeping zeros costs)
    # the adaptive attacker (run.adaptive, opt-in on a CPU): the decoding attack on 25 prompts; GCG at
    # 10 steps of 16 candidates (about 10 s a step here; 20 x 64 took 37 s a step, 37 minutes a model)
    "evaluation.attacks": ["vanilla"],  # what run.attacks auto runs on a CPU, for evaluate too
    "evaluation.decoding_n_prompts": 25,
    "evaluation.gcg_steps": "10",
    "evaluation.gcg_search_width": "16",
}

# Profiles sit between the defaults and the config file: a file or --set value always wins.
PROFILES: dict[str, dict[str, Any]] = {"full": {}, "cpu": CPU, "quick": QUICK}


def resolve_profile(name: str, device: str) -> str:
    """``auto``: ``cpu`` when the run will not use a GPU, else ``full`` (the configured defaults)."""
    if name != "auto":
        return name
    import torch

    return "full" if torch.cuda.is_available() and device != "cpu" else "cpu"
