"""The offline utility tasks: multiple-choice items that installed packages ship, turned into
local lm-evaluation-harness tasks.

**The offline suite** reads MMLU's dev questions (Hendrycks et al. 2021, MIT), which lm-eval
keeps in its own task files as the few-shot examples of ``mmlu_flan_cot_fewshot``: 282 questions,
about five from each of MMLU's 57 subjects (281 with four choices, one with five), each with one
correct answer. They come from the installed ``lm-eval`` package, checked against the pinned
sha256 (:mod:`refusalkit.core.external`, artifact ``mmlu-dev``), so the suite needs nothing but
the ``utility`` extra and the same items are scored on every machine. They are scored two ways:

* ``mmlu_dev``: MMLU's own zero-shot format, as lm-eval's ``mmlu`` task writes it: the subject's
  header, the question, the choices as ``A. …`` lines and ``Answer:``; the choices scored are the
  letters ``" A"``, ``" B"``, … (a model must read the listed choices);
* ``mmlu_dev_cloze``: the continuation format of lm-eval's ``mmlu_continuation``: the header,
  ``Question: …`` and ``Answer:``, the choices scored are the answer texts themselves (a small
  model that cannot yet map letters to answers still shows what it knows; ``acc_norm`` divides by
  the answer's length).

PyPI no longer serves the BIG-bench package that held the task files of refusalkit's earlier
offline suite (``bigbench`` 1.0.0; only a 0.0.1 placeholder is left), so no BIG-bench task is
fetched. A BIG-bench ``task.json`` that the user has (a clone of the BIG-bench repository) is
still read: :func:`convert_bigbench_task`.

Any task becomes a JSONL file (``question``, ``choices``, ``gold``) and a local lm-eval YAML task
(``output_type: multiple_choice``, metrics ``acc`` and ``acc_norm``) in a folder
(:func:`write_local_task`). Each choice is scored as the text that follows the prompt
(``target_delimiter: ""``; lm-eval moves trailing spaces of the prompt onto the choice). The
items are shuffled once with ``seed``, so ``limit=N`` scores the same N items on every run.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from pathlib import Path
from typing import Any

from refusalkit.core.errors import UserError
from refusalkit.core.external import artifact_files

# The offline suite: lm-eval task name -> (how the items are shown, what it stands in for).
OFFLINE_SUITE: dict[str, tuple[str, str]] = {
    "mmlu_dev": ("letters", "MMLU (zero-shot, lm-eval's mmlu format) on its 282 dev questions"),
    "mmlu_dev_cloze": ("cloze", "MMLU (zero-shot, lm-eval's mmlu_continuation format) on its 282 dev questions"),
}
# Names of the BIG-bench tasks of refusalkit 0.7 and earlier, for a clear error on old configurations.
RETIRED_BIGBENCH = (
    "bb_strategyqa",
    "bb_epistemic_reasoning",
    "bb_goal_step_wikihow_step_inference",
    "bb_winowhy",
    "bb_social_iqa",
    "bb_sports_understanding",
)


# --------------------------------------------------------------------------------------------
# MMLU's dev questions, from lm-eval's task files
# --------------------------------------------------------------------------------------------


@functools.cache
def _task_yaml_loader() -> Any:
    """A yaml SafeLoader that reads lm-eval's ``!function`` tags as None."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return Loader


_OPTION = re.compile(r"\s*\(([A-J])\)\s")
_ANSWER = re.compile(r"answer is \(([A-J])\)")


def _parse_mmlu_sample(question: str, target: str) -> tuple[str, list[str], int] | None:
    """(stem, choices, gold index) of one flan-CoT sample ``Q\n(A) a (B) b ...`` whose target ends
    in ``The answer is (X)``; None if it does not have that shape."""
    cut = question.find("\n(A) ")
    answers = _ANSWER.findall(target)
    if cut < 0 or not answers:
        return None
    parts = _OPTION.split(" " + question[cut + 1 :])
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if letters != [chr(ord("A") + i) for i in range(len(letters))] or len(letters) < 2 or not all(texts):
        return None
    if answers[-1] not in letters:
        return None
    return question[:cut].strip(), texts, letters.index(answers[-1])


def mmlu_dev_items() -> list[dict[str, Any]]:
    """MMLU's dev questions from the installed lm-eval: ``{"id": "<subject>/<k>", "subject",
    "header", "question", "choices", "gold"}`` in file order (282 in lm-eval 0.4.13). Raises
    :class:`UserError` when lm-eval is missing or its files differ from the pinned version."""
    import yaml

    items: list[dict[str, Any]] = []
    for path in artifact_files("mmlu-dev"):
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_task_yaml_loader())
            subject = str(data["dataset_name"])
            header = str(data["description"]).strip()
            samples = data["fewshot_config"]["samples"]
        except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as e:
            raise UserError(f"cannot read MMLU items from {path} ({e}); reinstall lm-eval==0.4.13") from None
        for k, sample in enumerate(samples):
            parsed = _parse_mmlu_sample(str(sample.get("question", "")), str(sample.get("target", "")))
            if parsed is not None:
                stem, choices, gold = parsed
                items.append(
                    {
                        "id": f"{subject}/{k}",
                        "subject": subject,
                        "header": header,
                        "question": stem,
                        "choices": choices,
                        "gold": gold,
                    }
                )
    return items


def mmlu_rows(items: list[dict[str, Any]], form: str, seed: int = 0) -> list[dict[str, Any]]:
    """The local-task rows (``question`` = the prompt, ``choices``, ``gold``, ``id``) of MMLU items
    in ``form`` ``letters`` or ``cloze`` (see the module docstring), shuffled once with ``seed``."""
    rows = []
    for it in items:
        if form == "letters":
            letters = [chr(ord("A") + i) for i in range(len(it["choices"]))]
            listed = "".join(f"\n{ch}. {text}" for ch, text in zip(letters, it["choices"]))
            prompt = f"{it['header']}\n\n{it['question']}{listed}\nAnswer:"
            choices = [f" {ch}" for ch in letters]
        elif form == "cloze":
            prompt = f"{it['header']}\n\nQuestion: {it['question']}\nAnswer:"
            choices = [f" {text}" for text in it["choices"]]
        else:
            raise ValueError(f"unknown MMLU form {form!r}")
        rows.append({"question": prompt, "choices": choices, "gold": it["gold"], "id": it["id"]})
    random.Random(seed).shuffle(rows)
    return rows


def offline_task_rows(name: str, seed: int = 0) -> list[dict[str, Any]]:
    """The rows of an offline-suite task (a name in :data:`OFFLINE_SUITE`)."""
    return mmlu_rows(mmlu_dev_items(), OFFLINE_SUITE[name][0], seed=seed)


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
