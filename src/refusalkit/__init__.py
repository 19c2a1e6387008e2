"""refusalkit: the refusal direction of chat LLMs, what compression does to it, and its repair.

Python API (see the README)::

    from refusalkit import load_model, load_config, run_extract
    from refusalkit import mean_activations, candidate_directions, select_direction, Scorer
    from refusalkit import ablation_hooks, addition_hooks, add_hooks, orthogonalize
"""

from refusalkit.core.config import Config
from refusalkit.core.settings import load_config
from refusalkit.data.prompts import load_prompts, split_prompts
from refusalkit.data.refusal import SubstringJudge
from refusalkit.direction.extract import candidate_directions, mean_activations
from refusalkit.direction.generate import generate
from refusalkit.direction.hooks import ablation_hooks, add_hooks, addition_hooks, project_out
from refusalkit.direction.job import run_extract
from refusalkit.direction.orthogonalize import orthogonalize
from refusalkit.direction.select import Scorer, refusal_scores, refusal_token_ids, select_direction
from refusalkit.models.chat import format_prompts, post_instruction_ids, tokenize_instructions
from refusalkit.models.loading import LoadedModel, load_model

__version__ = "0.9.1"

__all__ = [
    "Config",
    "LoadedModel",
    "Scorer",
    "SubstringJudge",
    "ablation_hooks",
    "add_hooks",
    "addition_hooks",
    "candidate_directions",
    "format_prompts",
    "generate",
    "load_config",
    "load_model",
    "load_prompts",
    "mean_activations",
    "orthogonalize",
    "post_instruction_ids",
    "project_out",
    "refusal_scores",
    "refusal_token_ids",
    "run_extract",
    "select_direction",
    "split_prompts",
    "tokenize_instructions",
]
