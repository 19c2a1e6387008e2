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
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..formatting import format_prompts
from ..hooks import Hook, add_hooks

log = logging.getLogger(__name__)

PLACEHOLDER = "GCGSUFFIXPLACEHOLDER"
SEPARATOR = " "


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


def default_target(goal: str) -> str:
    """``"Sure, here is how to " + goal`` with its first letter lower-cased and a final period
    dropped (AdvBench's targets are "Sure, here is ..."; offline we only have the goals)."""
    g = goal.strip()
    if g.endswith("."):
        g = g[:-1]
    return "Sure, here is how to " + g[:1].lower() + g[1:]


def attack_prompt(goal: str, suffix: str) -> str:
    """The user message under attack: the goal, a space, the suffix."""
    return f"{goal}{SEPARATOR}{suffix}"


# --------------------------------------------------------------------------------------------
# Pure tensor helpers (Alg. 1: top-k substitutions, candidate sampling, selection)
# --------------------------------------------------------------------------------------------


def top_k_substitutions(grad: torch.Tensor, k: int, allowed: torch.Tensor) -> torch.Tensor:
    """``X_i = Top-k(−∇_{e_{x_i}} L)`` for every suffix position (Alg. 1, line 3).

    ``grad`` is ``[S, V]``, ``allowed`` a bool mask ``[V]`` or ``[S, V]``. Returns ``[S, k']`` token
    ids, ``k' = min(k, allowed tokens of the most restricted position)``, so no disallowed token
    is ever proposed.
    """
    allowed = allowed.to(grad.device).expand_as(grad)
    k = min(k, int(allowed.sum(-1).min()))
    if k < 1:
        raise UserError("no token is allowed at some suffix position; set allow_non_ascii or check the tokenizer")
    scores = (-grad.float()).masked_fill(~allowed, float("-inf"))
    return scores.topk(k, dim=-1).indices


def sample_candidates(ids: torch.Tensor, topk_ids: torch.Tensor, n: int, n_replace: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``n`` copies of ``ids [S]``, each with ``n_replace`` distinct uniformly random positions ``i``
    set to a uniformly random token of ``topk_ids[i]`` (Alg. 1, lines 4-6). CPU, seeded."""
    ids, topk_ids = ids.cpu(), topk_ids.cpu()
    S, k = topk_ids.shape
    n_replace = max(1, min(n_replace, S))
    pos = torch.rand(n, S, generator=generator).argsort(dim=-1)[:, :n_replace]
    pick = torch.randint(0, k, (n, n_replace), generator=generator)
    out = ids.unsqueeze(0).repeat(n, 1)
    out.scatter_(1, pos, topk_ids[pos, pick])
    return out


def unique_candidates(cands: torch.Tensor, current: torch.Tensor | None = None) -> torch.Tensor:
    """Drop repeated rows (first kept, order preserved) and rows equal to ``current``: every
    candidate costs a forward pass."""
    seen = {tuple(current.tolist())} if current is not None else set()
    keep = []
    for i, row in enumerate(cands.tolist()):
        t = tuple(row)
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return cands[torch.tensor(keep, dtype=torch.long)] if keep else cands[:0]


def target_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``target [T]`` under teacher forcing (Eq. 2) and whether every target
    token is the argmax (the target is the greedy continuation). ``logits [B, T, V]`` predict
    the target tokens. Returns float32 ``loss [B]`` and bool ``success [B]``."""
    B, T, V = logits.shape
    tgt = target.to(logits.device).unsqueeze(0).expand(B, T)
    ce = F.cross_entropy(logits.float().reshape(B * T, V), tgt.reshape(-1), reduction="none").view(B, T)
    return ce.mean(-1), (logits.argmax(-1) == tgt).all(-1)


def consistent_rows(cands: list[list[int]], encoded: list[list[int]]) -> list[bool]:
    """Row ``i`` is consistent when re-encoding its text gave back exactly ``cands[i]``."""
    return [c == e for c, e in zip(cands, encoded)]


# --------------------------------------------------------------------------------------------
# Text of token ids and the tokens allowed in a suffix
# --------------------------------------------------------------------------------------------


class TokenText:
    """The text that suffix ids stand for *inside* a prompt.

    Decoding behind an anchor token and removing the anchor's text keeps a leading space that
    SentencePiece decoders strip at the start of a string; for byte-level BPE it equals
    ``decode(ids)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.anchor = tokenizer("x", add_special_tokens=False)["input_ids"][-1:]
        self.anchor_text = self._decode([self.anchor])[0]

    def _decode(self, rows: list[list[int]]) -> list[str]:
        return self.tok.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def texts(self, rows: list[list[int]]) -> list[str | None]:
        """Text of every row of ids (``None`` when the anchor's text is not a clean prefix)."""
        out = self._decode([self.anchor + r for r in rows])
        n = len(self.anchor_text)
        return [t[n:] if t.startswith(self.anchor_text) else None for t in out]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def allowed_tokens(tokenizer: Any, vocab_size: int, n_positions: int, allow_non_ascii: bool = False,
                   text: TokenText | None = None) -> torch.Tensor:
    """Bool mask ``[n_positions, vocab_size]`` of the tokens a suffix position may take.

    Every position excludes special and added tokens (template tokens: a suffix must not close
    the user turn), ids past the tokenizer's vocabulary, tokens that do not survive
    decode → encode alone, and unless ``allow_non_ascii`` tokens whose text is not printable
    ASCII. The first position only takes tokens that start with the separating space followed
    by a non-space, the last one no token ending with whitespace (the suffix string is stripped).
    """
    text = text or TokenText(tokenizer)
    n = min(len(tokenizer), vocab_size)
    excluded = set(getattr(tokenizer, "all_special_ids", []) or [])
    excluded.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = [i for i in range(n) if i not in excluded]
    texts = text.texts([[i] for i in ids])
    cand = [(i, t) for i, t in zip(ids, texts)
            if t and (allow_non_ascii or (t.isascii() and t.isprintable()))]
    enc = text.encode([t for _, t in cand])
    ok = [(i, t) for (i, t), e in zip(cand, enc) if e == [i]]
    mask = torch.zeros(n_positions, vocab_size, dtype=torch.bool)
    if not ok:
        return mask
    idx = torch.tensor([i for i, _ in ok])
    mask[:, idx] = True
    first_ok = torch.tensor([t.startswith(SEPARATOR) and len(t) > 1 and not t[1].isspace() for _, t in ok])
    last_ok = torch.tensor([not t[-1].isspace() for _, t in ok])
    mask[0, idx] &= first_ok
    mask[-1, idx] &= last_ok
    return mask


# --------------------------------------------------------------------------------------------
# The objective: segments, cached prefixes, exact losses and gradients
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segments:
    """Token ids of one prompt: ``before`` (template + goal), ``after`` (end of the user turn and
    the assistant header) and ``target``; the suffix goes between ``before`` and ``after``."""

    before: list[int]
    after: list[int]
    target: list[int]
    before_text: str
    after_text: str


def split_template(tokenizer: Any, goal: str, system_prompt: str | None = None) -> tuple[str, str]:
    """The rendered chat prompt of ``attack_prompt(goal, PLACEHOLDER)`` cut around
    ``" " + PLACEHOLDER``: the text before the suffix (ending with the goal) and after it."""
    text = format_prompts(tokenizer, [attack_prompt(goal, PLACEHOLDER)], system_prompt)[0]
    marker = SEPARATOR + PLACEHOLDER
    if text.count(marker) != 1:
        raise UserError("the chat template does not keep the user's message verbatim; GCG needs it to cut the "
                        "prompt around the suffix (check the model's template or --chat-template)")
    before, after = text.split(marker)
    return before, after


def make_segments(tokenizer: Any, goal: str, target: str, system_prompt: str | None = None) -> Segments:
    """Tokenize the four segments separately, without special tokens (the template holds any BOS)."""
    before, after = split_template(tokenizer, goal, system_prompt)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    tgt = enc(target)
    if not tgt:
        raise UserError(f"the GCG target for {goal!r} is empty")
    return Segments(before=enc(before), after=enc(after), target=tgt, before_text=before, after_text=after)


class GCGObjective:
    """The target loss of a set of prompts as a function of the suffix ids (Eq. 2; Alg. 2 sums it).

    The KV cache of every prompt's ``before`` segment is computed once (lazily, under the hooks
    active at its first use) and repeated over each candidate batch; the model only runs
    ``suffix + after + target[:-1]`` and the output head only the ``T`` positions that predict
    the target.
    """

    def __init__(self, lm: Any, goals: Sequence[str], targets: Sequence[str], system_prompt: str | None = None) -> None:
        if not goals or len(goals) != len(targets):
            raise UserError("GCG needs one target per goal and at least one goal")
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.device = lm.device
        self.embed = self.model.get_input_embeddings()
        self.weight = self.embed.weight
        self.vocab_size = int(self.weight.shape[0])
        self.text = TokenText(self.tokenizer)
        self.segments = [make_segments(self.tokenizer, g, t, system_prompt) for g, t in zip(goals, targets)]
        self._caches: list[Any] = [None] * len(goals)
        self.embed_scale = self._embed_scale()
        self.max_batch: int | None = None  # set when a forward ran out of memory: the size that is tried since

    def _embed_scale(self) -> float:
        """Scale between the embedding module and a lookup of its weights (1, or Gemma's √d)."""
        probe = torch.tensor([self.segments[0].target[:1]], device=self.device)
        with torch.no_grad():
            out = self.embed(probe)[0, 0].float()
        row = self.weight[probe[0, 0]].float()
        scale = float(getattr(self.embed, "embed_scale", 1.0))
        if not torch.allclose(out, row * scale, rtol=1e-3, atol=1e-5):
            raise UserError(f"the input embedding of {type(self.model).__name__} is not a lookup of its weight matrix; "
                            "GCG needs one-hot gradients through it")
        return scale

    # -- ids and text --------------------------------------------------------------------------

    def suffix_ids(self, suffix: str) -> torch.Tensor:
        """Ids of ``" " + suffix``, checked to tokenize the same inside every prompt."""
        ids = self.text.encode([SEPARATOR + suffix])[0]
        if not ids:
            raise UserError("the GCG initial suffix is empty")
        t = torch.tensor(ids)
        for g in range(len(self.segments)):
            if not self.consistent(t.unsqueeze(0), [g])[0]:
                raise UserError(f"the suffix {suffix!r} does not tokenize the same alone and inside the chat prompt of "
                                f"{self.tokenizer.__class__.__name__}; choose another suffix_init")
        return t

    def suffix_text(self, ids: torch.Tensor) -> str:
        """The suffix string (without the separator) that ``ids`` stand for."""
        t = self.text.texts([ids.tolist()])[0] or ""
        return t[len(SEPARATOR):] if t.startswith(SEPARATOR) else t

    def consistent(self, cands: torch.Tensor, goals: Sequence[int]) -> list[bool]:
        """Retokenization filter (Alg. 1, step 3): the candidate's text starts with the separator,
        is stripped, and re-encodes to the same ids alone and inside the prompt of every goal."""
        rows = cands.tolist()
        texts = self.text.texts(rows)
        ok = [t is not None and t.startswith(SEPARATOR) and len(t) > len(SEPARATOR)
              and t[len(SEPARATOR):] == t[len(SEPARATOR):].strip() for t in texts]
        idx = [i for i, k in enumerate(ok) if k]
        alone = consistent_rows([rows[i] for i in idx], self.text.encode([texts[i] for i in idx]))
        idx = [i for i, k in zip(idx, alone) if k]
        for g in goals:
            s = self.segments[g]
            full = self.text.encode([s.before_text + texts[i] + s.after_text for i in idx])
            want = [s.before + rows[i] + s.after for i in idx]
            idx = [i for i, k in zip(idx, consistent_rows(want, full)) if k]
        keep = set(idx)
        return [i in keep for i in range(len(rows))]

    # -- forward passes ------------------------------------------------------------------------

    def _prefix_cache(self, g: int) -> Any:
        """KV cache of ``before`` of prompt ``g`` (batch 1), or None when ``before`` is empty."""
        before = self.segments[g].before
        if not before:
            return None
        if self._caches[g] is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            # Normal tensors even when first called from losses() (inference mode): the cache also
            # feeds the gradient pass.
            with torch.inference_mode(False), torch.no_grad():
                self.model(input_ids=torch.tensor([before], device=self.device), past_key_values=cache,
                           use_cache=True, logits_to_keep=1)
            self._caches[g] = cache
        return self._caches[g]

    def _cache_for(self, g: int, batch: int) -> dict[str, Any]:
        prefix = self._prefix_cache(g)
        if prefix is None:
            return {}
        cache = copy.deepcopy(prefix)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return {"past_key_values": cache, "use_cache": True}

    def _tail(self, g: int) -> torch.Tensor:
        s = self.segments[g]
        return torch.tensor(s.after + s.target[:-1], dtype=torch.long, device=self.device)

    def losses(self, cands: torch.Tensor, goals: Sequence[int], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact loss of every candidate ``[B, S]`` on each goal: float32 ``[B, len(goals)]`` losses
        and bool ``[B, len(goals)]`` successes (Alg. 1, line 7), ``batch_size`` rows per forward."""
        B = cands.shape[0]
        loss = torch.empty(B, len(goals))
        success = torch.empty(B, len(goals), dtype=torch.bool)
        cands = cands.to(self.device)
        size = max(1, min(batch_size, self.max_batch or batch_size))
        with torch.inference_mode():
            for j, g in enumerate(goals):
                tail = self._tail(g)
                target = torch.tensor(self.segments[g].target, device=self.device)
                T = len(target)
                start = 0
                while start < B:
                    sl = slice(start, min(B, start + size))
                    try:
                        x = cands[sl]
                        x = torch.cat([x, tail.unsqueeze(0).expand(x.shape[0], -1)], dim=1)
                        out = self.model(input_ids=x, logits_to_keep=T, **self._cache_for(g, x.shape[0]))
                        lo, ok = target_loss(out.logits[:, -T:, :], target)
                        del out
                    except torch.cuda.OutOfMemoryError:
                        if size == 1:
                            raise
                        size = self.max_batch = size // 2
                        log.warning("GCG: out of memory with %d candidates per forward; retrying with %d", size * 2, size)
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                    loss[sl, j] = lo.cpu()
                    success[sl, j] = ok.cpu()
                    start = sl.stop
        return loss, success

    def gradient(self, ids: torch.Tensor, goals: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``∇_{e_{x_i}} Σ_g L_g`` for the one-hot suffix rows (Alg. 1 line 3; Alg. 2 sums over goals).

        The suffix embedding is ``onehot @ W`` (times the embedding scale); since it is linear,
        ``∂L/∂onehot = (∂L/∂emb) @ Wᵀ``, so the gradient w.r.t. the ``[S, d]`` embeddings is
        taken (one forward + backward per goal, summed) and mapped to ``[S, V]`` once. Only that
        input needs a gradient: the model's parameters keep their flags and no ``.grad`` is
        written to them. Returns the float32 ``[S, V]`` gradient and per-goal loss and success.
        """
        ids = ids.to(self.device)
        W = self.weight.detach()
        emb = W[ids].clone().requires_grad_(True)
        total = torch.zeros_like(emb, dtype=torch.float32)
        losses, success = torch.empty(len(goals)), torch.empty(len(goals), dtype=torch.bool)
        with torch.enable_grad():
            for j, g in enumerate(goals):
                tail = self._tail(g)
                target = torch.tensor(self.segments[g].target, device=self.device)
                T = len(target)
                with torch.no_grad():
                    tail_emb = self.embed(tail.unsqueeze(0))
                x = torch.cat([(emb * self.embed_scale).unsqueeze(0).to(tail_emb.dtype), tail_emb], dim=1)
                out = self.model(inputs_embeds=x, logits_to_keep=T, **self._cache_for(g, 1))
                lo, ok = target_loss(out.logits[:, -T:, :], target)
                (grad,) = torch.autograd.grad(lo.sum(), emb)
                total += grad.float()
                losses[j], success[j] = float(lo.detach()), bool(ok)
                del out, lo
        # In the model's dtype: a float32 copy of a 7B model's embedding matrix would cost GBs per step.
        grad_onehot = ((total * self.embed_scale).to(W.dtype) @ W.T).float()
        return grad_onehot, losses, success


# --------------------------------------------------------------------------------------------
# The attack
# --------------------------------------------------------------------------------------------


def gcg(lm: Any, goals: list[str], targets: list[str], config: GCGConfig, *, system_prompt: str | None = None,
        hooks: tuple[list[Hook], list[Hook]] = ([], []), progress: Callable[[int], None] | None = None) -> GCGResult:
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


def _optimize(lm: Any, goals: list[str], targets: list[str], config: GCGConfig, system_prompt: str | None,
              progress: Callable[[int], None] | None) -> GCGResult:
    obj = GCGObjective(lm, goals, targets, system_prompt)
    ids = obj.suffix_ids(config.suffix_init)
    allowed = allowed_tokens(lm.tokenizer, obj.vocab_size, len(ids), config.allow_non_ascii, obj.text).to(obj.device)
    gen = torch.Generator().manual_seed(config.seed)
    n = len(goals)
    active = 1 if config.progressive and n > 1 else n

    init_loss, init_ok = obj.losses(ids.unsqueeze(0), range(n), 1)
    cur_goal_loss, cur_ok = init_loss[0, :active].tolist(), init_ok[0, :active].tolist()
    initial_loss = float(sum(cur_goal_loss))
    # The best suffix: one that succeeds on every active prompt beats one that does not, then lower loss.
    best_ids, best_loss, best_ok = ids, initial_loss, all(cur_ok)
    losses: list[float] = []
    step, early = 0, False
    while True:
        # Alg. 2: add the next prompt once the suffix succeeds on all current ones.
        while config.progressive and active < n and all(cur_ok):
            lo, ok = obj.losses(ids.unsqueeze(0), [active], 1)
            cur_goal_loss.append(float(lo[0, 0]))
            cur_ok.append(bool(ok[0, 0]))
            active += 1
            # A new goal set: losses over the old one do not compare.
            best_ids, best_loss, best_ok = ids, float(sum(cur_goal_loss)), all(cur_ok)
        if config.early_stop and active == n and all(cur_ok):
            early = True
            break
        if step >= config.n_steps:
            break
        goal_set = list(range(active))
        grad, _, _ = obj.gradient(ids, goal_set)
        topk_ids = top_k_substitutions(grad, config.topk, allowed)
        cands = sample_candidates(ids, topk_ids, config.search_width, config.n_replace, gen)
        cands = unique_candidates(cands, ids)
        keep = obj.consistent(cands, goal_set)
        cands = cands[torch.tensor(keep, dtype=torch.bool)] if len(cands) else cands
        step += 1
        if len(cands) == 0:
            log.warning("GCG step %d: no candidate passed the retokenization filter; the suffix is kept", step)
            losses.append(float(sum(cur_goal_loss)))
        else:
            per_goal, ok = obj.losses(cands, goal_set, config.eval_batch_size)
            total = per_goal.sum(-1)
            j = int(total.argmin())
            ids = cands[j].clone()
            cur_goal_loss, cur_ok = per_goal[j].tolist(), ok[j].tolist()
            losses.append(float(total[j]))
            if (all(cur_ok), -losses[-1]) > (best_ok, -best_loss):
                best_ids, best_loss, best_ok = ids, losses[-1], all(cur_ok)
        if progress is not None:
            progress(1)
    if early and progress is not None and config.n_steps > step:
        progress(config.n_steps - step)

    final_loss, final_ok = obj.losses(best_ids.unsqueeze(0), range(n), 1)
    return GCGResult(
        suffix=obj.suffix_text(best_ids), suffix_ids=best_ids.tolist(), best_loss=float(best_loss), losses=losses,
        n_steps=step, seconds=0.0, success=final_ok[0].tolist(), initial_loss=initial_loss,
        initial_goal_losses=init_loss[0].tolist(), goal_losses=final_loss[0].tolist(), n_goals_used=active,
        early_stopped=early,
    )
