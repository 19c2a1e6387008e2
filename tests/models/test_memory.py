"""Freed model memory goes back to the system between a study's stages (glibc keeps it otherwise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh interpreter: a long-lived test worker's heap (holes left by earlier tests) decides where
# the buffers land, and with it whether glibc keeps them at all.
SCENARIO = """
import gc
from pathlib import Path
import torch
from refusalkit.models.session import release_memory

def anon_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

# What a released model leaves: its buffers freed in the heap with live allocations after each (a model's
# weights come from the heap once glibc raised its mmap threshold past their size, as the first freed
# large buffer does), so the heap cannot shrink from its top by itself.
big = torch.empty(16 * 2**20 // 4).fill_(1.0)
del big
buffers, pins = [], []
for _ in range(60):
    buffers.append(torch.ones(8 * 2**20 // 4))  # 8 MiB each, 480 MiB in all
    pins.append(torch.ones(64 * 2**10 // 4))  # 64 KiB, below the threshold: from the heap too
del buffers
gc.collect()
kept = anon_mb()
release_memory()
print(kept - anon_mb())
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/status").exists(), reason="glibc and /proc only"
)
def test_release_memory_returns_a_released_models_buffers():
    out = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True)
    returned = float(out.stdout.strip().splitlines()[-1])
    assert returned > 300, f"{returned:.0f} of 480 MiB freed returned to the system"
