"""Generating and judging the completions of an attack, resumably.

An attack is a list of :class:`Item` s (a prompt, the user message sent, a system prompt setting
and a decoding configuration). :func:`run_items` generates the ones not yet recorded, judges
them with every judge of the :class:`EvalContext` and appends them to the attack's record log
(:class:`~refusalkit.evaluation.records.RecordLog`), one chunk at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusalkit.core.config import Config, EvaluationConfig
from refusalkit.core.layout import RunLayout
from refusalkit.data.refusal import Judge, settle_rule
from refusalkit.evaluation.plan import SYSTEM_NONE, Plan
from refusalkit.evaluation.records import RecordLog
from refusalkit.models.chat import tokenize_instructions

if TYPE_CHECKING:
    from refusalkit.core.progress import Progress
    from refusalkit.evaluation.sampling import Decoding
    from refusalkit.models.loading import LoadedModel


@dataclass
class EvalContext:
    """Everything an attack needs: the configuration, the resolved plan, where its files go, the
    judges, and the model (loaded on first use through ``get_lm``; ``model_path`` is its folder
    or hub id, for the vLLM back end)."""

    cfg: Config
    layout: RunLayout
    variant: str
    plan: Plan
    force: bool
    progress: Progress
    judges: list[Judge]
    get_lm: Callable[[], LoadedModel]
    model_path: Callable[[], str]

    @property
    def e(self) -> EvaluationConfig:
        return self.cfg.evaluation

    @property
    def out(self) -> Path:
        """``<V>/eval/``: the variant's evaluation folder."""
        return self.layout.eval_dir(self.variant)

    def file(self, name: str) -> Path:
        """``<V>/eval/<name>``."""
        return self.layout.eval(self.variant, name)

    def judge_names(self) -> tuple[list[str], str]:
        """The judges' names and the primary one: a model judge when given (it comes last), else ``substring``."""
        names = [j.name for j in self.judges]
        return names, names[-1]

    def base_settings(self) -> dict[str, Any]:
        """The settings every attack's records depend on."""
        return {
            "max_new_tokens": self.plan.max_new_tokens,
            "seed": self.e.seed,
            "judges": [j.describe() for j in self.judges],
            "system_prompt": self.cfg.system_prompt,
            "backend": self.e.backend,
        }


@dataclass
class Item:
    """One completion to make: a prompt (the harmful goal), the user message (goal + any suffix),
    the system prompt setting and the decoding configuration."""

    key: str
    prompt: str
    message: str
    system: str  # name in plan.systems
    decoding: Decoding
    extra: dict[str, Any]


@dataclass
class _Chunk:
    """Messages generated together under one system prompt: each runs every decoding in ``decodings``."""

    system: str
    by_message: dict[str, list[Item]]
    decodings: list[Decoding]


def _chunks(todo: list[Item], batch_size: int) -> list[_Chunk]:
    """``todo`` grouped by system prompt, then by message (the items of one message share its
    prompt's cache), cut into chunks of about ``batch_size`` completions. A chunk runs the union
    of its items' decodings, in order of first appearance."""
    by_system: dict[str, dict[str, list[Item]]] = {}
    for it in todo:
        by_system.setdefault(it.system, {}).setdefault(it.message, []).append(it)
    chunks = []
    for system, by_msg in by_system.items():
        messages = list(by_msg)
        size = max(1, batch_size // max(1, max(len(v) for v in by_msg.values())))
        for s in range(0, len(messages), size):
            part = {m: by_msg[m] for m in messages[s : s + size]}
            decodings: list[Decoding] = []
            for it in (it for its in part.values() for it in its):
                if it.decoding not in decodings:
                    decodings.append(it.decoding)
            chunks.append(_Chunk(system, part, decodings))
    return chunks


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    """The tokenizer of a saved model, loaded once per path (the vLLM path formats every chunk)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _generate(
    ctx: EvalContext, user_messages: list[str], system: str | None, decodings: list[Decoding], keys: list[str]
) -> list[list[str]]:
    """Completions ``[prompt][decoding]`` of chat-formatted ``user_messages`` (seeded per key)."""
    if ctx.e.backend == "vllm":
        from refusalkit.evaluation.vllm_backend import sample_vllm
        from refusalkit.models.chat import format_prompts

        texts = format_prompts(_tokenizer(ctx.model_path()), user_messages, system)
        return sample_vllm(
            ctx.model_path(), texts, decodings, max_new_tokens=ctx.plan.max_new_tokens, seed=ctx.e.seed, keys=keys
        )
    from refusalkit.evaluation.sampling import sample

    lm = ctx.get_lm()
    ids = tokenize_instructions(lm.tokenizer, user_messages, system)
    return sample(
        lm,
        ids,
        decodings,
        max_new_tokens=ctx.plan.max_new_tokens,
        seed=ctx.e.seed,
        keys=keys,
        batch_size=ctx.cfg.batch_size,
        settled=settle_rule(ctx.cfg.early_stop, ctx.judges),
    )


def verdicts_json(prompts: list[str], completions: list[str], judges: list[Judge]) -> list[dict[str, dict[str, str]]]:
    """Per completion, ``{judge name: {"label", "reason"}}``."""
    per_judge = {j.name: j.judge_many(prompts, completions) for j in judges}
    return [
        {name: {"label": v[i].label, "reason": v[i].reason} for name, v in per_judge.items()}
        for i in range(len(completions))
    ]


def _complete(ctx: EvalContext, chunk: _Chunk) -> list[dict[str, Any]]:
    """Generate and judge one chunk: one record per item."""
    system = ctx.cfg.system_prompt if chunk.system == "default" else SYSTEM_NONE
    messages = list(chunk.by_message)
    outs = _generate(ctx, messages, system, chunk.decodings, keys=messages)
    rows = []
    for m, comps in zip(messages, outs):
        for it in chunk.by_message[m]:
            rows.append(
                {
                    "key": it.key,
                    "prompt": it.prompt,
                    "message": it.message,
                    "attack": {
                        "system_prompt": chunk.system,
                        "decoding": it.decoding.to_json(),
                        "max_new_tokens": ctx.plan.max_new_tokens,
                        **it.extra,
                    },
                    "completion": comps[chunk.decodings.index(it.decoding)],
                }
            )
    verdicts = verdicts_json([r["prompt"] for r in rows], [r["completion"] for r in rows], ctx.judges)
    for r, v in zip(rows, verdicts):
        r["verdicts"] = v
    return rows


def run_items(ctx: EvalContext, name: str, items: list[Item], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Generate and judge every item not yet recorded in ``<V>/eval/<name>.jsonl``, appending the
    records chunk by chunk; the records of all ``items``, in their order."""
    log = RecordLog(ctx.out, name, settings, force=ctx.force)
    todo = [it for it in items if not log.done(it.key)]
    if todo:
        with ctx.progress.bar(len(items), f"{ctx.variant}: {name}", unit="completion") as bar:
            bar.update(len(items) - len(todo))
            for chunk in _chunks(todo, ctx.cfg.batch_size):
                rows = _complete(ctx, chunk)
                log.append(rows)
                bar.update(len(rows))
    return log.finish([it.key for it in items])
