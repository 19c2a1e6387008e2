"""Text corpora (bundled Wikipedia leads, or a text file) for calibration and perplexity, with a
held-out part that calibration never sees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refusalkit.core.errors import UserError
from refusalkit.core.external import ARTIFACTS, artifact_file

# name -> (artifact in refusalkit.core.external, description)
TEXT_CORPORA: dict[str, tuple[str, str]] = {
    "wikipedia": (
        "wikipedia",
        "lead sections of Wikipedia's 10,033 Level-4 vital articles (776k words, CC BY-SA 4.0)",
    ),
}


def corpus_documents(source: str) -> list[str]:
    """The documents of a named corpus (``wikipedia``: one article lead per document, file order)."""
    artifact = ARTIFACTS[TEXT_CORPORA[source][0]]
    path = artifact_file(artifact.name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [d["extract"].strip() for d in data.values() if isinstance(d, dict) and d.get("extract", "").strip()]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        raise UserError(f"{path} is not the expected corpus file; run: {artifact.reinstall}") from None


def corpus_text(source: str) -> str:
    """The raw text of a named corpus (documents joined by blank lines) or of ``text:FILE``."""
    if source.startswith("text:"):
        path = Path(source[5:]).expanduser()
        if not path.is_file():
            raise UserError(f"calibration text file {path} does not exist; give text:PATH to a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (UnicodeDecodeError, OSError) as e:
            raise UserError(f"cannot read {path} as UTF-8 text ({e}); re-save it as UTF-8") from None
    else:
        text = "\n\n".join(corpus_documents(source))
    if not text.strip():
        raise UserError(f"calibration text {source} is empty; give a file with text in it")
    return text


def is_text_source(source: str) -> bool:
    return source in TEXT_CORPORA or source.startswith("text:")


def corpus_part(source: str, held_out: bool = False) -> str:
    """The calibration part of a corpus's text, or its held-out part (never used for calibration)."""
    if source in TEXT_CORPORA:
        docs = corpus_documents(source)
        return "\n\n".join(d for i, d in enumerate(docs) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out)
    text = corpus_text(source)
    cut = int(len(text) * (1 - HELD_OUT_FRACTION))
    return text[cut:] if held_out else text[:cut]


def corpus_ids(tokenizer: Any, source: str, held_out: bool = False) -> list[int]:
    return tokenizer(corpus_part(source, held_out), add_special_tokens=False)["input_ids"]


HELD_OUT_FRACTION = 0.1


HELD_OUT_EVERY = 10  # named corpora: every 10th document is held out
