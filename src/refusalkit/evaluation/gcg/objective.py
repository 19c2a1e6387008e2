"""GCG's objective: the exact target loss of candidate suffixes and its one-hot gradient, with
every prompt's ``before`` segment run once and its KV cache reused."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from refusalkit.core.errors import UserError
from refusalkit.evaluation.gcg.candidates import target_loss
from refusalkit.evaluation.gcg.tokens import SuffixCodec, make_segments
from refusalkit.models.kv_cache import cache_keyword, cache_kwargs, new_cache, repeat_rows

log = logging.getLogger(__name__)


class GCGObjective(SuffixCodec):
    """The target loss of a set of prompts as a function of the suffix ids (Eq. 2; Alg. 2 sums it).

    The KV cache of every prompt's ``before`` segment is computed once (lazily, under the hooks
    active at its first use) and repeated over each candidate batch; the model only runs
    ``suffix + after + target[:-1]`` and the output head only the ``T`` positions that predict
    the target. Suffix ids, text and the retokenization filter come from :class:`SuffixCodec`.
    """

    def __init__(self, lm: Any, goals: Sequence[str], targets: Sequence[str], system_prompt: str | None = None) -> None:
        if not goals or len(goals) != len(targets):
            raise UserError("GCG needs one target per goal and at least one goal")
        segments = [make_segments(lm.tokenizer, g, t, system_prompt) for g, t in zip(goals, targets)]
        super().__init__(lm.tokenizer, segments)
        self.model = lm.model
        self.device = lm.device
        self.embed = self.model.get_input_embeddings()
        self.weight = self.embed.weight
        self.vocab_size = int(self.weight.shape[0])
        self.cache_keyword = cache_keyword(self.model)
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
            raise UserError(
                f"the input embedding of {type(self.model).__name__} is not a lookup of its weight matrix; "
                "GCG needs one-hot gradients through it"
            )
        return scale

    # -- forward passes ------------------------------------------------------------------------

    def _prefix_cache(self, g: int) -> Any:
        """KV cache of ``before`` of prompt ``g`` (batch 1), or None when ``before`` is empty."""
        before = self.segments[g].before
        if not before:
            return None
        if self._caches[g] is None:
            cache = new_cache(self.model)
            # Normal tensors even when first called from losses() (inference mode): the cache also
            # feeds the gradient pass.
            with torch.inference_mode(False), torch.no_grad():
                self.model(
                    input_ids=torch.tensor([before], device=self.device),
                    logits_to_keep=1,
                    **cache_kwargs(cache, self.cache_keyword),
                )
            self._caches[g] = cache
        return self._caches[g]

    def _cache_for(self, g: int, batch: int) -> dict[str, Any]:
        prefix = self._prefix_cache(g)
        if prefix is None:
            return {}
        cache = copy.deepcopy(prefix)
        repeat_rows(cache, batch)
        return cache_kwargs(cache, self.cache_keyword)

    def _tail(self, g: int) -> torch.Tensor:
        s = self.segments[g]
        return torch.tensor(s.after + s.target[:-1], dtype=torch.long, device=self.device)

    def _batch_loss(self, x: torch.Tensor, g: int, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and success of the candidate rows ``x [b, S]`` on goal ``g`` (one forward)."""
        T = len(target)
        x = torch.cat([x, self._tail(g).unsqueeze(0).expand(x.shape[0], -1)], dim=1)
        out = self.model(input_ids=x, logits_to_keep=T, **self._cache_for(g, x.shape[0]))
        return target_loss(out.logits[:, -T:, :], target)

    def _halve(self, size: int) -> int:
        """The batch size after an out-of-memory error at ``size`` (kept for later calls)."""
        self.max_batch = size // 2
        log.warning("GCG: out of memory with %d candidates per forward; retrying with %d", size, self.max_batch)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self.max_batch

    def losses(
        self, cands: torch.Tensor, goals: Sequence[int], batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact loss of every candidate ``[B, S]`` on each goal: float32 ``[B, len(goals)]`` losses
        and bool ``[B, len(goals)]`` successes (Alg. 1, line 7), ``batch_size`` rows per forward
        (halved, and kept halved, after an out-of-memory error)."""
        B = cands.shape[0]
        loss = torch.empty(B, len(goals))
        success = torch.empty(B, len(goals), dtype=torch.bool)
        cands = cands.to(self.device)
        size = max(1, min(batch_size, self.max_batch or batch_size))
        with torch.inference_mode():
            for j, g in enumerate(goals):
                target = torch.tensor(self.segments[g].target, device=self.device)
                start = 0
                while start < B:
                    sl = slice(start, min(B, start + size))
                    try:
                        lo, ok = self._batch_loss(cands[sl], g, target)
                    except torch.cuda.OutOfMemoryError:
                        if size == 1:
                            raise
                        size = self._halve(size)
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
