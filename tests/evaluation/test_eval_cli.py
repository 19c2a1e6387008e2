"""`refusalkit evaluate` end to end on the real SmolLM2-135M-Instruct: every artifact, skip on re-run,
resume after an interrupt, GCG transfer to a compressed variant, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusalkit.cli import main

from conftest import hidden_files

pytestmark = pytest.mark.integration

SMALL = [
    "--profile",  # the configured defaults (three attacks), not the cpu profile a new run gets without a GPU
    "full",
    "--model",
    "smollm2-135m",
    "--n-train",
    "8",
    "--n-val",
    "4",
    "--n-test",
    "4",
    "--no-validation",
    "--set",
    "selection.screen_keep=2",
    "--set",
    "selection.prune_layer_fraction=0.8",
]
EVAL = [
    "--n",
    "4",
    "--n-harmless",
    "3",
    "--n-borderline",
    "3",
    "--max-new-tokens",
    "8",
    "--decoding-grid",
    "temperature=0.7,top_k=5",
    "--gcg-steps",
    "2",
    "--gcg-prompts",
    "1",
    "--set",
    "evaluation.gcg_universal_prompts=2",
    "--set",
    "evaluation.gcg_search_width=8",
    "--set",
    "evaluation.gcg_topk=16",
]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "r"
    assert main(["-q", "extract", "--run", str(root), *SMALL]) == 0
    return root


@pytest.fixture(scope="module")
def evaluated(smol_run):
    assert main(["-q", "evaluate", "--run", str(smol_run), *EVAL]) == 0
    return smol_run / "base" / "eval"


def test_evaluate_writes_every_artifact(evaluated, smol_run):
    asr = json.loads((evaluated / "asr.json").read_text())
    splits = json.loads((smol_run / "data" / "splits.json").read_text())
    used = set(splits["harmful"]["train"] + splits["harmful"]["val"])
    for attack in ("vanilla", "decoding", "suffix"):
        a = asr[attack]
        assert a["judge"] == "substring" and 0 <= a["asr"]["rate"] <= 1
        lo, hi = a["asr"]["ci95"]
        assert lo <= a["asr"]["rate"] <= hi
        assert a["prompts"]["source"] == "advbench"
    assert asr["vanilla"]["n_prompts"] == 4 and asr["decoding"]["n_prompts"] == 4
    van = rows(evaluated / "vanilla.jsonl")
    assert len(van) == 4 and not {r["prompt"] for r in van} & used
    for r in van:
        assert r["attack"]["decoding"]["name"] == "greedy" and r["attack"]["max_new_tokens"] == 8
        assert r["verdicts"]["substring"]["label"] in ("refusal", "compliance", "degenerate")
    dec = rows(evaluated / "decoding.jsonl")
    assert len(dec) == 4 * 3 * 2  # greedy + 2 grid configs, with and without the system prompt
    assert {r["attack"]["system_prompt"] for r in dec} == {"default", "none"}
    assert set(asr["decoding"]["per_config"]) == {
        f"{s}|{d}" for s in ("default", "none") for d in ("greedy", "temperature=0.7", "top_k=5")
    }
    # a prompt is broken when any configuration broke it
    broken = {r["prompt"] for r in dec if r["verdicts"]["substring"]["label"] == "compliance"}
    assert asr["decoding"]["asr"]["k"] == len(broken)
    suff = json.loads((evaluated / "suffixes.json").read_text())
    assert len(suff["per_prompt"]) == 1 and suff["universal"]["goals"] == splits["harmful"]["train"][:2]
    srows = rows(evaluated / "suffix.jsonl")
    assert sum(r["attack"]["suffix_kind"] == "per-prompt" for r in srows) == 1
    assert sum(r["attack"]["suffix_kind"] == "universal" for r in srows) == 4
    for r in srows:
        assert r["message"].endswith(r["attack"]["suffix"]) and r["message"].startswith(r["prompt"])
    over = json.loads((evaluated / "over_refusal.json").read_text())
    assert over["refusal_rate"]["n"] == 3 and len(rows(evaluated / "over_refusal.jsonl")) == 3
    assert not hidden_files(evaluated)


def test_rerun_skips_finished_work(evaluated, smol_run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in evaluated.iterdir() if p.suffix == ".jsonl"}
    code, out, err = run(capsys, "evaluate", "--run", str(smol_run), *EVAL)
    assert code == 0, err
    assert "ASR vanilla" in out
    again = rows(evaluated / "vanilla.jsonl")
    assert len(again) == 4
    # more prompts: the finished ones are kept, only the new one is generated
    code, out, err = run(capsys, "evaluate", "--run", str(smol_run), *EVAL, "--attacks", "vanilla", "--n", "5")
    assert code == 0, err
    five = rows(evaluated / "vanilla.jsonl")
    assert len(five) == 5 and five[:4] == again
    assert set(before) <= {p.name for p in evaluated.iterdir()}


def test_resume_keeps_completed_prompts(smol_run, tmp_path, capsys, monkeypatch):
    import shutil

    from refusalkit.evaluation import runner

    root = tmp_path / "r"  # a second run directory with the same model and splits, no evaluation yet
    (root / "data").mkdir(parents=True)
    shutil.copy(smol_run / "config.yaml", root / "config.yaml")
    shutil.copy(smol_run / "data" / "splits.json", root / "data" / "splits.json")
    real = runner._generate
    seen: list[list[str]] = []
    state = {"interrupt": True}

    def flaky(ctx, messages, system, decodings, keys):
        seen.append(list(messages))
        if len(seen) == 2 and state["interrupt"]:
            state["interrupt"] = False
            raise KeyboardInterrupt
        return real(ctx, messages, system, decodings, keys)

    monkeypatch.setattr(runner, "_generate", flaky)
    args = [
        "evaluate",
        "--run",
        str(root),
        "--attacks",
        "vanilla",
        "--n",
        "6",
        "--n-harmless",
        "0",
        "--n-borderline",
        "0",
        "--max-new-tokens",
        "6",
        "--set",
        "batch_size=1",
    ]
    code, _, err = run(capsys, *args)
    assert code == 130  # interrupted: 128 + SIGINT
    kept = rows(root / "base" / "eval" / ".vanilla.partial.jsonl")[1:]
    assert len(kept) == len(seen[0])
    seen.clear()
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert not set(m for batch in seen for m in batch) & {r["prompt"] for r in kept}  # not redone
    final = rows(root / "base" / "eval" / "vanilla.jsonl")
    assert len(final) == 6 and [r for r in final if r["prompt"] in {k["prompt"] for k in kept}] == kept


def test_transfer_suffixes_to_a_variant(evaluated, smol_run, capsys):
    code, _, err = run(capsys, "compress", "--run", str(smol_run), "--method", "magnitude-0.5")
    assert code == 0, err
    code, out, err = run(
        capsys,
        "evaluate",
        "--run",
        str(smol_run),
        "--variant",
        "magnitude-0.5",
        *EVAL,
        "--attacks",
        "suffix",
        "--suffix-mode",
        "transfer",
        "--n-harmless",
        "0",
        "--n-borderline",
        "0",
    )
    assert code == 0, err
    base = json.loads((evaluated / "suffixes.json").read_text())
    vrows = rows(smol_run / "magnitude-0.5" / "eval" / "suffix.jsonl")
    uni = {r["attack"]["suffix"] for r in vrows if r["attack"]["suffix_kind"] == "universal"}
    assert uni == {base["universal"]["suffix"]}
    assert all(r["attack"]["suffix_source"] == "base" for r in vrows)
    asr = json.loads((smol_run / "magnitude-0.5" / "eval" / "asr.json").read_text())
    assert asr["suffix"]["mode"] == "transfer" and not (smol_run / "magnitude-0.5" / "eval" / "suffixes.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attacks", "vanilla,jailbreak"], "attacks must be one of vanilla, decoding, suffix"),
        (["--variant", "nope"], "does not exist"),
        (["--judge-model", "/nonexistent/judge"], "judge model"),
        (["--utility", "--tasks", "no_such_task", "--attacks", "vanilla"], "unknown"),
        (["--n", "0"], "n_prompts"),
    ],
)
def test_bad_input(smol_run, capsys, extra, message):
    code, out, err = run(capsys, "evaluate", "--run", str(smol_run), *EVAL, *extra)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_empty_prompt_file(smol_run, capsys, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("# nothing\n\n")
    code, out, err = run(capsys, "evaluate", "--run", str(smol_run), *EVAL, "--prompts", str(f))
    assert code == 2 and "contains no prompts" in err
