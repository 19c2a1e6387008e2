"""The run manifest: package versions, hardware, seed, git revision and stage timings."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from refusalkit.core.artifacts import write_json
from refusalkit.core.counters import since, snapshot

_LAST: dict[str, int] = snapshot()  # the forward counters when this process last recorded a stage

_PACKAGES = ("refusalkit", "torch", "transformers", "accelerate", "safetensors", "gguf", "numpy")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import psutil

        hw["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


def update_manifest(
    path: Path,
    seed: int,
    stage: str | None = None,
    seconds: float | None = None,
    existing: dict[str, Any] | None = None,
    tokens: int | None = None,
) -> dict[str, Any]:
    """Record the environment and, with ``stage``, that stage's time and the forward tokens this process
        ran since it recorded its previous stage (:mod:`refusalkit.core.counters`). The file is re-read under a
        lock (``manifest.lock`` beside it): processes that run sweep points in parallel never drop
        each other's stages; ``existing`` (what the caller read before) fills in what the file lacks; ``tokens``: the
    stage's forward tokens when the caller counted them itself."""
    from refusalkit.core.artifacts import locked, read_json

    with locked(path.with_suffix(".lock")):
        current = read_json(path) if path.exists() else {}
        m = {**(existing or {}), **current}
        m["stages"] = {**(existing or {}).get("stages", {}), **current.get("stages", {})}
        m.update(
            {
                "packages": {p: _version(p) for p in _PACKAGES},
                "python": platform.python_version(),
                "hardware": hardware(),
                "seed": seed,
                "git_revision": _git_revision(),
            }
        )
        if stage is not None:
            m["stages"][stage] = {
                "seconds": round(seconds or 0.0, 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "forward_tokens": since(_LAST)["tokens"] if tokens is None else tokens,
            }
            _LAST.update(snapshot())
        write_json(path, m)
    return m
