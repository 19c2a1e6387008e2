"""GCG, the Greedy Coordinate Gradient suffix attack (Zou et al. 2023, "Universal and Transferable
Adversarial Attacks on Aligned Language Models", arXiv:2307.15043).

The attack looks for a suffix ``s`` (a sequence of tokens) such that, for a user message
``f"{goal} {s}"``, the assistant's reply starts with a target string (``"Sure, here is how to
..."``). The loss (their Eq. 2) is the mean cross-entropy of the target tokens under teacher
forcing. One step of Algorithm 1:

1. **Gradient.** With the suffix as one-hot rows ``e_{x_i}``, compute ``∇_{e_{x_i}} L`` for every
   suffix position ``i``; the ``k`` tokens with the largest negative gradient are the promising
   substitutions ``X_i`` of position ``i``.
2. **Candidates.** ``B`` copies of the suffix, each with a random position ``i`` replaced by a
   random token of ``X_i`` (``n_replace`` positions with ``n_replace > 1``).
3. **Selection.** The exact loss of every candidate is computed; the best becomes the suffix.

Algorithm 2 (universal): one suffix for several (goal, target) pairs; the loss and its gradient
are summed over the prompts, and with ``progressive=True`` the prompts are added one at a time,
the next as soon as the suffix succeeds on all current ones.

**Tokenization, from the chat template.** The template is rendered for the user message
``f"{goal} {PLACEHOLDER}"`` and cut at ``" " + PLACEHOLDER``: ``before`` ends with the goal,
``after`` is the end of the user turn and the assistant header. The four segments (before,
suffix, after, target) are tokenized separately. The separating space belongs to the *suffix*
segment: byte-level BPE tokenizers (Qwen, Llama 3, SmolLM2, GPT-2) attach a space to the word
that follows it, so ``"goal ! !"`` is ``goal | " !" | " !"`` and never ``goal | " " | "!" | " !"``.
The optimized ids are therefore those of ``" " + suffix`` (the first one starts with a space), and
a candidate is kept only if its text re-encodes to the same ids alone *and* inside every active
prompt (``encode(before + text + after) == before_ids + ids + after_ids``), so the suffix string
that is reported gives back exactly the optimized tokens when :func:`attack_prompt` is rendered
and tokenized as a whole. The suffix string neither starts nor ends with whitespace, so templates
that ``trim`` the message content render it unchanged.

**Cost.** Every candidate needs a forward pass over ``suffix + after + target`` (about 40 tokens);
``before`` (template, system prompt and goal) is run once per prompt and its KV cache reused
(under the active hooks), and the output head is applied to the target positions only. A step
costs one forward + backward per active prompt and ``B`` candidate forwards per active prompt.

Modules: :mod:`~refusalkit.evaluation.gcg.tokens` (segments, suffix text, allowed tokens, the
retokenization filter), :mod:`~refusalkit.evaluation.gcg.candidates` (Alg. 1's tensor steps),
:mod:`~refusalkit.evaluation.gcg.objective` (cached exact losses and gradients) and
:mod:`~refusalkit.evaluation.gcg.attack` (the optimization loop, :func:`gcg`).
"""

from refusalkit.evaluation.gcg.attack import GCGConfig, GCGResult, gcg
from refusalkit.evaluation.gcg.candidates import sample_candidates, target_loss, top_k_substitutions, unique_candidates
from refusalkit.evaluation.gcg.objective import GCGObjective
from refusalkit.evaluation.gcg.tokens import (
    PLACEHOLDER,
    SEPARATOR,
    Segments,
    SuffixCodec,
    TokenText,
    allowed_tokens,
    attack_prompt,
    consistent_rows,
    default_target,
    make_segments,
    split_template,
)

__all__ = [
    "PLACEHOLDER",
    "SEPARATOR",
    "GCGConfig",
    "GCGObjective",
    "GCGResult",
    "Segments",
    "SuffixCodec",
    "TokenText",
    "allowed_tokens",
    "attack_prompt",
    "consistent_rows",
    "default_target",
    "gcg",
    "make_segments",
    "sample_candidates",
    "split_template",
    "target_loss",
    "top_k_substitutions",
    "unique_candidates",
]
