"""Atomic artifact writes: every file is written to a temporary sibling, then renamed.

An error or an interrupt therefore never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from refusalkit.core.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it onto ``path`` on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror}; choose a writable --run directory") from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def locked(lock_file: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if missing) for a read-modify-write of a
    file several processes update (the run manifest while sweep points run in parallel). POSIX
    ``flock``; where there is none (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# make_temp_dir: .<name>.<8 random characters>; a replaced model folder being removed: .<name>.old-<time>
_PARTIAL_DIR = re.compile(r"^\..+\.([A-Za-z0-9_]{8}|old-\d+)$")


def remove_partial_writes(folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Remove what writers killed mid-write left under ``folder`` (SIGKILL skips their cleanup):
    the ``.<name>.*.tmp`` files of :func:`atomic_path` and the ``.<name>.*`` folders of
    :func:`make_temp_dir` whose name starts with ``.<prefix>``, recursively. Only for a folder no
    live process is writing to (a sweep point's own variant folder before it is re-run)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.rglob(f".{prefix}*"), key=lambda q: len(q.parts)):
        if not p.exists():  # inside a folder removed above
            continue
        if p.is_file() and p.name.endswith(".tmp"):
            p.unlink()
        elif p.is_dir() and _PARTIAL_DIR.match(p.name):
            shutil.rmtree(p)
        else:
            continue
        removed.append(p)
    return removed


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(final: Path) -> Path:
    """A temporary sibling folder of ``final`` (same file system, so it can be renamed onto it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError(f"{path} is missing; run the stage that writes it first") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is corrupt ({e.msg}); delete it or re-run with --force") from e


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing; run the stage that writes it first")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({e}); delete it or re-run with --force") from e


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o)}")
