"""The optional packages a command will need, named before any work starts.

refusalkit's heavy back ends are optional: lm-evaluation-harness (zero-shot utility), bitsandbytes
(LLM.int8 through its kernels), Ray (sweeps on a cluster), vLLM (generation on a GPU) and the
embedded default model's weight packages. :func:`needed` reads a resolved configuration and says
which of them the command will import; :func:`require` stops with one line that names the missing
ones and the pip command that installs them, so that a run does not find out an hour in. A package
is looked up with ``importlib.util.find_spec`` (nothing is imported).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from refusalkit.core.errors import UserError
from refusalkit.core.external import ARTIFACTS
from refusalkit.core.named_models import NAMED


@dataclass(frozen=True)
class Extra:
    """One optional package: its import ``module``, the pip ``install`` command, and ``extra``,
    the ``refusalkit[...]`` extra that installs it (None: not one of refusalkit's extras); ``modules``:
    every package it is (a named model split over several), when more than one."""

    name: str
    module: str
    install: str
    extra: str | None = None
    modules: tuple[str, ...] = ()


def model_extra(name: str) -> str:
    """The :data:`EXTRAS` key of a named model's packages."""
    return "default model" if name == "default" else f"{name} model"


EXTRAS: dict[str, Extra] = {
    e.name: e
    for e in (
        *(
            Extra(model_extra(m.name), m.packages[0], m.install, ARTIFACTS[m.parts[0]].extra, m.packages)
            for m in NAMED.values()
        ),
        Extra("lm-eval", "lm_eval", "pip install 'refusalkit[utility]'", "utility"),
        Extra("bitsandbytes", "bitsandbytes", "pip install 'refusalkit[int8]'", "int8"),
        Extra("ray", "ray", "pip install 'refusalkit[cluster]'", "cluster"),
        Extra("vllm", "vllm", "pip install vllm"),
        Extra("compressed-tensors", "compressed_tensors", "pip install 'refusalkit[formats]'", "formats"),
        Extra("llama-cpp-python", "llama_cpp", "pip install 'refusalkit[llama]' (compiles llama.cpp)", "llama"),
    )
}


def installed(extra: Extra) -> bool:
    """Whether ``extra``'s package can be imported here (looked up, not imported)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in extra.modules or (extra.module,))
    except (ImportError, ValueError):
        return False


def needed(
    cfg: Any,
    *,
    utility: bool = False,
    methods: list[str] | None = None,
    executor: str = "local",
    evaluates: bool = True,
    formats: list[str] | None = None,
) -> list[tuple[Extra, str]]:
    """The optional packages a command with configuration ``cfg`` will import, each with why:
    ``utility`` (zero-shot accuracy is evaluated), ``methods`` (the compression methods it runs),
    ``executor`` (``ray``: a Ray sweep), ``evaluates`` (it generates with ``evaluation.backend``),
    ``formats`` (the checkpoint formats it reads or writes)."""
    out: list[tuple[Extra, str]] = []
    named = NAMED.get(cfg.model)
    if named is not None and named.converted() is None:  # converted: the packages are not read
        why = "the embedded default model" if named.name == "default" else f"the {named.name} model"
        out.append((EXTRAS[model_extra(named.name)], f"{why} (--model {named.name})"))
    tasks = [t.strip() for t in cfg.evaluation.utility_tasks.split(",") if t.strip()]
    if utility and tasks and tasks != ["none"]:
        out.append((EXTRAS["lm-eval"], f"zero-shot utility (evaluation.utility_tasks {cfg.evaluation.utility_tasks})"))
    if cfg.compress.backend == "bitsandbytes" and any(m.startswith("llm-int8") for m in methods or []):
        out.append((EXTRAS["bitsandbytes"], "llm-int8 with compress.backend bitsandbytes"))
    if executor == "ray":
        out.append((EXTRAS["ray"], "--executor ray"))
    if evaluates and cfg.evaluation.backend == "vllm":
        out.append((EXTRAS["vllm"], "evaluation.backend vllm"))
    if "compressed-tensors" in (formats or []):
        out.append((EXTRAS["compressed-tensors"], "a compressed-tensors checkpoint"))
    return out


def missing(needs: list[tuple[Extra, str]]) -> list[tuple[Extra, str]]:
    """The entries of ``needs`` whose package is not installed."""
    return [(e, why) for e, why in needs if not installed(e)]


def missing_line(absent: list[tuple[Extra, str]]) -> str:
    """One line naming what is missing, what needs it, and the pip command(s)."""
    parts = [f"{why} needs {e.name}, which is not installed" for e, why in absent]
    installs = list(dict.fromkeys(e.install for e, _ in absent))
    return "; ".join(parts) + "; run: " + " && ".join(installs)


def require(needs: list[tuple[Extra, str]]) -> None:
    """A one-line :class:`UserError` when a needed optional package is missing."""
    absent = missing(needs)
    if absent:
        raise UserError(missing_line(absent))
