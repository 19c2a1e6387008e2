"""Resumable per-item records: an append-only JSONL log that becomes the final artifact when done.

While an attack runs, finished items are appended to ``.<name>.partial.jsonl`` (flushed and
fsynced per batch). Its first line holds the settings it was made with. An interrupt loses at
most the batch in flight; a truncated last line is dropped on resume. When every item is done,
the log is written atomically as ``<name>.jsonl`` (without the settings line) and the partial
file is removed, so the final name never holds a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from refusalkit.core import artifacts
from refusalkit.core.errors import UserError

SETTINGS_KEY = "_settings"


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parsed rows and the byte length of the valid prefix (a torn last line is not counted)."""
    rows: list[dict[str, Any]] = []
    good = 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    for raw in data.splitlines(keepends=True):
        pos += len(raw)
        if not raw.endswith(b"\n"):
            break  # torn write
        try:
            rows.append(json.loads(raw))
        except json.JSONDecodeError:
            if pos == len(data):
                break
            raise UserError(f"{path} is corrupt (line {len(rows) + 1}); delete it or re-run with --force") from None
        good = pos
    return rows, good


def read_records(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a finished record log (``<name>.jsonl``), or None when there is none."""
    if not path.is_file():
        return None
    return _read_lines(path)[0]


class RecordLog:
    """Records of one attack, keyed by ``row["key"]``; resumes from a partial or final log."""

    def __init__(self, folder: Path, name: str, settings: dict[str, Any], force: bool = False) -> None:
        self.final = folder / f"{name}.jsonl"
        self.partial = folder / f".{name}.partial.jsonl"
        self.settings = json.loads(json.dumps(settings, default=str))
        self.rows: dict[str, dict[str, Any]] = {}
        self.name = name
        if force:
            self.partial.unlink(missing_ok=True)
            return
        if self.partial.exists():
            rows, good = _read_lines(self.partial)
            if rows and rows[0].get(SETTINGS_KEY) is not None:
                if rows[0][SETTINGS_KEY] != self.settings:
                    raise UserError(
                        f"an interrupted {name} evaluation with other settings is in "
                        f"{self.partial.parent}; re-run with the same settings to resume it, "
                        "or add --force to discard it"
                    )
                self.rows = {r["key"]: r for r in rows[1:]}
            if good != self.partial.stat().st_size:
                with open(self.partial, "r+b") as f:
                    f.truncate(good)
        elif self.final.exists():
            meta = folder / f"{name}.settings.json"
            old = artifacts.read_json(meta) if meta.exists() else None
            if old != self.settings:
                raise UserError(
                    f"{self.final} was made with other evaluation settings; use the same settings, "
                    "a new --run, or --force to redo it"
                )
            rows, _ = _read_lines(self.final)
            self.rows = {r["key"]: r for r in rows}

    def done(self, key: str) -> bool:
        return key in self.rows

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self.rows]

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Add finished rows to the partial log (durably) and to memory."""
        new_file = not self.partial.exists()
        if new_file:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            # the rows of a final log being extended (more prompts asked for) move back into the partial log
            carried = list(self.rows.values())
        with open(self.partial, "a", encoding="utf-8") as f:
            if new_file:
                f.write(json.dumps({SETTINGS_KEY: self.settings}) + "\n")
                f.writelines(json.dumps(r, default=str) + "\n" for r in carried)
            f.writelines(json.dumps(r, default=str) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[r["key"]] = r

    def finish(self, keys: list[str]) -> list[dict[str, Any]]:
        """Write the final log (rows of ``keys``, in that order) atomically; remove the partial log."""
        rows = [self.rows[k] for k in keys]
        artifacts.write_json(self.final.with_name(f"{self.name}.settings.json"), self.settings)
        artifacts.write_jsonl(self.final, rows)
        self.partial.unlink(missing_ok=True)
        return rows
