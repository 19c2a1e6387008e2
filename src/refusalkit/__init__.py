"""refusalkit: the refusal direction of chat LLMs, what compression does to it, and its repair.

Python API (see the README)::

    from refusalkit import load_model, load_config, run_extract
    from refusalkit import mean_activations, candidate_directions, select_direction, Scorer
    from refusalkit import ablation_hooks, addition_hooks, add_hooks, orthogonalize
"""

from .config import Config, load_config
from .extract import candidate_directions, mean_activations
from .formatting import format_prompts, post_instruction_ids, tokenize_instructions
from .generate import generate
from .hooks import ablation_hooks, add_hooks, addition_hooks, project_out
from .judge import RefusalJudge
from .models import LoadedModel, load_model
from .orthogonalize import orthogonalize
from .pipeline import run_extract
from .prompts import load_prompts, split_prompts
from .select import Scorer, refusal_scores, refusal_token_ids, select_direction

__version__ = "0.1.0"

__all__ = [
    "Config", "LoadedModel", "RefusalJudge", "Scorer", "ablation_hooks", "add_hooks", "addition_hooks",
    "candidate_directions", "format_prompts", "generate", "load_config", "load_model", "load_prompts",
    "mean_activations", "orthogonalize", "post_instruction_ids", "project_out", "refusal_scores",
    "refusal_token_ids", "run_extract", "select_direction", "split_prompts", "tokenize_instructions",
]
