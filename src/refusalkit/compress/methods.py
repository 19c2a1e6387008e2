"""The compression methods, registered by name.

Each family module (:mod:`~refusalkit.compress.pruning`, :mod:`~refusalkit.compress.quant`,
:mod:`~refusalkit.compress.int8`) registers its methods with :func:`register`: the family, whether
calibration data is needed, descriptions, how a full name such as ``wanda-2:4`` or ``awq-w8`` is
read, how the variant is named, its parameters, its checks, and what it does to one decoder block.
Everything that lists or classifies methods (the compress job, the command line, the whole study,
the report) reads this registry, so a new method is one registration in its family's module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from refusalkit.core.errors import UserError


@dataclass
class BlockStep:
    """One decoder block being compressed: ``compress_block`` edits ``linears`` in place and returns
    the calibration inputs of the next block (``inputs`` unchanged for calibration-free methods)."""

    index: int
    block: Any  # nn.Module
    linears: dict[str, Any]  # name -> nn.Linear
    inputs: Any  # BlockInputs or None
    spec: Any  # CompressSpec
    notes: dict[str, Any]
    last: bool = False  # the model's last block: no block needs its outputs
    shared: dict[str, Any] = field(default_factory=dict)  # one dict for every block of the model (working state)


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "pruning" or "quantization"
    needs_calibration: bool
    description: str  # `refusalkit sources`
    title: str  # the compress command's summary line
    full_name: str | None = None  # regex of a full name (named groups: spec fields), e.g. "wanda-(?P<sparsity>.+)"
    configure: Callable[[Any], None] = lambda spec: None  # check and complete the spec (defaults, ranges)
    variant_name: Callable[[Any], str] = lambda spec: spec.method
    parameters: Callable[[Any], dict[str, Any]] = lambda spec: {}
    check_linear: Callable[[Any, Any, str], None] = lambda spec, linear, where: None  # impossible shapes
    compress_block: Callable[[BlockStep], Any] | None = None  # block by block (pruning, awq, rtn)
    # or the whole model at once: (spec, load) -> (model, {"per_layer", "notes"}, backend), where
    # load(**kwargs) loads the base model (e.g. with a transformers quantization_config)
    whole_model: Callable[[Any, Callable[..., Any]], tuple[Any, dict[str, Any], str | None]] | None = None
    # compresses the AliasLinear views of weights that are not nn.Linear layers (each expert of a fused
    # expert tensor, GPT-2's Conv1D); a method that does not is refused on such models
    covers_views: bool = False
    # the calibration forward and the mask in float64 on a CPU (compress.calibration_dtype; the same mask
    # on any CPU: refusalkit.compress.precision)
    exact_calibration: bool = False
    aliases: tuple[str, ...] = field(default=())
    rank: int = 100  # where the method is listed (`refusalkit sources`, the report), then by name
    # a refusal-preserving method: the plain method it corrects (refusalkit.compress.refusal); it needs
    # the run's base refusal direction and its training prompts
    preserves: str | None = None

    @property
    def plain(self) -> str:
        """The plain method's name (this method's own for a plain method)."""
        return (
            self.preserves or self.name
        )  # where the method is listed (`refusalkit sources`, the report), then by name


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"compression method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def listed() -> list[Method]:
    """The registered methods in listing order."""
    return sorted(METHODS.values(), key=lambda m: (m.rank, m.name))


# compression spec keys only a refusal-preserving (rp-*) method has; compression.json records them for those only
PRESERVING_SPEC_KEYS = ("refusal_weight", "n_refusal")


def plain_method(name: str | None) -> str | None:
    """The plain method behind a registered method's name (``rp-awq`` -> ``awq``); other names as given."""
    m = METHODS.get(name or "")
    return m.plain if m is not None else name


def methods_of(family: str) -> tuple[str, ...]:
    return tuple(m.name for m in listed() if m.family == family)


def parse_method(text: str) -> tuple[Method, dict[str, str]]:
    """The method a name or full name means, and the fields the full name sets."""
    t = text.strip().lower()
    for m in METHODS.values():
        if t == m.name or t in m.aliases:
            return m, {}
        match = re.fullmatch(m.full_name, t) if m.full_name else None
        if match:
            return m, match.groupdict()
    raise UserError(
        f"unknown compression method {text!r}; use one of {', '.join(METHODS)} "
        "(or a full name such as wanda-0.5, wanda-2:4, awq-w4)"
    )


def __getattr__(name: str) -> tuple[str, ...]:
    """``PRUNING`` and ``QUANTIZATION``: the registered methods of each family, read when asked (the
    family modules register theirs when :mod:`refusalkit.compress` is imported)."""
    families = {"PRUNING": "pruning", "QUANTIZATION": "quantization"}
    if name in families:
        return methods_of(families[name])
    raise AttributeError(name)
