"""``refusalkit config`` and ``refusalkit sources``: what can be set and named."""

from __future__ import annotations

import argparse


def config(args: argparse.Namespace) -> int:
    from refusalkit.core.settings import default_config_text

    print(default_config_text(), end="")
    return 0


def sources(args: argparse.Namespace) -> int:
    from refusalkit.compress.methods import listed
    from refusalkit.data.corpus import TEXT_CORPORA
    from refusalkit.data.prompts import NAMED_SOURCES
    from refusalkit.models.loading import SHORT_NAMES

    for k, v in {**NAMED_SOURCES, **SHORT_NAMES}.items():
        print(f"{k:18s} {v}")
    for k, v in TEXT_CORPORA.items():
        print(f"{k:18s} text corpus (calibration, perplexity): {v[3]}")
    for m in listed():
        print(f"{m.name:18s} compression method: {m.description}")
    return 0
