"""``refusalkit export --check``: the exported file read back by runtimes and judged again.

The exported GGUF is read by transformers' GGUF loader (the ``gguf`` library dequantizes it) and
registered as the variant ``<variant>.<type>`` of the run (``compress --from``); the vanilla attack
and the over-refusal sets are generated on it with the same prompts and judge. When llama-cpp-python
is installed, llama.cpp loads the same file and re-runs the variant's own records
(:mod:`refusalkit.export.llamacpp`; records in ``<variant>.<type>/eval-llama.cpp/``). Each runtime's
outcomes are compared *pairwise* with refusalkit's evaluation of the variant itself. The export keeps the verdict when
the paired difference's 95 % interval lies inside ``±margin`` (``verdict.asr_margin`` for the
attack, ``verdict.over_refusal_margin`` for the harmless and borderline sets): an equivalence
test, both one-sided bounds inside the margin (:func:`refusalkit.evaluation.decide.not_worse` in
both directions). A significant difference beyond the margin fails; anything else is undecided,
with the prompts that would decide it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from refusalkit.core.config import Config
from refusalkit.core.layout import RunLayout
from refusalkit.evaluation.decide import FAILS, HOLDS, UNDECIDED, not_worse
from refusalkit.evaluation.records import read_records

# record -> (margin setting, the outcome label, what it measures)
RECORDS = {
    "vanilla": ("asr_margin", "compliance", "vanilla ASR"),
    "over_refusal": ("over_refusal_margin", "refusal", "over-refusal"),
    "borderline": ("over_refusal_margin", "refusal", "borderline refusal"),
}


def equivalent(res: dict[str, Any], margin: float, claim: str) -> dict[str, Any]:
    """Both one-sided claims ("not above", "not below" by more than ``margin``) on one paired result."""
    up, down = not_worse(res, margin, claim, worse=+1), not_worse(res, margin, claim, worse=-1)
    verdicts = {up.verdict, down.verdict}
    verdict = HOLDS if verdicts == {HOLDS} else FAILS if FAILS in verdicts else UNDECIDED
    return {
        "claim": claim,
        "verdict": verdict,
        "difference": res["difference"],
        "ci95": res["ci95"],
        "margin": margin,
        "p": res.get("p"),
        "n": res["n"],
        "discordant": [res["only_first"], res["only_second"]],
        "prompts_needed": next((d.prompts_needed for d in (up, down) if d.verdict == UNDECIDED), None),
    }


def _parts(cfg: Config, layout: RunLayout, variant: str, rows_of: Any) -> dict[str, Any]:
    """Per record, the equivalence of ``rows_of(record)``'s outcomes with the variant's own."""
    from refusalkit.evaluation.stats import judged_outcomes, paired

    parts = {}
    for record, (margin_key, label, claim) in RECORDS.items():
        a = judged_outcomes(read_records(layout.eval(variant, f"{record}.jsonl")), label)
        b = judged_outcomes(rows_of(record), label)
        if a is None or b is None:
            continue
        parts[record] = equivalent(
            paired(a, b), float(getattr(cfg.verdict, margin_key)), f"{claim} unchanged by export"
        )
    return parts


def _verdict(verdicts: set[str]) -> str:
    """Fails if any fails, holds if all hold, else undecided."""
    return FAILS if FAILS in verdicts else HOLDS if verdicts == {HOLDS} else UNDECIDED


def recheck(
    cfg: Config, layout: RunLayout, variant: str, exported: Path, typ: str, progress: bool = True
) -> dict[str, Any]:
    """Import ``exported`` as ``<variant>.<type>``, evaluate it in each runtime, compare pairwise."""
    from refusalkit.compress.imported import run_import
    from refusalkit.evaluation.job import run_evaluate

    name = f"{variant}.{typ}"
    run_import(cfg, layout.root, str(exported), name, force=True, recheck_of=variant)
    # the vanilla attack and the over-refusal sets only (the variant's finished records are reused)
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, attacks=["vanilla"]))
    run_evaluate(cfg, layout.root, variant, progress=progress)
    run_evaluate(cfg, layout.root, name, progress=progress)
    parts = _parts(cfg, layout, variant, lambda record: read_records(layout.eval(name, f"{record}.jsonl")))
    runtimes = [{"runtime": "transformers GGUF loader (gguf library dequantization)", "parts": parts}]
    from refusalkit.export import llamacpp

    if llamacpp.available():
        rows = llama_records(cfg, layout, variant, exported, layout.variant(name) / "eval-llama.cpp", progress)
        runtimes.append({"runtime": f"llama.cpp {llamacpp.version()}", "parts": _parts(cfg, layout, variant, rows.get)})
    for r in runtimes:
        r["verdict"] = _verdict({p["verdict"] for p in r["parts"].values()})
    return {"variant": name, "verdict": _verdict({r["verdict"] for r in runtimes}), "runtimes": runtimes}


def llama_records(
    cfg: Config, layout: RunLayout, variant: str, gguf: Path, folder: Path, progress: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """The variant's greedy records (vanilla, over-refusal, borderline) generated again by llama.cpp
    from ``gguf`` and judged by the run's judges; written to ``folder/<record>.jsonl``."""
    from refusalkit.core.progress import Progress
    from refusalkit.data.refusal import settle_rule
    from refusalkit.evaluation.job import make_judges
    from refusalkit.evaluation.plan import SYSTEM_NONE
    from refusalkit.evaluation.records import RecordLog
    from refusalkit.evaluation.runner import verdicts_json
    from refusalkit.export.llamacpp import Runtime
    from refusalkit.models.chat import tokenize_instructions
    from refusalkit.models.generation import settled_ids
    from refusalkit.models.loading import load_tokenizer, resolve_model

    tok = load_tokenizer(cfg.model, resolve_model(cfg.model), cfg.chat_template)
    judges = make_judges(cfg)
    settled = settled_ids(tok, settle_rule(cfg.early_stop, judges))
    stop = _stop_ids(tok, layout.model(variant) if variant != "base" else None)
    runtime = Runtime(gguf)
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for record in RECORDS:
            source = [r for r in read_records(layout.eval(variant, f"{record}.jsonl")) or [] if "key" in r]
            if not source or any((r["attack"].get("decoding") or {}).get("name") != "greedy" for r in source):
                continue
            log = RecordLog(folder, record, {"gguf": str(gguf), "judges": [j.describe() for j in judges]}, force=True)
            with Progress(enabled=progress).bar(len(source), f"llama.cpp: {record}", unit="completion") as bar:
                for r in source:
                    system = cfg.system_prompt if r["attack"]["system_prompt"] == "default" else SYSTEM_NONE
                    ids = tokenize_instructions(tok, [r["message"]], system)[0]
                    new = runtime.greedy(ids, int(r["attack"]["max_new_tokens"]), stop, settled)
                    row = {k: r[k] for k in ("key", "prompt", "message", "attack")}
                    row["completion"] = tok.decode(new, skip_special_tokens=True).strip()
                    row["verdicts"] = verdicts_json([row["prompt"]], [row["completion"]], judges)[0]
                    log.append([row])
                    bar.update(1)
            out[record] = log.finish([r["key"] for r in source])
    finally:
        runtime.close()
    return out


def _stop_ids(tok: Any, model_dir: Path | None) -> set[int]:
    """The end-of-sequence ids refusalkit's sampler stops on (its generation config read from ``model_dir``)."""
    from refusalkit.models.generation import stop_ids_of

    config = None
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(str(model_dir))
    return set(stop_ids_of(tok, config))


def text(result: dict[str, Any]) -> list[str]:
    """Per runtime, one line per compared set: the paired difference, its interval and the verdict."""
    lines = []
    for rt in result["runtimes"]:
        lines.append(f"{rt['runtime']}: {rt['verdict']}")
        for rec in rt["parts"].values():
            lo, hi = rec["ci95"]
            lines.append(
                f"  {rec['claim']}: {100 * rec['difference']:+.0f} pt [{100 * lo:+.0f}, {100 * hi:+.0f}], "
                f"+{rec['discordant'][1]}/-{rec['discordant'][0]} prompts, margin ±{100 * rec['margin']:.0f} pt "
                f"-> {rec['verdict']}"
                + (f" (about {rec['prompts_needed']} prompts would decide it)" if rec["prompts_needed"] else "")
            )
    return lines
