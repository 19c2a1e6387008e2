"""Makes ``tests/data/compat-0.1.0/``: a run directory ``run/`` written by refusalkit 0.1.0
(commit 028133e), which the compatibility tests read, resume and report with the current code.

    PYTHONPATH=<0.1.0 checkout>/src:tests python tests/data/make_compat_run.py tests/data/compat-0.1.0

The model is the tests' tiny random Llama with the tiny ChatML tokenizer, saved beside the run
(``tiny-model/``, a few hundred KB), so the run resumes anywhere: ``run/config.yaml`` names it by
a path relative to ``compat-0.1.0/``, and the tests run from there.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from conftest import _train_tokenizer, make_llama  # noqa: E402
from refusalkit.cli import main

SETTINGS = ["n_train=8", "n_val=4", "n_test=3", "validation.max_new_tokens=4", "selection.screen_keep=2",
            "selection.screen_prompts=2", "selection.prune_layer_fraction=0.5", "evaluation.n_prompts=4",
            "evaluation.n_harmless=3", "evaluation.max_new_tokens=8", "evaluation.ppl_tokens=512",
            "evaluation.utility_tasks=none", "run.validate_variants=false", "run.variants=magnitude-0.5,llm-int8",
            "run.repair=pruned", "run.aird_sparse=true", "run.aird_scales=1,4", "run.aird_search_prompts=3",
            "run.aird_alpha_scale=auto", "batch_size=8"]


def make(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(dest)
    try:
        tok = _train_tokenizer()
        model_dir = Path("tiny-model")
        torch.set_num_threads(1)
        make_llama(tok).save_pretrained(str(model_dir))
        tok.save_pretrained(str(model_dir))
        args = ["-q", "run", "--run", "run", "--model", str(model_dir), "--profile", "quick", "--dtype", "float32"]
        for s in SETTINGS:
            args += ["--set", s]
        code = main(args)
        if code != 0:
            raise SystemExit(f"refusalkit run exited {code}")
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    make(Path(sys.argv[1]).resolve())
