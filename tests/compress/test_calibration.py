"""Calibration data: instruction sources, the bundled Wikipedia corpus, user files, bad input."""

from __future__ import annotations

import pytest

from refusalkit.compress.calibration import build_calibration
from refusalkit.core.errors import UserError
from refusalkit.data.corpus import HELD_OUT_EVERY, corpus_documents, corpus_ids, corpus_part

from conftest import HARMFUL, HARMLESS, POST_INSTRUCTION


def test_wikipedia_corpus_is_real_text():
    docs = corpus_documents("wikipedia")
    assert len(docs) > 10_000
    words = sum(len(d.split()) for d in docs)
    assert 700_000 < words < 850_000
    assert docs[0].startswith("20th-century classical music is")


def test_text_windows_are_seeded_and_exact(tokenizer):
    a = build_calibration(tokenizer, "wikipedia", 6, 48, seed=1)
    b = build_calibration(tokenizer, "wikipedia", 6, 48, seed=1)
    c = build_calibration(tokenizer, "wikipedia", 6, 48, seed=2)
    assert a.samples == b.samples and a.samples != c.samples
    assert [len(s) for s in a.samples] == [48] * 6
    assert a.info["kind"] == "text" and a.info["chat_template"] is False and a.info["n_tokens"] == 288


def test_held_out_part_is_disjoint(tokenizer):
    docs = corpus_documents("wikipedia")
    held = tokenizer.decode(corpus_ids(tokenizer, "wikipedia", held_out=True)[:400])
    first_held = docs[HELD_OUT_EVERY - 1]
    assert held.replace(" ", "").startswith(first_held[:40].replace(" ", ""))
    cal = corpus_part("wikipedia")[:20000]
    assert first_held[:40] not in cal and first_held[:40] in corpus_part("wikipedia", held_out=True)


def test_instructions_are_distinct_and_chat_formatted(tokenizer, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(HARMFUL + HARMLESS))
    cal = build_calibration(tokenizer, str(f), 10, 512, seed=0)
    assert cal.info["chat_template"] is True and cal.info["kind"] == "instructions"
    texts = [tokenizer.decode(s) for s in cal.samples]
    assert len(set(texts)) == 10
    assert all(t.endswith(POST_INSTRUCTION) for t in texts)
    raw = build_calibration(tokenizer, str(f), 10, 512, seed=0, chat_template=False)
    assert raw.info["chat_template"] is False
    assert not any("<|im_start|>" in tokenizer.decode(s) for s in raw.samples)
    cut = build_calibration(tokenizer, str(f), 10, 5, seed=0)
    assert max(len(s) for s in cut.samples) == 5


def test_user_text_file(tokenizer, tmp_path):
    f = tmp_path / "book.txt"
    f.write_text(" ".join(HARMLESS * 20))
    cal = build_calibration(tokenizer, f"text:{f}", 3, 16)
    assert cal.info["kind"] == "text" and all(len(s) == 16 for s in cal.samples)


@pytest.mark.parametrize(
    "source,n,seq,match",
    [
        ("alpaca-curated", 1000, 32, "too few calibration samples"),
        ("alpaca-curated", 0, 32, "too few calibration samples"),
        ("wikipedia", 4, 1, "too short"),
        ("text:{tmp}/missing.txt", 4, 16, "does not exist"),
        ("text:{tmp}/empty.txt", 4, 16, "empty"),
        ("text:{tmp}/short.txt", 4, 10_000, "fewer tokens than --seq-len"),
        ("nosuchsource", 4, 16, "unknown prompt source"),
    ],
)
def test_bad_calibration_settings(source, n, seq, match, tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("a few words only")
    with pytest.raises(UserError, match=match):
        build_calibration(tokenizer, source.format(tmp=tmp_path), n, seq)
