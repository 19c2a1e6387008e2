"""The GCG attack: Algorithm 1 (one prompt) and Algorithm 2 (universal, progressive) of Zou et al.,
over :class:`~refusalkit.evaluation.gcg.objective.GCGObjective`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from refusalkit.core.errors import UserError
from refusalkit.direction.hooks import Hook, add_hooks
from refusalkit.evaluation.gcg.candidates import sample_candidates, top_k_substitutions, unique_candidates
from refusalkit.evaluation.gcg.objective import GCGObjective
from refusalkit.evaluation.gcg.tokens import allowed_tokens

log = logging.getLogger(__name__)


@dataclass
class GCGConfig:
    """Settings of :func:`gcg`; the defaults are those of Zou et al. (§3, Alg. 1)."""

    n_steps: int = 250
    search_width: int = 512  # candidates per step (Zou: batch size B = 512)
    topk: int = 256  # top-k token substitutions per position (Zou: k = 256)
    n_replace: int = 1  # positions changed per candidate
    suffix_init: str = "! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! !"  # Zou's 20 "!"
    seed: int = 0
    eval_batch_size: int = 64  # candidates per forward pass (halved, and kept halved, on an out-of-memory error)
    allow_non_ascii: bool = False
    early_stop: bool = True  # stop when every target is the greedy continuation
    progressive: bool = True  # universal mode: add prompts one at a time once the current ones succeed (Alg. 2)


@dataclass
class GCGResult:
    """The best suffix found and how the optimization went.

    ``suffix_ids`` are the ids of ``" " + suffix`` (the separator is part of the first token).
    ``best_loss`` is the loss of the best suffix summed over the prompts active at the end
    (all of them unless progressive mode stopped early); ``losses[t]`` is the loss of the suffix
    chosen at step ``t`` over the prompts active then. ``initial_goal_losses`` and
    ``goal_losses`` are per-prompt losses of the initial and the best suffix over every prompt.
    """

    suffix: str
    suffix_ids: list[int]
    best_loss: float
    losses: list[float]
    n_steps: int
    seconds: float
    success: list[bool]  # per prompt: target is the greedy continuation with the best suffix
    initial_loss: float = float("nan")
    initial_goal_losses: list[float] | None = None
    goal_losses: list[float] | None = None
    n_goals_used: int = 1  # prompts active at the end (progressive mode adds them one at a time)
    early_stopped: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gcg(
    lm: Any,
    goals: list[str],
    targets: list[str],
    config: GCGConfig,
    *,
    system_prompt: str | None = None,
    hooks: tuple[list[Hook], list[Hook]] = ([], []),
    progress: Callable[[int], None] | None = None,
) -> GCGResult:
    """One suffix optimized for every (goal, target) pair: per-prompt when ``len(goals) == 1``
    (Zou et al. Alg. 1), universal otherwise (Alg. 2, progressive with ``config.progressive``).

    Every forward runs under ``hooks`` (e.g. a directional ablation). The model is put in eval
    mode for the attack and its mode restored; its weights and ``requires_grad`` flags are never
    changed. ``progress(k)`` is called with ``k = 1`` after every step (a tqdm bar's ``update``);
    on an early stop the skipped steps are reported at once, so a bar of ``n_steps`` ends full.
    """
    t0 = time.time()
    if config.n_steps < 0 or config.search_width < 1 or config.topk < 1 or config.n_replace < 1:
        raise UserError("GCG needs n_steps >= 0 and search_width, topk, n_replace >= 1")
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        with add_hooks(*hooks):
            result = _optimize(lm, goals, targets, config, system_prompt, progress)
    finally:
        if was_training:
            model.train()
    result.seconds = round(time.time() - t0, 3)
    return result


@dataclass
class _Search:
    """The optimization's state: the current suffix ``ids`` with its per-goal losses and successes
    on the ``active`` goals, the best suffix so far, and the loss of the suffix chosen at each step."""

    ids: torch.Tensor
    goal_loss: list[float]
    ok: list[bool]
    active: int
    best_ids: torch.Tensor | None = None
    best_loss: float = float("nan")
    best_ok: bool = False
    losses: list[float] = field(default_factory=list)

    def restart_best(self) -> None:
        """The current suffix becomes the best (at the start, and for a new goal set: losses over
        the old one do not compare)."""
        self.best_ids, self.best_loss, self.best_ok = self.ids, float(sum(self.goal_loss)), all(self.ok)

    def choose(self, ids: torch.Tensor, goal_loss: list[float], ok: list[bool], loss: float) -> None:
        """Move to ``ids`` (summed loss ``loss``); it becomes the best if it succeeds on every
        active prompt where the best does not, or succeeds as well with a lower loss."""
        self.ids, self.goal_loss, self.ok = ids, goal_loss, ok
        self.losses.append(loss)
        if (all(ok), -self.losses[-1]) > (self.best_ok, -self.best_loss):
            self.best_ids, self.best_loss, self.best_ok = ids, self.losses[-1], all(ok)


def _add_goals(obj: GCGObjective, s: _Search, n: int) -> None:
    """Alg. 2: add the next prompt once the suffix succeeds on all current ones."""
    while s.active < n and all(s.ok):
        lo, ok = obj.losses(s.ids.unsqueeze(0), [s.active], 1)
        s.goal_loss.append(float(lo[0, 0]))
        s.ok.append(bool(ok[0, 0]))
        s.active += 1
        s.restart_best()


def _step(
    obj: GCGObjective, s: _Search, config: GCGConfig, allowed: torch.Tensor, gen: torch.Generator, step: int
) -> None:
    """One step of Alg. 1 over the active goals: gradient, top-k substitutions, candidates, the
    retokenization filter, exact losses; the best candidate becomes the suffix."""
    goal_set = list(range(s.active))
    grad, _, _ = obj.gradient(s.ids, goal_set)
    topk_ids = top_k_substitutions(grad, config.topk, allowed)
    cands = sample_candidates(s.ids, topk_ids, config.search_width, config.n_replace, gen)
    cands = unique_candidates(cands, s.ids)
    keep = obj.consistent(cands, goal_set)
    cands = cands[torch.tensor(keep, dtype=torch.bool)] if len(cands) else cands
    if len(cands) == 0:
        log.warning("GCG step %d: no candidate passed the retokenization filter; the suffix is kept", step)
        s.losses.append(float(sum(s.goal_loss)))
        return
    per_goal, ok = obj.losses(cands, goal_set, config.eval_batch_size)
    total = per_goal.sum(-1)
    j = int(total.argmin())
    s.choose(cands[j].clone(), per_goal[j].tolist(), ok[j].tolist(), float(total[j]))


def _optimize(
    lm: Any,
    goals: list[str],
    targets: list[str],
    config: GCGConfig,
    system_prompt: str | None,
    progress: Callable[[int], None] | None,
) -> GCGResult:
    obj = GCGObjective(lm, goals, targets, system_prompt)
    ids = obj.suffix_ids(config.suffix_init)
    allowed = allowed_tokens(lm.tokenizer, obj.vocab_size, len(ids), config.allow_non_ascii, obj.text).to(obj.device)
    gen = torch.Generator().manual_seed(config.seed)
    n = len(goals)
    active = 1 if config.progressive and n > 1 else n
    init_loss, init_ok = obj.losses(ids.unsqueeze(0), range(n), 1)
    s = _Search(ids, init_loss[0, :active].tolist(), init_ok[0, :active].tolist(), active)
    s.restart_best()
    initial_loss = s.best_loss
    step, early = 0, False
    while True:
        if config.progressive:
            _add_goals(obj, s, n)
        if config.early_stop and s.active == n and all(s.ok):
            early = True
            break
        if step >= config.n_steps:
            break
        step += 1
        _step(obj, s, config, allowed, gen, step)
        if progress is not None:
            progress(1)
    if early and progress is not None and config.n_steps > step:
        progress(config.n_steps - step)
    final_loss, final_ok = obj.losses(s.best_ids.unsqueeze(0), range(n), 1)
    return GCGResult(
        suffix=obj.suffix_text(s.best_ids),
        suffix_ids=s.best_ids.tolist(),
        best_loss=float(s.best_loss),
        losses=s.losses,
        n_steps=step,
        seconds=0.0,
        success=final_ok[0].tolist(),
        initial_loss=initial_loss,
        initial_goal_losses=init_loss[0].tolist(),
        goal_losses=final_loss[0].tolist(),
        n_goals_used=s.active,
        early_stopped=early,
    )
