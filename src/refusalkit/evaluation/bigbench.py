"""BIG-bench multiple-choice tasks for the offline utility suite: finding their ``task.json``
files and converting them into lm-evaluation-harness tasks.

The task files come from an installed ``bigbench`` package, refusalkit's cache, or the
``bigbench==1.0.0`` sdist on PyPI (downloaded once with pip; only the suite's ``task.json``
files are kept: :func:`bigbench_task_file`).

A BIG-bench task becomes a JSONL file (``question``, ``choices``, ``gold``) and a local lm-eval
YAML task (``output_type: multiple_choice``, metrics ``acc`` and ``acc_norm``) in a folder
(:func:`convert_bigbench_task`, :func:`write_local_task`). The prompt is BIG-bench's own
zero-shot format: ``task_prefix`` + ``example_input_prefix`` + input (+ the choices, when the
task appends them) + ``example_output_prefix``; each choice is scored as the text that follows
it (``target_delimiter: ""``; lm-eval moves trailing spaces of the prompt onto the choice). The
examples are shuffled once with ``seed``, so ``limit=N`` scores the same N items on every run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from refusalkit.core.errors import UserError

log = logging.getLogger(__name__)

# Offline suite: lm-eval task name -> (BIG-bench task, the paper task it stands in for). Zero-shot
# multiple choice with one correct answer; items (chance, majority answer share):
#   strategyqa 2,290 (0.50, 0.53 "No")      yes/no questions needing implicit knowledge, like BoolQ
#   epistemic_reasoning 2,000 (0.50, 0.63)   entailment / non-entailment, RTE's two labels
#   goal_step_wikihow/step_inference 2,250 (0.25)  pick the step of a wikiHow goal: HellaSwag's wikiHow half
#   winowhy 2,865 (0.50, 0.56)               is this resolution of a Winograd pronoun and its reason correct
#   social_iqa 1,954 (0.33)                  commonsense QA with 3 answers (ARC / OpenBookQA style)
#   sports_understanding 1,000 (0.50, 0.50)  plausible / implausible world-knowledge statements
OFFLINE_SUITE: dict[str, tuple[str, str]] = {
    "bb_strategyqa": ("strategyqa", "boolq"),
    "bb_epistemic_reasoning": ("epistemic_reasoning", "rte"),
    "bb_goal_step_wikihow_step_inference": ("goal_step_wikihow/step_inference", "hellaswag"),
    "bb_winowhy": ("winowhy", "winogrande"),
    "bb_social_iqa": ("social_iqa", "arc_easy, arc_challenge, openbookqa"),
    "bb_sports_understanding": ("sports_understanding", "(world knowledge)"),
}

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_REQUIREMENT = f"bigbench=={BIGBENCH_VERSION}"
DOWNLOAD_TIMEOUT_S = 1800


# --------------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------------


def bigbench_cache_dir() -> Path:
    """Where the BIG-bench task files are kept: ``refusalkit.models.loading.cache_dir() / "bigbench"``."""
    from refusalkit.models.loading import cache_dir

    return cache_dir() / "bigbench"


def _check_task_name(task: str) -> None:
    """A UserError unless ``task`` is a relative path of plain names (``a/b``, no ``..``)."""
    parts = task.split("/")
    if not task or any(not p or p in (".", "..") or not all(c.isalnum() or c in "_-" for c in p) for p in parts):
        raise UserError(f"{task!r} is not a BIG-bench task name (e.g. social_iqa or goal_step_wikihow/step_inference)")


def _installed_task_file(task: str) -> Path | None:
    """The ``task.json`` of ``task`` in an installed ``bigbench`` package, if there is one."""
    spec = importlib.util.find_spec("bigbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "benchmark_tasks" / task / "task.json"
        if path.is_file():
            return path
    return None


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the bigbench sdist into ``dest``; the path of the archive."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        BIGBENCH_REQUIREMENT,
        "-d",
        str(dest),
    ]
    log.info("downloading the %s sdist (358 MB, once) for its task files", BIGBENCH_REQUIREMENT)
    hint = (
        f"the BIG-bench task files come from the {BIGBENCH_REQUIREMENT} source package on PyPI (358 MB); "
        "check your network or install it yourself "
        f"(pip download --no-deps --no-binary :all: {BIGBENCH_REQUIREMENT}, "
        "then pip install the archive with --no-deps)"
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"downloading {BIGBENCH_REQUIREMENT} took over {DOWNLOAD_TIMEOUT_S} s; {hint}") from None
    archives = sorted(dest.glob("bigbench-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no archive")
        raise UserError(f"cannot download {BIGBENCH_REQUIREMENT} ({why[:300]}); {hint}")
    return archives[0]


def _extract_tasks(archive: Path, tasks: set[str], dest_root: Path) -> set[str]:
    """Stream ``archive`` once and move ``<task>/task.json`` of every task in ``tasks`` into
    ``dest_root`` (each file written to a temporary sibling, then renamed). The tasks found."""
    marker = "/bigbench/benchmark_tasks/"
    wanted = {f"{t}/task.json": t for t in tasks}
    found: set[str] = set()
    dest_root.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                if not member.isfile() or marker not in member.name:
                    continue
                rel = member.name.split(marker, 1)[1]
                if rel not in wanted:
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                final = dest_root / rel
                final.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".task.", suffix=".tmp", dir=final.parent)
                try:
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.replace(tmp, final)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                found.add(wanted[rel])
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(
            f"cannot read the {BIGBENCH_REQUIREMENT} archive {archive.name} ({e}); delete it and try again"
        ) from None
    return found


def bigbench_task_file(task: str) -> Path:
    """The ``task.json`` of a BIG-bench task (``social_iqa``, ``goal_step_wikihow/step_inference``).

    Looked for (a) in an installed ``bigbench`` package, (b) in refusalkit's cache
    (:func:`bigbench_cache_dir`), else (c) the ``bigbench==1.0.0`` sdist is downloaded with
    ``python -m pip download`` into a temporary folder and the ``task.json`` files of the whole
    offline suite (and ``task``) are extracted into the cache in one pass over the archive; the
    archive is then deleted. Raises :class:`UserError` if the download fails or the task does
    not exist.
    """
    _check_task_name(task)
    installed = _installed_task_file(task)
    if installed is not None:
        return installed
    root = bigbench_cache_dir()
    cached = root / task / "task.json"
    if cached.is_file():
        return cached
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the cache folder {root} ({e.strerror}); set REFUSALKIT_CACHE to a writable folder"
        ) from None
    wanted = {bb for bb, _ in OFFLINE_SUITE.values()} | {task}
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        archive = _download_sdist(Path(tmp))
        _extract_tasks(archive, wanted, root)
    if not cached.is_file():
        raise UserError(
            f"BIG-bench {BIGBENCH_VERSION} has no task {task!r} with a task.json of its own "
            "(a task with subtasks is named like goal_step_wikihow/step_inference)"
        )
    return cached


# --------------------------------------------------------------------------------------------
# Conversion: BIG-bench task.json -> JSONL rows and an lm-eval YAML task
# --------------------------------------------------------------------------------------------


def _gold_index(scores: dict[str, Any]) -> int | None:
    """The index of the single best-scored choice, or None if there is no unique correct choice."""
    values = [float(v) for v in scores.values()]
    best = max(values)
    if values.count(best) != 1 or best <= min(values) or best <= 0:
        return None
    return values.index(best)


def convert_bigbench_task(task_json: str | os.PathLike | dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """The multiple-choice items of a BIG-bench JSON task, in a fixed seeded order.

    Each row is ``{"question": prompt, "choices": [...], "gold": index, "id": index in the file}``.
    The prompt is BIG-bench's zero-shot format (see the module docstring); choices keep the file's
    order, and when the task appends them to the input they are listed in a seeded permutation
    of their sorted order (as BIG-bench does). Items without ``target_scores`` or without a single
    best-scored choice are dropped. Raises :class:`UserError` for a file that is not a BIG-bench
    multiple-choice task (e.g. a folder of subtasks: name the subtask instead).
    """
    if isinstance(task_json, dict):
        data, where = task_json, "the task"
    else:
        where = str(task_json)
        try:
            data = json.loads(Path(task_json).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read BIG-bench task {where} ({e}); give a BIG-bench task.json file") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list) or not data["examples"]:
        lists_subtasks = isinstance(data, dict) and data.get("subtasks")
        sub = " (it lists subtasks: name one, e.g. parent/subtask)" if lists_subtasks else ""
        raise UserError(f"{where} is not a BIG-bench JSON task with examples{sub}")
    task_prefix = str(data.get("task_prefix", ""))
    input_prefix = str(data.get("example_input_prefix", "\nQ: "))
    output_prefix = str(data.get("example_output_prefix", "\nA: "))
    choice_prefix = str(data.get("choice_prefix", "\n  choice: "))
    append = bool(data.get("append_choices_to_input", True))
    rows = []
    for i, ex in enumerate(data["examples"]):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2:
            continue
        try:
            gold = _gold_index(scores)
        except (TypeError, ValueError):
            gold = None
        if gold is None:
            continue
        choices = [str(c) for c in scores]
        text = str(ex.get("input", ""))
        if append:
            listed = sorted(choices)
            random.Random(f"{seed}:{i}").shuffle(listed)
            text = text + choice_prefix + choice_prefix.join(listed)
        rows.append(
            {"question": task_prefix + input_prefix + text + output_prefix, "choices": choices, "gold": gold, "id": i}
        )
    if not rows:
        raise UserError(f"{where} has no multiple-choice items with a single correct choice (target_scores)")
    random.Random(seed).shuffle(rows)
    return rows


def _yaml_task(name: str, data_file: Path, cache: Path) -> str:
    """The lm-eval YAML task ``name``: multiple choice over the JSONL rows of ``data_file``, metrics
    acc and acc_norm; ``cache`` holds the data set cache of Hugging Face ``datasets``."""
    import yaml

    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "question",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    return yaml.safe_dump(config, sort_keys=False)


def write_local_task(name: str, rows: list[dict[str, Any]], folder: Path) -> Path:
    """Write ``rows`` as ``<folder>/<name>.jsonl`` and an lm-eval YAML task ``<folder>/<name>.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(_yaml_task(name, data, folder / "hf_datasets_cache"), encoding="utf-8")
    return yaml_path
