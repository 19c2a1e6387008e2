"""GCG's tokenization: the prompt cut around the suffix, the text of suffix ids, the tokens a
suffix may take, and the retokenization filter (see the package docstring, "Tokenization")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from refusalkit.core.errors import UserError
from refusalkit.models.chat import format_prompts

PLACEHOLDER = "GCGSUFFIXPLACEHOLDER"
SEPARATOR = " "


def default_target(goal: str) -> str:
    """``"Sure, here is how to " + goal`` with its first letter lower-cased and a final period
    dropped (AdvBench's targets are "Sure, here is ..."; offline we only have the goals)."""
    g = goal.strip().removesuffix(".")
    return "Sure, here is how to " + g[:1].lower() + g[1:]


def attack_prompt(goal: str, suffix: str) -> str:
    """The user message under attack: the goal, a space, the suffix."""
    return f"{goal}{SEPARATOR}{suffix}"


# --------------------------------------------------------------------------------------------
# Text of token ids and the tokens allowed in a suffix
# --------------------------------------------------------------------------------------------


def consistent_rows(cands: list[list[int]], encoded: list[list[int]]) -> list[bool]:
    """Row ``i`` is consistent when re-encoding its text gave back exactly ``cands[i]``."""
    return [c == e for c, e in zip(cands, encoded)]


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


def allowed_tokens(
    tokenizer: Any, vocab_size: int, n_positions: int, allow_non_ascii: bool = False, text: TokenText | None = None
) -> torch.Tensor:
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
    cand = [(i, t) for i, t in zip(ids, texts) if t and (allow_non_ascii or (t.isascii() and t.isprintable()))]
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
# A prompt's segments around the suffix; suffix ids <-> suffix text
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
        raise UserError(
            "the chat template does not keep the user's message verbatim; GCG needs it to cut the "
            "prompt around the suffix (check the model's template or --chat-template)"
        )
    before, after = text.split(marker)
    return before, after


def make_segments(tokenizer: Any, goal: str, target: str, system_prompt: str | None = None) -> Segments:
    """Tokenize the four segments separately, without special tokens (the template holds any BOS)."""
    before, after = split_template(tokenizer, goal, system_prompt)

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    tgt = enc(target)
    if not tgt:
        raise UserError(f"the GCG target for {goal!r} is empty")
    return Segments(before=enc(before), after=enc(after), target=tgt, before_text=before, after_text=after)


class SuffixCodec:
    """Suffix ids and the suffix string of a set of prompts, and the retokenization filter:
    ids are kept only where their text gives them back, alone and inside every prompt."""

    def __init__(self, tokenizer: Any, segments: list[Segments]) -> None:
        self.tokenizer = tokenizer
        self.segments = segments
        self.text = TokenText(tokenizer)

    def suffix_ids(self, suffix: str) -> torch.Tensor:
        """Ids of ``" " + suffix``, checked to tokenize the same inside every prompt."""
        ids = self.text.encode([SEPARATOR + suffix])[0]
        if not ids:
            raise UserError("the GCG initial suffix is empty")
        t = torch.tensor(ids)
        for g in range(len(self.segments)):
            if not self.consistent(t.unsqueeze(0), [g])[0]:
                raise UserError(
                    f"the suffix {suffix!r} does not tokenize the same alone and inside the chat prompt of "
                    f"{self.tokenizer.__class__.__name__}; choose another suffix_init"
                )
        return t

    def suffix_text(self, ids: torch.Tensor) -> str:
        """The suffix string (without the separator) that ``ids`` stand for."""
        t = self.text.texts([ids.tolist()])[0] or ""
        return t.removeprefix(SEPARATOR)

    def consistent(self, cands: torch.Tensor, goals: Sequence[int]) -> list[bool]:
        """Retokenization filter (Alg. 1, step 3): the candidate's text starts with the separator,
        is stripped, and re-encodes to the same ids alone and inside the prompt of every goal."""
        rows = cands.tolist()
        texts = self.text.texts(rows)
        ok = [
            t is not None
            and t.startswith(SEPARATOR)
            and len(t) > len(SEPARATOR)
            and t[len(SEPARATOR) :] == t[len(SEPARATOR) :].strip()
            for t in texts
        ]
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
