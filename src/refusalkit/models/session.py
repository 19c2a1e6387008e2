"""The model owner (:class:`ModelOwner`: load, release, swap) and what a job's stages share
(:class:`Session`)."""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusalkit.core.config import Config
from refusalkit.core.errors import UserError
from refusalkit.core.layout import RunLayout
from refusalkit.core.manifest import update_manifest
from refusalkit.core.progress import Progress
from refusalkit.models.loading import LoadedModel, load_model

log = logging.getLogger(__name__)


def release_memory() -> None:
    """Collect garbage and return freed memory to the system.

    glibc keeps large freed buffers in its heap: on the default model the resident size after three
    AWQ blocks was 2.45 GB without this and 1.0 GB with it (float32, weights memory-mapped), and a
    study kept about 1.7 GB of an LLM.int8 variant's freed buffers for the rest of the run (anonymous
    memory 1.9 GB at the report, 0.3 GB after ``malloc_trim``).
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class ModelOwner:
    """The one owner of a loaded model: it loads, releases and swaps; nobody else replaces it.

    Holders ask :attr:`lm` every time they need the model and never keep it across a
    :meth:`use` or :meth:`release`: both drop the owner's reference, so the old model is freed
    (one model in memory at a time).
    """

    def __init__(self, cfg: Config, layout: RunLayout, variant: str = "base"):
        self.cfg, self.layout, self.variant = cfg, layout, variant
        self._lm: LoadedModel | None = None

    @property
    def loaded(self) -> bool:
        return self._lm is not None

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            self._lm = self._load(self.variant)
        return self._lm

    def _load(self, variant: str) -> LoadedModel:
        override = None
        if variant != "base":
            if not self.layout.has_model(variant):
                raise UserError(
                    f"variant {variant!r} has no model in {self.layout.model(variant)}; "
                    "create it first (refusalkit compress) or use --variant base"
                )
            override = str(self.layout.model(variant))
        c = self.cfg
        log.info("loading model %s", c.model if override is None else override)
        return load_model(
            c.model, dtype=c.dtype, device=c.device, chat_template=c.chat_template, path_override=override
        )

    def release(self) -> None:
        """Drop the loaded model and invalidate every holder."""
        if self._lm is not None:
            self._lm = None
            release_memory()

    def use(self, variant: str) -> LoadedModel:
        """Swap to ``variant`` (the current model is released first)."""
        if variant != self.variant:
            self.release()
            self.variant = variant
        return self.lm


@dataclass
class Session:
    """What a job's stages share: the config, the run directory's layout, the variant, the model owner."""

    cfg: Config
    layout: RunLayout
    variant: str = "base"
    progress: Progress = field(default_factory=lambda: Progress(False))
    force: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    _ran: bool = False
    owner: ModelOwner | None = None

    def __post_init__(self) -> None:
        if self.owner is None:
            self.owner = ModelOwner(self.cfg, self.layout, self.variant)

    @property
    def lm(self) -> LoadedModel:
        """The owner's current model: ask each time, never keep it across a swap."""
        return self.owner.lm

    def direction_file(self, name: str) -> Path:
        return self.layout.direction(self.variant, name)

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        """Run a stage; record its time in the manifest only if it computed something."""
        self._ran = False
        t0 = time.time()
        out = fn()
        if self._ran:
            self.manifest = update_manifest(
                self.layout.manifest, self.cfg.seed, f"{self.variant}/{stage}", time.time() - t0, self.manifest
            )
        return out

    def needs(self, *paths: Path) -> bool:
        """True (and the stage counts as run) when ``--force`` or any output is missing."""
        need = self.force or not all(p.exists() for p in paths)
        self._ran = self._ran or need
        return need
