"""Progress bars on stderr (tqdm), quiet on request."""

from __future__ import annotations


class Progress:
    """tqdm bars on stderr (quiet when ``enabled`` is False)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def bar(self, total: int, desc: str, unit: str = "prompt"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.enabled, leave=False, dynamic_ncols=True)
