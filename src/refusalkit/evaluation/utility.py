"""Utility of a (compressed or edited) model: zero-shot multiple-choice accuracy and perplexity.

The paper measures utility as zero-shot accuracy on LM-harness tasks (boolq, rte, hellaswag,
winogrande, arc_easy, arc_challenge, openbookqa). :func:`evaluate_utility` runs
lm-evaluation-harness (``lm-eval``, the ``utility`` extra) on the in-memory model through
``HFLM(pretrained=model, tokenizer=tokenizer)`` and ``lm_eval.simple_evaluate``:

* the paper's tasks through lm-eval's built-in tasks, when their data can be reached (they
  download from the Hugging Face Hub; offline they are skipped with a one-line reason);
* an offline suite built from BIG-bench (Apache-2.0) multiple-choice tasks, one close in spirit
  to each family of the paper's tasks (:data:`OFFLINE_SUITE`). The task files come from an
  installed ``bigbench`` package, refusalkit's cache, or the ``bigbench==1.0.0`` sdist on PyPI
  (downloaded once with pip; only the suite's ``task.json`` files are kept).

A BIG-bench task becomes a JSONL file (``question``, ``choices``, ``gold``) and a local lm-eval
YAML task (``output_type: multiple_choice``, metrics ``acc`` and ``acc_norm``) in a temporary
folder. The prompt is BIG-bench's own zero-shot format: ``task_prefix`` + ``example_input_prefix``
+ input (+ the choices, when the task appends them) + ``example_output_prefix``; each choice is
scored as the text that follows it (``target_delimiter: ""``; lm-eval moves trailing spaces of
the prompt onto the choice). The examples are shuffled once with ``seed``, so ``limit=N`` scores
the same N items on every run.

``acc`` is the share of items whose choice with the highest summed log-probability is the gold
one; ``acc_norm`` divides each choice's log-probability by its length in bytes (lm-eval's
definition). No chat template is applied (lm-eval's default, as in the papers).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from ..errors import UserError

log = logging.getLogger(__name__)

PAPER_TASKS: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

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
LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13,<0.5"
DOWNLOAD_TIMEOUT_S = 1800
HUB_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class UtilityTask:
    """One task to evaluate: ``kind`` is ``bigbench`` (``ref``: a BIG-bench task name such as
    ``social_iqa``), ``file`` (``ref``: a BIG-bench-format ``task.json`` path) or ``lm-eval``
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
    return (", ".join(OFFLINE_SUITE) + "; paper tasks (need the Hugging Face Hub): " + ", ".join(PAPER_TASKS)
            + "; groups: offline, paper; or the path of a BIG-bench task.json file")


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
            found = [UtilityTask(n, "bigbench", bb) for n, (bb, _) in OFFLINE_SUITE.items()]
        elif name == "paper":
            found = [UtilityTask(n, "lm-eval", n) for n in PAPER_TASKS]
        elif name in OFFLINE_SUITE:
            found = [UtilityTask(name, "bigbench", OFFLINE_SUITE[name][0])]
        elif name in PAPER_TASKS:
            found = [UtilityTask(name, "lm-eval", name)]
        elif name.endswith(".json"):
            path = Path(name).expanduser()
            if not path.is_file():
                raise UserError(f"task file {path} does not exist; give the path of a BIG-bench task.json file")
            found = [_file_task(path)]
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
# BIG-bench task files
# --------------------------------------------------------------------------------------------


def bigbench_cache_dir() -> Path:
    """Where the BIG-bench task files are kept: ``refusalkit.models.cache_dir() / "bigbench"``."""
    from ..models import cache_dir

    return cache_dir() / "bigbench"


def _check_task_name(task: str) -> None:
    parts = task.split("/")
    if not task or any(not p or p in (".", "..") or not all(c.isalnum() or c in "_-" for c in p) for p in parts):
        raise UserError(f"{task!r} is not a BIG-bench task name (e.g. social_iqa or goal_step_wikihow/step_inference)")


def _installed_task_file(task: str) -> Path | None:
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
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "--progress-bar", "off", BIGBENCH_REQUIREMENT, "-d", str(dest)]
    log.info("downloading the %s sdist (358 MB, once) for its task files", BIGBENCH_REQUIREMENT)
    hint = (f"the BIG-bench task files come from the {BIGBENCH_REQUIREMENT} source package on PyPI (358 MB); "
            f"check your network or install it yourself (pip download --no-deps --no-binary :all: {BIGBENCH_REQUIREMENT}, "
            f"then pip install the archive with --no-deps)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
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
        raise UserError(f"cannot read the {BIGBENCH_REQUIREMENT} archive {archive.name} ({e}); "
                        "delete it and try again") from None
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
        raise UserError(f"cannot create the cache folder {root} ({e.strerror}); set REFUSALKIT_CACHE to a writable folder") from None
    wanted = {bb for bb, _ in OFFLINE_SUITE.values()} | {task}
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        archive = _download_sdist(Path(tmp))
        _extract_tasks(archive, wanted, root)
    if not cached.is_file():
        raise UserError(f"BIG-bench {BIGBENCH_VERSION} has no task {task!r} with a task.json of its own "
                        "(a task with subtasks is named like goal_step_wikihow/step_inference)")
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
        sub = " (it lists subtasks: name one, e.g. parent/subtask)" if isinstance(data, dict) and data.get("subtasks") else ""
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
        rows.append({"question": task_prefix + input_prefix + text + output_prefix, "choices": choices,
                     "gold": gold, "id": i})
    if not rows:
        raise UserError(f"{where} has no multiple-choice items with a single correct choice (target_scores)")
    random.Random(seed).shuffle(rows)
    return rows


def _yaml_task(name: str, data_file: Path, cache: Path) -> str:
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
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(_yaml_task(name, data, folder / "hf_datasets_cache"), encoding="utf-8")
    return yaml_path


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
        raise UserError(f"utility evaluation needs lm-evaluation-harness ({e}); "
                        f"run: pip install 'refusalkit[utility]' (or pip install '{LM_EVAL_REQUIREMENT}')") from None
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
        return (f"the Hugging Face Hub ({host}) cannot be reached ({e.strerror or type(e).__name__}) and lm-eval's built-in "
                "tasks download their data from it (set HF_DATASETS_OFFLINE=1 to use a local datasets cache)")


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


def _run_lm_eval(lm: Any, tasks: list[Any], task_manager: Any, limit: int | None, batch_size: int, seed: int,
                 log_samples: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` (zero-shot) on the in-memory model; lm-eval's raw results dict."""
    simple_evaluate, HFLM, _ = _import_lm_eval()
    with _keep_output_head(lm.model):
        hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=hflm, tasks=tasks, task_manager=task_manager, limit=limit, num_fewshot=0,
                          log_samples=log_samples, bootstrap_iters=1000, random_seed=None, numpy_random_seed=None,
                          torch_random_seed=None, fewshot_random_seed=seed)
    if not out:
        raise RuntimeError("lm-eval returned no results")
    return out


def evaluate_utility(lm: Any, tasks: list[str] | None = None, *, limit: int | None = None, batch_size: int = 8,
                     seed: int = 0) -> dict[str, Any]:
    """Zero-shot multiple-choice accuracy of ``lm`` (a :class:`refusalkit.models.LoadedModel`).

    ``tasks``: names for :func:`resolve_tasks`; ``None`` runs :data:`OFFLINE_SUITE` and the
    paper's tasks when the Hugging Face Hub can be reached. ``limit``: at most this many items
    per task (the same items every run for a given ``seed``, which fixes the order of the
    BIG-bench items). Returns::

        {"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "source", "chance"}},
         "mean_acc": unweighted mean of acc over the tasks run (None if none ran),
         "skipped": {name: one-line reason}, "seconds": wall time}

    ``source`` is ``bigbench:<task>`` or ``lm-eval:<task>``; ``acc_norm`` is None for tasks
    without it (boolq, rte, winogrande); ``chance`` is the expected accuracy of uniform guessing
    on the items scored (BIG-bench tasks; None for lm-eval's). A paper task whose data cannot
    be reached is skipped with its reason, whether asked for or not. ``limit`` takes lm-eval's
    first items of a built-in task (data set order). Raises :class:`UserError` for an unknown
    task, a bad setting, a BIG-bench download that fails, or when no task at all could be run.
    """
    t0 = time.time()
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise UserError(f"utility --limit must be a whole number of items of 1 or more, got {limit!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise UserError(f"utility batch size must be 1 or more, got {batch_size!r}")
    specs = resolve_tasks(tasks if tasks is not None else ["offline", "paper"])
    _import_lm_eval()
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="refusalkit-utility-") as tmp:
        folder = Path(tmp)
        local = [t for t in specs if t.kind != "lm-eval"]
        paper = [t for t in specs if t.kind == "lm-eval"]
        chance: dict[str, float] = {}
        for t in local:
            path = Path(t.ref) if t.kind == "file" else bigbench_task_file(t.ref)
            rows = convert_bigbench_task(path, seed=seed)
            write_local_task(t.name, rows, folder)
            scored = rows[:limit] if limit is not None else rows
            chance[t.name] = sum(1.0 / len(r["choices"]) for r in scored) / len(scored)
        _, _, TaskManager = _import_lm_eval()
        run: list[str] = [t.name for t in local]
        task_manager = None
        if paper:
            reason = _hub_unreachable_reason()
            if reason is not None:
                skipped.update({t.name: reason for t in paper})
            else:
                task_manager = TaskManager(include_path=str(folder) if local else None, include_defaults=True)
                for t in paper:
                    try:  # builds the task, which downloads (or reads the cached) data set
                        task_manager.load([t.ref])
                    except Exception as e:  # noqa: BLE001 - any failure to build the task is a reason to skip it
                        skipped[t.name] = f"lm-eval task {t.ref} could not load its data ({_one_line(e)})"
                        continue
                    run.append(t.ref)
        if not run:
            raise UserError("no utility task could be run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        if task_manager is None:
            task_manager = TaskManager(include_path=str(folder), include_defaults=False)
        out = _run_lm_eval(lm, run, task_manager, limit, batch_size, seed)
    results, counts = out.get("results", {}), out.get("n-samples", {})
    by_name = {t.ref if t.kind == "lm-eval" else t.name: t for t in specs}
    table: dict[str, dict[str, Any]] = {}
    for key, t in by_name.items():
        if t.name in skipped or key not in results:
            if t.name not in skipped:
                skipped[t.name] = "lm-eval returned no result for it"
            continue
        r = results[key]
        n = counts.get(key, {}).get("effective")
        table[t.name] = {
            "acc": _metric(r, "acc"), "acc_stderr": _metric(r, "acc_stderr"),
            "acc_norm": _metric(r, "acc_norm"), "acc_norm_stderr": _metric(r, "acc_norm_stderr"),
            "n": int(n) if n is not None else None, "source": t.source, "chance": chance.get(t.name),
        }
    accs = [v["acc"] for v in table.values() if v["acc"] is not None]
    return {"tasks": table, "mean_acc": sum(accs) / len(accs) if accs else None, "skipped": skipped,
            "seconds": round(time.time() - t0, 2)}


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def perplexity_on_corpus(lm: Any, n_tokens: int = 4096, seq_len: int = 512) -> dict[str, Any]:
    """Perplexity (:func:`refusalkit.perplexity.perplexity`) on the first ``n_tokens`` tokens of the
    held-out part of the bundled Wikipedia corpus (every tenth article, never used for
    calibration). Returns its dict plus ``"corpus"``."""
    from ..compress.calibration import corpus_ids
    from ..perplexity import perplexity

    if seq_len < 2:
        raise UserError(f"perplexity sequence length must be 2 or more, got {seq_len}")
    if n_tokens < seq_len:
        raise UserError(f"perplexity needs at least one window: n_tokens ({n_tokens}) < seq_len ({seq_len})")
    ids = corpus_ids(lm.tokenizer, "wikipedia", held_out=True)
    if len(ids) < seq_len:
        raise UserError(f"the held-out Wikipedia text has only {len(ids)} tokens, fewer than seq_len {seq_len}")
    out: dict[str, Any] = dict(perplexity(lm, ids, seq_len=seq_len, max_tokens=n_tokens))
    out["corpus"] = "wikipedia (held-out: every tenth article)"
    return out
