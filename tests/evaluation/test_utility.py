"""Zero-shot utility evaluation (refusalkit.evaluation.utility) through lm-evaluation-harness, the
offline tasks it builds (refusalkit.evaluation.offline_tasks: MMLU's dev questions from lm-eval,
BIG-bench task.json files) and held-out perplexity.

The end-to-end tests run lm-eval on the tiny random Llama with a hand-made BIG-bench-format
task and check its accuracy against choice log-likelihoods computed here by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from refusalkit.core.errors import UserError
from refusalkit.evaluation import offline_tasks as B
from refusalkit.evaluation import utility as U
from refusalkit.evaluation.perplexity import perplexity_on_corpus

pytest.importorskip("lm_eval")

TASK = {
    "name": "tiny_task",
    "task_prefix": "Answer the question.\n",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "append_choices_to_input": False,
    "examples": [
        {"input": "Is the sky blue?", "target_scores": {"Yes": 1, "No": 0}},
        {"input": "What is 2 + 2?", "target_scores": {"three": 0, "four": 1, "five": 0}},
        {"input": "Name a colour.", "target_scores": {"red": 1.0, "bread": 0.0}},
        {"input": "Which is a cat?", "target_scores": {"a dog": 0, "a bird": 0, "a cat": 1, "a fish": 0}},
        {"input": "Do fish swim?", "target_scores": {"No": 0, "Yes": 1}},
        {"input": "Which bakes bread?", "target_scores": {"a poem": 0, "an oven": 1}},
        # dropped: no single correct choice, no target_scores
        {"input": "Ambiguous?", "target_scores": {"Yes": 1, "No": 1}},
        {"input": "Generative only", "target": "text"},
    ],
}


@pytest.fixture()
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_task" / "task.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TASK))
    return path


# ------------------------------------------------------------------------------------------
# Conversion and names
# ------------------------------------------------------------------------------------------


def test_convert_gold_choices_and_prompt(task_file):
    rows = B.convert_bigbench_task(task_file, seed=0)
    assert len(rows) == 6 and sorted(r["id"] for r in rows) == [0, 1, 2, 3, 4, 5]
    by_id = {r["id"]: r for r in rows}
    assert by_id[1]["choices"] == ["three", "four", "five"] and by_id[1]["gold"] == 1
    assert by_id[2]["gold"] == 0 and by_id[3]["gold"] == 2 and by_id[4]["gold"] == 1 and by_id[5]["gold"] == 1
    assert by_id[0]["question"] == "Answer the question.\n\nQ: Is the sky blue?\nA: "
    for r in rows:
        assert (
            r["choices"][r["gold"]] == [c for c, v in TASK["examples"][r["id"]]["target_scores"].items() if v == 1][0]
        )
    # the order is seeded: the same every time for one seed, another for another seed
    assert [r["id"] for r in B.convert_bigbench_task(task_file, seed=0)] == [r["id"] for r in rows]
    orders = {tuple(r["id"] for r in B.convert_bigbench_task(task_file, seed=s)) for s in range(6)}
    assert len(orders) > 1


def test_convert_defaults_and_appended_choices():
    data = {"examples": [{"input": "Pick one.", "target_scores": {"b": 0, "a": 1, "c": 0}}]}
    (row,) = B.convert_bigbench_task(data, seed=3)
    # BIG-bench defaults: "\nQ: " / "\nA: ", choices appended as "\n  choice: X" in a seeded order
    assert row["question"].startswith("\nQ: Pick one.\n  choice: ") and row["question"].endswith("\nA: ")
    assert sorted(row["question"].split("\n  choice: ")[1:])[:2] == ["a", "b"]
    assert row["choices"] == ["b", "a", "c"] and row["gold"] == 1


def test_convert_rejects_subtask_folders_and_junk(tmp_path):
    with pytest.raises(UserError, match="subtask"):
        B.convert_bigbench_task({"name": "x", "subtasks": ["a", "b"]})
    with pytest.raises(UserError, match="single correct"):
        B.convert_bigbench_task({"examples": [{"input": "q", "target_scores": {"a": 0, "b": 0}}]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        B.convert_bigbench_task(bad)


def test_local_yaml_task(tmp_path, task_file):
    import yaml

    path = B.write_local_task("bb_tiny", B.convert_bigbench_task(task_file), tmp_path)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["task"] == "bb_tiny" and cfg["dataset_path"] == "json" and cfg["output_type"] == "multiple_choice"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "bb_tiny.jsonl")
    assert (cfg["doc_to_text"], cfg["doc_to_choice"], cfg["doc_to_target"]) == ("question", "choices", "gold")
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]
    lines = (tmp_path / "bb_tiny.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) >= {"question", "choices", "gold"}


def test_resolve_tasks(task_file):
    assert [t.name for t in U.resolve_tasks(["offline"])] == list(U.OFFLINE_SUITE)
    assert [t.name for t in U.resolve_tasks(["paper", "boolq"])] == list(U.PAPER_TASKS)
    t = U.resolve_tasks(["mmlu_dev_cloze"])[0]
    assert (t.kind, t.ref, t.source) == ("offline", "mmlu_dev_cloze", "offline:mmlu_dev_cloze")
    f = U.resolve_tasks([str(task_file)])[0]
    assert f.name == "bb_tiny_task" and f.kind == "file"
    with pytest.raises(UserError) as e:
        U.resolve_tasks(["bb_nonsense"])
    assert "mmlu_dev" in str(e.value) and "boolq" in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        U.resolve_tasks(["/no/such/task.json"])


def test_lm_eval_missing_is_a_user_error(monkeypatch, llama_lm, task_file):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match="pip install"):
        U.evaluate_utility(llama_lm, [str(task_file)])


def test_bad_settings(llama_lm, task_file):
    with pytest.raises(UserError, match="limit"):
        U.evaluate_utility(llama_lm, [str(task_file)], limit=0)
    with pytest.raises(UserError, match="batch size"):
        U.evaluate_utility(llama_lm, [str(task_file)], batch_size=0)


# ------------------------------------------------------------------------------------------
# The offline suite: MMLU's dev questions from the installed lm-eval
# ------------------------------------------------------------------------------------------


def test_parse_mmlu_sample():
    q = "Which is a mammal?\n(A) a trout (B) a whale (C) a shark (D) a squid"
    assert B._parse_mmlu_sample(q, "Whales breathe air. The answer is (B).") == (
        "Which is a mammal?",
        ["a trout", "a whale", "a shark", "a squid"],
        1,
    )
    # the last "answer is (X)" decides; a stem over several lines is kept whole
    q2 = "Line one.\nLine two?\n(A) yes (B) no"
    assert B._parse_mmlu_sample(q2, "Not the answer is (A) here. The answer is (B).") == (
        "Line one.\nLine two?",
        ["yes", "no"],
        1,
    )
    assert B._parse_mmlu_sample("No options here", "The answer is (A).") is None
    assert B._parse_mmlu_sample(q, "no stated answer") is None
    assert B._parse_mmlu_sample(q, "The answer is (E).") is None  # not one of the listed letters
    assert B._parse_mmlu_sample("Q?\n(A) x (C) y", "The answer is (A).") is None  # letters out of order


def test_mmlu_dev_items_from_the_installed_lm_eval():
    items = B.mmlu_dev_items()
    assert len(items) == 282 and len({it["id"] for it in items}) == 282
    assert len({it["subject"] for it in items}) == 57
    assert sorted(len(it["choices"]) for it in items) == [4] * 281 + [5]
    assert all(0 <= it["gold"] < len(it["choices"]) and all(it["choices"]) for it in items)
    golds = [it["gold"] for it in items]
    assert all(golds.count(g) > 50 for g in range(4))  # the answers are spread over the letters
    by_id = {it["id"]: it for it in items}
    first = by_id["anatomy/0"]
    assert first["question"] == "Which of the following is the body cavity that contains the pituitary gland?"
    assert first["choices"] == ["Abdominal", "Cranial", "Pleural", "Spinal"] and first["gold"] == 1
    assert first["header"] == "The following are multiple choice questions (with answers) about anatomy."


def test_mmlu_rows_in_both_formats():
    item = {"id": "anatomy/0", "header": "H.", "question": "Q?", "choices": ["x", "y", "z"], "gold": 2}
    (letters,) = B.mmlu_rows([item], "letters")
    assert letters == {
        "question": "H.\n\nQ?\nA. x\nB. y\nC. z\nAnswer:",
        "choices": [" A", " B", " C"],
        "gold": 2,
        "id": "anatomy/0",
    }
    (cloze,) = B.mmlu_rows([item], "cloze")
    assert cloze["question"] == "H.\n\nQuestion: Q?\nAnswer:" and cloze["choices"] == [" x", " y", " z"]
    rows = B.offline_task_rows("mmlu_dev", seed=0)
    assert len(rows) == 282 and [r["id"] for r in rows] == [r["id"] for r in B.offline_task_rows("mmlu_dev", seed=0)]
    assert [r["id"] for r in rows] != [r["id"] for r in B.offline_task_rows("mmlu_dev", seed=1)]
    assert [r["id"] for r in rows] == [r["id"] for r in B.offline_task_rows("mmlu_dev_cloze", seed=0)]
    with pytest.raises(ValueError):
        B.mmlu_rows([item], "essay")


def test_retired_bigbench_names_say_what_to_use():
    with pytest.raises(UserError, match="no longer serves the bigbench package.*mmlu_dev"):
        U.resolve_tasks(["bb_social_iqa"])


# ------------------------------------------------------------------------------------------
# lm-eval end to end on the tiny model
# ------------------------------------------------------------------------------------------


@torch.inference_mode()
def _choice_logprob(lm, question: str, choice: str) -> float:
    """Summed log-probability of ``choice`` after ``question`` (trailing spaces of the question
    belong to the choice; the choice's tokens are those of the whole text after the question's)."""
    ctx = question.rstrip()
    cont = question[len(ctx) :] + choice
    ctx_ids = lm.tokenizer(ctx)["input_ids"]
    whole = lm.tokenizer(ctx + cont)["input_ids"]
    cont_ids = whole[len(ctx_ids) :]
    ids = torch.tensor([ctx_ids + cont_ids])
    logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
    n = len(cont_ids)
    positions = range(len(ctx_ids) - 1, len(ctx_ids) - 1 + n)
    return float(sum(logp[p, t] for p, t in zip(positions, cont_ids)))


def _manual(lm, rows):
    acc, acc_norm, lls = [], [], []
    for r in rows:
        ll = [_choice_logprob(lm, r["question"], c) for c in r["choices"]]
        norm = [x / len(c.encode()) for x, c in zip(ll, r["choices"])]
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == r["gold"]))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == r["gold"]))
        lls.append(ll)
    return sum(acc) / len(acc), sum(acc_norm) / len(acc_norm), lls


@pytest.fixture(scope="module")
def rk_tiny(one_thread, tokenizer):
    """A tiny Llama whose output differs enough between choices (scaled-up logits)."""
    from refusalkit.models.loading import LoadedModel

    from conftest import make_llama

    model = make_llama(tokenizer, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return LoadedModel(model=model, tokenizer=tokenizer, spec="tiny", source="memory")


def test_end_to_end_matches_manual_loglikelihoods(rk_tiny, task_file, one_thread):
    lm = rk_tiny
    with one_thread():
        t0 = time.time()
        res = U.evaluate_utility(lm, [str(task_file)], batch_size=4, seed=0)
        took = time.time() - t0
        rows = B.convert_bigbench_task(task_file, seed=0)
        acc, acc_norm, lls = _manual(lm, rows)
        # per-item, per-choice log-likelihoods as lm-eval computed them
        with __import__("tempfile").TemporaryDirectory() as tmp:
            B.write_local_task("bb_tiny_task", rows, Path(tmp))
            from lm_eval.tasks import TaskManager

            raw = U._run_lm_eval(
                lm,
                ["bb_tiny_task"],
                TaskManager(include_path=tmp, include_defaults=False),
                None,
                3,
                0,
                log_samples=True,
            )
    r = res["tasks"]["bb_tiny_task"]
    assert r["n"] == 6 and r["source"].startswith("bigbench:") and res["skipped"] == {}
    assert r["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1 / 4 + 1 / 2 + 1 / 2) / 6)
    for k in ("acc", "acc_norm"):
        assert 0.0 <= r[k] <= 1.0
    assert r["acc_stderr"] > 0 and r["acc_norm_stderr"] > 0
    assert r["acc"] == pytest.approx(acc) and r["acc_norm"] == pytest.approx(acc_norm)
    assert 0 < acc < 1 or 0 < acc_norm < 1  # the check can tell right from wrong answers
    assert res["mean_acc"] == pytest.approx(r["acc"]) and res["seconds"] < 60 and took < 60
    samples = raw["samples"]["bb_tiny_task"]
    assert len(samples) == 6
    by_q = {rw["question"]: ll for rw, ll in zip(rows, lls)}
    for s in samples:
        got = [float(x[0]) for x in s["filtered_resps"]]
        assert got == pytest.approx(by_q[s["doc"]["question"]], abs=1e-4)
        # the log-likelihoods differ enough that argmax is not decided by float noise
        srt = sorted(got)
        assert srt[-1] - srt[-2] > 1e-3


def test_limit_takes_the_first_items_of_the_seeded_order(rk_tiny, task_file, one_thread):
    with one_thread():
        res = U.evaluate_utility(rk_tiny, [str(task_file)], limit=4, batch_size=8, seed=1)
        rows = B.convert_bigbench_task(task_file, seed=1)[:4]
        acc, _, _ = _manual(rk_tiny, rows)
    r = res["tasks"]["bb_tiny_task"]
    assert r["n"] == 4 and r["acc"] == pytest.approx(acc)


def test_output_head_is_never_retied(tokenizer, task_file, one_thread):
    from refusalkit.models.loading import LoadedModel

    from conftest import make_llama

    model = make_llama(tokenizer, seed=2)
    model.config.tie_word_embeddings = True  # an untied head under a config that says tied
    head = model.lm_head.weight
    with one_thread():
        U.evaluate_utility(LoadedModel(model, tokenizer, "tiny", "memory"), [str(task_file)], limit=1)
    assert model.lm_head.weight is head and model.lm_head.weight is not model.get_input_embeddings().weight


def test_paper_tasks_skipped_fast_when_the_hub_is_unreachable(llama_lm, task_file, monkeypatch, one_thread):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with one_thread():
        t0 = time.time()
        res = U.evaluate_utility(llama_lm, ["arc_easy", str(task_file)], limit=2)
    assert time.time() - t0 < 30
    assert set(res["tasks"]) == {"bb_tiny_task"} and "cannot be reached" in res["skipped"]["arc_easy"]
    assert "\n" not in res["skipped"]["arc_easy"]
    with pytest.raises(UserError, match="no utility task could be run: boolq: "):
        U.evaluate_utility(llama_lm, ["boolq"])


def test_paper_tasks_fail_fast_offline(llama_lm, task_file, monkeypatch, one_thread):
    """With HF_DATASETS_OFFLINE set the built-in task is tried and fails at once (no cache)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(task_file.parent / "empty_hf_cache"))
    with one_thread():
        t0 = time.time()
        res = U.evaluate_utility(llama_lm, ["arc_easy", str(task_file)], limit=2)
    assert time.time() - t0 < 60
    assert "bb_tiny_task" in res["tasks"]
    reason = res["skipped"]["arc_easy"]
    assert "arc_easy" in reason and "\n" not in reason


def test_paper_task_path_with_stand_in_builtin_tasks(llama_lm, task_file, tmp_path, monkeypatch, one_thread):
    """The paper-task branch, with two stand-ins for lm-eval's built-in tasks: one whose data
    loads (it is run and reported as lm-eval:<task>), one whose data is missing (skipped)."""
    extra = tmp_path / "builtin"
    B.write_local_task("fake_paper", B.convert_bigbench_task(task_file), extra)
    broken = B.write_local_task("fake_broken", B.convert_bigbench_task(task_file), extra)
    (extra / "fake_broken.jsonl").unlink()
    assert broken.is_file()
    real = U._import_lm_eval

    def patched():
        simple_evaluate, hflm, task_manager_cls = real()

        class WithStandIns(task_manager_cls):
            def __init__(self, include_path=None, include_defaults=True, **kw):
                paths = [p for p in (include_path, str(extra)) if p]
                super().__init__(include_path=paths, include_defaults=False, **kw)

        return simple_evaluate, hflm, WithStandIns

    monkeypatch.setattr(U, "_import_lm_eval", patched)
    monkeypatch.setattr(U, "PAPER_TASKS", ("fake_paper", "fake_broken"))
    monkeypatch.setattr(U, "_hub_unreachable_reason", lambda: None)
    with one_thread():
        res = U.evaluate_utility(llama_lm, ["paper", str(task_file)], limit=3)
    assert set(res["tasks"]) == {"fake_paper", "bb_tiny_task"}
    assert res["tasks"]["fake_paper"]["source"] == "lm-eval:fake_paper" and res["tasks"]["fake_paper"]["n"] == 3
    assert res["tasks"]["fake_paper"]["acc"] == pytest.approx(res["tasks"]["bb_tiny_task"]["acc"])
    assert list(res["skipped"]) == ["fake_broken"] and "could not load its data" in res["skipped"]["fake_broken"]


def test_perplexity_on_corpus(llama_lm, one_thread):
    with one_thread():
        out = perplexity_on_corpus(llama_lm, n_tokens=256, seq_len=64)
    assert out["corpus"].startswith("wikipedia") and out["n_windows"] == 4 and out["perplexity"] > 1
    with pytest.raises(UserError, match="n_tokens"):
        perplexity_on_corpus(llama_lm, n_tokens=10, seq_len=64)


# ------------------------------------------------------------------------------------------
# The offline suite on SmolLM2 and on the tiny model
# ------------------------------------------------------------------------------------------


def test_offline_suite_through_lm_eval_matches_manual_loglikelihoods(rk_tiny, one_thread):
    with one_thread():
        res = U.evaluate_utility(rk_tiny, ["offline"], limit=4, batch_size=8, seed=3)
        for name in B.OFFLINE_SUITE:
            acc, acc_norm, _ = _manual(rk_tiny, B.offline_task_rows(name, seed=3)[:4])
            r = res["tasks"][name]
            assert r["n"] == 4 and r["source"] == f"offline:{name}" and r["chance"] == pytest.approx(0.25)
            assert r["acc"] == pytest.approx(acc) and r["acc_norm"] == pytest.approx(acc_norm)


@pytest.mark.integration
def test_smollm2_offline_suite():
    from refusalkit.models.loading import load_model

    lm = load_model("smollm2-135m")
    res = U.evaluate_utility(lm, ["offline"], limit=20, batch_size=8)
    assert set(res["tasks"]) == set(B.OFFLINE_SUITE) and res["skipped"] == {}
    for name, r in res["tasks"].items():
        assert r["n"] == 20 and r["source"] == f"offline:{name}"
        assert 0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] > 0
