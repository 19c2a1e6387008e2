"""Selecting the refusal direction among the candidates (Arditi et al. 2024, §C / App. C).

For a candidate ``r = r_i^(l)``:

* ``ablation_score``: mean refusal score on harmful validation prompts with ``r̂`` ablated at
  every layer (lower = ablation removes more refusal);
* ``addition_score``: mean refusal score on harmless validation prompts with ``r`` added at the
  input of block ``l``;
* ``kl``: mean KL(base ‖ ablated) of the last-position next-token distribution on harmless
  validation prompts.

The refusal score of one prompt is the log-odds of the refusal tokens at the last position:
``log p − log(1 − p)`` with ``p = Σ_{t ∈ R} softmax(logits)_t`` (their Eq. 7). ``R`` is derived
from the tokenizer: the first token of each refusal opening phrase.

Arditi's filters: discard candidates with ``kl > 0.1``, ``addition_score < 0`` (does not induce
refusal), or ``l ≥ int(L · (1 − 0.2))``; pick the lowest ``ablation_score``. All thresholds are
configurable. When nothing passes, an explicit, recorded fallback is used (see :func:`choose`).

Speed (``mode='fast'``, the default): every candidate is first screened by ablation on a few
harmful validation prompts (refusal score) and a few harmless ones (KL). Candidates whose
screened KL is within ``screen_kl_slack`` × the KL limit come first, ordered by screened
ablation score, and the first ``screen_keep`` go on to the full scoring above. ``mode='full'``
scores every candidate in full. The benchmark compares the two. Candidates are scored
``group`` at a time in one batched forward (grouped hooks), which changes no score.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from refusalkit.direction.forward import forward_last
from refusalkit.direction.hooks import RowGroups, grouped_ablation_hooks, grouped_addition_hooks
from refusalkit.models.loading import LoadedModel


def refusal_token_ids(tokenizer: Any, phrases: list[str]) -> list[int]:
    """First token of each refusal opening phrase, as the model would emit it after the template."""
    ids: list[int] = []
    for p in phrases:
        toks = tokenizer(p, add_special_tokens=False)["input_ids"]
        if toks and toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise ValueError("no refusal tokens could be derived from the phrases")
    return ids


def default_refusal_ids(tokenizer: Any) -> list[int]:
    """The first tokens of refusalkit's documented refusal openings ("I", "Sorry", "As", ...)."""
    from refusalkit.data.prompts import refusal_first_phrases

    return refusal_token_ids(tokenizer, refusal_first_phrases())


def refusal_scores(logits: torch.Tensor, refusal_ids: list[int], eps: float = 1e-8) -> torch.Tensor:
    """Per-prompt log-odds of the refusal tokens: ``log p − log(1 − p)``, ``logits [n, vocab]`` → ``[n]``."""
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[:, refusal_ids].sum(-1).clamp(eps, 1 - eps)
    return (torch.log(p) - torch.log1p(-p)).float()


def kl_divergence(base_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """Per-prompt ``KL(base ‖ new)`` of the next-token distributions, ``[n]``."""
    lp = torch.log_softmax(base_logits.double(), -1)
    lq = torch.log_softmax(new_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).float()


@dataclass
class CandidateScore:
    position: int  # negative offset from the end of the prompt
    layer: int
    norm: float
    screen_score: float | None = None  # ablation score on the screening prompts
    screen_kl: float | None = None  # KL on the screening prompts
    ablation_score: float | None = None
    addition_score: float | None = None
    kl: float | None = None
    discarded: str | None = None  # why the filters dropped it (None: kept)
    # fully scored candidates: the per-prompt terms of the three means (source stability resamples them)
    per_prompt: dict[str, list[float]] | None = None


@dataclass
class SelectionResult:
    position: int
    layer: int
    scores: list[CandidateScore]
    baseline: dict[str, float]
    fallback: str | None
    thresholds: dict[str, Any]
    n_fully_scored: int
    baseline_per_prompt: dict[str, list[float]] | None = None
    chosen: CandidateScore = field(init=False)

    def __post_init__(self) -> None:
        self.chosen = next(s for s in self.scores if s.position == self.position and s.layer == self.layer)

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "layer": self.layer,
            "fallback": self.fallback,
            "baseline": self.baseline,
            "thresholds": self.thresholds,
            "n_fully_scored": self.n_fully_scored,
            "baseline_per_prompt": self.baseline_per_prompt,
            "candidates": [asdict(s) for s in self.scores],
        }


class Scorer:
    """Scores candidates on fixed validation prompts; the baseline logits are computed once.

    Several candidates are scored in one batched forward (grouped hooks: each candidate's
    direction acts on its own rows), so the matmuls stay large on a CPU.
    """

    def __init__(
        self,
        lm: LoadedModel,
        harmful_ids: list[list[int]],
        harmless_ids: list[list[int]],
        refusal_ids: list[int],
        n_pos: int,
        batch_size: int = 64,
    ):
        self.lm, self.harmful, self.harmless = lm, harmful_ids, harmless_ids
        self.refusal_ids, self.n_pos, self.batch_size = refusal_ids, n_pos, batch_size
        self.harmless_base_logits = self._logits(harmless_ids)
        self.harmful_base_logits = self._logits(harmful_ids)

    def _logits(self, ids: list[list[int]], hooks=([], []), groups=None, rows=None) -> torch.Tensor:
        return forward_last(
            self.lm.model,
            ids,
            pad_id=self.lm.tokenizer.pad_token_id,
            batch_size=self.batch_size,
            hooks=hooks,
            keep_suffix=self.n_pos,
            groups=groups,
            rows=rows,
        )

    def baseline(self) -> dict[str, float]:
        return {k: torch.tensor(v).mean().item() for k, v in self.baseline_per_prompt().items()}

    def baseline_per_prompt(self) -> dict[str, list[float]]:
        """The unsteered refusal score of every validation prompt (``harmful_score``, ``harmless_score``)."""
        return {
            "harmful_score": refusal_scores(self.harmful_base_logits, self.refusal_ids).tolist(),
            "harmless_score": refusal_scores(self.harmless_base_logits, self.refusal_ids).tolist(),
        }

    def _ablated_per_prompt(self, directions: torch.Tensor, harmful: list[list[int]], harmless: list[list[int]]):
        """Per candidate and prompt: (refusal scores ``[k, n_harmful]``, KL ``[k, n_harmless]``) under ablation."""
        k, nh, nb = directions.shape[0], len(harmful), len(harmless)
        rows = RowGroups()
        per = harmful + harmless
        logits = self._logits(
            per * k,
            grouped_ablation_hooks(self.lm.model, directions, rows),
            groups=[g for g in range(k) for _ in per],
            rows=rows,
        )
        logits = logits.view(k, nh + nb, -1)
        scores = torch.stack([refusal_scores(logits[g, :nh], self.refusal_ids) for g in range(k)])
        kls = torch.stack([kl_divergence(self.harmless_base_logits[:nb], logits[g, nh:]) for g in range(k)])
        return scores, kls

    def _ablated(self, directions: torch.Tensor, harmful: list[list[int]], harmless: list[list[int]]):
        """Per candidate: (mean refusal score on ``harmful``, mean KL on ``harmless``) under ablation."""
        scores, kls = self._ablated_per_prompt(directions, harmful, harmless)
        return scores.mean(-1).tolist(), kls.mean(-1).tolist()

    def screen(self, directions: torch.Tensor, n: int) -> tuple[list[float], list[float]]:
        """Ablation score on ``n`` harmful and KL on ``n`` harmless validation prompts, per candidate."""
        return self._ablated(directions, self.harmful[:n], self.harmless[:n])

    def full(self, directions: torch.Tensor, layers: list[int]) -> list[tuple[float, float, float]]:
        """``(ablation_score, addition_score, kl)`` per candidate ``directions [k, d]`` at ``layers``."""
        return [
            tuple(torch.tensor(v).mean().item() for v in terms) for terms in self.full_per_prompt(directions, layers)
        ]  # type: ignore[misc]

    def full_per_prompt(
        self, directions: torch.Tensor, layers: list[int]
    ) -> list[tuple[list[float], list[float], list[float]]]:
        """Per candidate: the per-prompt terms of :meth:`full`'s three means (ablation refusal score
        per harmful prompt, addition refusal score and KL per harmless prompt)."""
        k = directions.shape[0]
        abl, kls = self._ablated_per_prompt(directions, self.harmful, self.harmless)
        rows = RowGroups()
        added = self._logits(
            self.harmless * k,
            grouped_addition_hooks(self.lm.model, directions, layers, rows),
            groups=[g for g in range(k) for _ in self.harmless],
            rows=rows,
        )
        added = added.view(k, len(self.harmless), -1)
        add = [refusal_scores(added[g], self.refusal_ids).tolist() for g in range(k)]
        return [(abl[g].tolist(), add[g], kls[g].tolist()) for g in range(k)]


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def layer_cutoff(n_layers: int, prune_layer_fraction: float) -> int:
    """First excluded layer: ``int(L · (1 − fraction))`` (Arditi's ``prune_layer_percentage``)."""
    return int(n_layers * (1.0 - prune_layer_fraction))


def _nan(x: float | None) -> bool:
    return x is None or math.isnan(x)


def apply_filters(s: CandidateScore, kl_threshold: float, induce_threshold: float) -> str | None:
    if _nan(s.ablation_score) or _nan(s.addition_score) or _nan(s.kl):
        return "not scored" if s.ablation_score is None else "nan score"
    if s.kl > kl_threshold:
        return f"kl {s.kl:.3f} > {kl_threshold}"
    if s.addition_score < induce_threshold:
        return f"addition score {s.addition_score:.2f} < {induce_threshold}"
    return None


def choose(
    scores: list[CandidateScore],
    baseline: dict[str, float],
    kl_threshold: float,
    induce_threshold: float,
    fallback: str,
    fallback_margin: float,
) -> tuple[CandidateScore, str | None]:
    """Arditi's rule; if nothing passes, the fallback (recorded, never silent).

    ``fallback='relative'``: keep the KL and layer filters, but ask only that addition raises the
    harmless refusal score by ``fallback_margin`` over its baseline (instead of above 0); if that
    still leaves nothing, take the lowest ablation score among candidates within the KL limit,
    and failing that, among all scored ones. ``fallback='error'``: stop with an error.
    """
    # Candidates out for structural reasons (late layer, zero vector, screened out) never come back.
    eligible = [s for s in scores if s.discarded is None]
    for s in eligible:
        s.discarded = apply_filters(s, kl_threshold, induce_threshold)
    passing = [s for s in scores if s.discarded is None]
    if passing:
        return min(passing, key=lambda s: s.ablation_score), None
    scored = [s for s in eligible if not _nan(s.ablation_score) and not _nan(s.kl) and not _nan(s.addition_score)]
    if fallback == "error" or not scored:
        from refusalkit.core.errors import UserError

        raise UserError(
            "no candidate direction passed the selection filters; loosen selection.kl_threshold / "
            "selection.induce_refusal_threshold or set selection.fallback: relative"
        )
    need = baseline["harmless_score"] + fallback_margin
    tiers = [
        (
            [s for s in scored if s.kl <= kl_threshold and s.addition_score >= need],
            f"no candidate had addition score >= {induce_threshold}; relaxed to addition score >= harmless baseline "
            f"{baseline['harmless_score']:.2f} + margin {fallback_margin} with kl <= {kl_threshold}",
        ),
        (
            [s for s in scored if s.kl <= kl_threshold],
            f"no candidate induced refusal by the margin; chose the lowest ablation score with kl <= {kl_threshold}",
        ),
        (scored, "no candidate met the KL limit; chose the lowest ablation score among all scored candidates"),
    ]
    for group, why in tiers:
        if group:
            best = min(group, key=lambda s: s.ablation_score)
            best.discarded = None  # chosen by the recorded fallback
            return best, why
    raise AssertionError("unreachable")


def _candidate_list(candidates: torch.Tensor, cutoff: int) -> list[CandidateScore]:
    """Every (position, layer) candidate, those past the layer cutoff or of zero norm discarded with the reason."""
    n_pos, n_streams, _ = candidates.shape
    scores = []
    for i in range(n_pos):
        for layer in range(n_streams):
            s = CandidateScore(position=i - n_pos, layer=layer, norm=candidates[i, layer].norm().item())
            if layer >= cutoff:
                s.discarded = f"layer {layer} >= cutoff {cutoff}"
            elif s.norm < 1e-6 or not math.isfinite(s.norm):
                s.discarded = "zero vector"  # e.g. block 0's input is the same for every prompt
            scores.append(s)
    return scores


def _screen(
    live: list[CandidateScore],
    vec: Callable[[CandidateScore], torch.Tensor],
    scorer: Scorer,
    screen_prompts: int,
    screen_keep: int,
    kl_limit: float,
    group: int,
    progress: Callable[[str, int, int], None] | None,
) -> list[CandidateScore]:
    """The fast screen: ablation score and KL on a few prompts; keep ``screen_keep`` candidates,
    those whose screened KL is within ``kl_limit`` first, then by ablation score."""
    for chunk in _chunks(live, group):
        screened, kls = scorer.screen(torch.stack([vec(s) for s in chunk]), screen_prompts)
        for s, sc, kl in zip(chunk, screened, kls):
            s.screen_score, s.screen_kl = sc, kl
        if progress:
            progress("screen", len(chunk), len(live))
    kept = sorted(live, key=lambda s: (s.screen_kl > kl_limit, s.screen_score))[:screen_keep]
    for s in live:
        if s not in kept:
            s.discarded = f"screened out (top {screen_keep} kept)"
    return kept


def select_direction(
    lm: LoadedModel,
    candidates: torch.Tensor,
    scorer: Scorer,
    *,
    kl_threshold: float = 0.1,
    induce_refusal_threshold: float = 0.0,
    prune_layer_fraction: float = 0.2,
    mode: str = "fast",
    screen_prompts: int = 4,
    screen_keep: int = 8,
    fallback: str = "relative",
    fallback_margin: float = 1.0,
    screen_kl_slack: float = 2.0,
    group: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
) -> SelectionResult:
    """Score the candidates ``[n_pos, L + 1, d]`` and select one (see the module docstring)."""
    n_pos, n_streams, _ = candidates.shape
    cutoff = layer_cutoff(n_streams - 1, prune_layer_fraction)
    scores = _candidate_list(candidates, cutoff)
    live = [s for s in scores if s.discarded is None]

    def vec(s: CandidateScore) -> torch.Tensor:
        return candidates[s.position + n_pos, s.layer]

    t0 = time.perf_counter()
    if mode not in ("fast", "full"):
        raise ValueError(f"unknown selection mode {mode!r}")
    full_set = live
    if mode == "fast" and screen_keep < len(live):
        full_set = _screen(
            live, vec, scorer, screen_prompts, screen_keep, screen_kl_slack * kl_threshold, group, progress
        )
    t1 = time.perf_counter()
    for chunk in _chunks(full_set, group):
        results = scorer.full_per_prompt(torch.stack([vec(s) for s in chunk]), [s.layer for s in chunk])
        for s, (abl, add, kl) in zip(chunk, results):
            s.per_prompt = {"ablation": abl, "addition": add, "kl": kl}
            s.ablation_score, s.addition_score, s.kl = (torch.tensor(v).mean().item() for v in (abl, add, kl))
        if progress:
            progress("score", len(chunk), len(full_set))
    timings = {"screen_seconds": round(t1 - t0, 1), "full_seconds": round(time.perf_counter() - t1, 1)}
    baseline = scorer.baseline()
    best, why = choose(scores, baseline, kl_threshold, induce_refusal_threshold, fallback, fallback_margin)
    thresholds = {
        "kl_threshold": kl_threshold,
        "induce_refusal_threshold": induce_refusal_threshold,
        "prune_layer_fraction": prune_layer_fraction,
        "layer_cutoff": cutoff,
        "mode": mode,
        "screen_prompts": screen_prompts,
        "screen_keep": screen_keep,
        "fallback": fallback,
        "fallback_margin": fallback_margin,
        "screen_kl_slack": screen_kl_slack,
        **timings,
    }
    return SelectionResult(
        position=best.position,
        layer=best.layer,
        scores=scores,
        baseline=baseline,
        fallback=why,
        thresholds=thresholds,
        n_fully_scored=len(full_set),
        baseline_per_prompt=scorer.baseline_per_prompt(),
    )
