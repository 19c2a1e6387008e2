"""Utility of a (compressed or edited) model: zero-shot multiple-choice accuracy.

The paper measures utility as zero-shot accuracy on LM-harness tasks (boolq, rte, hellaswag,
winogrande, arc_easy, arc_challenge, openbookqa). :func:`evaluate_utility` runs
lm-evaluation-harness (``lm-eval``, the ``utility`` extra) on the in-memory model through
``HFLM(pretrained=model, tokenizer=tokenizer)`` and ``lm_eval.simple_evaluate``:

* the paper's tasks through lm-eval's built-in tasks, when their data can be reached (they
  download from the Hugging Face Hub; offline they are skipped with a one-line reason);
* an offline suite, MMLU's dev questions read from lm-eval's own installed task files, in two
  formats (:data:`~refusalkit.evaluation.offline_tasks.OFFLINE_SUITE`), turned into local lm-eval
  tasks by :mod:`refusalkit.evaluation.offline_tasks`; and any BIG-bench ``task.json`` file the
  user names.

``acc`` is the share of items whose choice with the highest summed log-probability is the gold
one; ``acc_norm`` divides each choice's log-probability by its length in bytes (lm-eval's
definition). No chat template is applied (lm-eval's default, as in the papers). Perplexity is
in :mod:`refusalkit.evaluation.perplexity`.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from refusalkit.core.errors import UserError
from refusalkit.evaluation.offline_tasks import (
    OFFLINE_SUITE,
    RETIRED_BIGBENCH,
    convert_bigbench_task,
    offline_task_rows,
    write_local_task,
)

PAPER_TASKS: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13,<0.5"
HUB_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class UtilityTask:
    """One task to evaluate: ``kind`` is ``offline`` (``ref``: a task of the offline suite, such
    as ``mmlu_dev``), ``file`` (``ref``: a BIG-bench-format ``task.json`` path) or ``lm-eval``
    (``ref``: a built-in lm-eval task name)."""

    name: str
    kind: str
    ref: str

    @property
    def source(self) -> str:
        return f"{'bigbench' if self.kind == 'file' else self.kind}:{self.ref}"


# --------------------------------------------------------------------------------------------
# Task names
# --------------------------------------------------------------------------------------------


def _valid_names() -> str:
    return (
        ", ".join(OFFLINE_SUITE)
        + "; paper tasks (need the Hugging Face Hub): "
        + ", ".join(PAPER_TASKS)
        + "; groups: offline, paper; or the path of a BIG-bench task.json file"
    )


def _file_task(path: Path) -> UtilityTask:
    stem = path.parent.name if path.name == "task.json" else path.stem
    safe = "".join(c if c.isalnum() else "_" for c in stem).strip("_") or "task"
    return UtilityTask(name=f"bb_{safe}", kind="file", ref=str(path.resolve()))


def resolve_tasks(names: list[str] | tuple[str, ...]) -> list[UtilityTask]:
    """Task names (``bb_social_iqa``, ``boolq``, the groups ``offline`` and ``paper``, or a path to
    a BIG-bench ``task.json``) to :class:`UtilityTask` s, in order, without duplicates.

    Raises :class:`UserError` naming the valid tasks on an unknown name.
    """
    if isinstance(names, str):
        names = [names]
    out: dict[str, UtilityTask] = {}
    for raw in names:
        name = str(raw).strip()
        if name == "offline":
            found = [UtilityTask(n, "offline", n) for n in OFFLINE_SUITE]
        elif name == "paper":
            found = [UtilityTask(n, "lm-eval", n) for n in PAPER_TASKS]
        elif name in OFFLINE_SUITE:
            found = [UtilityTask(name, "offline", name)]
        elif name in PAPER_TASKS:
            found = [UtilityTask(name, "lm-eval", name)]
        elif name.endswith(".json"):
            path = Path(name).expanduser()
            if not path.is_file():
                raise UserError(f"task file {path} does not exist; give the path of a BIG-bench task.json file")
            found = [_file_task(path)]
        elif name in RETIRED_BIGBENCH:
            raise UserError(
                f"the BIG-bench task {name} is gone: PyPI no longer serves the bigbench package that held its "
                "files; use the offline suite (offline: mmlu_dev, mmlu_dev_cloze) or give the path of a BIG-bench task.json"
            )
        else:
            raise UserError(f"unknown utility task {name!r}; valid tasks: {_valid_names()}")
        for t in found:
            if t.name in out and out[t.name] != t:
                raise UserError(f"two utility tasks are both named {t.name}; rename one of the task files")
            out[t.name] = t
    if not out:
        raise UserError(f"no utility task given; valid tasks: {_valid_names()}")
    return list(out.values())


# --------------------------------------------------------------------------------------------
# Running lm-eval
# --------------------------------------------------------------------------------------------


def _import_lm_eval() -> tuple[Any, Any, Any]:
    """``(simple_evaluate, HFLM, TaskManager)``; a UserError if lm-eval is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(
            f"utility evaluation needs lm-evaluation-harness ({e}); "
            f"run: pip install 'refusalkit[utility]' (or pip install '{LM_EVAL_REQUIREMENT}')"
        ) from None
    return lm_eval.simple_evaluate, HFLM, TaskManager


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_unreachable_reason() -> str | None:
    """Why lm-eval's built-in tasks cannot fetch their data now, or None if they may.

    With ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, datasets fail at once unless cached,
    so loading is simply tried. Otherwise one TCP connection to the hub (5 s) decides: without
    it ``datasets`` retries for about 25 s per task before failing.
    """
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return (
            f"the Hugging Face Hub ({host}) cannot be reached ({e.strerror or type(e).__name__}) and "
            "lm-eval's built-in tasks download their data from it "
            "(set HF_DATASETS_OFFLINE=1 to use a local datasets cache)"
        )


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300]}" if msg else type(e).__name__


@contextlib.contextmanager
def _keep_output_head(model: Any) -> Iterator[None]:
    """HFLM calls ``model.tie_weights()``; make sure that never re-ties an output head that
    refusalkit untied (e.g. by weight orthogonalization) to the embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    try:
        yield
    finally:
        if head is not None and weight is not None and head.weight is not weight:
            head.weight = weight


def _metric(results: dict[str, Any], key: str) -> float | None:
    v = results.get(f"{key},none")
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    return None


def _run_lm_eval(
    lm: Any,
    tasks: list[Any],
    task_manager: Any,
    limit: int | None,
    batch_size: int,
    seed: int,
    log_samples: bool = False,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` (zero-shot) on the in-memory model; lm-eval's raw results dict."""
    simple_evaluate, HFLM, _ = _import_lm_eval()
    with _keep_output_head(lm.model):
        hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    out = simple_evaluate(
        model=hflm,
        tasks=tasks,
        task_manager=task_manager,
        limit=limit,
        num_fewshot=0,
        log_samples=log_samples,
        bootstrap_iters=1000,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
        fewshot_random_seed=seed,
    )
    if not out:
        raise RuntimeError("lm-eval returned no results")
    return out


def _check_settings(limit: int | None, batch_size: int) -> None:
    """A UserError unless ``limit`` is None or a whole number >= 1 and ``batch_size`` a whole number >= 1."""
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise UserError(f"utility --limit must be a whole number of items of 1 or more, got {limit!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise UserError(f"utility batch size must be 1 or more, got {batch_size!r}")


def _write_local_tasks(local: list[UtilityTask], folder: Path, seed: int, limit: int | None) -> dict[str, float]:
    """Write each offline or BIG-bench-file task as an lm-eval task into ``folder``; per task, the
    chance accuracy of the items scored (the mean of 1 / number of choices over the first ``limit`` items)."""
    chance: dict[str, float] = {}
    for t in local:
        rows = (
            convert_bigbench_task(Path(t.ref), seed=seed) if t.kind == "file" else offline_task_rows(t.ref, seed=seed)
        )
        write_local_task(t.name, rows, folder)
        scored = rows[:limit] if limit is not None else rows
        chance[t.name] = sum(1.0 / len(r["choices"]) for r in scored) / len(scored)
    return chance


def _load_paper_tasks(paper: list[UtilityTask], include: str | None, skipped: dict[str, str]) -> tuple[Any, list[str]]:
    """A TaskManager with lm-eval's built-in tasks (and the local ones in ``include``), and the
    paper tasks whose data loads; the others go into ``skipped`` with their reason. The
    TaskManager is None when the Hugging Face Hub cannot be reached (then every paper task is skipped)."""
    reason = _hub_unreachable_reason()
    if reason is not None:
        skipped.update({t.name: reason for t in paper})
        return None, []
    _, _, TaskManager = _import_lm_eval()
    task_manager = TaskManager(include_path=include, include_defaults=True)
    loaded = []
    for t in paper:
        try:  # builds the task, which downloads (or reads the cached) data set
            task_manager.load([t.ref])
        except Exception as e:  # noqa: BLE001 - any failure to build the task is a reason to skip it
            skipped[t.name] = f"lm-eval task {t.ref} could not load its data ({_one_line(e)})"
            continue
        loaded.append(t.ref)
    return task_manager, loaded


def _table(
    out: dict[str, Any], specs: list[UtilityTask], skipped: dict[str, str], chance: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Per task run, its metrics from lm-eval's results ``out``; a task without a result goes into ``skipped``."""
    results, counts = out.get("results", {}), out.get("n-samples", {})
    table: dict[str, dict[str, Any]] = {}
    for t in specs:
        key = t.ref if t.kind == "lm-eval" else t.name
        if t.name in skipped or key not in results:
            if t.name not in skipped:
                skipped[t.name] = "lm-eval returned no result for it"
            continue
        r = results[key]
        n = counts.get(key, {}).get("effective")
        table[t.name] = {
            "acc": _metric(r, "acc"),
            "acc_stderr": _metric(r, "acc_stderr"),
            "acc_norm": _metric(r, "acc_norm"),
            "acc_norm_stderr": _metric(r, "acc_norm_stderr"),
            "n": int(n) if n is not None else None,
            "source": t.source,
            "chance": chance.get(t.name),
        }
    return table


def evaluate_utility(
    lm: Any, tasks: list[str] | None = None, *, limit: int | None = None, batch_size: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Zero-shot multiple-choice accuracy of ``lm`` (a :class:`refusalkit.models.loading.LoadedModel`).

    ``tasks``: names for :func:`resolve_tasks`; ``None`` runs the offline suite and the
    paper's tasks when the Hugging Face Hub can be reached. ``limit``: at most this many items
    per task (the same items every run for a given ``seed``, which fixes the order of the
    local tasks' items). Returns::

        {"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "source", "chance"}},
         "mean_acc": unweighted mean of acc over the tasks run (None if none ran),
         "skipped": {name: one-line reason}, "seconds": wall time}

    ``source`` is ``offline:<task>``, ``bigbench:<task.json>`` or ``lm-eval:<task>``; ``acc_norm``
    is None for tasks without it (boolq, rte, winogrande); ``chance`` is the expected accuracy of
    uniform guessing on the items scored (local tasks; None for lm-eval's built-in ones). A paper task whose data cannot
    be reached is skipped with its reason, whether asked for or not. ``limit`` takes lm-eval's
    first items of a built-in task (data set order). Raises :class:`UserError` for an unknown
    task, a bad setting, lm-eval missing or not the pinned version of its MMLU files, or when no
    task at all could be run.
    """
    t0 = time.time()
    _check_settings(limit, batch_size)
    specs = resolve_tasks(tasks if tasks is not None else ["offline", "paper"])
    _import_lm_eval()
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="refusalkit-utility-") as tmp:
        folder = Path(tmp)
        local = [t for t in specs if t.kind != "lm-eval"]
        paper = [t for t in specs if t.kind == "lm-eval"]
        chance = _write_local_tasks(local, folder, seed, limit)
        run: list[str] = [t.name for t in local]
        task_manager = None
        if paper:
            task_manager, loaded = _load_paper_tasks(paper, str(folder) if local else None, skipped)
            run += loaded
        if not run:
            raise UserError("no utility task could be run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        if task_manager is None:
            _, _, TaskManager = _import_lm_eval()
            task_manager = TaskManager(include_path=str(folder), include_defaults=False)
        out = _run_lm_eval(lm, run, task_manager, limit, batch_size, seed)
    table = _table(out, specs, skipped, chance)
    accs = [v["acc"] for v in table.values() if v["acc"] is not None]
    return {
        "tasks": table,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "skipped": skipped,
        "seconds": round(time.time() - t0, 2),
    }
